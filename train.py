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

import json
import logging
import math
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
from timm.utils import ModelEmaV3, random_seed
from torch.nn.parallel import DistributedDataParallel

from rednet import checkpoint, config_schema, data, distributed, engine, monitor, preemption

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
    """timm's scheduler factory, stepped per optimizer update; warmup starts at warmup_ratio x lr."""
    kwargs = OmegaConf.to_container(sched_cfg)
    warmup_lr = kwargs.pop("warmup_ratio") * lr
    scheduler, _ = create_scheduler_v2(
        optimizer, **kwargs, warmup_lr=warmup_lr, num_epochs=epochs, updates_per_epoch=updates
    )
    return scheduler


def check_config(cfg: DictConfig) -> None:
    """Errors for settings that would otherwise fail only after data loading or the first epoch."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is not set: add data.root=/path/to/images (folders train/<class>/, val/<class>/)")
    if cfg.trainer.amp not in engine.AMP_DTYPES:
        raise ValueError(f"trainer.amp={cfg.trainer.amp!r} is not one of {', '.join(engine.AMP_DTYPES)}")
    if cfg.trainer.log_interval < 1:
        raise ValueError(
            f"trainer.log_interval={cfg.trainer.log_interval} must be >= 1 (optimizer steps per log point)"
        )
    if cfg.trainer.epochs < 1:
        raise ValueError(
            f"trainer.epochs={cfg.trainer.epochs} must be >= 1 (0 would only evaluate the initial weights)"
        )
    if cfg.data.batch_size < 1:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be >= 1 (images per process and step)")
    if cfg.trainer.grad_accum < 1:
        raise ValueError(f"trainer.grad_accum={cfg.trainer.grad_accum} must be >= 1")
    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and cfg.data.batch_size % 2:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be even with mixup/cutmix")


def check_classes(cfg: DictConfig, classes: list[str]) -> None:
    """Errors for class folders a classifier cannot learn from, or that disagree with the config."""
    if len(classes) < 2:
        raise ValueError(
            f"data.root '{cfg.data.root}' has {len(classes)} class folder under {cfg.data.train_split}/ "
            f"({classes}): a classifier needs at least 2 classes (with one, every prediction is right and the loss "
            "is 0 from the start); add one folder per class"
        )
    configured = cfg.model.get("num_classes")
    if configured is not None and configured != len(classes):
        raise ValueError(
            f"model.num_classes={configured} but data.root '{cfg.data.root}' has {len(classes)} class folders: the "
            "classifier's size comes from the class folders; remove model.num_classes"
        )


def check_model_fits_data(model: torch.nn.Module, cfg: DictConfig, num_classes: int, world_size: int) -> None:
    """Before the first epoch: a batch of one sample for BatchNorm, and one image of data.img_size through the model.

    Every training forward gets exactly data.batch_size samples per process (the loader drops a partial last batch;
    trainer.grad_accum adds micro-batches, not samples to a batch). In training mode BatchNorm normalizes each
    channel over the batch: one sample gives it no statistics (torch fails on a 1x1 map with "Expected more than 1
    value per channel when training", and larger maps turn it into a per-image norm the evaluation does not use).

    Raises:
        ValueError: naming the setting and the fix.
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
    image = torch.zeros(
        1, 3, *((size, size) if isinstance(size, int) else size), device=next(model.parameters()).device
    )
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(image)  # eval mode: BatchNorm statistics and dropout untouched
    except torch.OutOfMemoryError:
        raise  # not the image size: the caller adds its advice
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ValueError(
            f"{name} cannot take data.img_size={size} images ({type(e).__name__}: {e}); set data.img_size to a size "
            "the model accepts (its pretrained_cfg input_size, e.g.)"
        ) from e
    finally:
        model.train(was_training)
    if logits.shape[-1] != num_classes:
        raise ValueError(f"{name} outputs {logits.shape[-1]} classes but the data has {num_classes}")
    reduction = (getattr(model, "feature_info", None) or [{}])[-1].get("reduction", 1)
    if min(image.shape[-2:]) < reduction:
        log.warning(
            "data.img_size=%s is smaller than %s's %dx downsampling: its last stages see 1x1 maps made mostly of "
            "padding; data.img_size=%d or more uses the whole model", size, name, reduction, reduction,
        )  # fmt: skip


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


def load_resume_checkpoint(cfg: DictConfig, ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from: resume=null (none), auto (this run's newest, chosen by rank 0), or a path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = checkpoint.find_resume_checkpoint(ckpt_dir)  # on every rank: an error stops them all
        chosen = distributed.broadcast_object(found[0] if found else None)  # and every rank loads rank 0's choice
        if chosen is None:
            log.warning("resume=auto: no checkpoint in %s yet, starting a new run", ckpt_dir)
            return None
        return found if found and found[0] == chosen else (chosen, checkpoint.load_checkpoint(chosen))
    path = Path(cfg.resume).expanduser()
    return path, checkpoint.load_checkpoint(path)


def check_new_run_dir(cfg: DictConfig, ckpt_dir: Path) -> None:
    """A new run (resume=null) never writes into a directory that holds another run's checkpoints."""
    if cfg.resume is None and (ckpt_dir / "last.pt").exists():
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


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"trainer.epochs": 100, ...}."""
    leaves = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        leaves.update(_leaves(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return leaves


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The config values that differ from a checkpoint's, as 'key: old -> new' ("resume" itself left out)."""
    old, new = _leaves(saved), _leaves(current)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key) and key != "resume")
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in keys]


def check_resume_classes(ckpt: dict[str, Any], path: Path, cfg: DictConfig, classes: list[str]) -> None:
    """Refuse a resume on class folders other than the checkpoint's: the labels would silently change meaning."""
    difference = engine.class_difference(ckpt.get("classes"), classes)
    if difference:
        raise ValueError(
            f"resume: '{path}' was trained on {len(ckpt['classes'])} classes, data.root={cfg.data.root} has "
            f"{len(classes)} ({difference}): resume on the same data, or start a new run with "
            "pretrained=<that checkpoint> to fine-tune"
        )


def check_resume_settings(
    ckpt: dict[str, Any], path: Path, cfg: DictConfig, train_images: int, world_size: int
) -> None:
    """Refuse changes a checkpoint cannot carry: another optimizer, or a new data order inside an epoch."""
    saved = ckpt.get("config") or {}
    saved_opt = saved.get("optim", {}).get("opt")
    if saved_opt is not None and saved_opt != cfg.optim.opt:
        raise ValueError(
            f"resume: '{path}' holds {saved_opt} optimizer state but optim.opt={cfg.optim.opt}: resume with "
            f"optim={saved_opt}, or start a new run with pretrained=<that checkpoint> to fine-tune"
        )
    saved_batch, saved_seed = saved.get("data", {}).get("batch_size"), saved.get("seed")
    saved_world = len(ckpt["rng"]) if isinstance(ckpt.get("rng"), list) else 1
    if not ckpt.get("epoch_batches") or saved_batch is None:
        return
    saved_epoch_batches = math.ceil(train_images / saved_world) // saved_batch  # the loader drops the last partial
    if ckpt["epoch_batches"] >= saved_epoch_batches:
        return  # the epoch's training was done; only its evaluation is left
    if (saved_batch, saved_world, saved_seed) != (cfg.data.batch_size, world_size, cfg.seed):
        raise ValueError(
            f"resume: '{path}' stopped inside epoch {ckpt['epoch'] + 1} after {ckpt['epoch_batches']} batches of "
            f"data.batch_size={saved_batch} on {saved_world} process(es), seed={saved_seed}; this run has "
            f"data.batch_size={cfg.data.batch_size} on {world_size}, seed={cfg.seed}, so it cannot tell which images "
            "are left. Resume with the same batch size, process count and seed (change them at the next epoch-end "
            "checkpoint), or resume from an epoch_NNNN.pt checkpoint"
        )


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]]) -> None:
    """Put the config's hyperparameters (weight decay, momentum, betas, ...) back after loading optimizer state,
    which brings the checkpoint's; the LR is the schedule's."""
    if len(configured) != len(optimizer.param_groups):
        return  # another parameter grouping: keep the loaded groups as they are
    for group, settings in zip(optimizer.param_groups, configured):
        group.update({key: value for key, value in settings.items() if key not in ("params", "lr", "initial_lr")})


def train(cfg: DictConfig, run_dir: str | Path, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run a full training as configured, writing everything into `run_dir`; return the final metrics.

    `should_stop` is polled after every optimizer step on every rank (e.g. `preemption.StopOnSignal`, which makes
    the ranks agree): when it returns True, last.pt is written at that step and the run returns `stopped: True`.
    """
    # --- set-up: processes, run directory, logging, early checks
    dist = distributed.init_distributed(cfg.trainer.device)
    own_dir = Path(run_dir)
    # The directory rank 0 claimed, for all ranks: Hydra's, or <it>_1 when a run started in the same second has it.
    run_dir = distributed.shared_run_dir(own_dir, continue_run=cfg.resume is not None)
    ckpt_dir = run_dir / "checkpoints"
    check_new_run_dir(cfg, ckpt_dir)  # before train.log opens: not a line into another run's log
    monitor.setup_logging(run_dir / "train.log", dist.is_main)
    if dist.is_main:
        if run_dir != own_dir:
            log.warning(
                "run directory %s belongs to another run (%s): this run writes to %s",
                own_dir, distributed.claim_holder(own_dir), run_dir,
            )  # fmt: skip
        save_hydra_files(run_dir, cfg)
    check_config(cfg)
    engine.check_model_name(cfg.model.name)
    resume = load_resume_checkpoint(cfg, ckpt_dir)  # a bad model name or resume path fails before data is read
    if resume is not None:
        checkpoint.check_arch(resume[1], cfg.model.name, resume[0])
    random_seed(cfg.seed)  # the same initial weights on every rank
    device, tcfg = dist.device, cfg.trainer
    if tcfg.sync_bn and device.type != "cuda":
        raise ValueError(f"trainer.sync_bn=true needs CUDA GPUs (NCCL), the run is on {device}: set it to false")

    # --- data
    classes = data.check_image_folder(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))
    check_classes(cfg, classes)
    if resume is not None:
        check_resume_classes(resume[1], resume[0], cfg, classes)
    train_set = data.create_image_dataset(
        cfg.data, cfg.data.train_split, classes, is_training=True, replace_bad=True, seed=cfg.seed
    )
    val_set = data.create_image_dataset(cfg.data, cfg.data.val_split, classes, is_training=False, replace_bad=False)
    if resume is not None:
        check_resume_settings(resume[1], resume[0], cfg, len(train_set), dist.world_size)
    train_loader = data.create_train_loader(train_set, cfg.data, dist.world_size, dist.rank, cfg.seed, device)
    val_loader = data.create_eval_loader(val_set, cfg.data, dist.world_size, dist.rank, device)
    updates_per_epoch = len(train_loader) // tcfg.grad_accum
    if updates_per_epoch == 0:
        raise ValueError(
            f"trainer.grad_accum={tcfg.grad_accum} exceeds the {len(train_loader)} batches per epoch; lower it"
        )

    # --- model, EMA, optimizer, schedule, loss
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"}
    # A resumed run's weights come from its checkpoint: the pretrained file is not needed (nor read) again.
    pretrained = cfg.pretrained if resume is None else False
    model = engine.build_model(cfg.model.name, len(classes), pretrained=pretrained, **model_kwargs)
    if pretrained:
        log.info("initial weights: pretrained=%s", pretrained)
    if tcfg.sync_bn:
        model = convert_sync_batchnorm(model)
    memory_format = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    try:
        check_model_fits_data(model, cfg, len(classes), dist.world_size)
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"{out_of_memory_advice(cfg)}\n({e})") from e
    model_ema = (
        ModelEmaV3(model, decay=tcfg.model_ema_decay, use_warmup=tcfg.model_ema_warmup) if tcfg.model_ema else None
    )
    global_batch = dist.world_size * cfg.data.batch_size * tcfg.grad_accum
    lr = scaled_lr(cfg.optim, global_batch)
    optimizer = create_optimizer(model, cfg.optim, lr)
    scheduler = create_scheduler(optimizer, cfg.sched, lr, tcfg.epochs, updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if tcfg.amp == "fp16" else None
    mixup = data.create_mixup(cfg.data, tcfg.label_smoothing, len(classes))
    loss_fn = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)

    # --- resume: everything a checkpoint holds, including the position inside the epoch
    random_seed(cfg.seed, dist.rank)  # each rank its own augmentation and dropout draws
    progress = engine.TrainProgress()
    if resume is not None:
        path, ckpt = resume
        model.load_state_dict(ckpt["model"])
        if model_ema is not None:
            if ckpt.get("model_ema") is None:
                log.warning("resume: %s holds no EMA weights; trainer.model_ema starts from the resumed model", path)
            model_ema.module.load_state_dict(ckpt.get("model_ema") or model.state_dict())
        configured = [dict(group) for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])  # moments and buffers; its hyperparameters are the old ones
        apply_optimizer_settings(optimizer, configured)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = checkpoint.rank_rng_state(ckpt["rng"], dist.rank, dist.world_size)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        progress = engine.TrainProgress(ckpt["epoch"], ckpt["step"], ckpt.get("epoch_batches", 0), ckpt["best_top1"])
        # The schedule is not restored but placed where this run's epochs put it, as timm's train.py does (timm
        # schedulers are functions of the update count): the saved one would carry the old epochs and lr, and the
        # saved step counts the old updates per epoch, if batch size, process count or grad_accum changed.
        position = progress.epoch * updates_per_epoch + progress.epoch_batches // tcfg.grad_accum
        progress.schedule_offset = position - progress.step
        scheduler.step_update(num_updates=position)
        log.info("resumed from %s: epoch %d, step %d", path, progress.epoch, progress.step)
        changes = (
            changed_settings(ckpt["config"], OmegaConf.to_container(cfg, resolve=True)) if ckpt.get("config") else []
        )
        if changes:
            log.warning(
                "resume: settings changed since the checkpoint (they apply from here on): %s", "; ".join(changes)
            )
    if dist.is_main:
        checkpoint.clean_stale_temp_files(ckpt_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # --- wrappers for speed and for several processes; checkpoints and EMA keep the plain model
    eval_model = torch.compile(model) if tcfg.compile else model
    train_model = eval_model
    if dist.distributed:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = monitor.create_writer(run_dir, enabled=dist.is_main)
    resolved_config = OmegaConf.to_container(cfg, resolve=True)

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": progress.epoch,
            "step": progress.step,
            "epoch_batches": progress.epoch_batches,
            "best_top1": progress.best_top1,
            "config": resolved_config,
            **checkpoint.weights_metadata(resolved_config, classes),  # arch, classes, preprocessing, model kwargs
        }

    def save(epoch_end: bool = False, is_best: bool = False) -> None:
        rng = distributed.all_gather_object(checkpoint.rng_state())  # every rank's, for an exact resume
        if dist.is_main:
            checkpoint.write_checkpoints(
                {**state(), "rng": rng}, ckpt_dir, epoch_end=epoch_end, is_best=is_best, keep_last=tcfg.keep_last
            )

    log.info(
        "%s: %d classes, %d train / %d val images, global batch %d, lr %.4g, %d updates/epoch, %s x%d, run dir %s",
        cfg.model.name, len(classes), len(train_set), len(val_set), global_batch, lr, updates_per_epoch,
        device, dist.world_size, run_dir,
    )  # fmt: skip

    # --- the epoch loop
    metrics: dict[str, Any] | None = None
    for epoch in range(progress.epoch, tcfg.epochs):
        progress.epoch = epoch
        train_loader.sampler.set_epoch(epoch, start_index=progress.epoch_batches * cfg.data.batch_size)
        train_set.set_epoch(epoch)
        epoch_start = time.perf_counter()
        try:
            stats = engine.train_one_epoch(
                train_model, train_loader, optimizer, loss_fn, progress,
                device=device, scheduler=scheduler, scaler=scaler, amp=tcfg.amp, channels_last=tcfg.channels_last,
                grad_accum=tcfg.grad_accum, clip_grad=tcfg.clip_grad, clip_mode=tcfg.clip_mode, mixup=mixup,
                model_ema=model_ema, writer=writer, log_interval=tcfg.log_interval,
                checkpoint_every=tcfg.ckpt_every_steps, save_checkpoint=save, should_stop=should_stop,
                show_progress=tcfg.progress_bar,
            )  # fmt: skip
        except data.BadImageError:
            # One rank's error path has no collective (the other ranks would never join it): several processes keep
            # the last periodic checkpoint; one process saves the work done up to the last update.
            if not dist.distributed:
                save()
            log.error("stopped on an unreadable image; %s holds the last saved step", ckpt_dir / "last.pt")
            raise
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(f"{out_of_memory_advice(cfg)}\n({e})") from e
        if stats["stopped"]:
            save()
            log.info("stopped in epoch %d, step %d; resume=auto continues from %s", epoch + 1, progress.step, ckpt_dir)
            if dist.is_main:
                writer.close()
            distributed.cleanup()
            return {"stopped": True, "epoch": progress.epoch, "step": progress.step}
        skipped = train_set.take_bad_count()

        for net in [model] + ([model_ema.module] if model_ema is not None else []):  # precise BN, then broadcast
            engine.recompute_batchnorm_stats(
                net, train_loader, tcfg.precise_bn_batches, device, tcfg.channels_last, tcfg.amp
            )
        distributed.broadcast_buffers(model)  # every rank evaluates the weights rank 0 saves
        if model_ema is not None:
            distributed.broadcast_buffers(model_ema.module)
        eval_kwargs = dict(
            device=device, amp=tcfg.amp, channels_last=tcfg.channels_last, show_progress=tcfg.progress_bar
        )
        try:
            metrics = engine.evaluate(eval_model, val_loader, desc=f"val {epoch}", **eval_kwargs)
            ema_metrics = (
                engine.evaluate(model_ema.module, val_loader, desc="val ema", **eval_kwargs) if model_ema else None
            )
        except data.BadImageError:
            if not dist.distributed:  # (no collective on one rank's error path: the last periodic checkpoint stays)
                save()  # the epoch's training is kept: resume=auto goes straight to this evaluation
            kept = "the last saved step" if dist.distributed else "the trained epoch"
            log.error("stopped on an unreadable validation image; %s holds %s", ckpt_dir / "last.pt", kept)
            raise
        skipped += val_set.take_bad_count()  # after this epoch's evaluation, so the count is this epoch's
        primary = ema_metrics or metrics  # best.pt and results.json follow the weights eval.py evaluates
        epoch_time = time.perf_counter() - epoch_start
        progress.epoch, progress.epoch_batches = epoch + 1, 0
        is_best = primary["top1"] > progress.best_top1
        progress.best_top1 = max(progress.best_top1, primary["top1"])
        save(epoch_end=True, is_best=is_best)

        scalars = {f"val/{k}": v for k, v in metrics.items() if k != "count"}
        scalars.update({f"ema/{k}": v for k, v in (ema_metrics or {}).items() if k != "count"})
        scalars["train/epoch"] = epoch + 1
        if stats["updates"]:  # none when the run resumed after the epoch's last update: only its evaluation ran
            scalars.update({"train/epoch_loss": stats["loss"], "train/epoch_time": epoch_time})
        scalars["train/peak_memory_mb"] = monitor.peak_memory_mb(device)
        monitor.log_scalars(writer, scalars, progress.step)
        trained = f"train loss {stats['loss']:.4f}" if stats["updates"] else "trained before the resume"
        log.info(
            "epoch %d/%d | %s | val %s%s | %.1f s, %.0f img/s, peak %.0f MB%s%s",
            epoch + 1, tcfg.epochs, trained, monitor.format_metrics(metrics),
            f" | ema {monitor.format_metrics(ema_metrics)}" if ema_metrics else "",
            epoch_time, stats["throughput"], scalars["train/peak_memory_mb"],
            " | best" if is_best else "", f" | skipped {skipped} unreadable images" if skipped else "",
        )  # fmt: skip

    # --- final metrics (a resumed run that had nothing left to train evaluates once)
    if metrics is None:
        eval_weights = model_ema.module if model_ema is not None else eval_model
        primary = engine.evaluate(eval_weights, val_loader, device, tcfg.amp, tcfg.channels_last, show_progress=False)
    results = {**primary, "epoch": progress.epoch, "step": progress.step, "best_top1": progress.best_top1}
    results["weights"] = "ema" if model_ema is not None else "model"
    if dist.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        writer.close()
        log.info("done: val top-1 %.2f (best %.2f); run dir %s", results["top1"], results["best_top1"], run_dir)
    distributed.cleanup()
    return results


config_schema.register()  # the typed schemas that configs/*.yaml name in their defaults lists


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns val top-1 so that sweeps can optimize it (nan when a signal stopped the run)."""
    # An error on one of several ranks ends that process at once, naming its rank: the job stops (no hang).
    with distributed.end_job_on_error(), preemption.StopOnSignal() as stop:
        results = train(cfg, HydraConfig.get().runtime.output_dir, should_stop=stop)
    if results.get("stopped"):
        preemption.requeue_under_submitit(stop.received)  # a time-limit warning under submitit: requeue the job
    return results.get("top1", float("nan"))  # a stopped (preempted) run has no final metrics


if __name__ == "__main__":
    main()
