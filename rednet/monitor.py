"""What a run reports: train.log, TensorBoard scalars, tqdm progress bars, peak memory. Rank 0 only."""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
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


def setup_logging(log_file: str | Path | None, is_main: bool = True) -> logging.Logger:
    """Send the `rednet` and `__main__` loggers to the console and `log_file` (rank 0); other ranks warn only."""
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if log_file is not None and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for name in ("rednet", "__main__", "train", "eval"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):  # a second run in the same process must not log to the old file
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
    return logging.getLogger("rednet")


def create_writer(log_dir: str | Path, enabled: bool = True) -> SummaryWriter | None:
    """A TensorBoard writer for rank 0; None elsewhere (see `log_scalars`)."""
    return SummaryWriter(log_dir=str(log_dir)) if enabled else None


def log_scalars(writer: SummaryWriter | None, scalars: dict[str, float], step: int) -> None:
    """Write several scalars at one step; no-op without a writer."""
    if writer is None:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


def progress(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None) -> tqdm:
    """A tqdm bar over `iterable`, silent on ranks other than 0."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=False)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def format_metrics(metrics: dict[str, Any]) -> str:
    """`top1 91.23 | top5 99.10 | loss 0.3120` for log lines."""
    return " | ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}" for k, v in metrics.items() if k != "count")
