"""Train a RedNet (or any timm model) on an image folder.

    python train.py model=rednet50 data.root=/data/imagenet
    python train.py experiment=rednet50_paper data.root=/data/imagenet trainer=gpu
    python train.py experiment=quickstart data.root=data/digits
    torchrun --standalone --nproc-per-node=8 train.py experiment=rednet50_paper data.root=/data/imagenet
    python train.py -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 experiment=rednet50_paper resume=auto ...

Read top to bottom: set-up, data, model, optimizer and schedule, resume, then the epoch loop (train, evaluate,
checkpoint). The pieces live in rednet/{data,engine,checkpoint,monitor,distributed,preemption}.py. SIGTERM and
SIGUSR1 stop the run after the current step with last.pt written (see rednet/preemption.py). An error on any rank
of a multi-process job ends every process, with the error and its rank in the output and the checkpoints kept
(distributed.end_job_on_error). A run claims its directory: a run started in the same second gets <dir>_1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from timm.layers import convert_sync_batchnorm
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn, random_seed
from torch.nn.parallel import DistributedDataParallel

from rednet import config_schema, data, distributed, engine, factory, monitor, preemption, run_state, weights
from rednet.checkpoint import PREPROCESSING_KEYS, weights_settings

log = logging.getLogger(__name__)
# configs/hydra/launcher/submitit_*.yaml replace the plugin's configs of the same name on purpose (DDP defaults).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema")


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """`optim.lr` is given at global batch `optim.lr_base_size`: scale it linearly to the real global batch."""
    if optim_cfg.get("lr_base_size") is None:
        return float(optim_cfg.lr)
    return float(optim_cfg.lr) * global_batch / optim_cfg.lr_base_size


def create_optimizer(model: torch.nn.Module, optim_cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory, fed the config's keys (timm's names) with the scaled lr."""
    kwargs = {k: v for k, v in OmegaConf.to_container(optim_cfg).items() if k != "lr_base_size"}
    return create_optimizer_v2(model, **{**kwargs, "lr": lr})


def create_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: DictConfig, lr: float, epochs: int, updates: int):
    """timm's scheduler factory (placed by run_state.place_schedule: per update, or per epoch with
    sched.step_on_epochs=true); warmup starts at warmup_ratio x lr."""
    kwargs = OmegaConf.to_container(sched_cfg)
    warmup_lr = kwargs.pop("warmup_ratio") * lr
    scheduler, _ = create_scheduler_v2(
        optimizer, **kwargs, warmup_lr=warmup_lr, num_epochs=epochs, updates_per_epoch=updates
    )
    return scheduler


def check_config(cfg: DictConfig) -> None:
    """Errors for settings that would otherwise fail only after data loading or the first epoch (or train wrong
    without a word); warnings for settings that train, but likely not as meant."""
    config_schema.check_known_keys(cfg, config_schema.TrainConfig)
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is not set: add data.root=/path/to/images (folders train/<class>/, val/<class>/)")
    if cfg.trainer.amp not in engine.AMP_DTYPES:
        raise ValueError(f"trainer.amp={cfg.trainer.amp!r} is not one of {', '.join(engine.AMP_DTYPES)}")
    config_schema.check_values(cfg)
    factory.check_model_name(cfg.model.name)  # (a suggestion for RedNet50, rednet_50)
    config_schema.check_checkpoint_paths(cfg)  # resume=, pretrained= (made absolute by train())
    for warning in config_schema.unusual_values(cfg):
        log.warning("%s", warning)
    batch = cfg.data.batch_size
    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and batch % 2:
        raise ValueError(
            f"data.batch_size={batch} must be even with mixup/cutmix (timm's Mixup pairs each image with the one at "
            f"the other end of the batch): set data.batch_size={batch + 1} or {batch - 1 or 2}, or data.mixup=0 "
            "data.cutmix=0"
        )
    check_schedule(cfg)
    if cfg.data.train_split == cfg.data.val_split:
        log.warning(
            "data.val_split=%s is the training split: val metrics measure images the model trained on",
            cfg.data.val_split,
        )


def check_schedule(cfg: DictConfig) -> None:
    """The LR schedule must end with the run: timm lengthens it by sched.cooldown_epochs, and by
    sched.warmup_epochs with sched.warmup_prefix=true (its train.py runs that long; ours runs trainer.epochs), so the
    run would stop before the learning rate has decayed. A warmup as long as the run only warns.

    Raises:
        ValueError: naming the settings and the fix.
    """
    epochs, sched = cfg.trainer.epochs, cfg.sched
    if sched.sched == "plateau":  # (timm asserts step_on_epochs for it; its own message would not say why)
        raise ValueError(
            "sched.sched=plateau is not supported: it lowers the learning rate from validation metrics, a state no "
            "checkpoint holds (timm deprecates it for that reason), so a resumed run would restart it; use "
            "sched=cosine or sched=step (sched.sched=multistep with sched.decay_milestones=[...] for fixed drops)"
        )
    if sched.sched == "none" and sched.warmup_epochs > 0:  # timm builds no scheduler at all: no warmup either
        raise ValueError(
            f"sched.sched=none keeps optim.lr constant from the first step, without the sched.warmup_epochs="
            f"{sched.warmup_epochs} warmup: set sched.sched=constant (a warmup, then a constant lr) or "
            "sched.warmup_epochs=0"
        )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # stands in: only the length counts
    kwargs = {k: v for k, v in OmegaConf.to_container(sched).items() if k != "warmup_ratio"}
    _, total = create_scheduler_v2(optimizer, **kwargs, num_epochs=epochs, updates_per_epoch=1)
    if total > epochs:
        raise ValueError(
            f"sched.{sched.sched} with sched.cooldown_epochs={sched.cooldown_epochs}, sched.warmup_prefix="
            f"{str(sched.warmup_prefix).lower()} (warmup_epochs={sched.warmup_epochs}) lasts {total} epochs, but "
            f"trainer.epochs={epochs}: the run would stop before the learning rate decays. Set trainer.epochs={total},"
            " or sched.cooldown_epochs=0 sched.warmup_prefix=false"
        )
    if sched.warmup_epochs >= epochs:
        log.warning(
            "sched.warmup_epochs=%s >= trainer.epochs=%d: the learning rate rises for the whole run and never decays; "
            "lower sched.warmup_epochs", sched.warmup_epochs, epochs,
        )  # fmt: skip


def check_classes(cfg: DictConfig, classes: list[str]) -> None:
    """Errors for class folders a classifier cannot learn from, or that disagree with the config."""
    if len(classes) < 2:
        raise ValueError(
            f"data.root '{cfg.data.root}' has {data.plural(len(classes), 'class folder')} under "
            f"{cfg.data.train_split}/ ({classes}): a classifier needs at least 2 classes (with one, every "
            "prediction is right and the loss is 0 from the start); add one folder per class"
        )
    configured = cfg.model.get("num_classes")
    if configured is not None and configured != len(classes):
        raise ValueError(
            f"model.num_classes={configured} but data.root '{cfg.data.root}' has "
            f"{data.plural(len(classes), 'class folder')}: the classifier's size comes from the class folders; "
            "remove model.num_classes"
        )


def resolve_preprocessing(cfg: DictConfig, model: torch.nn.Module, resume: run_state.Resume | None = None) -> None:
    """Fill cfg.data's null preprocessing keys (img_size, crop_pct, interpolation, mean, std) from the weights.

    A value set in the config (a data or experiment preset, the command line) wins; a null takes the model's
    pretrained_cfg: pretrained=<checkpoint>'s values, the published weights', or the architecture's defaults (timm's
    resolve_data_config, as timm's train.py does). A resumed run takes its checkpoint's values first. The values are
    written into cfg.data, so that the transforms, the checks, config.yaml and the checkpoints all see the same ones,
    and logged with where each came from. mean and std get one value per channel the model takes (an RGB default
    for a 1-channel model: its luma-weighted sum; see weights.resolve_preprocessing).

    Raises:
        ValueError: data.mean or data.std with another number of values than 1 or the model's channels.
    """
    if resume is not None:  # the resumed checkpoint's preprocessing (older checkpoints: their config's values)
        model.pretrained_cfg = {**model.pretrained_cfg, **weights_settings(resume.ckpt).pretrained_cfg}
    explicit = {key: cfg.data[key] for key in PREPROCESSING_KEYS if cfg.data[key] is not None}
    resolved = weights.resolve_preprocessing(model, explicit)
    own = weights.preprocessing_from_cfg(model.pretrained_cfg)
    if resume is not None:
        source = f"resumed {resume.path}"
    elif cfg.pretrained:
        source = f"pretrained={cfg.pretrained}"
    else:
        source = f"{cfg.model.name}'s pretrained_cfg"
    for key in PREPROCESSING_KEYS:
        cfg.data[key] = resolved[key]
    log.info("preprocessing: %s", weights.describe_preprocessing(resolved, [("config", explicit), (source, own)]))


def check_model_fits_data(
    model: torch.nn.Module, cfg: DictConfig, num_classes: int, world_size: int, in_chans: int | None = None
) -> None:
    """Before the first epoch: a batch of one sample for BatchNorm, and one image of data.img_size with the data's
    `in_chans` channels (default: the model's, `weights.model_in_chans`) through the model.

    Every training forward gets exactly data.batch_size samples per process (the loader drops a partial last batch;
    trainer.grad_accum adds micro-batches, not samples to a batch). In training mode BatchNorm normalizes each
    channel over the batch: one sample gives it no statistics (torch fails on a 1x1 map with "Expected more than 1
    value per channel when training", and larger maps turn it into a per-image norm the evaluation does not use).

    Raises:
        ValueError: naming the setting and the fix (the channels, when the model takes another number of channels
            than the images have).
    """
    batch, name = cfg.data.batch_size, cfg.model.name
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    synced = cfg.trainer.sync_bn and world_size > 1  # SyncBatchNorm: the batch of all processes
    if batch == 1 and norms and not synced:
        raise ValueError(
            f"data.batch_size=1: every training batch would reach {name}'s {len(norms)} BatchNorm layers with one "
            "sample per process, which gives them no batch statistics; set data.batch_size=2 or more "
            "(trainer.grad_accum keeps the memory per step and scales the global batch)"
        )
    size = cfg.data.img_size
    in_chans = weights.model_in_chans(model) if in_chans is None else in_chans
    image = torch.zeros(
        1, in_chans, *((size, size) if isinstance(size, int) else size), device=next(model.parameters()).device
    )
    try:
        logits = _probe(model, image)
    except torch.OutOfMemoryError:
        raise  # not the image size: the caller adds its advice
    except (RuntimeError, ValueError, AssertionError) as e:
        takes = _channels_taken(model, image)
        if takes is not None:
            raise ValueError(
                f"{name} takes {takes}-channel images but the data gives {in_chans}-channel ones "
                f"({data.image_mode(in_chans)}); build the model with model.in_chans={in_chans}, or give it "
                f"{takes}-channel data ({type(e).__name__}: {e})"
            ) from e
        raise ValueError(
            f"{name} cannot take data.img_size={size} images ({type(e).__name__}: {e}); set data.img_size to a size "
            "the model accepts (its pretrained_cfg input_size, e.g.)"
        ) from e
    if logits.shape[-1] != num_classes:
        raise ValueError(f"{name} outputs {logits.shape[-1]} classes but the data has {num_classes}")
    reduction = (getattr(model, "feature_info", None) or [{}])[-1].get("reduction", 1)
    if min(image.shape[-2:]) < reduction:
        log.warning(
            "data.img_size=%s is smaller than %s's %dx downsampling: its last stages see 1x1 maps made mostly of "
            "padding; data.img_size=%d or more uses the whole model", size, name, reduction, reduction,
        )  # fmt: skip


def _probe(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The model's logits for `image`, in eval mode (BatchNorm statistics and dropout untouched), without grad."""
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(image)
    finally:
        model.train(was_training)


def _channels_taken(model: torch.nn.Module, image: torch.Tensor) -> int | None:
    """After `image` failed: another channel count the model runs with at the same size (its first conv's, else 1
    or 3), i.e. the channels were the mismatch; None when none does (the size, or something else, is)."""
    candidates = dict.fromkeys([weights.model_in_chans(model), 3, 1])
    for chans in candidates:
        if chans != image.shape[1]:
            with contextlib.suppress(RuntimeError, ValueError, AssertionError):
                _probe(model, image.new_zeros(1, chans, *image.shape[2:]))
                return chans
    return None


def out_of_memory_advice(cfg: DictConfig) -> str:
    """What to change after a CUDA out-of-memory error, keeping the global batch (and so the scaled lr)."""
    batch, accum = cfg.data.batch_size, cfg.trainer.grad_accum
    if batch == 1:
        return "data.batch_size is 1 already: use trainer.amp=bf16, a smaller data.img_size or a smaller model"
    smaller = max(d for d in range(1, batch // 2 + 1) if batch % d == 0)
    return (
        f"CUDA ran out of memory with data.batch_size={batch} per process: set data.batch_size={smaller} "
        f"trainer.grad_accum={accum * batch // smaller} (the same global batch and learning rate); "
        "trainer.amp=bf16 and trainer.channels_last=true save memory too"
    )


def check_new_run_dir(cfg: DictConfig, ckpt_dir: Path) -> None:
    """A new run (resume=null) never writes into a directory that holds another run's checkpoints.

    Raises:
        FileExistsError: the directory's run is still running (its host and pid: resume=auto would be refused as
            well), or it ended: then resume=auto continues it.
    """
    if cfg.resume is None and distributed.has_checkpoints(ckpt_dir.parent):  # (last_prev.pt, epoch_NNNN.pt too)
        distributed.check_not_running(ckpt_dir.parent)
        raise FileExistsError(
            f"'{ckpt_dir}' already holds checkpoints: set resume=auto to continue that run, "
            "or choose another hydra.run.dir"
        )


def save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's .hydra/ files (config, hydra, overrides), in the directory this run claimed.

    configs/train.yaml sets hydra.output_subdir to null: Hydra would write them into the directory it named, which
    a run started in the same second shares (see distributed.claim_run_dir).
    """
    if not HydraConfig.initialized():  # train() called from Python, not through Hydra
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def evaluate_epoch(model, eval_model, model_ema, train_loader, val_loader, epoch: int, dist, tcfg: DictConfig):
    """Validation metrics of the model and of its EMA (None without one); every rank evaluates rank 0's buffers,
    recomputed first over trainer.precise_bn_batches training batches (precise BatchNorm) when set."""
    for net in [model] + ([model_ema.module] if model_ema is not None else []):  # the plain modules, not DDP's
        engine.recompute_batchnorm_stats(
            net, train_loader, tcfg.precise_bn_batches, dist.device, tcfg.channels_last, tcfg.amp
        )
    if dist.distributed:  # BatchNorm statistics drift apart on each rank's last batches
        distribute_bn(eval_model, dist.world_size, reduce=False)
        if model_ema is not None:
            distribute_bn(model_ema.module, dist.world_size, reduce=False)
    kwargs = dict(device=dist.device, amp=tcfg.amp, channels_last=tcfg.channels_last, show_progress=tcfg.progress_bar)
    metrics = engine.evaluate(eval_model, val_loader, desc=f"val {epoch}", **kwargs)
    ema_metrics = engine.evaluate(model_ema.module, val_loader, desc="val ema", **kwargs) if model_ema else None
    return metrics, ema_metrics


def train_loss_text(stats: dict[str, Any], done_before: int, epoch_updates: int) -> str:
    """The epoch line's training part. After a mid-epoch resume the loss averages only the steps this run did, so
    it names them: "train loss 0.4100 (steps 13-20 of 20, resumed mid-epoch)".

    Args:
        stats: `engine.train_one_epoch`'s result (mean loss over its `updates`).
        done_before: updates of this epoch done before the resume (0: the run trained the whole epoch).
        epoch_updates: updates in a whole epoch.
    """
    if not stats["updates"]:  # the run resumed after the epoch's last update: only its evaluation ran
        return "trained before the resume"
    text = f"train loss {stats['loss']:.4f}"
    if done_before:
        last = done_before + stats["updates"]
        text += f" (steps {done_before + 1}-{last} of {epoch_updates}, resumed mid-epoch)"
    return text


def log_epoch(writer, epoch: int, tcfg: DictConfig, step: int, stats, metrics, ema_metrics, seconds, device, notes,
              done_before: int = 0, epoch_updates: int = 0):  # fmt: skip
    """One epoch's TensorBoard points and log line; `done_before`, `epoch_updates`: see `train_loss_text`."""
    scalars = {f"val/{k}": v for k, v in metrics.items() if k != "count"}
    scalars.update({f"ema/{k}": v for k, v in (ema_metrics or {}).items() if k != "count"})
    scalars["train/epoch"] = epoch + 1
    if stats["updates"]:  # none when the run resumed after the epoch's last update: only its evaluation ran
        scalars.update({"train/epoch_loss": stats["loss"], "train/epoch_time": seconds})
        # How many steps train/epoch_loss averages: fewer than the epoch's after a mid-epoch resume.
        scalars["train/epoch_loss_steps"] = stats["updates"]
    scalars["train/peak_memory_mb"] = monitor.peak_memory_mb(device)
    monitor.log_scalars(writer, scalars, step)
    trained = train_loss_text(stats, done_before, epoch_updates)
    log.info(
        "epoch %d/%d | %s | val %s%s | %.1f s, %.0f img/s, peak %.0f MB%s",
        epoch + 1, tcfg.epochs, trained, monitor.format_metrics(metrics),
        f" | ema {monitor.format_metrics(ema_metrics)}" if ema_metrics else "",
        seconds, stats["throughput"], scalars["train/peak_memory_mb"], notes,
    )  # fmt: skip


def start_run(cfg: DictConfig, own_dir: Path) -> tuple[distributed.DistInfo, Path]:
    """Join the processes, claim the run directory, open train.log, and check the config before any data is read.

    Returns the process info and the directory rank 0 claimed, for all ranks: Hydra's, or <it>_1 when a run started
    in the same second has it; after a torchrun restart (--max-restarts), the first attempt's, whose run it
    continues from the last checkpoint (cfg.resume set to auto).
    """
    dist = distributed.init_distributed(cfg.trainer.device)
    run_dir = distributed.shared_run_dir(own_dir, continue_run=cfg.resume is not None)
    restarted = distributed.restart_count() and distributed.broadcast_object(distributed.has_checkpoints(run_dir))
    if restarted:  # torchrun restarted the workers after a failure (--max-restarts): continue from this run's last
        cfg.resume = "auto"  # checkpoint, not from scratch (resume=null) nor from resume=PATH's checkpoint again
    check_new_run_dir(cfg, run_dir / "checkpoints")  # before train.log opens: not a line into another run's log
    monitor.setup_logging(run_dir / "train.log", dist.is_main)
    if restarted:
        log.warning("torchrun restart %d: continuing the run in %s from its last checkpoint (resume=auto)",
                    distributed.restart_count(), run_dir)  # fmt: skip
    if dist.is_main:
        if run_dir != own_dir:
            log.warning("run directory %s belongs to another run (%s): this run writes to %s",
                        own_dir, distributed.claim_holder(own_dir), run_dir)  # fmt: skip
        save_hydra_files(run_dir, cfg)
    check_config(cfg)
    return dist, run_dir


# Paths of the config read relative to the directory train.py was started in (config_schema.make_paths_absolute).
PATH_KEYS = ("data.root", "resume", "pretrained")


def train(cfg: DictConfig, run_dir: str | Path, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run a full training as configured, writing everything into `run_dir`; return the final metrics.

    `should_stop` is polled after every optimizer step on every rank (e.g. `preemption.StopOnSignal`, which makes
    the ranks agree): when it returns True, last.pt is written at that step and the run returns `stopped: True`.
    """
    # --- set-up: processes, run directory, logging, early checks
    config_schema.make_paths_absolute(cfg, PATH_KEYS)
    dist, run_dir = start_run(cfg, Path(run_dir))
    log.info("data.root=%s", cfg.data.root)
    device, tcfg, ckpt_dir = dist.device, cfg.trainer, run_dir / "checkpoints"
    # A bad model name, resume path or a checkpoint of another model fails before data is read.
    resume = run_state.find_resume(cfg.resume, ckpt_dir, cfg.model.name)
    random_seed(cfg.seed)  # the same initial weights on every rank
    if tcfg.sync_bn and device.type != "cuda":
        raise ValueError(f"trainer.sync_bn=true needs CUDA GPUs (NCCL), the run is on {device}: set it to false")

    # --- classes, then the model (a resumed run's weights come from its checkpoint, not pretrained=), whose weights
    # bring the preprocessing the data transforms need
    classes = data.check_image_folder(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))
    check_classes(cfg, classes)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"}
    pretrained = cfg.pretrained if resume is None else False
    model = factory.build_model(cfg.model.name, len(classes), pretrained=pretrained, **model_kwargs)
    if pretrained:
        log.info("initial weights: pretrained=%s", pretrained)
    in_chans = weights.model_in_chans(model)  # model.in_chans or the checkpoint's: the images' channels
    data.image_mode(in_chans)  # 1: images read as grayscale, 3: RGB; any other: an error naming it, now
    resolve_preprocessing(cfg, model, resume)

    # --- data
    train_set, val_set = data.create_train_val_datasets(cfg.data, classes, seed=cfg.seed, in_chans=in_chans)
    if resume is not None:
        run_state.check_resume(resume, cfg, classes, len(train_set), dist.world_size)
    train_loader = data.create_train_loader(train_set, cfg.data, dist.world_size, dist.rank, cfg.seed, device)
    val_loader = data.create_eval_loader(val_set, cfg.data, dist.world_size, dist.rank, device)
    epoch_updates = run_state.updates_per_epoch(len(train_loader), tcfg.grad_accum)

    # --- EMA, optimizer, schedule, loss
    if tcfg.sync_bn:
        model = convert_sync_batchnorm(model)
    model.to(device=device, memory_format=torch.channels_last if tcfg.channels_last else torch.contiguous_format)
    with advise_on_out_of_memory(cfg):
        check_model_fits_data(model, cfg, len(classes), dist.world_size, in_chans)
    model_ema = (
        ModelEmaV3(model, decay=tcfg.model_ema_decay, use_warmup=tcfg.model_ema_warmup) if tcfg.model_ema else None
    )
    global_batch = dist.world_size * cfg.data.batch_size * tcfg.grad_accum
    lr = scaled_lr(cfg.optim, global_batch)
    optimizer = create_optimizer(model, cfg.optim, lr)
    scheduler = create_scheduler(optimizer, cfg.sched, lr, tcfg.epochs, epoch_updates)
    scaler = torch.amp.GradScaler(device.type) if tcfg.amp == "fp16" else None
    mixup = data.create_mixup(cfg.data, tcfg.label_smoothing, len(classes))
    loss_fn = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)

    # --- resume: weights, EMA, optimizer, scaler, RNG, the position inside the epoch and in the schedule
    random_seed(cfg.seed, dist.rank)  # each rank its own augmentation and dropout draws
    config = OmegaConf.to_container(cfg, resolve=True)
    progress = run_state.TrainProgress()
    if resume is not None:
        progress = run_state.restore(resume, model=model, model_ema=model_ema, optimizer=optimizer, scaler=scaler,
                                     config=config, rank=dist.rank, world_size=dist.world_size)  # fmt: skip
    saver = run_state.CheckpointSaver(ckpt_dir, model, model_ema, optimizer, scaler, progress, config, classes,
                                      tcfg.keep_last, dist.is_main)  # fmt: skip
    if resume is not None and resume.path.resolve().parent == ckpt_dir.resolve():
        saver.saved_step = progress.step  # this directory holds the resumed step already
    if dist.is_main:
        run_state.clean_stale_temp_files(ckpt_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Points after the checkpoint's step were logged by the run that crashed: the resumed run writes them again.
    writer = monitor.create_writer(run_dir, enabled=dist.is_main, purge_step=progress.step + 1 if resume else None)

    # --- wrappers for speed and for several processes; checkpoints and EMA keep the plain model
    eval_model = torch.compile(model) if tcfg.compile else model
    train_model = eval_model
    if dist.distributed:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)
    loop = engine.LoopSettings(
        device, epoch_updates, tcfg.amp, tcfg.channels_last, tcfg.grad_accum, tcfg.clip_grad, tcfg.clip_mode,
        tcfg.log_interval, tcfg.ckpt_every_steps, tcfg.progress_bar,
    )  # fmt: skip
    log.info(
        "%s: %d classes, %d train / %d val images, global batch %d, lr %.4g, %d updates/epoch, %s x%d, run dir %s",
        cfg.model.name, len(classes), len(train_set), len(val_set), global_batch, lr, epoch_updates,
        device, dist.world_size, run_dir,
    )  # fmt: skip

    # --- the epoch loop: train, evaluate, checkpoint
    metrics = primary = None
    for epoch in range(progress.epoch, tcfg.epochs):
        progress.epoch = epoch
        run_state.place_schedule(scheduler, progress, epoch_updates, tcfg.grad_accum)  # per-epoch schedules step here
        train_loader.sampler.set_epoch(epoch, start_index=progress.epoch_batches * cfg.data.batch_size)
        done_before = math.ceil(progress.epoch_batches / tcfg.grad_accum)  # > 0 only after a mid-epoch resume
        train_set.set_epoch(epoch)
        epoch_start = time.perf_counter()
        with stop_on_train_error(cfg, dist, saver, "image"):
            stats = engine.train_one_epoch(
                train_model, train_loader, optimizer, loss_fn, progress, loop, scheduler=scheduler, scaler=scaler,
                mixup=mixup, model_ema=model_ema, writer=writer, save_checkpoint=saver.save, should_stop=should_stop,
            )  # fmt: skip
        if stats["stopped"]:
            saver.save()
            log.info("stopped in epoch %d, step %d; resume=auto continues from %s", epoch + 1, progress.step, ckpt_dir)
            close(writer)
            return {"stopped": True, "epoch": progress.epoch, "step": progress.step}
        skipped = train_set.take_bad_count()
        with stop_on_train_error(cfg, dist, saver, "validation image"):
            metrics, ema_metrics = evaluate_epoch(
                model, eval_model, model_ema, train_loader, val_loader, epoch, dist, tcfg
            )
        train_set.take_bad_count()  # precise BatchNorm's pass met training files again: not the next epoch's skips
        skipped += val_set.take_bad_count()  # after this epoch's evaluation, so the count is this epoch's
        primary = ema_metrics or metrics  # best.pt and results.json follow the weights eval.py evaluates
        progress.epoch, progress.epoch_batches = epoch + 1, 0
        is_best = primary["top1"] > progress.best_top1
        progress.best_top1 = max(progress.best_top1, primary["top1"])
        saver.save(epoch_end=True, is_best=is_best)
        notes = (" | best" if is_best else "") + (
            f" | skipped {data.plural(skipped, 'unreadable image')}" if skipped else ""
        )
        seconds = time.perf_counter() - epoch_start
        log_epoch(writer, epoch, tcfg, progress.step, stats, metrics, ema_metrics, seconds, device, notes,
                  done_before, epoch_updates)  # fmt: skip

    # --- final metrics (a resumed run that had nothing left to train evaluates once)
    if primary is None:
        eval_weights = model_ema.module if model_ema is not None else eval_model
        primary = engine.evaluate(eval_weights, val_loader, device, tcfg.amp, tcfg.channels_last, show_progress=False)
    results = {**primary, "epoch": progress.epoch, "step": progress.step, "best_top1": progress.best_top1}
    results["weights"] = "ema" if model_ema is not None else "model"
    if dist.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info("done: val top-1 %.2f (best %.2f); run dir %s", results["top1"], results["best_top1"], run_dir)
    close(writer)
    return results


@contextlib.contextmanager
def advise_on_out_of_memory(cfg: DictConfig):
    """A CUDA out-of-memory error leaving the block gets `out_of_memory_advice` in its message."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"{out_of_memory_advice(cfg)}\n({e})") from e


@contextlib.contextmanager
def stop_on_train_error(cfg: DictConfig, dist, saver: run_state.CheckpointSaver, what: str):
    """An unreadable image saves what one process can, and says what was kept; CUDA out of memory gets advice."""
    try:
        with advise_on_out_of_memory(cfg):
            yield
    except data.BadImageError:
        # One rank's error path has no collective (the other ranks would never join it): several processes keep the
        # last periodic checkpoint; one process saves the work done up to the last update (after a validation
        # error, the trained epoch: resume=auto goes straight to its evaluation). Nothing trained: nothing saved.
        kept = saver.save_after_error(can_save=not dist.distributed)
        log.error("stopped on an unreadable %s; %s", what, kept)
        raise


def close(writer) -> None:
    """Flush TensorBoard and leave the process group."""
    if writer is not None:
        writer.close()
    distributed.cleanup()


config_schema.register()  # the typed schemas that configs/*.yaml name in their defaults lists


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns val top-1 so that sweeps can optimize it (nan when a signal stopped the run)."""
    # An error on one of several ranks ends that process at once, naming its rank: the job stops (no hang). The
    # error is reported inside StopOnSignal: torchrun's SIGTERM, sent as soon as a peer dies, only gets recorded
    # then, instead of killing this rank (default action) before its report is written.
    with preemption.StopOnSignal() as stop, distributed.end_job_on_error():
        results = train(cfg, HydraConfig.get().runtime.output_dir, should_stop=stop)
    if results.get("stopped"):
        preemption.requeue_under_submitit(stop.received)  # a time-limit warning under submitit: requeue the job
    return results.get("top1", float("nan"))  # a stopped (preempted) run has no final metrics


if __name__ == "__main__":
    sys.argv[1:] = config_schema.expand_home_in_overrides(sys.argv[1:])  # data.root=~/x: Hydra refuses a bare ~
    main()
