"""What a run reports: train.log, TensorBoard scalars, progress (tqdm bars on a terminal, plain lines elsewhere),
peak memory. Rank 0 only."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

LOG_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints above running progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break training
            self.handleError(record)


class _WarningFirstLine(logging.Filter):
    """Keeps `path:line: Category: message` of a captured warning, not the source line Python prints under it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().strip().split("\n", 1)[0], None
        return True


def setup_logging(log_file: str | Path | None, is_main: bool = True) -> logging.Logger:
    """Send the `rednet` and `__main__` loggers to the console and `log_file` (rank 0); other ranks warn only.

    Python warnings (`warnings.warn`: ours, e.g. a classifier left fresh for fine-tuning, timm's, torch's) go the
    same way, through the `py.warnings` logger, so the log file holds them too.
    """
    # Off then on: captureWarnings(True) does nothing when it was called before, even if warnings.showwarning has
    # been put back since (warnings.catch_warnings does that on exit), and then warnings would reach stderr only.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if log_file is not None and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for name in ("rednet", "__main__", "train", "eval", "py.warnings"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):  # a second run in the same process must not log to the old file
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _WarningFirstLine) for f in warnings_logger.filters):
        warnings_logger.addFilter(_WarningFirstLine())
    return logging.getLogger("rednet")


def create_writer(log_dir: str | Path, enabled: bool = True, purge_step: int | None = None) -> SummaryWriter | None:
    """A TensorBoard writer for rank 0; None elsewhere (see `log_scalars`).

    `purge_step`: TensorBoard drops the points of earlier event files at this step and after (a resumed run writes
    the steps after its checkpoint again; without it each would show twice, a zig-zag curve).
    """
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step) if enabled else None


def log_scalars(writer: SummaryWriter | None, scalars: dict[str, float], step: int) -> None:
    """Write several scalars at one step; no-op without a writer."""
    if writer is None:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


PLAIN_PROGRESS_EVERY_S = 60.0  # seconds between progress lines when stderr is not a terminal
_PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class PlainProgress:
    """The part of a tqdm bar the loop uses (iterate, `set_postfix`, `close`), written as one plain log line every
    `every_s` seconds: a log file or a batch system's output gets a line a minute, not every bar frame."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, every_s: float) -> None:
        self.iterable, self.desc, self.every_s = iterable, desc, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def __iter__(self) -> Iterator[Any]:
        start = last = time.monotonic()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                line = tqdm.format_meter(
                    done,
                    self.total,
                    now - start,
                    prefix=self.desc,
                    postfix=self.postfix,
                    unit="batch",
                    bar_format=_PLAIN_FORMAT,
                )
                logging.getLogger("rednet.progress").info(line)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable,
    desc: str,
    enabled: bool = True,
    total: int | None = None,
    file: TextIO | None = None,
    every_s: float = PLAIN_PROGRESS_EVERY_S,
) -> tqdm | PlainProgress:
    """A progress display over `iterable` on rank 0 when `enabled`: a tqdm bar when `file` (default stderr) is a
    terminal, else a `PlainProgress` log line every `every_s` seconds. Silent elsewhere."""
    file = sys.stderr if file is None else file
    enabled = enabled and (not dist.is_initialized() or dist.get_rank() == 0)
    if enabled and not _is_terminal(file):
        return PlainProgress(iterable, desc, total, every_s)
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=False, file=file)


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes, since it started or since the last `reset_peak_rss`.

    Linux: VmHWM of /proc/self/status, this address space's own high-water mark. Not `getrusage`'s ru_maxrss:
    the kernel carries that across exec, so a child started by a process that once held 1 GB reads at least 1 GB
    however little it uses itself. Elsewhere (no /proc): ru_maxrss.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def reset_peak_rss() -> bool:
    """Restart `peak_rss_bytes` from the current resident set size (Linux >= 4.0: "5" into /proc/self/clear_refs).

    Returns False where the kernel does not allow it (no /proc, or the write refused); the peak then still
    includes everything since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_rise(fn: Callable[[], Any]) -> float:
    """Bytes the resident set size peaked above its current value while `fn()` ran (the high-water mark restarted
    first, so earlier peaks do not count); NaN where it cannot be restarted (`reset_peak_rss`)."""
    reset = reset_peak_rss()
    before = current_rss_bytes()
    fn()
    return peak_rss_bytes() - before if reset else float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def format_metrics(metrics: dict[str, Any]) -> str:
    """`top1 91.23 | top5 99.10 | loss 0.3120` for log lines."""
    return " | ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}" for k, v in metrics.items() if k != "count")
