"""Run train.py exactly as `python train.py ARGS` would, recording per rank what the tests cannot see from outside.

    torchrun --standalone --nproc-per-node=2 tests/ddp_probe.py PROBE_DIR ARGS...

Writes PROBE_DIR/rank<R>.pt: the training images this rank read (in order), its final model weights and a digest
of its RNG state when the model was wrapped in DDP (after the per-rank seeding). Nothing here changes what train.py
computes: the probes only read.

The one exception, for the tests of a failing rank: PROBE_FAIL=KIND:RANK:N makes rank RANK fail at its N-th
training forward (KIND forward: an exception; nan: a NaN loss) or at its N-th write of last.pt (KIND save: an
OSError from torch.save), printing "PROBE injected KIND at <unix time>" to stderr first.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rednet import data  # noqa: E402  (after the path set-up, like train.py's own imports)

probe_dir = Path(sys.argv.pop(1))
images: list[str] = []
wrapped: list[torch.nn.Module] = []
rng_digest: list[str] = []

read_image = data.CheckedImageFolder.__getitem__
wrap = DistributedDataParallel.__init__


def recording_getitem(self, index):
    if self.seed is not None:  # the training set (evaluation sets have no augmentation seed)
        images.append(self.samples[index][0])
    return read_image(self, index)


def recording_init(self, module, *args, **kwargs):
    if fail_kind in ("forward", "nan"):
        failing_forward(module)
    wrapped.append(module)
    rng_digest.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
    wrap(self, module, *args, **kwargs)


fail_kind, fail_rank, fail_at = (os.environ.get("PROBE_FAIL") or "none:-1:0").split(":")
fail_here = fail_rank == os.environ.get("RANK", "0")
calls = {"forward": 0, "save": 0}


def injected(kind: str) -> bool:
    """Whether this call is the one to fail (and announce it with the time, for the tests' time limit)."""
    calls[kind] += 1
    if fail_here and calls[kind] == int(fail_at):
        print(f"PROBE injected {fail_kind} at {time.time()}", file=sys.stderr, flush=True)
        return True
    return False


def failing_forward(module):
    forward = module.forward

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        if module.training and injected("forward"):
            if fail_kind == "forward":
                raise RuntimeError(f"injected failure in forward on rank {fail_rank}")
            return out * float("nan")
        return out

    module.forward = wrapped


save = torch.save


def failing_save(obj, f, *args, **kwargs):
    if "last.pt" in str(getattr(f, "name", f)) and injected("save"):  # (collectives pickle objects with torch.save)
        raise OSError(28, "No space left on device (injected)")
    return save(obj, f, *args, **kwargs)


if fail_kind == "save":
    torch.save = failing_save
data.CheckedImageFolder.__getitem__ = recording_getitem
DistributedDataParallel.__init__ = recording_init
try:
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
finally:
    state = {k: v.detach().cpu() for k, v in wrapped[0].state_dict().items()} if wrapped else None
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    record = {"images": images, "state": state, "rng_digest": rng_digest, "env": env}
    save(record, probe_dir / f"rank{os.environ.get('RANK', '0')}.pt")
