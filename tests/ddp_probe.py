"""Run train.py exactly as `python train.py ARGS` would, recording per rank what the tests cannot see from outside.

    torchrun --standalone --nproc-per-node=2 tests/ddp_probe.py PROBE_DIR ARGS...

Writes PROBE_DIR/rank<R>.pt: the training images this rank read (in order), its final model weights and a digest
of its RNG state when the model was wrapped in DDP (after the per-rank seeding). Nothing here changes what train.py
computes: the probes only read.

The one exception, for the tests of a failing rank: PROBE_FAIL=KIND:RANK:N makes rank RANK fail at its N-th
call of KIND's point, printing "PROBE injected KIND at <unix time>" to stderr first:
    forward / nan / kill   a training forward raises / returns NaN / the rank kills itself with SIGKILL
    save                   a write of last.pt raises OSError (disk full)
    val                    an evaluation forward raises (validation on one rank)
    worker                 reading a training image raises inside a DataLoader worker process
    device                 resolving trainer.device raises, before the process group is joined
    data                   the image folder check raises FileNotFoundError (data.root missing on one node)
    build                  building the model raises
    resume                 every read of last.pt raises CheckpointError (a torn last.pt seen by one rank)
    ema                    the EMA update raises
    precise_bn             recomputing BatchNorm statistics raises
    results                writing results.json raises OSError (after the last epoch's training and evaluation)
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rednet import checkpoint, data, distributed, engine, factory, run_state  # noqa: E402  (after the path set-up, like train.py's imports)

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
    if fail_kind in ("forward", "nan", "kill", "val"):
        failing_forward(module)
    wrapped.append(module)
    rng_digest.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
    wrap(self, module, *args, **kwargs)


fail_kind, fail_rank, fail_at = (os.environ.get("PROBE_FAIL") or "none:-1:0").split(":")
# (only in torchrun's first attempt: a restarted worker group, --max-restarts, runs without the failure)
fail_here = fail_rank == os.environ.get("RANK", "0") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
calls: dict[str, int] = {}


def injected(kind: str) -> bool:
    """Whether this call is the one to fail (and announce it with the time, for the tests' time limit)."""
    calls[kind] = calls.get(kind, 0) + 1
    # (a torn last.pt stays torn: every read of it from the N-th on fails)
    if fail_here and (calls[kind] == int(fail_at) or (kind == "resume" and calls[kind] > int(fail_at))):
        print(f"PROBE injected {fail_kind} at {time.time()}", file=sys.stderr, flush=True)
        return True
    return False


def failing_forward(module):
    forward = module.forward

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        if fail_kind == "val" and not module.training and injected("val"):
            raise RuntimeError(f"injected failure in validation on rank {fail_rank}")
        if fail_kind != "val" and module.training and injected("forward"):
            if fail_kind == "forward":
                raise RuntimeError(f"injected failure in forward on rank {fail_rank}")
            if fail_kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return out * float("nan")
        return out

    module.forward = wrapped


save = torch.save


def failing_save(obj, f, *args, **kwargs):
    if "last.pt" in str(getattr(f, "name", f)) and injected("save"):  # (collectives pickle objects with torch.save)
        raise OSError(28, "No space left on device (injected)")
    return save(obj, f, *args, **kwargs)


def fail_in(owner, name: str, error: BaseException, when=lambda *args, **kwargs: True) -> None:
    """Make `owner.name` raise `error` at its N-th call for which `when(args)` holds (on the failing rank)."""
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        if when(*args, **kwargs) and injected(fail_kind):
            raise error
        return original(*args, **kwargs)

    setattr(owner, name, failing)


def in_worker(*args, **kwargs) -> bool:
    return torch.utils.data.get_worker_info() is not None


injections = {
    "worker": lambda: fail_in(
        data.CheckedImageFolder,
        "_load",
        RuntimeError(f"injected failure in a loader worker on rank {fail_rank}"),
        in_worker,
    ),
    "data": lambda: fail_in(
        data, "check_image_folder", FileNotFoundError(f"injected: data.root missing on rank {fail_rank}")
    ),
    "device": lambda: fail_in(
        distributed, "resolve_device", RuntimeError(f"injected: no usable device on rank {fail_rank}")
    ),
    "build": lambda: fail_in(
        factory, "build_model", RuntimeError(f"injected failure building the model on rank {fail_rank}")
    ),
    "resume": lambda: fail_in(
        run_state,
        "read_torch_file",
        checkpoint.CheckpointError(f"injected: torn last.pt on rank {fail_rank}"),
        lambda path, *args, **kwargs: str(path).endswith("last.pt"),
    ),
    "precise_bn": lambda: fail_in(
        engine, "recompute_batchnorm_stats", RuntimeError(f"injected failure in precise BN on rank {fail_rank}")
    ),
    "results": lambda: fail_in(
        json,
        "dumps",
        OSError(28, "No space left on device (injected)"),
        lambda obj, *args, **kwargs: isinstance(obj, dict) and "best_top1" in obj,
    ),
}
if fail_kind == "ema":
    from timm.utils import ModelEmaV3

    fail_in(ModelEmaV3, "update", RuntimeError(f"injected failure in the EMA update on rank {fail_rank}"))
elif fail_kind in injections:
    injections[fail_kind]()
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
