"""Training checkpoints: plain dicts written atomically, loaded with torch.load(weights_only=True), resumed.

Layout of a run's `checkpoints/` folder: `last.pt` (newest state, each epoch and every N steps), `last_prev.pt` (the
one before it), `best.pt` (best val top-1), `epoch_NNNN.pt` (the last k epoch ends). When last.pt is damaged, resume
falls back to last_prev.pt, then to the newest epoch_NNNN.pt.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "arch")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` hold `src`'s bytes atomically; a hard link costs no I/O, a copy is the fallback."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_checkpoints(
    state: dict[str, Any], ckpt_dir: str | Path, *, epoch_end: bool, is_best: bool, keep_last: int
) -> Path:
    """Write last.pt (the old one becomes last_prev.pt), and at an epoch end also epoch_NNNN.pt (keeping the newest
    `keep_last`) and best.pt."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if last.is_file():
        _link_or_copy(last, ckpt_dir / "last_prev.pt")
    save_checkpoint(state, last)
    if epoch_end and keep_last > 0:
        _link_or_copy(last, ckpt_dir / f"epoch_{state['epoch']:04d}.pt")
        for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep_last]:
            old.unlink()
    if is_best:
        _link_or_copy(last, ckpt_dir / "best.pt")
    return last


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint written by `save_checkpoint`, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give the path of a .pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"'{path}' is not a rednet training checkpoint: keys {missing} are missing "
            "(model weights alone load with eval.py checkpoint=PATH)"
        )
    return ckpt


def check_arch(ckpt: dict[str, Any], arch: str, path: str | Path) -> None:
    """Refuse a checkpoint of another architecture before any weights are touched."""
    if ckpt.get("arch") not in (None, arch):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {ckpt['arch']} but the run builds {arch}; set model={ckpt['arch']} "
            "or give a checkpoint of this model"
        )


def find_resume_checkpoint(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run (last.pt, last_prev.pt, the newest epoch_NNNN.pt), or None if none.

    A damaged last.pt (e.g. the disk filled up) falls back to an older one with a warning, never silently to scratch.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.pt", ckpt_dir / "last_prev.pt"] + sorted(ckpt_dir.glob("epoch_*.pt"), reverse=True)
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            _logger.warning("skipping damaged checkpoint, trying an older one: %s", e)
    if existing:
        raise CheckpointError(f"no loadable checkpoint in '{ckpt_dir}' (tried {[str(p) for p in existing]})")
    return None


def rng_state() -> dict[str, Any]:
    """RNG states of torch, CUDA, numpy and Python as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's RNG states (one per rank), or None when the world size changed."""
    if isinstance(saved, dict):  # a single process's state
        saved = [saved]
    if len(saved) != world_size:
        _logger.warning(
            "the checkpoint holds RNG states of %d processes, this run has %d: random augmentation continues from "
            "fresh per-rank seeds (the run is not bit-exact with an uninterrupted one)",
            len(saved),
            world_size,
        )
        return None
    return saved[rank]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def clean_stale_temp_files(ckpt_dir: str | Path) -> None:
    """Remove temp files left by a process killed in the middle of a write."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
