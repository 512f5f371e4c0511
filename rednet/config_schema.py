"""Types of the training and evaluation config keys: Hydra checks every value when it composes a config, so
`trainer.epochs=abc` fails at once, naming the key, instead of after the data scan.

Each YAML file in configs/ has a dataclass here; configs/train.yaml and configs/eval.yaml list their schema first in
their defaults, group options with keys of their own (optim/sgd.yaml, sched/step.yaml) list theirs. A new key in a
YAML file needs a field here (composition names it otherwise): the YAML files give the values, so fields have no
defaults (MISSING) except in the groups whose keys go to timm as keyword arguments (model, optim, sched): those
are open to extra keys (from a YAML file, or `+optim.betas=[0.9,0.95]` on the command line), and their fields
default to timm's values so that no MISSING reaches timm. OmegaConf 1.3's types have no unions: `Any` where a key
takes a bool or a path. `register()` must run before composing (train.py, eval.py and the tests call it).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict  # noqa: UP035

from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "check_checkpoint_paths",
    "check_known_keys",
    "check_values",
    "register",
    "unknown_keys",
    "unusual_values",
]

# A Dict[str, Any] base is OmegaConf 2.x's way to let a structured config take extra keys (dict[str, Any] does not
# work; deprecated for an OmegaConf 2.4 that hydra-core 1.3 does not use); it warns at every composition.
OpenKeys = Dict[str, Any]  # noqa: UP006
warnings.filterwarnings("ignore", message=r"Class `\w+Config` subclasses `Dict`", category=UserWarning)


@dataclass
class ModelConfig(OpenKeys):
    """configs/model/*.yaml: `name` and rednet.create_model / timm.create_model keyword arguments (open)."""

    name: str = MISSING
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    """configs/data/*.yaml: the image folders, loader and timm transform settings.

    The preprocessing keys (rednet.checkpoint.PREPROCESSING_KEYS: img_size, crop_pct, interpolation, mean, std) may
    be null: the weights' values (train.py and eval.py resolve them from the model's pretrained_cfg).
    """

    root: str = MISSING
    train_split: str = MISSING
    val_split: str = MISSING
    img_size: int | None = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    skip_bad_images: bool = MISSING
    verify_images: Any = MISSING  # auto, true or false (rednet.data.VERIFY_IMAGES_AUTO_LIMIT)
    scale: list[float] = MISSING
    ratio: list[float] = MISSING
    hflip: float = MISSING
    color_jitter: Any = MISSING  # timm takes a float or 3-4 floats
    auto_augment: str | None = MISSING
    re_prob: float = MISSING
    re_mode: str = MISSING
    re_count: int = MISSING
    interpolation: str | None = MISSING
    mean: list[float] | None = MISSING
    std: list[float] | None = MISSING
    crop_pct: float | None = MISSING
    mixup: float = MISSING
    cutmix: float = MISSING
    mixup_prob: float = MISSING
    mixup_switch_prob: float = MISSING


@dataclass
class OptimConfig(OpenKeys):
    """configs/optim/*.yaml: timm.optim.create_optimizer_v2 keyword arguments (open), and lr_base_size."""

    opt: str = MISSING
    lr: float = MISSING
    lr_base_size: int | None = None
    weight_decay: float = 0.0
    filter_bias_and_bn: bool = True


@dataclass
class SGDConfig(OptimConfig):
    """configs/optim/sgd.yaml."""

    momentum: float = 0.9


@dataclass
class SchedConfig(OpenKeys):
    """configs/sched/*.yaml: timm.scheduler.create_scheduler_v2 keyword arguments (open), and warmup_ratio."""

    sched: str = MISSING
    warmup_epochs: int = 0
    warmup_ratio: float = MISSING
    warmup_prefix: bool = False
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    step_on_epochs: bool = True


@dataclass
class StepSchedConfig(SchedConfig):
    """configs/sched/step.yaml."""

    decay_epochs: float = 90
    decay_rate: float = 0.1


@dataclass
class TrainerConfig:
    """configs/trainer/*.yaml: device, precision, loop, EMA, logging and checkpoint settings."""

    epochs: int = MISSING
    device: str = MISSING
    amp: str = MISSING  # none | bf16 | fp16, checked by train.py (an Enum would put Enum objects in checkpoints)
    channels_last: bool = MISSING
    compile: bool = MISSING
    sync_bn: bool = MISSING
    grad_accum: int = MISSING
    clip_grad: float | None = MISSING
    clip_mode: str = MISSING
    label_smoothing: float = MISSING
    model_ema: bool = MISSING
    model_ema_decay: float = MISSING
    model_ema_warmup: bool = MISSING
    precise_bn_batches: int = MISSING  # training batches to recompute BatchNorm statistics on before each evaluation
    log_interval: int = MISSING
    ckpt_every_steps: int = MISSING
    keep_last: int = MISSING
    progress_bar: bool = MISSING


@dataclass
class TrainConfig:
    """configs/train.yaml."""

    task_name: str = MISSING
    seed: int = MISSING
    resume: str | None = MISSING  # null | auto | a path
    pretrained: Any = MISSING  # false | true | a checkpoint path
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class EvalModelConfig(ModelConfig):
    """eval.yaml's model: a null name takes the checkpoint's architecture."""

    name: str | None = None


@dataclass
class EvalConfig:
    """configs/eval.yaml."""

    task_name: str = MISSING
    checkpoint: str | None = MISSING
    pretrained: Any = MISSING  # false | true | a path or URL
    use_ema: bool = MISSING
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def unknown_keys(cfg: Any, schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema does not declare, outside the open groups (model, optim, sched).

    Hydra lets `+trainer.epoch=2` add a key to a closed structured config; nothing would read it.
    """
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in cfg:
        if key not in hints:
            unknown.append(f"{prefix}{key}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and not issubclass(kind, dict) and OmegaConf.is_dict(cfg[key]):
            unknown += unknown_keys(cfg[key], kind, f"{prefix}{key}.")
    return unknown


def check_known_keys(cfg: Any, schema: type = TrainConfig) -> None:
    """Refuse keys the schema does not declare (e.g. `+trainer.epoch=2`), naming the closest declared key.

    Raises:
        ValueError: naming each unknown key and a suggestion.
    """
    problems = []
    for key in unknown_keys(cfg, schema):
        parent, _, name = key.rpartition(".")
        siblings = list(OmegaConf.select(cfg, parent).keys()) if parent else list(cfg.keys())
        close = difflib.get_close_matches(name, [k for k in siblings if k != name], n=1)
        problems.append(f"{key}" + (f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""))
    if problems:
        raise ValueError(
            f"unknown config keys: {'; '.join(problems)}. Nothing reads them; remove the '+' override or fix the name "
            "(only model.*, optim.* and sched.* take new keys: they go to timm as keyword arguments)"
        )


def _probability(v: float) -> bool:
    return 0 <= v <= 1


def _below_one(v: float) -> bool:
    """A fraction that must leave something: a drop rate, a momentum, a decay."""
    return 0 <= v < 1


def _interpolations() -> tuple[str, ...]:
    from timm.data.transforms import _str_to_torch_interpolation  # the names timm's resize transforms take

    return tuple(_str_to_torch_interpolation)


# (key, is the value usable, what it must be): values the types allow but that cannot train, or train wrong without
# a word (a negative clip_grad reverses the gradients, label_smoothing 1.5 with mixup gives negative targets,
# timm reads crop_pct 0 as 0.875), or that would fail only at the first step (std 0, an unknown clip_mode).
# A rule names a key; other keys of its kind (a probability, a count) take the same test. Keys a config lacks are
# skipped: SGD's momentum, AdamW's betas, timm keyword arguments added with `+`.
VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "seed",
        lambda v: 0 <= v < 2**32 - 2**16,
        "in [0, 2**32 - 2**16) (numpy takes seeds below 2**32, and each process adds its rank)",
    ),
    ("data.root", lambda v: v.strip() != "", "an image folder (an empty one would read the current directory)"),
    ("model.drop_rate", _below_one, "in [0, 1) (the classifier's dropout probability: 1 zeroes every feature)"),
    ("model.drop_path_rate", _below_one, "in [0, 1) (stochastic depth's drop probability: 1 drops every block)"),
    ("trainer.epochs", lambda v: v >= 1, ">= 1 (0 would only evaluate the initial weights)"),
    ("data.verify_images", lambda v: v in ("auto", True, False), "auto, true or false"),
    ("trainer.grad_accum", lambda v: v >= 1, ">= 1 (micro-batches per optimizer step)"),
    ("trainer.log_interval", lambda v: v >= 1, ">= 1 (optimizer steps per log point)"),
    ("trainer.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1) (1 makes every target uniform: nothing to learn)"),
    ("trainer.clip_grad", lambda v: v is None or v > 0, "null (off) or > 0"),
    ("trainer.clip_mode", lambda v: v in ("norm", "value", "agc"), "one of norm, value, agc"),
    ("trainer.model_ema_decay", _below_one, "in [0, 1) (0.9998: the EMA moves 0.02% a step; 1 freezes it)"),
    ("trainer.precise_bn_batches", lambda v: v >= 0, ">= 0 (0: off)"),
    ("trainer.ckpt_every_steps", lambda v: v >= 0, ">= 0 (0: at epoch ends only)"),
    ("trainer.keep_last", lambda v: v >= 0, ">= 0 (0: keep no epoch_NNNN.pt)"),
    ("data.batch_size", lambda v: v >= 1, ">= 1 (images per process and step)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0 (0: load in the training process)"),
    ("data.img_size", lambda v: v is None or v >= 1, "null (the weights' size) or >= 1 pixel"),
    ("data.scale", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= max <= 1"),
    ("data.ratio", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max (width / height)"),
    ("data.hflip", _probability, "a probability in [0, 1]"),
    ("data.re_prob", _probability, "a probability in [0, 1]"),
    ("data.re_mode", lambda v: v in ("const", "rand", "pixel"), "one of const, rand, pixel"),
    ("data.re_count", lambda v: v >= 1, ">= 1"),
    ("data.crop_pct", lambda v: v is None or 0 < v <= 1, "null (the weights' value) or in (0, 1]"),
    ("data.interpolation", lambda v: v is None or v in _interpolations(), "null or a timm name (bilinear, ...)"),
    # One value per image channel (3: R, G, B; 1 for in_chans=1), or one for all (timm's rule); weights.
    # resolve_preprocessing checks the count against the model's channels.
    ("data.mean", lambda v: v is None or len(v) in (1, 3), "null, 3 values (R, G, B) or 1 (every channel)"),
    ("data.std", lambda v: v is None or (len(v) in (1, 3) and min(v) > 0), "null, 3 values or 1, all > 0"),
    ("data.mixup", lambda v: v >= 0, ">= 0 (0: off)"),
    ("data.cutmix", lambda v: v >= 0, ">= 0 (0: off)"),
    ("data.mixup_prob", _probability, "a probability in [0, 1]"),
    ("data.mixup_switch_prob", _probability, "a probability in [0, 1]"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    # 1 or more keeps every past gradient in the step at full weight: the steps grow until the loss is NaN.
    ("optim.momentum", _below_one, "in [0, 1) (0.9 usual; 1 or more never forgets a gradient)"),
    ("optim.betas", lambda v: len(v) >= 2 and all(map(_below_one, v)), "a list of values in [0, 1) ([0.9, 0.999])"),
    ("sched.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("sched.warmup_ratio", _probability, "in [0, 1] (the first lr as a fraction of optim.lr)"),
    ("sched.min_lr", lambda v: v >= 0, ">= 0"),
    ("sched.cooldown_epochs", lambda v: v >= 0, ">= 0"),
)
_ABSENT = object()


def check_values(cfg: Any) -> None:
    """Refuse values outside what training can use (VALUE_RULES), before any data is read; keys `cfg` lacks (eval's
    config has no optim) are skipped.

    Raises:
        ValueError: naming every bad key, its value and the values it takes.
    """
    problems = [f"{key}={value!r} must be {requirement}" for key, value, requirement in _failing(cfg, VALUE_RULES)]
    if problems:
        raise ValueError("; ".join(problems))


# (key, is the value usual, why it is not): values that train, but far outside any recipe, as a mistyped exponent
# gives them (optim.lr=1e5 for 1e-5); train.py logs a warning. The lr is the one at lr_base_size (SGD 0.1 at 256).
WARNING_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optim.lr", lambda v: v <= 10, "is far above any recipe's (SGD 0.1, AdamW 1e-3): the loss will likely diverge "
     "to NaN; a mistyped exponent (1e5 for 1e-5)?"),
)  # fmt: skip


def _failing(cfg: Any, rules: Sequence[tuple[str, Callable[[Any], bool], str]]) -> list[tuple[str, Any, str]]:
    """(key, value, text) of each rule whose key `cfg` has and whose test the value fails (or cannot take)."""
    failing = []
    for key, usable, text in rules:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        try:
            ok = usable(value)
        except TypeError:  # e.g. a list where a number was meant (the open groups take any type)
            ok = False
        if not ok:
            failing.append((key, value, text))
    return failing


def unusual_values(cfg: Any) -> list[str]:
    """Warnings for values that train but are unlikely to be meant (WARNING_RULES): "key=value is ...", one each."""
    return [f"{key}={value!r} {why}" for key, value, why in _failing(cfg, WARNING_RULES)]


# Keys that name a checkpoint file: what each takes, and the file of a run directory it most likely means.
CHECKPOINT_KEYS = {
    "resume": ("null (a new run), auto (this run directory's last checkpoint) or a checkpoint file", "last.pt"),
    "pretrained": ("true (the model's published weights), false, or a checkpoint file or http(s) URL", "best.pt"),
    "checkpoint": ("a checkpoint file, e.g. a run's checkpoints/best.pt", "best.pt"),
}


def check_checkpoint_paths(cfg: Any) -> None:
    """Refuse a checkpoint key (CHECKPOINT_KEYS) naming no file before any data is read: an empty value, a path that
    does not exist (resume=true or pretrained=yes are read as file names), or a directory (a run directory instead
    of its checkpoints/best.pt: its .pt files are listed). Call it after `make_paths_absolute`; URLs, booleans,
    null and resume=auto are left to the loaders.

    Raises:
        rednet.checkpoint.CheckpointError: naming each key, its value, the file it likely meant and what it takes.
    """
    from rednet.checkpoint import CheckpointError  # (torch: not needed to compose a config)

    problems = []
    for key, (takes, usual) in CHECKPOINT_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not _names_a_local_path(key, value):
            continue
        path = Path(value).expanduser()
        if not value.strip():
            problems.append(f"{key}={value!r} is empty: {key} takes {takes}")
        elif path.is_dir():
            found = sorted(path.glob("*.pt")) + sorted(path.glob("checkpoints/*.pt"))
            likely = [p for p in found if p.name == usual] or found
            problems.append(
                f"{key}='{value}' is a directory: give a checkpoint file in it, "
                + (f"e.g. {key}={likely[0]} (it holds {', '.join(str(p.relative_to(path)) for p in found)})"
                   if found else "it holds no .pt file")
            )  # fmt: skip
        elif not path.is_file():
            problems.append(f"{key}='{value}' does not exist: {key} takes {takes}")
    if problems:
        raise CheckpointError("; ".join(problems))


def register() -> None:
    """Put the schemas in Hydra's ConfigStore under the names the YAML defaults lists use (safe to call again)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(group="optim", name="sgd_schema", node=SGDConfig)
    store.store(group="sched", name="step_schema", node=StepSchedConfig)


def _names_a_local_path(key: str, value: Any) -> bool:
    """Whether a config value names a local path: a string that is no URL and not resume=auto (null and booleans,
    e.g. pretrained=true, are no paths)."""
    return isinstance(value, str) and "://" not in value and not (key == "resume" and value == "auto")


def make_paths_absolute(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Make the relative file paths among the dotted `keys` of `cfg` absolute, from the directory the command was
    started in (`~` expanded first).

    Hydra's `to_absolute_path` gives that directory even with hydra.job.chdir=true, where the process runs in the
    run directory and a relative path would name another file. config.yaml and the checkpoints then record paths
    that eval.py or a resume started from another directory still finds. Values that are no local path are kept:
    null, booleans (pretrained=true), resume=auto and URLs.
    """
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if _names_a_local_path(key, value) and value.strip():
            path = Path(to_absolute_path(os.path.expanduser(value))).resolve()
            OmegaConf.update(cfg, key, str(path))


def expand_home_in_overrides(overrides: Sequence[str]) -> list[str]:
    """Hydra command-line overrides with a value starting with `~` ("data.root=~/images") given the home folder.

    The shell expands no `~` after `data.root=` (it is no variable assignment), and Hydra's override grammar refuses
    one unquoted ("LexerNoViableAltException: data.root=~/images"), so such an override could never be meant
    otherwise; `~user/x` is expanded too. Deletions (`~key`) and quoted values are left as they are.
    """
    expanded = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and "~" in value and not key.startswith("~"):  # (each value of a sweep: data.root=~/a,~/b)
            override = f"{key}=" + ",".join(os.path.expanduser(v) for v in value.split(","))
        expanded.append(override)
    return expanded
