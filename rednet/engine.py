"""The training loop: one training epoch (`train_one_epoch`, set by `LoopSettings`) and evaluation with exact counts."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad, unwrap_model
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from rednet import distributed, monitor
from rednet.data import BadImageError
from rednet.run_state import TrainProgress, place_schedule

_logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


def amp_autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for trainer.amp (none | bf16 | fp16)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"trainer.amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


@dataclass(frozen=True)
class LoopSettings:
    """How `train_one_epoch` trains (from the trainer config).

    Attributes:
        device: where batches go.
        epoch_updates: optimizer updates in a whole epoch (run_state.updates_per_epoch), to place the LR schedule.
        amp: none | bf16 | fp16 (fp16 needs a GradScaler).
        channels_last: batches in channels-last memory format.
        grad_accum: micro-batches per optimizer update (the epoch's last update may take fewer).
        clip_grad: gradient clipping value (None: no clipping), in `clip_mode` (timm's norm | value | agc).
        log_interval: optimizer updates per logged point.
        ckpt_every_steps: save a checkpoint every this many updates (0: only at epoch ends).
        show_progress: a progress bar.
    """

    device: torch.device
    epoch_updates: int
    amp: str = "none"
    channels_last: bool = False
    grad_accum: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"
    log_interval: int = 50
    ckpt_every_steps: int = 0
    show_progress: bool = True


class _LossLog:
    """The per-update losses of an epoch: checked for NaN/inf and logged in windows, one device sync per window."""

    def __init__(self, writer: Any, optimizer: torch.optim.Optimizer, bar: Any) -> None:
        self.writer, self.optimizer, self.bar = writer, optimizer, bar
        self.pending: list[torch.Tensor] = []  # per-update losses not yet checked
        self.loss_sum, self.updates, self.window_images = 0.0, 0, 0
        self.window_start = time.perf_counter()

    def flush(self, progress: TrainProgress) -> None:
        """Check the pending losses (first bad step raises), then log the window at `progress.step`.

        The losses are averaged over ranks first, so that every rank stops at the same step when one rank's loss is
        not finite.
        """
        if not self.pending:
            return
        world_size = distributed.get_world_size()
        losses = (distributed.all_reduce_sum(torch.stack(self.pending).float()) / world_size).cpu()
        first_step = progress.step - len(self.pending) + 1
        self.pending.clear()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise NonFiniteLossError(
                f"training loss is {losses[bad[0, 0]].item()} at step {first_step + bad[0, 0].item()} "
                f"(epoch {progress.epoch}); stopped without saving it: the last checkpoint holds the last good state. "
                "Lower optim.lr, set trainer.clip_grad, or use trainer.amp=bf16 instead of fp16, then resume"
            )
        self.loss_sum += losses.sum().item()
        self.updates += len(losses)
        elapsed = time.perf_counter() - self.window_start
        scalars = {
            "train/loss": losses.mean().item(),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/throughput": self.window_images * world_size / max(elapsed, 1e-9),
        }
        monitor.log_scalars(self.writer, scalars, progress.step)
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.3g}")
        self.window_images, self.window_start = 0, time.perf_counter()


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, settings: LoopSettings
) -> None:
    if scaler is not None and settings.clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients
    if settings.clip_grad:
        dispatch_clip_grad(model.parameters(), settings.clip_grad, mode=settings.clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    progress: TrainProgress,
    settings: LoopSettings,
    *,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    mixup: Callable | None = None,
    model_ema: nn.Module | None = None,
    writer: Any = None,
    save_checkpoint: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Train over `loader` (already positioned at `progress.epoch_batches`), updating `progress` after each update.

    Every batch is used: updates take `settings.grad_accum` micro-batches, the epoch's last one the batches that are
    left, its loss averaged over those. The loss is checked for NaN/inf without a device sync per step: at each log
    interval and before any checkpoint is written, so a checkpoint never holds weights updated from a non-finite loss.

    Returns:
        mean training loss, updates done, throughput (images/s over all ranks) and whether `should_stop` ended the
        epoch early.
    """
    model.train()
    num_batches, accum = len(loader), settings.grad_accum
    world_size = distributed.get_world_size()
    bar = monitor.progress(loader, desc=f"train {progress.epoch}", enabled=settings.show_progress, total=num_batches)
    losses = _LossLog(writer, optimizer, bar)
    epoch_images, epoch_start = 0, time.perf_counter()
    accum_loss = torch.zeros((), device=settings.device)
    stopped = False
    optimizer.zero_grad(set_to_none=True)
    batches = iter(bar)
    for i in range(num_batches):
        try:
            batch = next(batches)
        except BadImageError:
            if world_size == 1:  # no collective on one rank's error path: the other ranks would never join it
                losses.flush(progress)  # the caller saves the state on this error: its losses must be checked first
            raise
        images, targets = _to_device(batch, settings.device, settings.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        group_start = i - i % accum
        group_size = min(accum, num_batches - group_start)  # the epoch's last group may be shorter
        is_update = i == group_start + group_size - 1
        # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
        sync = contextlib.nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp_autocast(settings.device, settings.amp):
                loss = loss_fn(model(images), targets) / group_size
            accum_loss += loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.window_images += images.shape[0]
        epoch_images += images.shape[0]
        if not is_update:
            continue

        _optimizer_step(model, optimizer, scaler, settings)
        progress.step += 1
        progress.epoch_batches += group_size
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=progress.step)
        place_schedule(scheduler, progress, settings.epoch_updates, accum)
        losses.pending.append(accum_loss)
        accum_loss = torch.zeros((), device=settings.device)

        if progress.step % settings.log_interval == 0:
            losses.flush(progress)
        if settings.ckpt_every_steps and progress.step % settings.ckpt_every_steps == 0 and save_checkpoint:
            losses.flush(progress)
            save_checkpoint()
        if should_stop is not None and should_stop():
            stopped = True
            break
    losses.flush(progress)
    bar.close()
    elapsed = time.perf_counter() - epoch_start
    return {
        "loss": losses.loss_sum / max(losses.updates, 1),
        "updates": losses.updates,
        "throughput": epoch_images * world_size / max(elapsed, 1e-9),
        "stopped": stopped,
    }


def precise_bn_loader(loader: DataLoader, batches: int) -> DataLoader:
    """A loader of `batches` full batches of `loader`'s dataset, the same ones every epoch, for precise BatchNorm.

    The images are a fixed random subset of the training set (a permutation seeded by the train sampler's seed; rank
    r of n takes every n-th image of it), so that every class is present (the folder order is by class). They get
    the dataset's training augmentation of the current epoch: `CheckedImageFolder` seeds it by (seed, epoch, index)
    and gives the process's generators back their state, and this loader has its own generator, so reading it
    consumes nothing of the training run's random streams. Fewer batches when the rank's share of the subset is
    smaller; the last partial batch is dropped (a batch of one has no variance).
    """
    sampler = loader.sampler
    seed, rank, ranks = getattr(sampler, "seed", 0), getattr(sampler, "rank", 0), getattr(sampler, "num_replicas", 1)
    dataset = loader.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    indices = order[rank::ranks][: batches * loader.batch_size].tolist()
    return DataLoader(
        Subset(dataset, indices),
        batch_size=loader.batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),  # worker seeds; the global generator is not drawn
    )


def recompute_batchnorm_stats(
    model: nn.Module,
    loader: DataLoader,
    batches: int,
    device: torch.device,
    channels_last: bool = False,
    amp: str = "none",
) -> None:
    """Precise BatchNorm (as in pycls/fvcore): replace every BatchNorm's running mean/variance of `model` by their
    average over `batches` training batches (`precise_bn_loader`) with the current weights.

    The running statistics are an exponential average over the last ~10 batches (momentum 0.1): while the weights
    move fast they trail them, and evaluation with them can score a fraction of what the weights do (an epoch-1
    checkpoint: 31% with its running statistics, 89% with recomputed ones; docs/benchmarks.md, "Quickstart recipe").
    torch.optim.swa_utils.update_bn resets the statistics and averages them cumulatively (momentum None) in train
    mode over plain images (no mixup); weights are not changed, and the random generators (dropout, drop-path) are
    given back their state, so the training run that follows is the same with or without this. `batches` <= 0: no-op.
    Pass the plain model (`unwrap`): no DDP forward (it would wait for a backward) and no torch.compile recompile.
    """
    if batches <= 0:
        return
    cuda = [device] if device.type == "cuda" else []

    def images() -> Iterator[torch.Tensor]:
        for batch in precise_bn_loader(loader, batches):
            if batch is not None:  # (a training set replaces unreadable images: no batch is None there)
                yield _to_device(batch, device, channels_last)[0]

    with torch.random.fork_rng(devices=cuda), amp_autocast(device, amp):
        update_bn(images(), model)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    desc: str = "val",
    show_progress: bool = True,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over every image of `loader`, summed as counts over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for batch in monitor.progress(loader, desc=desc, enabled=show_progress):
        if batch is None:  # every image of the batch was unreadable and skipped
            continue
        images, targets = _to_device(batch, device, channels_last)
        with amp_autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ]
        )
    loss_sum, top1, top5, count = distributed.all_reduce_sum(totals).tolist()
    if count == 0:
        raise RuntimeError("evaluation saw no images: the validation split is empty or every image was skipped")
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss_sum / count, "count": int(count)}
