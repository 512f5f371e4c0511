"""Pretrained weights: official-layout checkpoints served from a loopback HTTP server, hashes, cache, conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import rednet
from rednet import weights
from rednet.models.rednet import checkpoint_filter_fn, model_kwargs_from_state_dict

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def isolated_cache(weights_cache):
    return weights_cache


def random_model(name: str = "rednet26", **kwargs) -> torch.nn.Module:
    """A model whose every tensor (BN statistics included) differs from a fresh model's."""
    torch.manual_seed(123)
    model = rednet.create_model(name, **kwargs)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.1)
            else:
                tensor.fill_(7)
    return model


def official_layout(model: torch.nn.Module) -> dict:
    """The checkpoint layout of the official mmcls release: backbone./head. prefixes, a meta entry."""
    state_dict = {("head." if key.startswith("fc.") else "backbone.") + key: value
                  for key, value in model.state_dict().items()}  # fmt: skip
    return {"meta": {"epoch": 130, "mmcls_version": "0.8.0"}, "state_dict": state_dict}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        if key not in skip:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def source():
    """rednet26 with random weights and its official-layout checkpoint (made once: the file is 37 MB)."""
    model = random_model()
    return model, official_layout(model)


def test_pretrained_true_downloads_registered_url_checks_sha256_and_loads_cached_without_network(
    source, server, isolated_cache
):
    reference, checkpoint = source
    root, base_url, stop = server
    torch.save(checkpoint, root / "rednet26_official.pth")
    digest = sha256(root / "rednet26_official.pth")
    weights.register_weights("rednet26", url=f"{base_url}/rednet26_official.pth", sha256=digest)

    model = timm.create_model("rednet26", pretrained=True)
    assert_same_weights(model, reference)
    cached = isolated_cache / "rednet26_official.pth"
    assert sha256(cached) == digest

    stop()  # no network from here on: the cached file must serve
    assert_same_weights(rednet.create_model("rednet26", pretrained=True), reference)


def test_bad_hash_deletes_download_and_names_both_hashes(source, server, isolated_cache):
    _, checkpoint = source
    root, base_url, _ = server
    torch.save(checkpoint, root / "rednet26.pth")
    actual = sha256(root / "rednet26.pth")
    wrong = "0" * 64
    weights.register_weights("rednet26", url=f"{base_url}/rednet26.pth", sha256=wrong)
    with pytest.raises(RuntimeError) as error:
        rednet.create_model("rednet26", pretrained=True)
    assert wrong in str(error.value) and actual in str(error.value)
    assert list(isolated_cache.iterdir()) == []


def test_hash_prefix_in_file_name_is_checked(source, server, isolated_cache):
    _, checkpoint = source
    root, base_url, _ = server
    torch.save(checkpoint, root / "rednet26-deadbeef.pth")
    with pytest.raises(RuntimeError, match="expected deadbeef"):
        rednet.create_model("rednet26", pretrained=f"{base_url}/rednet26-deadbeef.pth")
    assert not (isolated_cache / "rednet26-deadbeef.pth").exists()


def test_failed_download_names_url_and_where_to_put_the_file(isolated_cache):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/rednet26-abcdef12.pth"
    weights.register_weights("rednet26", url=url)
    with pytest.raises(RuntimeError) as error:
        rednet.create_model("rednet26", pretrained=True)
    message = str(error.value)
    assert url in message and str(isolated_cache / "rednet26-abcdef12.pth") in message


def test_no_registered_url_points_at_the_cache_file_and_loads_one_placed_by_hand(source, isolated_cache):
    reference, checkpoint = source
    weights.register_weights("rednet26", url="", file_name="rednet26.pth")  # rednet26 has PaddleClas's URL by default
    with pytest.raises(RuntimeError, match="no download URL is registered for rednet26") as error:
        rednet.create_model("rednet26", pretrained=True)
    assert str(isolated_cache / "rednet26.pth") in str(error.value)
    isolated_cache.mkdir(parents=True)
    torch.save(checkpoint, isolated_cache / "rednet26.pth")
    assert_same_weights(timm.create_model("rednet26", pretrained=True), reference)


def test_local_path_file_url_and_timm_overlay(source, tmp_path):
    reference, checkpoint = source
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    assert_same_weights(rednet.create_model("rednet26", pretrained=str(path)), reference)
    assert_same_weights(rednet.create_model("rednet26", pretrained=path.as_uri()), reference)
    overlay = dict(file=str(path))
    assert_same_weights(timm.create_model("rednet26", pretrained=True, pretrained_cfg_overlay=overlay), reference)


def test_num_classes_mismatch_drops_classifier_with_warning(source, tmp_path):
    reference, checkpoint = source
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    with pytest.warns(UserWarning, match="1000 classes, the model 10"):
        model = rednet.create_model("rednet26", pretrained=str(path), num_classes=10)
    assert model.fc.weight.shape == (10, 2048)
    assert_same_weights(model, reference, skip=("fc.weight", "fc.bias"))


def test_a_classifier_of_another_input_width_is_an_error_not_dropped():
    """Only another class count drops the classifier (with a warning); another width is another architecture."""
    model = rednet.create_model("rednet26", num_classes=10)
    state_dict = dict(model.state_dict(), **{"fc.weight": torch.randn(10, 999)})
    with pytest.raises(RuntimeError, match=r"fc.weight \(10, 999\) vs \(10, 2048\)"):
        weights.load_state_dict(model, state_dict)


def test_unexpected_and_missing_keys_are_errors_that_list_them(source):
    reference, checkpoint = source
    state_dict = dict(checkpoint["state_dict"], **{"backbone.extra.weight": torch.zeros(1)})
    del state_dict["backbone.layer2.1.bn2.running_var"]
    model = rednet.create_model("rednet26")
    with pytest.raises(RuntimeError, match="extra.weight") as error:
        weights.load_state_dict(model, weights.to_state_dict({"state_dict": state_dict}))
    assert "layer2.1.bn2.running_var" in str(error.value)


def test_checkpoint_filter_maps_the_mmcls_layout_and_refuses_another_stem_kernel_size(source):
    reference, checkpoint = source
    mmcls = checkpoint["state_dict"]
    assert "backbone.stem.0.conv.weight" in mmcls and "head.fc.weight" in mmcls
    filtered = checkpoint_filter_fn(mmcls, rednet.create_model("rednet26"))
    assert sorted(filtered) == sorted(reference.state_dict())
    torch.testing.assert_close(filtered, reference.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="create the model with stem_kernel_size=3"):
        checkpoint_filter_fn(mmcls, rednet.create_model("rednet26", stem_kernel_size=7))
    with pytest.raises(RuntimeError, match=r"missing keys .*\(a checkpoint of another RedNet depth"):
        checkpoint_filter_fn(mmcls, rednet.create_model("rednet38"))


@pytest.mark.parametrize("via", ["file", "state_dict"])
def test_timm_create_model_loads_a_converted_checkpoint_exactly(via, source, tmp_path):
    reference, checkpoint = source
    path = tmp_path / "rednet26.pth"
    torch.save(reference.state_dict(), path)
    location = str(path) if via == "file" else torch.load(path, weights_only=True)
    model = timm.create_model("rednet26", pretrained=True, pretrained_cfg_overlay={via: location})
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept in the config


def test_stem_kernel_size_7_is_detected(tmp_path):
    reference = random_model(stem_kernel_size=7)
    path = tmp_path / "detection_backbone.pth"
    torch.save(official_layout(reference), path)
    assert model_kwargs_from_state_dict(weights.to_state_dict(torch.load(path)))["stem_kernel_size"] == 7
    model = rednet.create_model("rednet26", pretrained=str(path))
    assert model.stem_kernel_size == 7
    assert_same_weights(model, reference)
    with pytest.raises(ValueError, match="stem_kernel_size=7"):
        weights.load_weights(rednet.create_model("rednet26"), path)


def test_training_checkpoint_prefers_ema_and_strips_ddp_and_compile_prefixes(source, tmp_path):
    reference, _ = source
    plain = reference.state_dict()
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in plain.items()}
    checkpoint = {
        "model": {f"module._orig_mod.{key}": value for key, value in plain.items()},
        "model_ema": {f"_orig_mod.{key}": value for key, value in ema.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
    }
    path = tmp_path / "last.pt"
    torch.save(checkpoint, path)
    model = weights.load_weights(rednet.create_model("rednet26"), path)
    torch.testing.assert_close(model.fc.bias, ema["fc.bias"])
    model = weights.load_weights(rednet.create_model("rednet26"), path, use_ema=False)
    assert_same_weights(model, reference)
    assert_same_weights(rednet.create_model("rednet26", pretrained=str(path), use_ema=False), reference)


@pytest.mark.parametrize(
    "layout, logged",
    [
        ({"module.fc.weight": 1}, "removed the prefix 'module.' (DistributedDataParallel / DataParallel) from 1 of 1"),
        ({"_orig_mod.fc.weight": 1}, "removed the prefix '_orig_mod.' (torch.compile) from 1 of 1 keys"),
        ({"module._orig_mod.fc.weight": 1}, "prefix 'module._orig_mod.' (DistributedDataParallel / DataParallel + "),
        ({"state_dict_ema": {"fc.weight": 1}}, "the checkpoint holds only EMA weights: loading its 'state_dict_ema'"),
        ({"model_ema": {"module.fc.weight": 1, "module.n_averaged": 1}}, "holds only EMA weights: loading its 'model_"),
        ({"model": {"fc.weight": 1}, "model_ema": {"fc.weight": 1}}, "loading the EMA weights of the checkpoint: its"),
        ({"state_dict": {"backbone.fc.weight": 1}}, "mmcls / mmpretrain layout: removed the prefixes 'backbone.' and"),
    ],
)
def test_loading_logs_each_prefix_removed_and_the_entry_taken(layout, logged, caplog):
    """A key rename or a choice among the file's weights is never silent (one INFO line each)."""

    def tensors(value):
        return {k: tensors(v) for k, v in value.items()} if isinstance(value, dict) else torch.ones(1) * value

    with caplog.at_level("INFO", logger="rednet.weights"):
        assert list(weights.to_state_dict(tensors(layout))) == ["fc.weight"]
    assert logged in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="rednet.weights"):
        weights.to_state_dict({"fc.weight": torch.ones(1)})
    assert caplog.text == ""  # a plain state dict: nothing to say


def test_a_checkpoint_without_class_names_logs_that_the_folder_gives_the_order(caplog):
    from rednet import factory

    state_dict = timm.create_model("test_resnet", num_classes=3).state_dict()
    with caplog.at_level("INFO", logger="rednet.factory"):
        factory.model_from_checkpoint(state_dict, "plain.pth", "test_resnet", 3, classes=["cat", "dog", "fox"])
    assert "checkpoint 'plain.pth' does not name its classes: output i is taken as the i-th val class folder in " \
        "sorted order (cat, dog, fox)" in caplog.text  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO", logger="rednet.factory"):
        named = {"model": state_dict, "classes": ["cat", "dog", "fox"]}
        factory.model_from_checkpoint(named, "named.pth", "test_resnet", 3, classes=["cat", "dog", "fox"])
    assert "does not name its classes" not in caplog.text


def test_only_mmcls_checkpoints_lose_backbone_and_head_prefixes():
    tensor = torch.zeros(1)
    mmcls = {"state_dict": {"backbone.stem.0.conv.weight": tensor, "head.fc.weight": tensor}, "meta": {}}
    assert set(weights.to_state_dict(mmcls)) == {"stem.0.conv.weight", "fc.weight"}
    convnext = {"model": {"module.stem.0.weight": tensor, "head.fc.weight": tensor, "head.norm.weight": tensor}}
    assert set(weights.to_state_dict(convnext)) == {"stem.0.weight", "head.fc.weight", "head.norm.weight"}


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext"])  # classifier "fc", and "head.fc" under head.*
def test_fine_tuning_a_timm_model_loads_the_checkpoint_path(arch, tmp_path):
    from rednet import factory

    torch.manual_seed(0)
    source = timm.create_model(arch, num_classes=5)
    torch.save({"model": source.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    same = factory.build_model(arch, 5, pretrained=str(tmp_path / "last.pt"))
    assert_same_weights(same, source)
    with pytest.warns(UserWarning, match="5 classes, the model 3"):  # a fresh 3-class classifier
        fine_tuned = factory.build_model(arch, 3, pretrained=str(tmp_path / "last.pt"))
    classifier = fine_tuned.pretrained_cfg["classifier"]
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith(classifier)}
    for key, value in kept.items():
        torch.testing.assert_close(fine_tuned.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert fine_tuned.get_classifier().out_features == 3


def test_safetensors_and_bad_local_sha256(source, tmp_path):
    reference, _ = source
    path = tmp_path / "weights.safetensors"
    save_file(reference.state_dict(), str(path))
    assert_same_weights(weights.load_weights(rednet.create_model("rednet26"), path, sha256=sha256(path)), reference)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        weights.load_weights(rednet.create_model("rednet26"), path, sha256="1" * 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load_weights(rednet.create_model("rednet26"), tmp_path / "missing.pth")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_convert_checkpoint_script(fmt, source, server, tmp_path):
    reference, _ = source
    plain = reference.state_dict()
    ema = {key: value * 2 if value.is_floating_point() else value for key, value in plain.items()}
    training = {"model": plain, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9}
    root, base_url, _ = server
    torch.save(training, tmp_path / "last.pt")
    if fmt == "safetensors":  # the command line once; the other format in-process, to save an interpreter start
        command = [sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"), str(tmp_path / "last.pt"),
                   str(root / "rednet26.pth"), "--safetensors"]  # fmt: skip
        printed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    else:
        printed = str(load_script("convert_checkpoint").convert(str(tmp_path / "last.pt"), str(root / "rednet26")))
    (written,) = root.iterdir()
    digest = sha256(written)
    assert written.name == f"rednet26-{digest[:8]}.{fmt}"
    assert str(written) in printed
    # The published file is clean (EMA weights only, plain key names) and loads through a URL with its hash check.
    contents = weights.read_checkpoint(written)
    assert sorted(contents) == sorted(plain)
    model = rednet.create_model("rednet26", pretrained=f"{base_url}/{written.name}")
    torch.testing.assert_close(model.state_dict(), ema, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_convert_checkpoint_gives_the_same_bytes_and_name_for_the_same_tensors(fmt, tmp_path):
    """Publishing is reproducible: every layout of the same tensors, any file name, converted any number of times,
    gives one file (torch.save once named its zip folder after a random temporary file)."""
    torch.manual_seed(0)
    plain = {"stem.0.conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(5), "bn.num_batches_tracked":
             torch.tensor(7), "fc.weight": torch.randn(5, 4)}  # fmt: skip
    inputs = {
        "plain.pth": plain,
        "ddp.pt": {f"module.{key}": value for key, value in plain.items()},
        "compiled.pth": {f"_orig_mod.{key}": value for key, value in plain.items()},
        "ema_only.pt": {"model_ema": {f"module.{key}": value for key, value in plain.items()}, "epoch": 3},
        "reversed.pth": dict(reversed(plain.items())),
    }
    for file_name, contents in inputs.items():
        torch.save(contents, tmp_path / file_name)
    save_file(plain, str(tmp_path / "plain.safetensors"))
    convert = load_script("convert_checkpoint").convert
    written = [
        convert(str(tmp_path / file_name), str(tmp_path / f"out{i}" / "rednet26"), safetensors=fmt == "safetensors")
        for i, file_name in enumerate([*inputs, "plain.safetensors", "plain.pth"])
    ]
    assert {path.name for path in written} == {f"rednet26-{sha256(written[0])[:8]}.{fmt}"}
    assert {path.read_bytes() for path in written} == {written[0].read_bytes()}
    assert sorted(weights.read_checkpoint(written[0])) == sorted(plain)
    if fmt == "pth":  # the zip's inner folder is torch's name for an in-memory save, not a temporary file's
        assert {name.split("/")[0] for name in zipfile.ZipFile(written[0]).namelist()} == {"archive"}
    assert [path.name for path in written[0].parent.iterdir()] == [written[0].name]  # no temporary left behind
    # Settings travel beside the file, not in it: the same name and bytes, and a sidecar that converting the
    # converted file again (its sidecar read with it) writes unchanged.
    settings = {"arch": "rednet26", "classes": ["a", "b", "c", "d", "e"], "pretrained_cfg": {"input_size": (3, 32, 32)}}
    torch.save({"model": plain, "epoch": 3, **settings}, tmp_path / "best.pt")
    as_safetensors = fmt == "safetensors"
    again = convert(str(tmp_path / "best.pt"), str(tmp_path / "settings" / "rednet26"), safetensors=as_safetensors)
    assert (again.name, again.read_bytes()) == (written[0].name, written[0].read_bytes())
    sidecar = weights.sidecar_path(again).read_text()
    assert json.loads(sidecar) == {"architecture": "rednet26", "label_names": list("abcde"),
                                   "pretrained_cfg": {"input_size": [3, 32, 32]}}  # fmt: skip
    twice = convert(str(again), str(tmp_path / "twice" / "rednet26"), safetensors=as_safetensors)
    assert (twice.read_bytes(), weights.sidecar_path(twice).read_text()) == (again.read_bytes(), sidecar)


def test_features_only_in_chans_and_num_classes_from_the_checkpoint(source, tmp_path):
    reference, checkpoint = source
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    backbone = timm.create_model("rednet26", pretrained=str(path), features_only=True, out_indices=(4,))
    torch.testing.assert_close(backbone.layer4[0].conv3.weight, reference.layer4[0].conv3.weight, rtol=0, atol=0)
    gray = rednet.create_model("rednet26", pretrained=str(path), in_chans=1)
    stem = reference.stem[0].conv.weight
    torch.testing.assert_close(gray.stem[0].conv.weight, stem.sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    # A fine-tuned checkpoint builds a model of its own class count unless num_classes is given.
    small = dict(reference.state_dict(), **{"fc.weight": torch.ones(10, 2048), "fc.bias": torch.zeros(10)})
    torch.save(small, tmp_path / "finetuned.pth")
    model = rednet.create_model("rednet26", pretrained=str(tmp_path / "finetuned.pth"))
    assert model.num_classes == 10 and torch.equal(model.fc.weight, torch.ones(10, 2048))


# --- checkpoints of other tools, read with weights_only (issue 9, item 6) ------------------------------------------


class _Evil:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _fake_class(module: str, name: str, **attributes):
    """A class pickled under another tool's name (mmengine, ...) without that tool installed; call
    `_forget_modules` after saving."""
    import types

    cls = type(name, (), {"__module__": module, "__init__": lambda self: self.__dict__.update(attributes)})
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, cls)
    return cls


def _forget_modules(prefix: str) -> None:
    for name in [name for name in sys.modules if name == prefix or name.startswith(prefix + ".")]:
        del sys.modules[name]


def _layout(tool: str, state_dict: dict, tmp_path: Path) -> Path:
    """A checkpoint of `tool`'s layout holding `state_dict` (3-class test_resnet), as that tool writes it."""
    import argparse

    import numpy as np

    path = tmp_path / f"{tool}.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    if tool == "timm":  # timm's own CheckpointSaver, with an args Namespace (timm train.py's) and an EMA
        from timm.utils import CheckpointSaver

        model = timm.create_model("test_resnet", num_classes=3)
        model.load_state_dict(state_dict)
        args = argparse.Namespace(model="test_resnet", img_size=40, input_size=None, crop_pct=None, mean=None,
                                  std=None, interpolation="", num_classes=3, in_chans=None)  # fmt: skip
        saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, model_ema=model,
                                checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))  # fmt: skip
        saver.save_checkpoint(epoch=0, metric=50.0)
        return tmp_path / "last.pth.tar"
    if tool == "torchvision":  # references/classification/train.py: args Namespace, EMA as an AveragedModel
        args = argparse.Namespace(model="test_resnet", val_resize_size=44, val_crop_size=40, interpolation="bicubic")
        ema = {"n_averaged": torch.tensor(5), **{f"module.{k}": v for k, v in state_dict.items()}}
        ckpt = {"model": state_dict, "model_ema": ema, "optimizer": optimizer, "lr_scheduler": {"last_epoch": 1},
                "epoch": 1, "args": args}  # fmt: skip
    elif tool == "mmcls":  # mmcv 1.x save_checkpoint: meta with versions, CLASSES, the config text, numpy scores
        meta = {"mmcv_version": "1.3.0", "time": "Mon Jan  4 10:00:00 2021", "CLASSES": ["cat", "dog", "fox"],
                "config": "model = dict(type='ImageClassifier')", "epoch": 100, "iter": 5000,
                "hook_msgs": {"best_score": np.float64(75.9), "last_ckpt": "/work/epoch_100.pth"},
                "env_info": "sys.platform: linux", "seed": np.int64(0), "shape": np.array([1, 2])}  # fmt: skip
        sd = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in state_dict.items()}
        ckpt = {"meta": meta, "state_dict": sd, "optimizer": optimizer}
    elif tool == "mmpretrain":  # mmengine: dataset_meta, and message_hub's log buffers (a class of mmengine's)
        buffer = _fake_class("mmengine.logging.history_buffer", "HistoryBuffer", max_length=10,
                             _log_history=np.arange(3.0), _count_history=np.ones(3))  # fmt: skip
        meta = {"epoch": 100, "iter": 5000, "cfg": "model = dict()", "mmengine_version": "0.10.0",
                "dataset_meta": {"classes": ("cat", "dog", "fox")}, "seed": 0}  # fmt: skip
        sd = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in state_dict.items()}
        hub = {"log_scalars": {"train/loss": buffer()}, "runtime_info": {"epoch": 100}, "resumed_keys": {}}
        ckpt = {"meta": meta, "state_dict": sd, "message_hub": hub, "optimizer": optimizer, "param_schedulers": []}
    elif tool == "lightning":  # LightningModule holding the network as self.model
        callbacks = {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
            "best_model_score": torch.tensor(0.9), "best_model_path": "/x.ckpt", "dirpath": "/ckpts",
            "best_k_models": {"/x.ckpt": torch.tensor(0.9)}}}  # fmt: skip
        loops = {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 3}}}}
        ckpt = {"epoch": 2, "global_step": 60, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state_dict.items()}, "loops": loops,
                "callbacks": callbacks, "optimizer_states": [optimizer], "lr_schedulers": [{"last_epoch": 2}],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "model_name": "test_resnet"}}  # fmt: skip
    torch.save(ckpt, path)
    _forget_modules("mmengine")  # the reader has no mmengine either
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    from train_utils import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"), n_train=1, n_val=2, size=40)


@pytest.mark.parametrize("tool", ["timm", "torchvision", "mmcls", "mmpretrain", "lightning"])
def test_ecosystem_checkpoints_load_through_every_entry_point(tool, image_root, tmp_path):
    from train_utils import compose_config

    import eval as eval_script
    from rednet import factory

    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=3)
    path = _layout(tool, reference.state_dict(), tmp_path)
    if tool != "lightning":  # (Lightning's plain dicts load; its model. prefix was the problem)
        with pytest.raises(Exception, match="Unsupported global"):  # what plain torch.load does with these files
            torch.load(path, weights_only=True)

    # pretrained= (train.py's fine-tuning builds the model this way) and the published-file converter
    assert_same_weights(factory.build_model("test_resnet", 3, pretrained=str(path)), reference)
    converted = load_script("convert_checkpoint").convert(str(path), str(tmp_path / "out" / "clean"))
    torch.testing.assert_close(torch.load(converted, weights_only=True), reference.state_dict(), rtol=0, atol=0)
    if tool in ("timm", "torchvision"):  # what their training arguments say travels in the sidecar
        sidecar = json.loads(weights.sidecar_path(converted).read_text())
        assert (sidecar["architecture"], sidecar["pretrained_cfg"]["input_size"]) == ("test_resnet", [3, 40, 40])
        assert factory.build_model("test_resnet", 3, pretrained=str(converted)).pretrained_cfg["input_size"] == (
            3, 40, 40,
        )  # fmt: skip

    # eval.py checkpoint= (model= only where the file does not name its architecture) gives the reference's numbers
    named = tool in ("timm", "torchvision")
    base = [f"data.root={image_root}", "data.num_workers=0", "trainer.device=cpu", "trainer.progress_bar=false"]
    base += [] if named else ["model.name=test_resnet"]
    got = eval_script.evaluate_checkpoint(compose_config("eval", [*base, f"checkpoint={path}"]), tmp_path / "e")
    torch.save(reference.state_dict(), tmp_path / "plain.pth")
    # What the training arguments say: timm's img_size; torchvision's crop 40 of a 44-px resize, bicubic.
    size = {"timm": ["data.img_size=40"], "torchvision": ["data.img_size=40", f"data.crop_pct={40 / 44}",
                                                          "data.interpolation=bicubic"]}.get(tool, [])  # fmt: skip
    base += [] if not named else ["model.name=test_resnet"]
    expected = eval_script.evaluate_checkpoint(
        compose_config("eval", [*base, *size, f"checkpoint={tmp_path / 'plain.pth'}"]), tmp_path / "r"
    )
    assert (got["top1"], got["loss"]) == (expected["top1"], expected["loss"]) and got["count"] == 6
    if named:  # the training arguments' preprocessing travelled: 40 px (timm img_size, torchvision val_crop_size)
        assert got["preprocessing"]["img_size"] == 40


def test_a_hostile_pickle_is_refused_by_name_and_never_runs(tmp_path, image_root):
    from train_utils import compose_config

    import eval as eval_script
    from rednet import checkpoint, factory, run_state

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(3)}, "meta": {"x": _Evil(marker)}}, path)
    calls = {
        "eval.py checkpoint=": lambda: eval_script.evaluate_checkpoint(
            compose_config("eval", [f"checkpoint={path}", f"data.root={image_root}", "model.name=test_resnet"]),
            tmp_path / "e",
        ),
        "pretrained=": lambda: factory.build_model("test_resnet", 3, pretrained=str(path)),
        "convert_checkpoint.py": lambda: load_script("convert_checkpoint").convert(str(path), str(tmp_path / "o")),
        "resume": lambda: run_state.load_checkpoint(path),
    }
    for name, call in calls.items():
        with pytest.raises(checkpoint.CheckpointError, match=r"posix.system: rednet .* will not unpickle") as error:
            call()
        assert "weights_only=False" in str(error.value), name  # how to convert a file one trusts
        assert not marker.exists(), name


def test_a_mean_of_the_wrong_length_names_the_counts_once_and_the_fix():
    with pytest.raises(ValueError) as error:
        weights._per_channel("mean", [0.5, 0.5, 0.5], 1, given=True)
    assert str(error.value) == (
        "data.mean=[0.5, 0.5, 0.5] has 3 values but the model takes 1-channel images: give 1 value, or leave "
        "data.mean null for the weights' values"
    )
    with pytest.raises(ValueError, match=r"data.std=\[0.2, 0.3\] has 2 values .* give 3 values \(one per channel\)"):
        weights._per_channel("std", [0.2, 0.3], 3, given=True)
    with pytest.raises(ValueError) as error:  # the weights' values are the problem: null would not help
        weights._per_channel("std", [0.2, 0.3], 3, given=False)
    assert str(error.value).endswith("takes 3-channel images: set data.std to 3 values (one per channel) or 1 (for "
                                     "every channel)")  # fmt: skip


def test_describe_preprocessing_names_the_first_source_that_holds_each_value():
    resolved = {"img_size": 40, "crop_pct": 0.9, "mean": [0.5, 0.5, 0.5]}
    sources = [("config", {"img_size": 40}), ("the checkpoint", {"img_size": 36, "crop_pct": 0.9})]
    assert weights.describe_preprocessing(resolved, sources) == (
        "img_size=40 (config), crop_pct=0.9 (the checkpoint), mean=[0.5, 0.5, 0.5] (timm's default)"
    )


# --- more layouts and files (issue 9 items 4 and 6, second round) ------------------------------------------------


def _prefixed(prefix: str, state_dict: dict) -> dict:
    return {prefix + key: value for key, value in state_dict.items()}


def _more_layouts(state_dict: dict) -> dict:
    """Checkpoints as other tools write them (each holds `state_dict`'s weights), by name."""
    import collections
    import datetime
    import pathlib
    import types

    import numpy as np
    from omegaconf import OmegaConf

    averaged = {"n_averaged": torch.tensor(4), **_prefixed("module.", state_dict)}  # AveragedModel (EMA-v3, tv)
    mmcls = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in state_dict.items()}
    lightning = {"pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1}, "callbacks": {}}
    return {
        "ddp": _prefixed("module.", state_dict),
        "compile": _prefixed("_orig_mod.", state_dict),
        "compile_of_ddp": _prefixed("_orig_mod.module.", state_dict),
        "timm_only_ema": {"state_dict_ema": state_dict, "epoch": 3},
        "torchvision_only_ema": {"model_ema": averaged, "epoch": 3},
        "timm_averaged_ema": {"state_dict": {k: v * 0 for k, v in state_dict.items()}, "state_dict_ema": averaged},
        "lightning_compiled": {**lightning, "state_dict": _prefixed("model._orig_mod.", state_dict)},
        "lightning_with_loss_weights": {
            **lightning,
            "state_dict": {**_prefixed("model.", state_dict), "criterion.weight": torch.ones(3)},
        },  # fmt: skip
        "lightning_with_ema": {
            **lightning,
            "state_dict": {
                **_prefixed("model.", {k: v * 0 for k, v in state_dict.items()}),
                **_prefixed("ema.module.", state_dict),
                "ema.n_averaged": torch.tensor(2),
            },
        },  # fmt: skip
        "mmpretrain_data_preprocessor": {
            "meta": {"seed": np.int64(1), "dataset_meta": {"classes": ("a", "b", "c")}},
            "state_dict": {
                **mmcls,
                "data_preprocessor.mean": torch.tensor([127.5, 127.5, 127.5]).view(-1, 1, 1),
                "data_preprocessor.std": torch.tensor([51.0, 51.0, 51.0]).view(-1, 1, 1),
            },
        },  # fmt: skip
        "metadata_types": {
            "state_dict": collections.OrderedDict(state_dict),
            "args": types.SimpleNamespace(output=pathlib.PurePosixPath("/runs/x")),
            "meta": {
                "work_dir": pathlib.PosixPath("/w"),
                "time": datetime.datetime(2021, 1, 4),
                "counts": collections.defaultdict(list, a=[1]),
                "name": np.str_("x"),
                "names": np.array(["a"]),
                "day": np.datetime64("2021-01-04"),
            },
            "hyper_parameters": OmegaConf.create({"model": {"name": "test_resnet"}, "sizes": [1, 2]}),
        },  # fmt: skip
    }


@pytest.mark.parametrize("layout", list(_more_layouts({})))
def test_more_layouts_load_through_pretrained_and_the_converter(layout, tmp_path):
    from rednet import factory

    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / f"{layout}.pth"
    torch.save(_more_layouts(reference.state_dict())[layout], path)
    assert_same_weights(factory.build_model("test_resnet", 3, pretrained=str(path)), reference)
    converted = load_script("convert_checkpoint").convert(str(path), str(tmp_path / "out" / "clean"))
    torch.testing.assert_close(torch.load(converted, weights_only=True), reference.state_dict(), rtol=0, atol=0)


def test_windows_paths_in_metadata_read_as_pure_paths(tmp_path, monkeypatch):
    import argparse
    import pathlib

    class WindowsPath(pathlib.PureWindowsPath):  # pickled as pathlib.WindowsPath, which Linux cannot build
        __module__, __qualname__ = "pathlib", "WindowsPath"

    monkeypatch.setattr(pathlib, "WindowsPath", WindowsPath)
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(output=WindowsPath("C:/out"))},
               tmp_path / "win.pth")  # fmt: skip
    monkeypatch.undo()
    loaded = weights.read_checkpoint(tmp_path / "win.pth")
    assert loaded["args"].output == pathlib.PureWindowsPath("C:/out")


def test_mmpretrain_data_preprocessor_gives_mean_and_std(tmp_path):
    from rednet.checkpoint import weights_settings

    layout = _more_layouts({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(3, 2)})[
        "mmpretrain_data_preprocessor"
    ]
    assert weights_settings(layout).pretrained_cfg == {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
    assert set(weights.to_state_dict(layout)) == {
        "conv1.weight",
        "fc.weight",
    }  # the preprocessor's buffers are not weights


def test_a_lightning_module_that_is_the_network_keeps_its_keys():
    tensors = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    assert weights.to_state_dict({"state_dict": tensors, "pytorch-lightning_version": "2.4.0"}) == tensors


def _save_gzip(path: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(b"x" * 100))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: p.write_text("<!DOCTYPE html><html>Sign in</html>"), "HTML/XML page, not weights"),
        (lambda p: __import__("zipfile").ZipFile(p, "w").writestr("a.txt", "x"), r"not a torch checkpoint .*a.txt"),
        (lambda p: p.write_bytes(_zip_bytes()[:3000]), "zip archive that is truncated or damaged"),
        (_save_gzip, "compressed file"),
        (lambda p: torch.save([torch.zeros(1)], p), "holds a list, not a dict of weights"),
        (lambda p: torch.save({"epoch": 1}, p), r"holds no weights: .*its keys: \['epoch'\]"),
        (lambda p: torch.save(timm.create_model("test_resnet"), p), r"whole pickled model \(torch.save\(model\)"),
    ],
    ids=["empty", "html", "foreign_zip", "truncated", "gzip", "list", "no_tensors", "whole_module"],
)
def test_files_that_are_not_checkpoints_are_named_with_the_fix(content, message, tmp_path):
    from rednet import checkpoint, factory

    path = tmp_path / "bad.pth"
    content(path)
    for name, call in {
        "pretrained=": lambda: factory.build_model("test_resnet", 3, pretrained=str(path)),
        "export": lambda: factory.model_from_weights(str(path), "test_resnet", "rednet50"),
        "convert_checkpoint.py": lambda: load_script("convert_checkpoint").convert(str(path), str(tmp_path / "o")),
    }.items():
        with pytest.raises(checkpoint.CheckpointError, match=message) as error:
            call()
        assert str(path) in str(error.value), name


def _zip_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buffer)
    return buffer.getvalue()


def test_weights_of_another_architecture_name_the_shapes(tmp_path):
    from rednet import checkpoint, factory

    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(checkpoint.CheckpointError, match=r"tensors have other shapes .*: bn1.weight \(64,\) vs"):
        factory.build_model("test_resnet", 3, pretrained=str(tmp_path / "resnet18.pth"))
    with pytest.raises(RuntimeError, match=r"does not match RedNet: .* unexpected keys \['conv1.weight'"):
        factory.build_model("rednet26", 3, pretrained=str(tmp_path / "resnet18.pth"))


def test_timm_checkpoint_args_name_the_architecture_for_a_model_check(tmp_path):
    import argparse

    from rednet import checkpoint

    ckpt = {"state_dict": {}, "arch": "resnet", "args": argparse.Namespace(model="test_resnet")}  # timm's arch
    with pytest.raises(checkpoint.CheckpointError, match="holds a test_resnet but the run builds rednet26"):
        checkpoint.check_arch(ckpt, "rednet26", "x.pth")


# --- downloads that go wrong (issues 3 and 11) ------------------------------------------------------------------


@pytest.fixture
def odd_server(tmp_path):
    """A loopback server whose paths misbehave: /truncated* (half the body, Content-Length of all), /page* (an HTML
    page with 200), /moved* (302 to /good.pth), /good.pth, else 404. Yields (base URL, the good file's bytes)."""
    import http.server
    import io
    import threading

    buffer = io.BytesIO()
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), buffer)
    good = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes = b"", length: int | None = None, **headers: str) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body) if length is None else length), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if name == "good.pth":
                self._send(200, good)
            elif name.startswith("truncated"):
                self._send(200, good[: len(good) // 2], length=len(good))
                self.close_connection = True
            elif name.startswith("page"):
                self._send(200, b"<!DOCTYPE html><html><body>Sign in</body></html>", **{"Content-Type": "text/html"})
            elif name.startswith("moved"):
                self._send(302, Location="/good.pth")
            else:
                self._send(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", good
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.pth", r"could not download .*missing.pth \(HTTPError: HTTP Error 404.*save it as .*missing.pth"),
        ("truncated.pth", r"download of .*truncated.pth is not a readable checkpoint and was deleted: .*truncated"),
        ("page.pth", r"download of .*page.pth is not a readable checkpoint and was deleted: .*HTML/XML page"),
    ],
)
def test_a_failed_download_names_the_url_and_caches_nothing(name, message, odd_server, isolated_cache):
    from rednet import factory

    base_url, _ = odd_server
    for _ in range(2):  # the second try downloads again: nothing corrupt was cached
        with pytest.raises(RuntimeError, match=message):
            factory.build_model("test_resnet", 3, pretrained=f"{base_url}/{name}")
        assert not isolated_cache.exists() or list(isolated_cache.iterdir()) == []


def test_a_redirect_is_followed_and_cached_under_the_requested_name(odd_server, isolated_cache):
    from rednet import factory

    base_url, good = odd_server
    factory.build_model("test_resnet", 3, pretrained=f"{base_url}/moved.pth")
    (cached,) = isolated_cache.iterdir()
    assert cached.name.startswith("moved-") and cached.read_bytes() == good


def test_a_partial_file_in_the_cache_names_itself_and_the_fix(odd_server, isolated_cache):
    from rednet import checkpoint, factory

    base_url, good = odd_server
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "good.pth").write_bytes(good[:5000])  # an earlier download cut short (by hand, wget, ...)
    with pytest.raises(checkpoint.CheckpointError, match=r"cached file .*good.pth .*truncated.*: delete it to down"):
        factory.build_model("test_resnet", 3, pretrained=f"{base_url}/good.pth")
    (isolated_cache / "good.pth").unlink()
    factory.build_model("test_resnet", 3, pretrained=f"{base_url}/good.pth")


def test_an_unwritable_cache_names_torch_home(odd_server, tmp_path, monkeypatch):
    from rednet import factory

    base_url, _ = odd_server
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a_file" / "torch"))  # (root can write anywhere else)
    with pytest.raises(RuntimeError, match=r"cannot write the download cache .*a_file.*: set TORCH_HOME"):
        factory.build_model("test_resnet", 3, pretrained=f"{base_url}/good.pth")
