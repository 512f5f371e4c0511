"""Checkpoint files: atomic writes, weights_only loading, retention, fallbacks, RNG round trips, bad files."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rednet import checkpoint, data, run_state

REPO = Path(__file__).resolve().parents[1]


def _state(epoch: int = 1, **extra) -> dict:
    return {
        "state_dict": {"w": torch.full((3,), float(epoch))},
        "state_dict_ema": None,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": epoch,
        "step": 10 * epoch,
        "arch": "rednet26",
        "rng": run_state.rng_state(),
        "config": {"seed": 1, "optim": {"lr": 0.1}},
        **extra,
    }


def test_save_is_loadable_with_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    run_state.save_checkpoint(_state(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    run_state.save_checkpoint(_state(epoch=1), path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # as if killed in the middle of torch.save

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        run_state.save_checkpoint(_state(epoch=2), path)
    assert run_state.load_checkpoint(path)["epoch"] == 1
    run_state.clean_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_write_checkpoints_keeps_last_k_and_best(tmp_path):
    for epoch, best in ((1, True), (2, False), (3, True), (4, False)):
        run_state.write_checkpoints(_state(epoch), tmp_path, epoch_end=True, is_best=best, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "epoch_0003.pt", "epoch_0004.pt", "last.pt", "last_prev.pt"]
    assert run_state.load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert run_state.load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    run_state.write_checkpoints(_state(5), tmp_path, epoch_end=False, is_best=False, keep_last=2)
    assert run_state.load_checkpoint(tmp_path / "epoch_0004.pt")["epoch"] == 4  # a later last.pt leaves it alone


def test_load_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        run_state.load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        run_state.load_checkpoint(junk)
    weights_only = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, weights_only)
    with pytest.raises(checkpoint.CheckpointError, match=r"not a rednet training checkpoint: keys \['state_dict'"):
        run_state.load_checkpoint(weights_only)


def test_check_arch_refuses_another_architecture():
    checkpoint.check_arch({"arch": "rednet26"}, "rednet26", "x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="holds a rednet50 but the run builds rednet26"):
        checkpoint.check_arch({"arch": "rednet50"}, "rednet26", "x.pt")


def test_resume_falls_back_from_a_truncated_last(tmp_path, caplog):
    assert run_state.find_resume_checkpoint(tmp_path) is None  # a fresh run
    for epoch in (1, 2):
        run_state.write_checkpoints(_state(epoch), tmp_path, epoch_end=True, is_best=False, keep_last=3)
    run_state.write_checkpoints(_state(3), tmp_path, epoch_end=False, is_best=False, keep_last=3)
    path, ckpt = run_state.find_resume_checkpoint(tmp_path)
    assert path.name == "last.pt" and ckpt["epoch"] == 3
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        path, ckpt = run_state.find_resume_checkpoint(tmp_path)
    assert path.name == "last_prev.pt" and ckpt["epoch"] == 2  # the last.pt before the newest write
    assert "skipping damaged checkpoint" in caplog.text
    (tmp_path / "last_prev.pt").unlink()  # (a damaged copy in its place; truncating it in place would also
    (tmp_path / "last_prev.pt").write_bytes(b"")  # truncate epoch_0002.pt, a hard link to the same bytes)
    path, ckpt = run_state.find_resume_checkpoint(tmp_path)
    assert path.name == "epoch_0002.pt" and ckpt["epoch"] == 2
    for p in tmp_path.glob("epoch_*.pt"):
        p.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no loadable checkpoint"):
        run_state.find_resume_checkpoint(tmp_path)


def test_rng_state_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    np.random.normal()  # leave a cached gaussian in numpy's state
    run_state.save_checkpoint(_state(), tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    run_state.set_rng_state(run_state.load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


# --- settings that travel with the weights (issue 9, item 4) ---------------------------------------------------------

# Non-default everything: eval with ImageNet's 224 px / bilinear / 0.875 would see other pixels and logits.
_PREPROCESSING = ["data.img_size=36", "data.crop_pct=0.9", "data.interpolation=bicubic",
                  "data.mean=[0.3,0.4,0.5]", "data.std=[0.2,0.25,0.3]"]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch of RedNet-26 (stem K=7, drop-path, channels_last) at non-default preprocessing; (image root, run
    dir, results)."""
    from train_utils import TINY, compose_config, make_image_folder

    import train

    root = make_image_folder(tmp_path_factory.mktemp("images"), size=40)
    run_dir = tmp_path_factory.mktemp("run")
    # Shape, regularization and memory-layout arguments too: the shape one travels, the others must not matter.
    model = ["+model.stem_kernel_size=7", "model.drop_path_rate=0.1", "trainer.channels_last=true"]
    cfg = compose_config("train", [*TINY, f"data.root={root}", "trainer.epochs=1", *_PREPROCESSING, *model])
    return root, run_dir, train.train(cfg, run_dir)


def _eval(root, path, out, *overrides):
    from train_utils import compose_config

    import eval as eval_script

    base = [f"checkpoint={path}", "data.num_workers=0", "trainer.device=cpu"]
    base += [f"data.root={root}"] if root is not None else []  # None: the checkpoint's
    overrides = [*base, "trainer.progress_bar=false", *overrides]
    return eval_script.evaluate_checkpoint(compose_config("eval", overrides), out, overrides)


def test_checkpoint_carries_its_preprocessing_classes_and_arch(trained_run):
    _, run_dir, _ = trained_run
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["classes"]) == ("rednet26", 3, ["cat", "dog", "fox"])
    assert ckpt["pretrained_cfg"] == {
        "input_size": (3, 36, 36), "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.3, 0.4, 0.5),
        "std": (0.2, 0.25, 0.3), "num_classes": 3,
    }  # fmt: skip
    assert ckpt["model_kwargs"]["stem_kernel_size"] == 7
    assert "drop_rate" not in ckpt["model_kwargs"] and "drop_path_rate" not in ckpt["model_kwargs"]  # run-time ones


def test_eval_with_only_checkpoint_and_root_reproduces_the_logged_top1(trained_run, tmp_path, caplog):
    root, run_dir, results = trained_run
    with caplog.at_level("INFO"):
        got = _eval(root, run_dir / "checkpoints" / "best.pt", tmp_path / "eval")  # no model=, no data settings
    assert got["top1"] == results["top1"] and got["loss"] == pytest.approx(results["loss"], rel=1e-6)
    assert got["model"] == "rednet26"
    assert got["preprocessing"] == {"img_size": 36, "crop_pct": 0.9, "interpolation": "bicubic",
                                    "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}  # fmt: skip
    assert "img_size=36 (the checkpoint)" in caplog.text


def test_eval_refuses_settings_that_contradict_the_checkpoint(trained_run, tmp_path):
    root, run_dir, _ = trained_run
    best = run_dir / "checkpoints" / "best.pt"
    with pytest.raises(checkpoint.CheckpointError, match="holds a rednet26 but the run builds rednet50; set model="):
        _eval(root, best, tmp_path / "e1", "model=rednet50")
    with pytest.raises(ValueError, match="has K=7 but the model has stem_kernel_size=3: create the model with"):
        _eval(root, best, tmp_path / "e2", "+model.stem_kernel_size=3")
    with pytest.raises(ValueError, match="model.num_classes=5 but .* has 3 val class folders"):  # was a TypeError
        _eval(root, best, tmp_path / "e3", "+model.num_classes=5")
    with pytest.raises(ValueError, match="both checkpoint=.* and pretrained=True are set"):
        _eval(root, best, tmp_path / "e4", "pretrained=true")


def test_eval_refuses_values_that_cannot_evaluate_before_loading_anything(trained_run, tmp_path):
    root, run_dir, _ = trained_run
    best = run_dir / "checkpoints" / "best.pt"
    with pytest.raises(ValueError, match=r"data.crop_pct=0.0 must be .*data.std=\[0.0, 1.0, 1.0\] must be"):
        _eval(root, best, tmp_path / "e", "data.std=[0.0,1.0,1.0]", "data.crop_pct=0.0")


def test_eval_takes_the_checkpoints_data_root_when_none_is_given(trained_run, tmp_path, caplog):
    root, run_dir, results = trained_run
    best = run_dir / "checkpoints" / "best.pt"
    with caplog.at_level("INFO"):
        got = _eval(None, best, tmp_path / "eval")  # checkpoint= alone
    assert got["top1"] == results["top1"] and got["count"] == results["count"]
    assert f"data.root={root} (from the checkpoint's training config" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"data.root '.*elsewhere' does not exist"):  # the command line wins
        _eval(tmp_path / "elsewhere", best, tmp_path / "eval2")
    ckpt = torch.load(best, weights_only=True)
    ckpt["config"]["data"]["root"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(
        FileNotFoundError, match=r"'.*moved' \(from checkpoint '.*moved.pt'\) does not exist here: add data.root="
    ):
        _eval(None, tmp_path / "moved.pt", tmp_path / "eval3")
    del ckpt["config"]["data"]["root"]
    torch.save(ckpt, tmp_path / "rootless.pt")
    with pytest.raises(
        ValueError, match=r"data.root is not set and checkpoint '.*rootless.pt' saved no data.root: add data.root="
    ):
        _eval(None, tmp_path / "rootless.pt", tmp_path / "eval4")


def test_checkpoint_alone_evaluates_the_val_set_training_used(tmp_path, caplog):
    """A run with data.skip_bad_images=true over a folder with a bad val file: eval.py checkpoint= alone takes the
    setting with data.root (it failed on the bad file) and gives training's top-1; the command line still wins."""
    from train_utils import TINY, compose_config, make_image_folder

    import train

    root = make_image_folder(tmp_path / "images", size=32)
    (root / "val" / "dog" / "broken.png").write_text("not an image")
    cfg = compose_config("train", [*TINY, f"data.root={root}", "trainer.epochs=1", "data.skip_bad_images=true"])
    train.train(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    with caplog.at_level("INFO"):
        got = _eval(None, best, tmp_path / "eval")
    assert got["top1"] == results["top1"] and got["count"] == results["count"] == 12
    assert "data.val_split=val data.skip_bad_images=True data.verify_images=auto (from the checkpoint's" in caplog.text
    with pytest.raises(data.BadImageError, match="broken.png"):
        _eval(None, best, tmp_path / "eval2", "data.skip_bad_images=false")


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch, caplog):
    """train.py from one directory with data.root=../images, eval.py with checkpoint= alone from another."""
    from train_utils import TINY, compose_config, make_image_folder

    import train

    make_image_folder(tmp_path / "images", size=32)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = compose_config("train", [*TINY, "data.root=../images", "trainer.epochs=1"])
    with caplog.at_level("INFO"):
        results = train.train(cfg, tmp_path / "run")
    absolute = str((tmp_path / "images").resolve())
    assert f"data.root={absolute}" in caplog.text  # train.log says which folder the run read
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["config"]["data"]["root"] == absolute
    monkeypatch.chdir(tmp_path)
    got = _eval(None, best, tmp_path / "eval")
    assert got["top1"] == results["top1"] and got["count"] == results["count"]


def test_eval_command_line_value_wins_with_a_warning(trained_run, tmp_path, caplog):
    root, run_dir, _ = trained_run
    got = _eval(root, run_dir / "checkpoints" / "best.pt", tmp_path / "eval", "data.img_size=48", "data=small")
    assert got["preprocessing"]["img_size"] == 48 and got["preprocessing"]["crop_pct"] == 0.9  # data=small: no value
    assert "trained and validated with data.img_size=36;" in caplog.text


def test_eval_at_another_precision_than_training_warns(trained_run, tmp_path, caplog):
    root, run_dir, _ = trained_run
    _eval(root, run_dir / "checkpoints" / "best.pt", tmp_path / "eval", "trainer.amp=bf16")
    assert "validated with trainer.amp=none, this evaluation uses trainer.amp=bf16" in caplog.text


def test_old_checkpoint_falls_back_to_its_saved_config(trained_run, tmp_path, caplog):
    """A checkpoint written before pretrained_cfg/model_kwargs existed: its `config` dict still gives everything."""
    root, run_dir, results = trained_run
    old = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    for key in ("pretrained_cfg", "model_kwargs", "num_classes"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    with caplog.at_level("INFO"):
        got = _eval(root, tmp_path / "old.pt", tmp_path / "eval")
    assert got["top1"] == results["top1"] and got["preprocessing"]["interpolation"] == "bicubic"
    assert "(the training config saved in the checkpoint" in caplog.text
    # A bare state dict carries nothing: model= is needed, the model's pretrained_cfg (ImageNet defaults) is used.
    torch.save(old["state_dict"], tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not name its architecture: set model="):
        _eval(root, tmp_path / "plain.pt", tmp_path / "eval2")
    got = _eval(root, tmp_path / "plain.pt", tmp_path / "eval3", "model=rednet26", "use_ema=false")
    assert got["preprocessing"] == {"img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear",
                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert "carries no preprocessing settings" in caplog.text


def test_registered_weights_use_timm_pretrained_cfg(trained_run, tmp_path, monkeypatch):
    """pretrained=true: the preprocessing comes from the model's pretrained_cfg via timm's resolve_data_config, and
    a checkpoint's own values are merged into the model's pretrained_cfg (what export and the scripts read)."""
    import rednet
    from rednet import weights

    _, run_dir, _ = trained_run
    model = rednet.create_model("rednet26")
    imagenet = {"img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert weights.resolve_preprocessing(model) == imagenet
    loaded = rednet.create_model("rednet26", pretrained=str(run_dir / "checkpoints" / "best.pt"))
    assert loaded.num_classes == 3 and loaded.pretrained_cfg["input_size"] == (3, 36, 36)
    assert weights.resolve_preprocessing(loaded, {"crop_pct": 1.0})["crop_pct"] == 1.0
    assert weights.resolve_preprocessing(loaded)["mean"] == [0.3, 0.4, 0.5]


def _fine_tune(root, run_dir, out, *overrides, weights=None):
    """One epoch from best.pt (or `weights`) on `root` with the data group's defaults (data=imagenet: no
    preprocessing set)."""
    from train_utils import TINY, compose_config

    import train

    base = [o for o in TINY if not o.startswith(("data=", "data.img_size"))]
    cfg = compose_config("train", [*base, f"data.root={root}", "trainer.epochs=1", *overrides])
    cfg.pretrained = str(weights or run_dir / "checkpoints" / "best.pt")
    train.train(cfg, out)
    config = OmegaConf.load(out / "config.yaml").data
    return config, run_state.load_checkpoint(out / "checkpoints" / "best.pt")["pretrained_cfg"]


def test_fine_tuning_takes_the_checkpoints_preprocessing(trained_run, tmp_path, caplog):
    from train_utils import make_image_folder

    _, run_dir, _ = trained_run
    root = make_image_folder(tmp_path / "images", classes=("ant", "bee"), n_train=4, n_val=2, size=40)
    with caplog.at_level("INFO"):
        config, carried = _fine_tune(root, run_dir, tmp_path / "run")
    used = {key: config[key] for key in checkpoint.PREPROCESSING_KEYS}
    assert used == {"img_size": 36, "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.3, 0.4, 0.5],
                    "std": [0.2, 0.25, 0.3]}  # fmt: skip
    assert carried == {"input_size": (3, 36, 36), "crop_pct": 0.9, "interpolation": "bicubic",
                       "mean": (0.3, 0.4, 0.5), "std": (0.2, 0.25, 0.3), "num_classes": 2}  # fmt: skip
    assert "preprocessing: img_size=36 (pretrained=" in caplog.text


def test_fine_tuning_keeps_a_preprocessing_value_set_on_the_command_line(trained_run, tmp_path):
    from train_utils import make_image_folder

    _, run_dir, _ = trained_run
    root = make_image_folder(tmp_path / "images", classes=("ant", "bee"), n_train=4, n_val=2, size=40)
    config, carried = _fine_tune(root, run_dir, tmp_path / "run", "data.img_size=40")
    assert (config.img_size, config.interpolation, config.crop_pct) == (40, "bicubic", 0.9)
    assert carried["input_size"] == (3, 40, 40)


@pytest.mark.parametrize("model", ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152"])
def test_training_from_scratch_resolves_the_imagenet_values(model, caplog):
    """data=imagenet leaves the preprocessing to the model: a RedNet's defaults are the values the YAML held."""
    from train_utils import compose_config

    import train
    from rednet import factory

    cfg = compose_config("train", [f"model={model}", "data.root=/unused"])
    assert all(cfg.data[key] is None for key in checkpoint.PREPROCESSING_KEYS)
    with caplog.at_level("INFO"):
        train.resolve_preprocessing(cfg, factory.build_model(model, 10))
    assert {key: cfg.data[key] for key in checkpoint.PREPROCESSING_KEYS} == {
        "img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    assert f"img_size=224 ({model}'s pretrained_cfg)" in caplog.text


_EFBIG_SCRIPT = """
import resource, signal, sys, torch
from rednet import run_state
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    run_state.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}}, sys.argv[1])
except run_state.CheckpointError as e:
    print(e)
"""


def test_write_over_the_file_size_limit_names_the_path_and_cause_and_leaves_no_temp_file(tmp_path):
    """torch alone reports "[enforce fail at inline_container.cc] unexpected pos ..." with no file name."""
    import subprocess
    import sys

    path = tmp_path / "last.pt"
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _EFBIG_SCRIPT, str(path)], env=env, capture_output=True, text=True)
    assert f"could not write checkpoint '{path}': the file-size limit was reached" in out.stdout, out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("where", "code", "cause"),
    [("fsync", errno.ENOSPC, "the disk is full"), ("replace", errno.EACCES, "permission denied")],
)
def test_failed_write_names_the_path_and_cause_and_removes_the_temp_file(tmp_path, monkeypatch, where, code, cause):
    run_state.write_checkpoints(_state(1), tmp_path, epoch_end=False, is_best=False, keep_last=0)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_state.os, where, fail)
    with pytest.raises(checkpoint.CheckpointError, match=f"'{tmp_path / 'last.pt'}': {cause}"):
        run_state.save_checkpoint(_state(2), tmp_path / "last.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no .last.pt.<pid>.tmp
    assert run_state.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # the old one is intact


def test_keep_last_orders_epochs_by_number_past_9999(tmp_path):
    for epoch in (9998, 9999, 10000, 10001):
        run_state.write_checkpoints(_state(epoch), tmp_path, epoch_end=True, is_best=False, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_10000.pt", "epoch_10001.pt"]
    assert run_state.find_resume_checkpoint(tmp_path)[1]["epoch"] == 10001
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last_prev.pt").unlink()
    assert run_state.find_resume_checkpoint(tmp_path)[0].name == "epoch_10001.pt"  # the newest by number


def test_save_when_last_prev_is_already_a_link_of_last_leaves_no_temp_link(tmp_path):
    run_state.write_checkpoints(_state(1), tmp_path, epoch_end=False, is_best=False, keep_last=0)
    os.link(tmp_path / "last.pt", tmp_path / "last_prev.pt")  # e.g. a save stopped after the link was made
    run_state.write_checkpoints(_state(2), tmp_path, epoch_end=False, is_best=False, keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last_prev.pt"]
    assert run_state.load_checkpoint(tmp_path / "last_prev.pt")["epoch"] == 1
    assert run_state.load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_checkpoint_in_the_old_layout_loads_with_timm_names(tmp_path):
    """Checkpoints written before the timm layout (model, model_ema, scaler) still load and resume."""
    state = _state(3)
    old = {"model": state.pop("state_dict"), "model_ema": state.pop("state_dict_ema"), "scaler": None, **state}
    torch.save(old, tmp_path / "last.pt")
    ckpt = run_state.find_resume_checkpoint(tmp_path)[1]
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((3,), 3.0))
    assert "state_dict_ema" in ckpt and "amp_scaler" in ckpt and "model" not in ckpt


def test_ctrl_c_inside_torch_save_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while torch.save writes: its zip writer's cleanup then raises "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos", with the KeyboardInterrupt only as its __context__. The run must stop as
    interrupted (train.log: "interrupted (SIGINT, Ctrl-C)"), not as a failed checkpoint write."""
    path = tmp_path / "last.pt"
    run_state.save_checkpoint(_state(epoch=1), path)
    real_save = torch.save

    class InterruptedFile:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 64:  # a few bytes in, as a SIGINT arrives in the middle of the write
                raise KeyboardInterrupt
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, InterruptedFile(f), *a, **k))
    with pytest.raises(KeyboardInterrupt):
        run_state.save_checkpoint(_state(epoch=2), path)
    assert run_state.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_write_that_fails_while_an_interrupt_is_handled_is_a_failed_write(tmp_path, monkeypatch):
    """The save after Ctrl-C (code handling the KeyboardInterrupt writes last.pt): a full disk there is the error to
    report, not the interrupt further up the handling."""

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(checkpoint.CheckpointError, match="the disk is full"):
            run_state.save_checkpoint(_state(epoch=2), tmp_path / "last.pt")


def test_resume_auto_in_a_new_run_directory_names_the_earlier_run(tmp_path, caplog):
    """resume=auto without hydra.run.dir lands in a new timestamped directory and starts over: the warning names the
    run it was probably meant to continue (it only said "no checkpoint in <new dir> yet")."""
    earlier = tmp_path / "train" / "2026-01-01" / "10-00-00"
    run_state.write_checkpoints(_state(), earlier / "checkpoints", epoch_end=True, is_best=True, keep_last=1)
    new = tmp_path / "train" / "2026-01-02" / "09-00-00" / "checkpoints"
    new.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert run_state.find_resume("auto", new, "rednet26") is None
    assert f"no checkpoint in {new} yet, starting a new run; to continue an earlier run" in caplog.text
    assert f"hydra.run.dir={earlier} (newest one here)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_state.find_resume("auto", tmp_path / "elsewhere" / "a" / "b" / "checkpoints", "rednet26") is None
    assert "starting a new run" in caplog.text and "earlier run" not in caplog.text
    caplog.clear()  # a directory of the user's choosing (hydra.run.dir=runs/r50): the runs beside it are other runs
    run_state.write_checkpoints(_state(), tmp_path / "runs" / "r26" / "checkpoints", epoch_end=True, is_best=True,
                                keep_last=1)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run_state.find_resume("auto", tmp_path / "runs" / "r50" / "checkpoints", "rednet26") is None
    assert "starting a new run" in caplog.text and "earlier run" not in caplog.text


def _convert(run_dir, out):
    """convert_checkpoint.py's weights file of best.pt (tensors only; its settings in the sidecar JSON)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.convert(str(run_dir / "checkpoints" / "best.pt"), str(out / "mine"))


_TRAINED_PREPROCESSING = {"img_size": 36, "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.3, 0.4, 0.5],
                          "std": [0.2, 0.25, 0.3]}  # fmt: skip


def test_converted_weights_evaluate_with_the_settings_of_their_sidecar(trained_run, tmp_path, caplog):
    """The fresh-user fault: best.pt converted to a tensors-only file and evaluated with pretrained=<file> got 224 px
    and ImageNet mean/std (another top-1). The sidecar JSON carries the checkpoint's settings, the file stays
    tensors only, and evaluating it reproduces the logged top-1."""
    from rednet import weights

    root, run_dir, results = trained_run
    converted = _convert(run_dir, tmp_path / "weights")
    assert sorted(weights.to_state_dict(torch.load(converted, weights_only=True))) == sorted(
        torch.load(converted, weights_only=True)
    )  # tensors only, plain keys
    sidecar = json.loads(weights.sidecar_path(converted).read_text())
    assert sidecar == {
        "architecture": "rednet26", "num_classes": 3, "label_names": ["cat", "dog", "fox"],
        "model_args": {"stem_kernel_size": 7},
        "pretrained_cfg": {"input_size": [3, 36, 36], "crop_pct": 0.9, "interpolation": "bicubic",
                           "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]},
    }  # fmt: skip
    with caplog.at_level("INFO"):
        got = _eval(root, converted, tmp_path / "eval", "checkpoint=null", "model=rednet26", f"pretrained={converted}")
    assert got["top1"] == results["top1"] and got["loss"] == pytest.approx(results["loss"], rel=1e-6)
    assert got["preprocessing"] == _TRAINED_PREPROCESSING
    assert f"img_size=36 (the settings file {weights.sidecar_path(converted)})" in caplog.text
    # checkpoint=<file> without model=: the sidecar names the architecture; a value on the command line still wins
    got = _eval(root, converted, tmp_path / "eval2", "data.crop_pct=1.0")
    assert got["preprocessing"] == {**_TRAINED_PREPROCESSING, "crop_pct": 1.0}


def test_converted_weights_without_a_sidecar_load_as_before(trained_run, tmp_path):
    """No sidecar, no metadata in the file: the model's (ImageNet) preprocessing, model= needed, as before."""
    from rednet import weights

    root, run_dir, _ = trained_run
    converted = _convert(run_dir, tmp_path / "weights")
    weights.sidecar_path(converted).unlink()
    with pytest.raises(ValueError, match="does not name its architecture: set model="):
        _eval(root, converted, tmp_path / "eval")
    got = _eval(root, None, tmp_path / "eval2", "checkpoint=null", f"pretrained={converted}", "model=rednet26",
                f"data.root={root}")  # fmt: skip
    assert got["preprocessing"] == {"img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear",
                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip


def test_fine_tuning_from_converted_weights_takes_the_sidecars_preprocessing(trained_run, tmp_path):
    from train_utils import make_image_folder

    _, run_dir, _ = trained_run
    converted = _convert(run_dir, tmp_path / "weights")
    root = make_image_folder(tmp_path / "images", classes=("ant", "bee"), n_train=4, n_val=2, size=40)
    config, carried = _fine_tune(root, run_dir, tmp_path / "run", weights=converted)
    assert {key: config[key] for key in checkpoint.PREPROCESSING_KEYS} == _TRAINED_PREPROCESSING
    assert carried["input_size"] == (3, 36, 36)


def test_a_sidecar_that_contradicts_the_model_or_the_weights_is_an_error(trained_run, tmp_path):
    from train_utils import make_image_folder

    from rednet import weights

    root, run_dir, _ = trained_run
    converted = _convert(run_dir, tmp_path / "weights")
    json_path = weights.sidecar_path(converted)
    sidecar = json.loads(json_path.read_text())
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a rednet26 \(says its settings file .*mine-.*json'\) "
                       "but the run builds rednet50; set model=rednet26"):  # fmt: skip
        _eval(root, converted, tmp_path / "e1", "model=rednet50")
    other = make_image_folder(tmp_path / "other", classes=("ant", "bee", "cow"), n_train=1, n_val=1)
    with pytest.raises(ValueError, match="trained on 3 classes but the val folder has 3 .*missing: .'cat'"):
        _eval(other, converted, tmp_path / "e2")
    bad = {
        "num_classes 5 vs a 3-class fc": ({**sidecar, "num_classes": 5, "label_names": list("abcde")},
                                          r"predict 5 classes but .* has a 3-class classifier \(fc.weight\)"),
        "names vs count": ({**sidecar, "num_classes": 2}, "has num_classes=2 but 3 label_names"),
        "unknown architecture": ({**sidecar, "architecture": "rednet27"}, "'rednet27', which is not a registered"),
        "wrong type": ({**sidecar, "pretrained_cfg": [3, 36, 36]}, r"has pretrained_cfg=\[3, 36, 36\], not a dict"),
    }  # fmt: skip
    for content, message in bad.values():
        json_path.write_text(json.dumps(content))
        with pytest.raises(checkpoint.CheckpointError, match=message):
            _eval(root, converted, tmp_path / "e3")
    json_path.write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"mine-.*\.json' cannot be read as JSON .* or delete it"):
        _eval(root, converted, tmp_path / "e4")
