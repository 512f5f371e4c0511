"""Where a run stands: what a checkpoint holds, how it is written, found and restored, and what a resume may change.

train.py calls this module once to set up saving (`CheckpointSaver`) and once to resume (`find_resume`,
`check_resume`, `restore`). A checkpoint is a plain dict in timm's layout, so timm's tools read it
(`timm.models.load_checkpoint`, `timm.models.resume_checkpoint`, timm's validate.py --checkpoint):

    state_dict, state_dict_ema (None without EMA), optimizer, amp_scaler (None without fp16), epoch, arch
    + step, epoch_batches, best_top1, rng (one entry per rank), config (the resolved run config)
    + what belongs to the weights (rednet.checkpoint.weights_metadata): model_kwargs, num_classes, classes,
      pretrained_cfg

`epoch` is the epoch in progress (0-based), which after an epoch end is the next one to run: what timm's
resume_checkpoint returns as the epoch to start from (no `version` key, so timm does not add 1). Checkpoints written
before this layout (keys model, model_ema, scaler) load through `load_checkpoint`, which renames their keys.

Files of a run's `checkpoints/` folder: `last.pt` (newest state, each epoch and every trainer.ckpt_every_steps
updates), `last_prev.pt` (the one before it), `best.pt` (best val top-1), `epoch_NNNN.pt` (the last
trainer.keep_last epoch ends). Every file is written atomically (a temp file, fsync, rename); when last.pt is
damaged, resume falls back to last_prev.pt, then to the newest epoch_NNNN.pt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from rednet import distributed
from rednet.checkpoint import CheckpointError, check_arch, read_torch_file, weights_metadata
from rednet.data import plural
from rednet.factory import class_difference

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("state_dict", "optimizer", "epoch", "step", "arch")
# Keys of checkpoints written before the timm layout, and their names now.
_OLD_KEYS = {"model": "state_dict", "model_ema": "state_dict_ema", "scaler": "amp_scaler"}
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


@dataclasses.dataclass
class TrainProgress:
    """Where training stands; saved in every checkpoint so a resumed run continues at the same batch.

    Attributes:
        epoch: the epoch in progress (0-based); after an epoch ends, the next one.
        step: optimizer updates done since the start of training.
        epoch_batches: batches of `epoch` consumed by the updates done (0 at an epoch boundary).
        best_top1: best validation top-1 so far (-1 before the first evaluation).
    """

    epoch: int = 0
    step: int = 0
    epoch_batches: int = 0
    best_top1: float = -1.0


def updates_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer updates in an epoch of `batches` micro-batches: the last update may take fewer than grad_accum.

    Raises:
        ValueError: grad_accum exceeds the batches of an epoch (not one full update per epoch).
    """
    if grad_accum > batches:
        raise ValueError(
            f"trainer.grad_accum={grad_accum} exceeds the {plural(batches, 'batch', 'batches')} per epoch; lower it"
        )
    return math.ceil(batches / grad_accum)


def schedule_position(progress: TrainProgress, epoch_updates: int, grad_accum: int) -> int:
    """The LR schedule's update count for `progress` under this run's `epoch_updates` per epoch.

    Computed from the epoch and its consumed batches, not from `progress.step`: a resume with another batch size,
    process count or grad_accum has another number of updates per epoch, and timm's schedulers are functions of the
    update count (as in timm's train.py, the schedule follows this run's epochs).
    """
    return progress.epoch * epoch_updates + math.ceil(progress.epoch_batches / grad_accum)


def place_schedule(scheduler: Any, progress: TrainProgress, epoch_updates: int, grad_accum: int) -> None:
    """Set the optimizer's learning rate to the schedule's value where `progress` stands.

    timm's schedulers come in two kinds (sched.step_on_epochs): per update (false: `step_update` sets the LR, `step`
    is a no-op) and per epoch (true, timm's default: `step` sets it, `step_update` is a no-op). Calling both serves
    either kind, so a schedule set to step per epoch is followed instead of holding the warmup's first LR for the
    whole run. Call it after every update and at the start of every epoch (also the first one after a resume).
    `scheduler` None (sched.sched=none: the LR stays optim.lr) does nothing.
    """
    if scheduler is None:
        return
    scheduler.step(progress.epoch)
    scheduler.step_update(num_updates=schedule_position(progress, epoch_updates, grad_accum))


# --- files: atomic writes, rotation, finding the newest loadable one


def _write_error(path: Path, error: OSError) -> CheckpointError:
    """A write error that names the file and the cause (torch reports a full disk as 'unexpected pos N')."""
    causes = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file-size limit was reached (ulimit -f)",
        errno.EACCES: "permission denied",
        errno.EROFS: "the file system is read-only",
    }
    cause = causes.get(error.errno, error.strerror or str(error))
    return CheckpointError(f"could not write checkpoint '{path}': {cause} ({type(error).__name__}: {error})")


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: torch turns a failed file.write into "[enforce fail at inline_container.cc]
    ... unexpected pos N vs M", the OSError left only as its __context__."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _interrupt(error: BaseException | None) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit behind `error`: Ctrl-C inside torch.save surfaces as the zip writer's
    "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", the interrupt left as its __context__. Only
    that direct context counts: a write that failed while code further up handled an interrupt is a failed write."""
    context = error.__context__ if isinstance(error, RuntimeError) else None
    return context if context is not None and not isinstance(context, Exception) else None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash at any moment leaves either the old file or the new one, never a torn one.

    Raises:
        CheckpointError: the write failed; names the path and the cause (disk full, size limit, permission). The
            temp file is removed.
        KeyboardInterrupt: Ctrl-C during the write (also when torch.save turned it into a RuntimeError); the old
            file stays, the temp file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # (a pickling error or Ctrl-C in torch.save too: no temp file left behind)
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        interrupt = _interrupt(e)
        if interrupt is not None:  # Ctrl-C mid-write: the run was stopped, no write failed
            raise interrupt from None
        cause = _os_error(e)
        if cause is None:
            raise CheckpointError(f"could not write checkpoint '{path}': {type(e).__name__}: {e}") from e
        raise _write_error(path, cause) from e


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` hold `src`'s bytes atomically; a hard link costs no I/O, a copy is the fallback."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already the same file (os.replace would keep the temp link and leave it behind)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(dst, e) from e


def _epoch_number(path: Path) -> int:
    return int(_EPOCH_FILE.fullmatch(path.name).group(1))


def epoch_files(ckpt_dir: str | Path) -> list[Path]:
    """The epoch_NNNN.pt files of a run, oldest first (by epoch number: epoch_10000.pt after epoch_9999.pt)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("epoch_*.pt") if (m := _EPOCH_FILE.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def write_checkpoints(
    state: dict[str, Any], ckpt_dir: str | Path, *, epoch_end: bool, is_best: bool, keep_last: int
) -> Path:
    """Write last.pt (the old one becomes last_prev.pt), and at an epoch end also epoch_NNNN.pt (keeping the newest
    `keep_last`) and best.pt.

    Raises:
        CheckpointError: a write failed (see `save_checkpoint`).
    """
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if last.is_file():
        _link_or_copy(last, ckpt_dir / "last_prev.pt")
    save_checkpoint(state, last)
    if epoch_end and keep_last > 0:
        _link_or_copy(last, ckpt_dir / f"epoch_{state['epoch']:04d}.pt")
        # Only epochs up to this one take turns: a run resumed from an earlier epoch_NNNN.pt finds the later epochs of
        # its first course here, which are newer by number but not by time (they would push out the file just
        # written); they are left alone.
        for old in [p for p in epoch_files(ckpt_dir) if _epoch_number(p) <= state["epoch"]][:-keep_last]:
            old.unlink()
    if is_best:
        _link_or_copy(last, ckpt_dir / "best.pt")
    return last


def clean_stale_temp_files(ckpt_dir: str | Path) -> None:
    """Remove temp files left by a process killed in the middle of a write."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint (this layout, or the older one with keys model / model_ema / scaler, renamed).

    Raises:
        CheckpointError: missing, unreadable, or not a training checkpoint (keys missing).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give the path of a .pt file written by train.py")
    ckpt = read_torch_file(path, map_location)
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and "model" in ckpt:
        ckpt = {_OLD_KEYS.get(key, key): value for key, value in ckpt.items()}
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"'{path}' is not a rednet training checkpoint: keys {missing} are missing "
            "(model weights alone load with eval.py checkpoint=PATH)"
        )
    return ckpt


def find_resume_checkpoint(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run (last.pt, last_prev.pt, the newest epoch_NNNN.pt), or None if none.

    A damaged last.pt (e.g. the disk filled up) falls back to an older one with a warning, never silently to scratch.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.pt", ckpt_dir / "last_prev.pt", *reversed(epoch_files(ckpt_dir))]
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            _logger.warning("skipping damaged checkpoint, trying an older one: %s", e)
    if existing:
        raise CheckpointError(f"no loadable checkpoint in '{ckpt_dir}' (tried {[str(p) for p in existing]})")
    return None


# --- random number generators


def rng_state() -> dict[str, Any]:
    """RNG states of torch, CUDA, numpy and Python as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's RNG states (one per rank), or None when the world size changed."""
    if isinstance(saved, dict):  # a single process's state
        saved = [saved]
    if len(saved) != world_size:
        _logger.warning(
            "the checkpoint holds RNG states of %s, this run has %d: random augmentation continues from "
            "fresh per-rank seeds (the run is not bit-exact with an uninterrupted one)",
            plural(len(saved), "process", "processes"),
            world_size,
        )
        return None
    return saved[rank]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# --- what a checkpoint holds, and saving it


def checkpoint_state(
    *,
    model: torch.nn.Module,
    model_ema: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: TrainProgress,
    config: dict[str, Any],
    classes: list[str],
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything a training checkpoint holds (see the module docstring); the one place its layout is written.

    Args:
        model: the plain model (no DDP / torch.compile wrapper).
        model_ema: timm's ModelEmaV3, or None.
        config: the run's resolved config (a plain dict).
        rng: every rank's `rng_state()`, in rank order.
    """
    return {
        "state_dict": model.state_dict(),
        "state_dict_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "amp_scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": progress.epoch,
        "step": progress.step,
        "epoch_batches": progress.epoch_batches,
        "best_top1": progress.best_top1,
        "rng": rng,
        "config": config,
        **weights_metadata(config, classes),  # arch, model_kwargs, num_classes, classes, pretrained_cfg
    }


@dataclasses.dataclass
class CheckpointSaver:
    """Saves a run's state into `ckpt_dir` (see `write_checkpoints`); every rank calls `save`, rank 0 writes.

    `saved_step`: the step last.pt in `ckpt_dir` holds (this run's last save, or the checkpoint of that folder it
    resumed from), None while it holds none.
    """

    ckpt_dir: Path
    model: torch.nn.Module
    model_ema: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    progress: TrainProgress
    config: dict[str, Any]
    classes: list[str]
    keep_last: int
    is_main: bool
    saved_step: int | None = None

    def save(self, epoch_end: bool = False, is_best: bool = False) -> None:
        """Write last.pt (and at an epoch end epoch_NNNN.pt, best.pt when `is_best`); a collective on every rank."""
        rng = distributed.all_gather_object(rng_state())  # every rank's, for an exact resume
        if self.is_main:
            state = checkpoint_state(
                model=self.model, model_ema=self.model_ema, optimizer=self.optimizer, scaler=self.scaler,
                progress=self.progress, config=self.config, classes=self.classes, rng=rng,
            )  # fmt: skip
            write_checkpoints(state, self.ckpt_dir, epoch_end=epoch_end, is_best=is_best, keep_last=self.keep_last)
        self.saved_step = self.progress.step  # (after the write: a failed one leaves the previous step)

    def save_after_error(self, can_save: bool) -> str:
        """After an error ends the run: save the updates done since the last save when `can_save` (one process: an
        error path of one rank of several has no collective), and say what `ckpt_dir` keeps, for the error's log.

        No checkpoint of step 0 is written: it would hold untrained weights, and its last.pt would make a rerun of
        the same command refuse the directory ("already holds checkpoints") for a run that trained nothing.
        """
        step = self.progress.step
        if step == 0:
            return "no checkpoint was saved: nothing was trained yet (rerun the same command once the files are fixed)"
        if can_save and step != self.saved_step:
            self.save()
        last = self.ckpt_dir / "last.pt"
        if self.saved_step is None:
            return (
                f"no checkpoint was saved ({plural(step, 'step')} trained, lost: a run of several processes saves "
                "only at epoch ends and every trainer.ckpt_every_steps updates)"
            )
        lost = step - self.saved_step
        held = f"{last} holds step {self.saved_step}" + (f" ({plural(lost, 'later step')} lost)" if lost else "")
        return f"{held}; resume=auto continues from it"


# --- resuming: which checkpoint, what may change, restoring


@dataclasses.dataclass
class Resume:
    """The checkpoint a run continues from."""

    path: Path
    ckpt: dict[str, Any]


def _other_runs(ckpt_dir: Path) -> str:
    """A hint for resume=auto in a new directory: the default hydra.run.dir is a new one per start
    (outputs/train/<date>/<time>), so resume=auto without hydra.run.dir never finds the run it was meant to continue.
    Names the newest last.pt of the runs beside this one (same date folder or the dates beside it), if any; nothing
    for a directory of the user's choosing (hydra.run.dir=outputs/r50: a first start of a job that always passes
    resume=auto; the runs beside it are other runs)."""
    if not distributed.is_date_folder(ckpt_dir.parent.parent.name):
        return ""
    runs = ckpt_dir.parent.parent.parent  # outputs/train, for outputs/train/<date>/<time>/checkpoints
    with contextlib.suppress(OSError):
        found = [p for p in runs.glob("*/*/checkpoints/last.pt") if p.parent != ckpt_dir]
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime).parent.parent
            return f"; to continue an earlier run, start in its directory: hydra.run.dir={newest} (newest one here)"
    return ""


def find_resume(resume: str | None, ckpt_dir: Path, arch: str) -> Resume | None:
    """The checkpoint to continue from: resume=null (none), auto (this run's newest, chosen by rank 0), or a path.

    Raises:
        CheckpointError: unreadable, or a checkpoint of another architecture than `arch`.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = find_resume_checkpoint(ckpt_dir)  # on every rank: an error stops them all
        chosen = distributed.broadcast_object(found[0] if found else None)  # and every rank loads rank 0's choice
        if chosen is None:
            hint = _other_runs(ckpt_dir)
            _logger.warning("resume=auto: no checkpoint in %s yet, starting a new run%s", ckpt_dir, hint)
            return None
        found = Resume(*found) if found and found[0] == chosen else Resume(chosen, load_checkpoint(chosen))
    else:
        path = Path(resume).expanduser()
        found = Resume(path, load_checkpoint(path))
    check_arch(found.ckpt, arch, found.path)
    return found


def check_resume(resume: Resume, cfg: DictConfig, classes: list[str], train_images: int, world_size: int) -> None:
    """Refuse what a checkpoint cannot carry: other classes, another optimizer, or a new data order
    inside an epoch (batch size, process count or seed changed mid-epoch).

    Raises:
        CheckpointError / ValueError: naming the checkpoint, the setting and the fix.
    """
    ckpt, path = resume.ckpt, resume.path
    difference = class_difference(ckpt.get("classes"), classes)
    if difference:
        raise ValueError(
            f"resume: '{path}' was trained on {plural(len(ckpt['classes']), 'class', 'classes')}, "
            f"data.root={cfg.data.root} has {len(classes)} ({difference}): resume on the same data, or start a new "
            "run with pretrained=<that checkpoint> to fine-tune"
        )
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


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"trainer.epochs": 100, ...}."""
    leaves = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        leaves.update(_leaves(value, f"{name}.") if isinstance(value, Mapping) else {name: value})
    return leaves


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The config values that differ from a checkpoint's, as 'key: old -> new' ("resume" itself left out)."""
    old, new = _leaves(saved), _leaves(current)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key) and key != "resume")
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in keys]


def resume_position(path: Path, progress: TrainProgress, epochs: int) -> str:
    """Where a run resumed from `path` at `progress` stands in a run of `epochs` epochs, for the log: the epoch it
    continues in (1-based, as the epoch lines count), or that every epoch is done and how to train longer."""
    if progress.epoch < epochs:
        return f"resumed from {path}: continues in epoch {progress.epoch + 1} after step {progress.step}"
    done = plural(progress.epoch, "epoch")
    return (
        f"resumed from {path}: the run has finished ({done} trained, step {progress.step}; trainer.epochs={epochs}), "
        "nothing is left to train (its weights are evaluated once); to train longer, raise trainer.epochs above "
        f"{progress.epoch} (e.g. trainer.epochs={2 * progress.epoch} resume=auto; the LR schedule follows the new "
        "length)"
    )


def restore(
    resume: Resume,
    *,
    model: torch.nn.Module,
    model_ema: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    config: dict[str, Any],
    rank: int,
    world_size: int,
) -> TrainProgress:
    """Load a checkpoint's weights, EMA, optimizer moments, scaler and this rank's RNG; return its progress.

    The optimizer's hyperparameters (weight decay, betas, ...) stay the configured ones, not the checkpoint's; the
    LR is the schedule's (place it with `schedule_position`). Where the run continues (`resume_position`, against
    config's trainer.epochs) and the settings changed since the checkpoint are logged.
    """
    ckpt, path = resume.ckpt, resume.path
    model.load_state_dict(ckpt["state_dict"])
    if model_ema is not None:
        if ckpt.get("state_dict_ema") is None:
            _logger.warning("resume: %s holds no EMA weights; trainer.model_ema starts from the resumed model", path)
        model_ema.module.load_state_dict(ckpt.get("state_dict_ema") or model.state_dict())
    configured = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])  # moments and buffers; its hyperparameters are the old ones
    if len(configured) == len(optimizer.param_groups):  # (another parameter grouping keeps the loaded groups)
        for group, settings in zip(optimizer.param_groups, configured):
            group.update({key: value for key, value in settings.items() if key not in ("params", "lr", "initial_lr")})
    if scaler is not None and ckpt.get("amp_scaler"):
        scaler.load_state_dict(ckpt["amp_scaler"])
    rng = rank_rng_state(ckpt["rng"], rank, world_size)
    if rng is not None:
        set_rng_state(rng)
    progress = TrainProgress(ckpt["epoch"], ckpt["step"], ckpt.get("epoch_batches", 0), ckpt["best_top1"])
    epochs = config.get("trainer", {}).get("epochs", progress.epoch + 1)
    _logger.info("%s", resume_position(path, progress, epochs))
    changes = changed_settings(ckpt["config"], config) if ckpt.get("config") else []
    if changes:
        _logger.warning(
            "resume: settings changed since the checkpoint (they apply from here on): %s", "; ".join(changes)
        )
    return progress
