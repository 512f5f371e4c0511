"""The training loop's pieces: model creation, one training epoch, evaluation with exact counts."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

import rednet
from rednet import distributed, monitor
from rednet.checkpoint import WeightsSettings, check_arch, weights_settings
from rednet.data import BadImageError

_logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@dataclass
class TrainProgress:
    """Where training stands; saved in every checkpoint so a resumed run continues at the same batch.

    Attributes:
        epoch: the epoch in progress (0-based); after an epoch ends, the next one.
        step: optimizer updates done since the start of training.
        epoch_batches: batches of `epoch` consumed by the updates done (0 at an epoch boundary).
        best_top1: best validation top-1 so far (-1 before the first evaluation).
        schedule_offset: added to `step` to place the LR schedule. Not saved: a resume sets it to
            epoch × updates per epoch + the epoch's updates − step, which is 0 unless the updates per epoch changed.
    """

    epoch: int = 0
    step: int = 0
    epoch_batches: int = 0
    best_top1: float = -1.0
    schedule_offset: int = 0


def check_model_name(name: str) -> None:
    """Fail early on a model name that is neither a RedNet nor a timm model, listing the RedNets."""
    if name not in rednet.list_models() and not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: set model=<one of {', '.join(rednet.list_models())}> "
            "(any timm model name, e.g. model.name=resnet50, works too)"
        )


def build_model(name: str, num_classes: int, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """A RedNet by name (rednet.create_model), or any other timm model.

    ``pretrained``: True (the registered weights, with their pretrained_cfg) or a checkpoint path/URL in any layout
    rednet.weights reads: the model then takes the checkpoint's model arguments (``kwargs`` win) and carries its
    preprocessing in ``model.pretrained_cfg``; a classifier of another class count is left fresh (fine-tuning).
    """
    check_model_name(name)
    if isinstance(pretrained, (str, Path)):
        from rednet import weights

        path = weights.fetch(pretrained)
        model, _ = model_from_checkpoint(weights.read_checkpoint(path), path, name, num_classes, **kwargs)
        return model
    if name in rednet.list_models():
        return rednet.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    return timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)


def model_from_checkpoint(
    ckpt: dict[str, Any],
    path: str | Path,
    name: str | None = None,
    num_classes: int | None = None,
    use_ema: bool = True,
    classes: list[str] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, WeightsSettings]:
    """Build the model a loaded checkpoint holds and load its weights; one path for eval, fine-tuning and scripts.

    Args:
        ckpt: a checkpoint as ``rednet.weights.read_checkpoint`` returns it (any layout it reads).
        path: where it came from, for messages.
        name: model name; None takes the checkpoint's architecture (an error when it names none).
        num_classes: classifier outputs; None takes the checkpoint's. Another count than the checkpoint's leaves the
            classifier fresh, with a warning (fine-tuning); with ``classes`` it is an error instead.
        use_ema: load the EMA weights when the checkpoint has them.
        classes: the evaluation folder's classes: the checkpoint must predict exactly these, in this order.
        **kwargs: model arguments; they win over the checkpoint's (``WeightsSettings.model_kwargs``).

    Returns:
        the model, on the CPU, with the checkpoint's preprocessing merged into ``model.pretrained_cfg``, and the
        settings read from the checkpoint.
    """
    from rednet import weights

    settings = weights_settings(ckpt)
    if name is None:
        name = settings.arch
        if name is None:
            raise ValueError(
                f"checkpoint '{path}' does not name its architecture: set model=<name> (e.g. model=rednet50, or "
                "model.name=<timm model>)"
            )
    check_model_name(name)
    check_arch(ckpt, name, path)
    state_dict = weights.to_state_dict(ckpt, use_ema=use_ema)
    shape = {**settings.model_kwargs, **weights.model_kwargs_from_state_dict(state_dict)}
    if name not in rednet.list_models():
        shape = {key: value for key, value in shape.items() if key in settings.model_kwargs and key != "num_classes"}
    checkpoint_classes = shape.pop("num_classes", None) or settings.num_classes
    model_kwargs = {**shape, **kwargs}
    num_classes = num_classes or checkpoint_classes
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    create = rednet.create_model if name in rednet.list_models() else timm.create_model
    model = create(name, pretrained=False, **model_kwargs)
    if classes is not None:
        check_checkpoint_classes(ckpt, state_dict, model, classes, Path(path))
    weights.load_state_dict(model, state_dict)
    model.pretrained_cfg = {**model.pretrained_cfg, **settings.pretrained_cfg}
    return model, settings


def model_from_weights(source: str | Path | None, name: str | None, default_name: str, **kwargs: Any) -> nn.Module:
    """A model for inference scripts (export, visualization), in eval mode: from a checkpoint path/URL with its
    architecture, shape arguments and preprocessing (``model.pretrained_cfg``), or ``name`` / ``default_name`` with
    random weights when ``source`` is None. ``kwargs`` (e.g. num_classes) win over the checkpoint's."""
    if source is None:
        return timm.create_model(name or default_name, pretrained=False, **kwargs).eval()
    from rednet import weights

    path = weights.fetch(source)
    model, _ = model_from_checkpoint(weights.read_checkpoint(path), path, name, **kwargs)
    return model.eval()


def class_difference(trained: list[str] | None, classes: list[str]) -> str:
    """How ``classes`` differ from a checkpoint's ``trained`` ones ("" when they match or are unknown)."""
    if trained is None or list(trained) == list(classes):
        return ""
    missing, extra = sorted(set(trained) - set(classes)), sorted(set(classes) - set(trained))
    if not missing and not extra:
        return "same names in another order"
    return f"missing: {missing[:5]}, not in the checkpoint: {extra[:5]}"


def check_checkpoint_classes(
    ckpt: dict[str, Any], state_dict: dict[str, torch.Tensor], model: nn.Module, classes: list[str], path: Path
) -> None:
    """Refuse to evaluate a checkpoint on class folders other than the ones it was trained on."""
    difference = class_difference(ckpt.get("classes"), classes)
    if difference:
        raise ValueError(
            f"checkpoint '{path}' was trained on {len(ckpt['classes'])} classes but the val folder has "
            f"{len(classes)} ({difference}): evaluate on the data it was trained on"
        )
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    weight = state_dict.get(f"{classifier}.weight") if classifier else None
    if weight is not None and weight.shape[0] != len(classes):
        raise ValueError(
            f"checkpoint '{path}' has a {weight.shape[0]}-class classifier but the val folder has {len(classes)} "
            "class folders: evaluate on the data it was trained on"
        )


def amp_autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for trainer.amp (none | bf16 | fp16)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"trainer.amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (what checkpoints and EMA hold)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    progress: TrainProgress,
    *,
    device: torch.device,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: str = "none",
    channels_last: bool = False,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    mixup: Callable | None = None,
    model_ema: nn.Module | None = None,
    writer: Any = None,
    log_interval: int = 50,
    checkpoint_every: int = 0,
    save_checkpoint: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train over `loader` (already positioned at `progress.epoch_batches`), updating `progress` after each update.

    The loss is checked for NaN/inf without a device sync per step: at each log interval and before any checkpoint
    is written, so a checkpoint never holds weights updated from a non-finite loss.

    Returns:
        mean training loss, throughput (images/s over all ranks) and whether `should_stop` ended the epoch early.
    """
    model.train()
    num_batches = len(loader) // grad_accum * grad_accum  # a partial accumulation group at the end is dropped
    world_size = distributed.get_world_size()
    pending: list[torch.Tensor] = []  # per-update losses not yet checked
    epoch_loss, epoch_updates, epoch_images = 0.0, 0, 0
    window_images, window_start, epoch_start = 0, time.perf_counter(), time.perf_counter()
    accum_loss = torch.zeros((), device=device)
    stopped = False

    def flush() -> None:
        # One sync for all pending losses: find the first bad step, else log the window. The losses are averaged
        # over ranks first, so that every rank stops at the same step when one rank's loss is not finite.
        nonlocal epoch_loss, epoch_updates, window_images, window_start
        if not pending:
            return
        losses = (distributed.all_reduce_sum(torch.stack(pending).float()) / world_size).cpu()
        first_step = progress.step - len(pending) + 1
        pending.clear()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise NonFiniteLossError(
                f"training loss is {losses[bad[0, 0]].item()} at step {first_step + bad[0, 0].item()} "
                f"(epoch {progress.epoch}); stopped without saving it: the last checkpoint holds the last good state. "
                "Lower optim.lr, set trainer.clip_grad, or use trainer.amp=bf16 instead of fp16, then resume"
            )
        epoch_loss += losses.sum().item()
        epoch_updates += len(losses)
        elapsed = time.perf_counter() - window_start
        scalars = {
            "train/loss": losses.mean().item(),
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/throughput": window_images * world_size / max(elapsed, 1e-9),
        }
        monitor.log_scalars(writer, scalars, progress.step)
        bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.3g}")
        window_images, window_start = 0, time.perf_counter()

    bar = monitor.progress(loader, desc=f"train {progress.epoch}", enabled=show_progress, total=num_batches)
    optimizer.zero_grad(set_to_none=True)
    batches = iter(bar)
    for i in range(num_batches):
        try:
            batch = next(batches)
        except BadImageError:
            if world_size == 1:  # no collective on one rank's error path: the other ranks would never join it
                flush()  # the caller saves the state on this error: its pending losses must be checked first
            raise
        images, targets = _to_device(batch, device, channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        is_update = (i + 1) % grad_accum == 0
        # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
        sync = contextlib.nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp_autocast(device, amp):
                loss = loss_fn(model(images), targets)
            accum_loss += loss.detach() / grad_accum
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        window_images += images.shape[0]
        epoch_images += images.shape[0]
        if not is_update:
            continue

        if scaler is not None:
            if clip_grad:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip_grad:
                dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.epoch_batches += grad_accum
        if model_ema is not None:
            model_ema.update(unwrap(model), step=progress.step)
        if scheduler is not None:
            scheduler.step_update(num_updates=progress.step + progress.schedule_offset)
        pending.append(accum_loss)
        accum_loss = torch.zeros((), device=device)

        if progress.step % log_interval == 0:
            flush()
        if checkpoint_every and progress.step % checkpoint_every == 0 and save_checkpoint is not None:
            flush()
            save_checkpoint()
        if should_stop is not None and should_stop():
            stopped = True
            break
    flush()
    bar.close()
    elapsed = time.perf_counter() - epoch_start
    return {
        "loss": epoch_loss / max(epoch_updates, 1),
        "updates": epoch_updates,
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
