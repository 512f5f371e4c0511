"""torch.distributed glue: process group set-up from torchrun's or SLURM's environment, rank helpers, reductions.

A single process is the world-size-1 case of the same code, so train.py has one path.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

# Small CPU collectives (stop flags, picked objects) go through gloo even when the default group is NCCL, so
# polling a flag every step costs no GPU synchronization.
_cpu_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn `trainer.device` (auto | cpu | cuda | cuda:N) into a device, failing early if it cannot be used."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"trainer.device={device} but no CUDA GPU is visible to torch "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use trainer.device=cpu or auto"
            )
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise ValueError(f"trainer.device={device!r} is not one of auto, cpu, cuda")
    return torch.device("cpu")


def export_submitit_env() -> None:
    """Inside a submitit job (hydra-submitit-launcher), set torchrun's variables from the job's environment.

    submitit reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST (or its local
    executor's equivalents) and derives MASTER_PORT from the job id, so every task of the job agrees.
    """
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment  # present whenever submitit runs this process

    # Each task sees all of its node's GPUs and takes cuda:LOCAL_RANK, as under torchrun. (overwrite: a MASTER_PORT
    # already set is kept by submitit, the other variables must be this task's.)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun or submitit (RANK/WORLD_SIZE), else run as one process."""
    global _cpu_group
    export_submitit_env()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        _cpu_group = dist.new_group(backend="gloo") if dev.type == "cuda" else None
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    """Leave the process group (no-op for a single process)."""
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (counts, not means, so uneven shards stay exact)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' `value`, on every rank (e.g. the stop signal one of them received, or 0)."""
    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(tensor.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of `obj` on every rank (e.g. the run directory rank 0 chose)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_cpu_group)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (e.g. the ranks' RNG states for a checkpoint)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_cpu_group)
    return gathered


CLAIM_FILE = ".run_claim"


def _claim(run_dir: Path, exclusive: bool) -> bool:
    """Create `run_dir`/.run_claim (naming host, process and time); False when `exclusive` and it exists already."""
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(run_dir / CLAIM_FILE, flags, 0o644)  # O_EXCL: one creator wins, atomically (also on NFS 3+)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"host {socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return True


def claim_run_dir(run_dir: str | Path, continue_run: bool = False) -> Path:
    """The directory this run owns: `run_dir`, or the first free `run_dir`_1, _2, ... when another run has it.

    Hydra names the default directory by the second (outputs/train/<date>/<time>) and creates it before our code
    runs, so two runs started in the same second share it. A run claims its directory by creating .run_claim in it
    exclusively; whoever comes second takes a directory of its own, so no run writes into another's. A run that
    continues one (`continue_run`: resume=auto or a path) uses `run_dir` as it is, and so does a new run in a
    directory that already holds checkpoints (train.py then asks for resume=auto) or whose run ended before saving
    any (on this host).
    """
    run_dir = Path(run_dir)
    if continue_run or (run_dir / "checkpoints" / "last.pt").exists() or _abandoned(run_dir):
        _claim(run_dir, exclusive=False)
        return run_dir
    for attempt in itertools.count():
        candidate = run_dir.with_name(f"{run_dir.name}_{attempt}") if attempt else run_dir
        if _claim(candidate, exclusive=True):
            return candidate
    raise AssertionError("unreachable")


def _abandoned(run_dir: Path) -> bool:
    """Whether `run_dir` was claimed by a process of this host that has ended without saving a checkpoint (a run
    that failed during set-up, e.g. on a wrong data.root): rerunning the same command may take the directory over."""
    holder = claim_holder(run_dir).split()
    if len(holder) < 4 or holder[0] != "host" or holder[1] != socket.gethostname() or holder[2] != "pid":
        return False
    try:
        os.kill(int(holder[3]), 0)
    except ProcessLookupError:
        return not (run_dir / "checkpoints").exists()
    except (OSError, ValueError):
        return False
    return False


def claim_holder(run_dir: Path) -> str:
    """Who claimed `run_dir` ("host H pid P at T"), for messages."""
    try:
        return (run_dir / CLAIM_FILE).read_text().strip()
    except OSError:
        return "unknown"


def shared_run_dir(own_dir: str | Path, continue_run: bool = False) -> Path:
    """The directory rank 0 claimed (see `claim_run_dir`), for every rank.

    Hydra names the directory from each process's own clock, so ranks started in different seconds get different
    ones: rank 0 decides, and a rank whose Hydra made another directory removes it if it holds only Hydra's files
    (none for train.py, whose hydra.output_subdir is null: it writes .hydra/ into the claimed directory itself).
    """
    own_dir = Path(own_dir)
    claimed = claim_run_dir(own_dir, continue_run) if int(os.environ.get("RANK", 0)) == 0 else own_dir
    run_dir = Path(broadcast_object(str(claimed)))
    if run_dir != own_dir and own_dir.is_dir() and {p.name for p in own_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(own_dir, ignore_errors=True)  # (another run's directory of that name holds its claim)
    return run_dir


@contextlib.contextmanager
def end_job_on_error() -> Iterator[None]:
    """In a job of several processes, end this process at once when an exception leaves the block.

    Unwinding normally after an error on one rank can enter a collective the other ranks never join (a checkpoint's
    all_gather, a loss all_reduce, a process-group destructor): every rank then waits for the process-group
    timeout (30 min), and a rank blocked in a collective cannot run Python's SIGTERM handler. Instead the error is
    logged with this rank's number (stderr, and train.log on rank 0), written to torchrun's error file (its failure
    summary then names the rank and the error), and the process exits with status 1 without touching the process
    group. The other ranks' collectives then fail on the closed connection and end them the same way, and torchrun
    stops whatever is left (SIGTERM, then SIGKILL). Checkpoints already written stay: they are written atomically.

    A single process logs the error (train.log says why the run stopped) and re-raises.
    """
    try:
        yield
    except Exception as error:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size <= 1:  # the error goes to train.log too: the run directory then says why the run stopped
            _logger.error("the run failed: %s: %s", type(error).__name__, error)
            raise
        rank = os.environ.get("RANK", "?")
        _logger.error(
            "rank %s of %d failed: %s: %s; ending this process so that the whole job stops",
            rank, world_size, type(error).__name__, error, exc_info=error,
        )  # fmt: skip
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's per-worker error file (torch's @record format)
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(error)
        logging.shutdown()  # flush train.log and the console
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
