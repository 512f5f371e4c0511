"""The model scripts: visualize_kernels.py draws heat maps; benchmark_memory_efficient.py measures a saving."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("single_thread")


def test_visualize_kernels_draws_one_row_per_layer(tmp_path, monkeypatch, capsys):
    picture = Image.new("RGB", (96, 80))
    picture.paste((250, 240, 230), (0, 0, 48, 80))  # two halves: kernels should tell them apart
    picture.paste((20, 60, 30), (48, 0, 96, 80))
    picture.save(tmp_path / "input.png")
    out = tmp_path / "kernels.png"
    argv = ["visualize_kernels.py", "--image", str(tmp_path / "input.png"), "--out", str(out), "--size", "64",
            "--layers", "stem.1", "layer2.0.conv2", "--groups", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    load_script("visualize_kernels").main()
    assert str(out) in capsys.readouterr().out
    sheet = Image.open(out)
    label, panel = 16, 128  # 64 px drawn 2x: panels of at least 128 px
    assert sheet.size == (3 * panel, label + 2 * (panel + label))
    image_tile = sheet.crop((0, 2 * label, panel, 2 * label + panel))
    heat_tile = sheet.crop((panel, 2 * label, 2 * panel, 2 * label + panel))
    assert image_tile.tobytes() != heat_tile.tobytes()

    monkeypatch.setattr(sys, "argv", argv[:-5] + ["--layers", "layer1.0.conv1"])
    with pytest.raises(SystemExit, match="not involution layers"):
        load_script("visualize_kernels").main()


def test_memory_benchmark_measures_a_saving():
    benchmark = load_script("benchmark_memory_efficient")
    plain = benchmark.measure("rednet26", batch=2, size=64, memory_efficient=False)
    efficient = benchmark.measure("rednet26", batch=2, size=64, memory_efficient=True)
    # The 9 involutions' kernels, (N, G, K², H, W) float32: at least this much less is kept for backward.
    kernel_bytes = (
        2 * 4 * (2 * 9 * 32 * 32 + 4 * 49 * 16 * 16 + 8 * 49 * 8 * 8 * 2 + 16 * 49 * 4 * 4 * 4 + 32 * 49 * 2 * 2)
    )
    assert plain["saved_bytes"] - efficient["saved_bytes"] >= kernel_bytes * 0.9


@pytest.fixture(params=["checkpoint", "converted"])
def trained_checkpoint(request, tmp_path):
    """A train.py-style checkpoint of a 3-class RedNet-26 trained at 36 px (its weights_metadata entries), or its
    convert_checkpoint.py weights file (tensors only) whose settings travel in the sidecar JSON."""
    import torch

    import rednet
    from rednet import checkpoint

    data = {"img_size": 36, "crop_pct": 1.0, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.2] * 3}
    config = {"model": {"name": "rednet26", "drop_rate": 0.1}, "data": data}
    state = {"model": rednet.create_model("rednet26", num_classes=3).state_dict(), "epoch": 1}
    torch.save({**state, **checkpoint.weights_metadata(config, ["a", "b", "c"])}, tmp_path / "best.pt")
    if request.param == "converted":
        return load_script("convert_checkpoint").convert(str(tmp_path / "best.pt"), str(tmp_path / "out" / "mine"))
    return tmp_path / "best.pt"


def test_visualize_kernels_takes_architecture_and_size_from_the_checkpoint(trained_checkpoint, tmp_path, monkeypatch):
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "input.png")
    out = tmp_path / "kernels.png"
    argv = ["visualize_kernels.py", "--image", str(tmp_path / "input.png"), "--out", str(out), "--checkpoint",
            str(trained_checkpoint), "--layers", "stem.1", "--groups", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    load_script("visualize_kernels").main()
    assert Image.open(out).height == 16 + 4 * 36 + 16  # 36 px (the checkpoint's, not 224), drawn 4x


def test_visualize_kernels_labels_fit_on_small_inputs():
    """A model trained at 32 px gave 32 px panels and a 64 px wide sheet: the title and row labels were cut off."""
    script = load_script("visualize_kernels")
    title = "rednet26 involution kernels, outputs/train/2026-01-01/12-00-00/checkpoints/best.pt"
    sheet = script.render(Image.new("RGB", (32, 32), (90, 90, 90)), {"stem.1": torch.rand(2, 32, 32)}, 1, title)
    assert sheet.height == 16 + 128 + 16  # 32 px drawn 4x
    for top in (0, 16):  # the title and the row label end inside the sheet: their rows' right margin is blank
        margin = sheet.crop((sheet.width - 4, top, sheet.width, top + 16))
        assert margin.getcolors() == [(4 * 16, (255, 255, 255))]


def test_export_onnx_takes_architecture_classes_and_size_from_the_checkpoint(trained_checkpoint, tmp_path, monkeypatch):
    script = load_script("export_onnx")
    exported = {}

    def record(model, out, size, *args, **kwargs):  # the export itself is tested in test_export.py (and slow)
        exported.update(arch=model.pretrained_cfg["architecture"], classes=model.num_classes, size=size)
        Path(out).write_bytes(b"")
        return Path(out)

    monkeypatch.setattr(script, "export_onnx", record)
    script.main(["--weights", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"), "--no-check"])
    assert exported == {"arch": "rednet26", "classes": 3, "size": (3, 36, 36)}  # not rednet50, 1000, 224
    script.main(["--weights", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"), "--no-check",
                 "--img-size", "64"])  # fmt: skip
    assert exported["size"] == (3, 64, 64)


def test_compare_models_times_variants_in_one_process(monkeypatch, capsys):
    compare = load_script("compare_models")
    argv = ["compare_models.py", "resnet26", "rednet26@torch", "rednet26@ideal", "--batch-size", "2",
            "--img-size", "32", "--rounds", "1", "--warmup", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| r")]
    assert [row[1].strip() for row in rows] == ["resnet26", "rednet26@torch", "rednet26@ideal"]
    assert rows[0][4].strip() == rows[0][5].strip() == "1.00x"  # the first model is the baseline
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


def test_compare_models_ideal_variant_replaces_only_the_operator():
    """The bound keeps the kernel generator (its parameters get gradients) but not the operator's values."""
    compare = load_script("compare_models")
    real, ideal = compare.build("rednet26", False).model, compare.build("rednet26@ideal", False).model
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(real(x), ideal(x))
    ideal(x).sum().backward()
    generator = ideal.stem[1]  # the stem's Involution: its kernel generator
    assert all(p.grad is not None for p in generator.parameters())


def test_compare_models_shared_variant_drops_every_involution_module():
    """The looser bound runs neither kernel generator nor operator, and keeps every shape (stride-2 blocks too)."""
    compare = load_script("compare_models")
    shared = compare.build("rednet26@shared", False).model
    x = torch.randn(2, 3, 64, 64)
    assert shared(x).shape == (2, 1000)
    assert shared.forward_features(x).shape == compare.build("rednet26", False).model.forward_features(x).shape
    shared(x).sum().backward()
    generator = shared.layer2[0].conv2  # a stride-2 block's Involution
    assert all(p.grad is None for p in generator.parameters())
    assert shared.layer2[0].conv1.weight.grad is not None  # the 1x1 convs still train


@pytest.mark.parametrize(
    "spec,message",
    [
        ("resnet26@torch", "only RedNets take @VARIANT"),
        ("rednet26@nonsense", "@nonsense is not one of auto, .*ideal, shared or a path to a .cpp kernel source"),
        ("rednet26@", "@ is not one of"),
        ("rednet27", "no timm model 'rednet27' \\(RedNets: rednet26"),
    ],
)
def test_compare_models_refuses_a_bad_spec_before_timing(spec, message):
    with pytest.raises(SystemExit, match=message):
        load_script("compare_models").build(spec, False)
