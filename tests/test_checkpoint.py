"""Checkpoint files: atomic writes, weights_only loading, retention, fallbacks, RNG round trips, bad files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rednet import checkpoint


def _state(epoch: int = 1, **extra) -> dict:
    return {
        "model": {"w": torch.full((3,), float(epoch))},
        "model_ema": None,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": epoch,
        "step": 10 * epoch,
        "arch": "rednet26",
        "rng": checkpoint.rng_state(),
        "config": {"seed": 1, "optim": {"lr": 0.1}},
        **extra,
    }


def test_save_is_loadable_with_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_checkpoint(_state(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(_state(epoch=1), path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # as if killed in the middle of torch.save

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(_state(epoch=2), path)
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    checkpoint.clean_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_write_checkpoints_keeps_last_k_and_best(tmp_path):
    for epoch, best in ((1, True), (2, False), (3, True), (4, False)):
        checkpoint.write_checkpoints(_state(epoch), tmp_path, epoch_end=True, is_best=best, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "epoch_0003.pt", "epoch_0004.pt", "last.pt", "last_prev.pt"]
    assert checkpoint.load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert checkpoint.load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    checkpoint.write_checkpoints(_state(5), tmp_path, epoch_end=False, is_best=False, keep_last=2)
    assert checkpoint.load_checkpoint(tmp_path / "epoch_0004.pt")["epoch"] == 4  # a later last.pt leaves it alone


def test_load_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(junk)
    weights_only = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, weights_only)
    with pytest.raises(checkpoint.CheckpointError, match=r"not a rednet training checkpoint: keys \['model'"):
        checkpoint.load_checkpoint(weights_only)


def test_check_arch_refuses_another_architecture():
    checkpoint.check_arch({"arch": "rednet26"}, "rednet26", "x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="holds a rednet50 but the run builds rednet26"):
        checkpoint.check_arch({"arch": "rednet50"}, "rednet26", "x.pt")


def test_resume_falls_back_from_a_truncated_last(tmp_path, caplog):
    assert checkpoint.find_resume_checkpoint(tmp_path) is None  # a fresh run
    for epoch in (1, 2):
        checkpoint.write_checkpoints(_state(epoch), tmp_path, epoch_end=True, is_best=False, keep_last=3)
    checkpoint.write_checkpoints(_state(3), tmp_path, epoch_end=False, is_best=False, keep_last=3)
    path, ckpt = checkpoint.find_resume_checkpoint(tmp_path)
    assert path.name == "last.pt" and ckpt["epoch"] == 3
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        path, ckpt = checkpoint.find_resume_checkpoint(tmp_path)
    assert path.name == "last_prev.pt" and ckpt["epoch"] == 2  # the last.pt before the newest write
    assert "skipping damaged checkpoint" in caplog.text
    (tmp_path / "last_prev.pt").unlink()  # (a damaged copy in its place; truncating it in place would also
    (tmp_path / "last_prev.pt").write_bytes(b"")  # truncate epoch_0002.pt, a hard link to the same bytes)
    path, ckpt = checkpoint.find_resume_checkpoint(tmp_path)
    assert path.name == "epoch_0002.pt" and ckpt["epoch"] == 2
    for p in tmp_path.glob("epoch_*.pt"):
        p.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no loadable checkpoint"):
        checkpoint.find_resume_checkpoint(tmp_path)


def test_rng_state_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    np.random.normal()  # leave a cached gaussian in numpy's state
    checkpoint.save_checkpoint(_state(), tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]
