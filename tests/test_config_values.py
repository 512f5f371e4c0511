"""Command-line values a user mistypes or misjudges: refused before any data is read, with a message naming the key,
the value and what it takes (config_schema.VALUE_RULES, check_checkpoint_paths, factory.check_model_name), or warned
about (config_schema.WARNING_RULES). Config checks only: no training runs."""

from __future__ import annotations

import logging
import re

import pytest
from train_utils import TINY, compose_config

import eval as eval_script
import train
from rednet import checkpoint, data, factory


def _check(*overrides: str) -> None:
    train.check_config(compose_config("train", ["data.root=/unused", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # A seed numpy cannot take failed after the run directory was claimed, without naming the key.
        (["seed=-1"], "seed=-1 must be in [0, 2**32 - 2**16)"),
        (["seed=4294967296"], "seed=4294967296 must be in [0, 2**32 - 2**16)"),
        # An empty data.root read the current directory as the image folder.
        (["data.root=''"], "data.root='' must be an image folder"),
        (["data.root=' '"], "data.root=' ' must be an image folder"),
        # Probabilities that must leave something: 1 zeroes every feature / drops every block (timm trains on), a
        # negative drop_rate failed at the first step (torch's dropout), momentum >= 1 diverges, decay 1 freezes.
        (["model.drop_rate=1.0"], "model.drop_rate=1.0 must be in [0, 1)"),
        (["model.drop_rate=-0.1"], "model.drop_rate=-0.1 must be in [0, 1)"),
        (["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0 must be in [0, 1)"),
        (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 must be in [0, 1)"),
        (["optim=sgd", "optim.momentum=1.5"], "optim.momentum=1.5 must be in [0, 1)"),
        (["optim=sgd", "optim.momentum=1.0"], "optim.momentum=1.0 must be in [0, 1)"),
        (["optim=sgd", "optim.momentum=-0.1"], "optim.momentum=-0.1 must be in [0, 1)"),
        (["optim=adamw", "+optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] must be a list of values in [0, 1)"),
        (["optim=adamw", "+optim.betas=0.9"], "optim.betas=0.9 must be a list of values in [0, 1)"),
        (["trainer.model_ema=true", "trainer.model_ema_decay=1.0"], "trainer.model_ema_decay=1.0 must be in [0, 1)"),
        (["trainer.model_ema_decay=1.5"], "trainer.model_ema_decay=1.5 must be in [0, 1)"),
        (["optim=sgd", "optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    ],
)
def test_values_outside_their_range_are_refused_naming_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _check(*overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=0"],
        ["seed=3000000000"],  # numpy takes it (below 2**32)
        ["model.drop_rate=0.5", "model.drop_path_rate=0.99"],
        ["optim=sgd", "optim.momentum=0"],
        ["optim=adamw", "+optim.betas=[0.9,0.95]"],
        ["optim=adamw", "+optim.betas=[0.98,0.92,0.99]"],  # Adan's three betas
        ["trainer.model_ema=true", "trainer.model_ema_decay=0"],
        ["trainer.amp=fp16"],  # runs on the CPU too (tests/test_train.py test_loop_options_run_together)
    ],
)
def test_values_at_the_edges_of_their_range_pass(overrides):
    _check(*overrides)


def test_a_learning_rate_far_above_any_recipe_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="train"):
        _check("optim.lr=1e5")
    assert "optim.lr=100000.0 is far above any recipe's (SGD 0.1, AdamW 1e-3)" in caplog.text
    assert "mistyped exponent (1e5 for 1e-5)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"):
        _check("optim=sgd", "optim.lr=0.8")  # SGD's lr at batch 256 x 8: usual
    assert "optim.lr" not in caplog.text


@pytest.fixture
def run_dir(tmp_path):
    """A train.py run directory: checkpoints/ with best.pt, last.pt and an epoch file (contents are not read)."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("best.pt", "last.pt", "epoch_0001.pt"):
        (ckpts / name).write_bytes(b"")
    return tmp_path / "run"


@pytest.fixture
def no_data(monkeypatch):
    monkeypatch.setattr(data, "check_image_folder", lambda *args, **kwargs: pytest.fail("data was read"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # true and yes are file names to a key that takes a path (resume is typed str: true becomes 'True').
        ("resume=yes", r"resume='\S+/yes' does not exist: resume takes null \(a new run\), auto"),
        ("resume=true", r"resume='\S+/True' does not exist: resume takes null \(a new run\), auto"),
        ("resume=''", r"resume='' is empty: resume takes null"),
        # pretrained=maybe failed after the data scan (weights.fetch, without naming the key).
        ("pretrained=maybe", r"pretrained='\S+/maybe' does not exist: pretrained takes true .* or a checkpoint file"),
        ("pretrained=''", r"pretrained='' is empty: pretrained takes true"),
        ("pretrained=/no/such/best.pt", r"pretrained='/no/such/best.pt' does not exist"),
        # A run directory for its file: the file it most likely means, and what it holds.
        ("resume={run}", r"resume='\S+/run' is a directory: give a checkpoint file in it, e.g. resume=\S+/run/"
         r"checkpoints/last.pt \(it holds checkpoints/best.pt, checkpoints/epoch_0001.pt, checkpoints/last.pt\)"),
        ("pretrained={run}/checkpoints", r"e.g. pretrained=\S+/run/checkpoints/best.pt \(it holds best.pt, "),
        ("pretrained={empty}", r"pretrained='\S+/empty' is a directory: give a checkpoint file in it, it holds no .pt"),
    ],
)  # fmt: skip
def test_train_checkpoint_keys_naming_no_file_fail_before_data(run_dir, no_data, tmp_path, override, message):
    (tmp_path / "empty").mkdir()
    cfg = compose_config("train", [*TINY, "data.root=/unused", override.format(run=run_dir, empty=tmp_path / "empty")])
    with pytest.raises(checkpoint.CheckpointError, match=message):
        train.train(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # A run directory for its checkpoint: weights.fetch said "does not exist (expected a file...)".
        (["checkpoint={run}"], r"checkpoint='\S+/run' is a directory: .* e.g. checkpoint=\S+/run/checkpoints/best.pt"),
        (["checkpoint={run}/checkpoints"], r"e.g. checkpoint=\S+/run/checkpoints/best.pt \(it holds best.pt, "),
        # A missing checkpoint with data.root given failed after the val folder was scanned.
        (["checkpoint=missing.pt", "data.root=/unused"], r"checkpoint='\S+/missing.pt' does not exist: checkpoint "),
        (["checkpoint=''"], r"checkpoint='' is empty"),
        (["pretrained=maybe", "data.root=/unused"], r"pretrained='\S+/maybe' does not exist: pretrained takes true"),
    ],
)
def test_eval_checkpoint_keys_naming_no_file_fail_before_data(run_dir, no_data, tmp_path, overrides, message):
    cfg = compose_config("eval", ["trainer.device=cpu", *(o.format(run=run_dir) for o in overrides)])
    with pytest.raises(checkpoint.CheckpointError, match=message):
        eval_script.evaluate_checkpoint(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("RedNet50", "rednet50"),  # case
        ("rednet_50", "rednet50"),  # separators
        ("rednet-101", "rednet101"),
        ("ResNet_50", "resnet50"),  # timm's names too
        ("rednet5", "rednet50"),  # difflib's closest
    ],
)
def test_unknown_model_names_suggest_the_close_one(name, suggestion):
    with pytest.raises(ValueError, match=rf"unknown model '{name}' \(did you mean model.name={suggestion}\b"):
        factory.check_model_name(name)
    with pytest.raises(ValueError, match=rf"unknown model '{name}' \(did you mean model.name={suggestion}\b"):
        _check(f"model.name={name}")
