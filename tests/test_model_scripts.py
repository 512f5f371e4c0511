"""The model scripts: visualize_kernels.py draws heat maps; benchmark_memory_efficient.py measures a saving."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
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
    label = 16
    assert sheet.size == (3 * 64, label + 2 * (64 + label))
    image_tile = sheet.crop((0, 2 * label, 64, 2 * label + 64))
    heat_tile = sheet.crop((64, 2 * label, 128, 2 * label + 64))
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
