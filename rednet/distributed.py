"""torch.distributed glue: process group set-up from torchrun's or SLURM's environment, rank helpers, reductions.

A single process is the world-size-1 case of the same code, so train.py has one path.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
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


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22; "" where unknown): a pid and its
    start time name one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # (the command name in parentheses may hold spaces)


def job_id() -> str:
    """The batch system's id of this job, which a requeued job keeps ("" outside one): submitit's, else SLURM's."""
    if "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        with contextlib.suppress(Exception):  # (outside a submitit job process)
            return str(submitit.JobEnvironment().job_id)
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "")


def torchrun_job() -> str:
    """This torchrun invocation, which its worker restarts keep ("" outside torchrun): its rendezvous id and its
    elastic agent (this worker's parent process: host, pid, start time). The agent tells apart torchruns that share
    a rendezvous id (--rdzv-id=$SLURM_JOB_ID for every torchrun of a batch job; "none" without --rdzv-id)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id:
        return ""
    agent = os.getppid()
    return f"{run_id}@{socket.gethostname()}:{agent}:{_process_start(agent) or '?'}"


def is_date_folder(name: str) -> bool:
    """Whether a folder name is a date (Hydra's default run directory is outputs/<task>/<date>/<time>)."""
    return re.fullmatch(r"\d[\d_-]*", name) is not None


def restart_count() -> int:
    """How often torchrun has restarted this worker group (--max-restarts) after a failure; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def earlier_attempt_dir(own_dir: Path) -> Path | None:
    """The directory the first attempt of this torchrun job claimed, when torchrun restarted the workers; else None.

    A restarted worker group is composed by Hydra again, so the default hydra.run.dir (named by the second) is a new
    one: the earlier attempt's directory is a sibling of it (or of its date folder, past midnight) whose claim
    names this torchrun (`torchrun_job`). (A worker group moved to another node by a multi-node restart has another
    agent and is not matched: it starts in a new directory, as before.)
    """
    job = torchrun_job()
    if restart_count() == 0 or not job:
        return None
    parent = own_dir.parent
    places = [lambda: [own_dir], lambda: _subdirs(parent)]  # nearest first: a fixed hydra.run.dir is its own
    if is_date_folder(parent.name):  # Hydra's default <date>/<time>: the other date folders too
        places.append(lambda: [d for date in _subdirs(parent.parent) if date != parent for d in _subdirs(date)])
    for listed in places:
        found = [d for d in listed() if read_claim(d).torchrun == job]
        if found:
            return max(found, key=lambda d: (d / CLAIM_FILE).stat().st_mtime)
    return None


def _subdirs(folder: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in folder.iterdir() if p.is_dir()]
    return []


@dataclass(frozen=True)
class Claim:
    """Who claimed a run directory (the fields of its .run_claim line; "" where the line does not say)."""

    host: str = ""
    pid: int = 0
    start: str = ""  # the process's start time (`_process_start`)
    job: str = ""  # the batch job (`job_id`), kept when the job is requeued
    torchrun: str = ""  # the torchrun invocation (`torchrun_job`), kept when it restarts its workers
    moved_from: str = ""  # the directory this run was named first, when another run had claimed that

    def alive_elsewhere(self) -> bool:
        """Whether the claiming process still runs on this host and is not this process."""
        if self.host != socket.gethostname() or not self.pid or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # (another user's process: it exists)
            return True
        return not self.start or self.start == _process_start(self.pid)


def read_claim(run_dir: Path) -> Claim:
    """The claim of `run_dir` (an empty `Claim` when there is none or it cannot be read)."""
    first, *more = claim_holder(run_dir).split("\n")
    words = first.split()
    fields = dict(zip(words[0::2], words[1::2]))
    fields.update(line.split(" ", 1) for line in more if " " in line)  # "moved_from PATH" (a path may hold spaces)
    pid = fields.get("pid", "")
    return Claim(
        host=fields.get("host", ""),
        pid=int(pid) if pid.isdigit() else 0,
        start=fields.get("start", "").strip("?"),  # "?": unknown, as older claims wrote it
        job=fields.get("job", ""),
        torchrun=fields.get("torchrun", ""),
        moved_from=fields.get("moved_from", ""),
    )


def _claim(run_dir: Path, exclusive: bool, moved_from: str = "") -> bool:
    """Create `run_dir`/.run_claim (naming host, process, job and time); False when `exclusive` and it exists.

    Raises:
        PermissionError / OSError: the directory cannot be created or written, naming it and the fix.
    """
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / CLAIM_FILE, flags, 0o644)  # O_EXCL: one creator wins, atomically (also on NFS 3+)
    except FileExistsError:
        return False
    except OSError as e:
        raise type(e)(
            e.errno, f"cannot claim the run directory '{run_dir}' ({e.strerror}): choose a writable hydra.run.dir"
        ) from e
    start = _process_start(os.getpid())  # unknown without /proc: left out, so a reader does not compare it
    line = f"host {socket.gethostname()} pid {os.getpid()}" + (f" start {start}" if start else "")
    line += f" job {job_id()}" if job_id() else ""
    line += f" torchrun {torchrun_job()}" if torchrun_job() else ""
    with os.fdopen(fd, "w") as f:
        f.write(
            f"{line} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + (f"moved_from {moved_from}\n" if moved_from else "")
        )
    return True


def _numbered(run_dir: Path) -> list[Path]:
    """The `run_dir`_1, _2, ... directories that exist, in order."""
    found = []
    for attempt in itertools.count(1):
        candidate = run_dir.with_name(f"{run_dir.name}_{attempt}")
        if not candidate.is_dir():
            return found
        found.append(candidate)
    raise AssertionError("unreachable")


def claim_run_dir(run_dir: str | Path, continue_run: bool = False) -> Path:
    """The directory this run owns: `run_dir`, or the first free `run_dir`_1, _2, ... when another run has it.

    Hydra names the default directory by the second (outputs/train/<date>/<time>) and creates it before our code
    runs, so two runs started in the same second share it. A run claims its directory by creating .run_claim in it
    exclusively; whoever comes second takes a directory of its own (its claim says which it was moved from), so no
    run writes into another's. A new run in a directory whose run ended before saving any checkpoint (on this host)
    takes it over; one that holds checkpoints is left untouched (train.py then asks for resume=auto).

    A run that continues one (`continue_run`: resume=auto or a path) continues in `run_dir` when it holds
    checkpoints, or in the `run_dir`_N its batch job was moved to (a requeued job keeps its id and its Hydra
    directory name); with no checkpoints yet it is a new run and claims a directory as one.

    Raises:
        FileExistsError: `continue_run` and the directory's run is still running on this host (another process).
        OSError: the directory cannot be created or written.
    """
    run_dir = Path(run_dir)
    if continue_run:
        target = _continued_dir(run_dir)
        holder = read_claim(target)
        if has_checkpoints(target):
            check_not_running(target)
            _claim(target, exclusive=False, moved_from=holder.moved_from)
            return target
        if holder.pid == os.getpid() or (holder.job and holder.job == job_id()):  # this run's own, before a save
            _claim(target, exclusive=False, moved_from=holder.moved_from)
            return target
    elif has_checkpoints(run_dir):
        return run_dir  # another run's checkpoints: its claim stays, and train.py refuses to start a new run here
    if _abandoned(run_dir):
        _claim(run_dir, exclusive=False)
        return run_dir
    for attempt in itertools.count():
        candidate = run_dir.with_name(f"{run_dir.name}_{attempt}") if attempt else run_dir
        if _claim(candidate, exclusive=True, moved_from=str(run_dir) if attempt else ""):
            return candidate
    raise AssertionError("unreachable")


def check_not_running(run_dir: str | Path) -> None:
    """Refuse `run_dir` while the run that claimed it still runs (on this host, in another process).

    Raises:
        FileExistsError: naming the directory, the running run (host, pid, start, job) and the fix.
    """
    run_dir = Path(run_dir)
    if read_claim(run_dir).alive_elsewhere():
        raise FileExistsError(
            f"'{run_dir}' is in use by a run that is still running ({claim_holder(run_dir)}): two runs must not "
            "write into one directory; wait for it to end (then resume=auto continues it) or stop it, or choose "
            "another hydra.run.dir"
        )


def has_checkpoints(run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint (a write killed half-way leaves only a hidden .tmp file)."""
    return any((run_dir / "checkpoints").glob("*.pt"))


def _continued_dir(run_dir: Path) -> Path:
    """Where a run continuing `run_dir` continues: the `run_dir`_N this batch job was moved to, else `run_dir`
    (with a warning when other runs were moved from it: the user may have meant one of those)."""
    moved = [d for d in _numbered(run_dir) if read_claim(d).moved_from == str(run_dir)]
    job = job_id()
    own = [d for d in moved if job and read_claim(d).job == job]
    if own:
        return own[0]
    if moved and has_checkpoints(run_dir):
        _logger.warning(
            "resume: continuing the run in %s; %s started in the same directory and moved to %s (to continue one of "
            "those, set hydra.run.dir to it)", run_dir, "a run" if len(moved) == 1 else "runs",
            ", ".join(map(str, moved)),
        )  # fmt: skip
    return run_dir


def _abandoned(run_dir: Path) -> bool:
    """Whether `run_dir` was claimed by a process of this host that has ended without saving a checkpoint (a run
    that failed during set-up, e.g. on a wrong data.root, or was killed before its first checkpoint was complete):
    rerunning the same command may take the directory over."""
    holder = read_claim(run_dir)
    if holder.host != socket.gethostname() or not holder.pid or holder.pid == os.getpid() or holder.alive_elsewhere():
        return False
    return not has_checkpoints(run_dir)


def claim_holder(run_dir: Path) -> str:
    """Who claimed `run_dir` ("host H pid P start S [job J] at T", then "moved_from D" on a line of its own)."""
    try:
        return (run_dir / CLAIM_FILE).read_text().strip()
    except OSError:
        return "unknown"


def shared_run_dir(own_dir: str | Path, continue_run: bool = False) -> Path:
    """The directory rank 0 claimed (see `claim_run_dir`), for every rank; after a torchrun restart, the directory
    of the job's first attempt (`earlier_attempt_dir`).

    Hydra names the directory from each process's own clock, so ranks started in different seconds get different
    ones: rank 0 decides, and a rank whose Hydra made another directory removes it if it holds only Hydra's files
    (none for train.py, whose hydra.output_subdir is null: it writes .hydra/ into the claimed directory itself).
    """
    own_dir = Path(own_dir)
    claimed = own_dir
    if int(os.environ.get("RANK", 0)) == 0:
        earlier = earlier_attempt_dir(own_dir)  # (a torchrun restart continues its first attempt's directory)
        claimed = claim_run_dir(earlier or own_dir, continue_run or earlier is not None)
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

    A single process logs the error (train.log says why the run stopped) and re-raises. Ctrl-C (KeyboardInterrupt)
    is logged and re-raised on every rank: unwinding it enters no collective, and torchrun names the signal.
    """
    try:
        yield
    except KeyboardInterrupt:
        rank = os.environ.get("RANK", "0")
        _logger.error("interrupted (SIGINT, Ctrl-C) on rank %s: the run stops here; the checkpoints written so far "
                      "are kept, resume=auto continues from the last one", rank)  # fmt: skip
        raise
    except Exception as error:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size <= 1:  # the error goes to train.log too: the run directory then says why the run stopped
            _logger.error("the run failed: %s: %s", type(error).__name__, error)
            raise
        rank = os.environ.get("RANK", "?")
        # torchrun's SIGTERM, sent as soon as it sees a peer die, must not end this rank in the middle of its report
        # (the process ends right after it anyway): a rank whose collective failed on that dead peer said nothing.
        with contextlib.suppress(ValueError):  # (only the main thread may set a handler)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
