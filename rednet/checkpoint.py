"""Training checkpoints: plain dicts written atomically, loaded with torch.load(weights_only=True), resumed.

`read_torch_file` is the project's one torch.load: every loader (resume, eval, pretrained=, the scripts) reads through
it. It unpickles tensors, plain containers and a short allow-list of harmless metadata types that other tools write
(timm's and torchvision's `args` Namespace, numpy scalars in mmcv's `meta`), never arbitrary objects.

Besides the training state, a checkpoint carries what belongs to its weights (`weights_metadata`): `arch`,
`model_kwargs` (shape arguments such as stem_kernel_size), `num_classes`, `classes` and a timm-style `pretrained_cfg`
(input_size, crop_pct, interpolation, mean, std as the data config used them). `weights_settings` reads them back,
also from older checkpoints (their saved `config`) and from timm / torchvision checkpoints (their `args`).

Layout of a run's `checkpoints/` folder: `last.pt` (newest state, each epoch and every N steps), `last_prev.pt` (the
one before it), `best.pt` (best val top-1), `epoch_NNNN.pt` (the last k epoch ends). When last.pt is damaged, resume
falls back to last_prev.pt, then to the newest epoch_NNNN.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "arch")


# Model arguments that change how a model runs or trains, not the shape of its weights: not carried with them.
RUNTIME_MODEL_KWARGS = frozenset(
    ("name", "drop_rate", "drop_path_rate", "drop_block_rate", "memory_efficient", "involution_backend",
     "pretrained_cfg_overlay", "cache_dir", "use_ema")
)  # fmt: skip
# The data-config keys that belong to weights, and their timm pretrained_cfg names.
PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the run."""


class InertMetadata:
    """Stands in for a training tool's bookkeeping object in a checkpoint (e.g. mmengine's HistoryBuffer in
    `message_hub`): its state is kept as a plain attribute and none of the tool's code runs."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _safe_globals() -> list[Any]:
    """Globals that torch.load(weights_only=True) may build, beyond tensors and plain containers: argparse.Namespace
    (timm's CheckpointSaver and torchvision's references save `args`), numpy scalars, arrays and numeric dtypes
    (mmcv's `meta`, under numpy 2 and numpy 1 names), and mmengine's log buffers as `InertMetadata`."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct, scalar

    numeric = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
    return [
        argparse.Namespace,
        np.dtype,
        np.ndarray,
        _reconstruct,
        scalar,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (InertMetadata, "mmengine.logging.history_buffer.HistoryBuffer"),
        *numeric,
    ]


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals a refused file asks for (all of them when torch can list them, else the one that failed)."""
    allowed = {name for g in _safe_globals() if isinstance(g, tuple) for name in g[1:]}
    allowed |= {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals() if not isinstance(g, tuple)}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip-format file: fall back to the error message
        names = re.findall(r"GLOBAL (\S+)", str(error))
    return [name for name in names if name not in allowed]


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the harmless globals of `_safe_globals` allowed for this call only.

    Raises:
        CheckpointError: the file does not exist, is not a torch file, or holds other pickled objects: they are not
            unpickled (that would run code the file chooses); the message names them and says how to convert the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give the path of a .pt/.pth file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if not unsafe:
            raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from None
        raise CheckpointError(
            f"'{path}' holds pickled objects of {', '.join(unsafe)}: rednet reads checkpoints with "
            "torch.load(weights_only=True) and will not unpickle these (unpickling runs code the file chooses). "
            'If you trust the file, save its weights as plain tensors once, e.g. python -c "import torch; '
            f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, "
            "'clean.pth')\" (the key that holds the weights may be 'model' or another), and load clean.pth"
        ) from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` hold `src`'s bytes atomically; a hard link costs no I/O, a copy is the fallback."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_checkpoints(
    state: dict[str, Any], ckpt_dir: str | Path, *, epoch_end: bool, is_best: bool, keep_last: int
) -> Path:
    """Write last.pt (the old one becomes last_prev.pt), and at an epoch end also epoch_NNNN.pt (keeping the newest
    `keep_last`) and best.pt."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if last.is_file():
        _link_or_copy(last, ckpt_dir / "last_prev.pt")
    save_checkpoint(state, last)
    if epoch_end and keep_last > 0:
        _link_or_copy(last, ckpt_dir / f"epoch_{state['epoch']:04d}.pt")
        for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep_last]:
            old.unlink()
    if is_best:
        _link_or_copy(last, ckpt_dir / "best.pt")
    return last


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint written by `save_checkpoint`, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give the path of a .pt file written by train.py")
    ckpt = read_torch_file(path, map_location)
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"'{path}' is not a rednet training checkpoint: keys {missing} are missing "
            "(model weights alone load with eval.py checkpoint=PATH)"
        )
    return ckpt


def _model_name(name: Any) -> str | None:
    """`name` if it is a registered model name (timm's CheckpointSaver writes a class name when it has no args)."""
    import timm  # rednet's models are registered: this module is part of the rednet package

    return name if isinstance(name, str) and timm.is_model(name) else None


def check_arch(ckpt: Mapping[str, Any], arch: str, path: str | Path) -> None:
    """Refuse a checkpoint of another architecture before any weights are touched."""
    saved = _model_name(ckpt.get("arch"))
    if saved not in (None, arch):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {saved} but the run builds {arch}; set model={saved} "
            "or give a checkpoint of this model"
        )


@dataclasses.dataclass
class WeightsSettings:
    """What a checkpoint says about its weights; empty fields are unknown.

    Attributes:
        arch: registered model name.
        model_kwargs: shape arguments of the model (stem_kernel_size, in_chans, ...), without run-time ones.
        num_classes: classifier outputs.
        classes: class names in label order (this project's checkpoints).
        pretrained_cfg: timm pretrained_cfg keys: input_size (C, H, W), crop_pct, interpolation, mean, std.
        source: where the settings were read, for the log ("" when the checkpoint has none).
    """

    arch: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None
    classes: list[str] | None = None
    pretrained_cfg: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""


def _pretrained_cfg_from_data(data: Mapping[str, Any], in_chans: int) -> dict[str, Any]:
    """timm pretrained_cfg keys from a data config's img_size, crop_pct, interpolation, mean, std (those present)."""
    cfg: dict[str, Any] = {}
    size = data.get("img_size")
    if size is not None:
        cfg["input_size"] = (in_chans, size, size) if isinstance(size, int) else (in_chans, *size)
    for key in ("crop_pct", "interpolation"):
        if data.get(key) is not None:
            cfg[key] = data[key]
    for key in ("mean", "std"):
        if data.get(key) is not None:
            cfg[key] = tuple(data[key])
    return cfg


def weights_metadata(config: Mapping[str, Any], classes: list[str]) -> dict[str, Any]:
    """The entries of a training checkpoint that belong to its weights, from the run's resolved config.

    Returns:
        arch, model_kwargs, num_classes, classes, and pretrained_cfg (input_size, crop_pct, interpolation, mean, std
        as the data config used them, num_classes) for `weights_settings` to read back.
    """
    model = config["model"]
    kwargs = {key: value for key, value in model.items() if key not in RUNTIME_MODEL_KWARGS}
    pretrained_cfg = _pretrained_cfg_from_data(config["data"], kwargs.get("in_chans", 3))
    return {
        "arch": model["name"],
        "model_kwargs": kwargs,
        "num_classes": len(classes),
        "classes": list(classes),
        "pretrained_cfg": {**pretrained_cfg, "num_classes": len(classes)},
    }


def _settings_from_args(args: Mapping[str, Any], ckpt: Mapping[str, Any]) -> WeightsSettings:
    """Settings from the `args` of timm's train.py (input_size, img_size, crop_pct, interpolation, mean, std,
    in_chans, num_classes; None or "" when left to the model) or torchvision's references (val_crop_size,
    val_resize_size, interpolation)."""
    in_chans = args.get("in_chans") or 3
    cfg: dict[str, Any] = {}
    if args.get("input_size"):
        cfg["input_size"] = tuple(args["input_size"])
    elif args.get("img_size"):
        cfg["input_size"] = (in_chans, args["img_size"], args["img_size"])
    elif args.get("val_crop_size"):
        cfg["input_size"] = (in_chans, args["val_crop_size"], args["val_crop_size"])
        if args.get("val_resize_size"):
            cfg["crop_pct"] = args["val_crop_size"] / args["val_resize_size"]
    if args.get("crop_pct"):
        cfg["crop_pct"] = args["crop_pct"]
    for key in ("interpolation", "mean", "std"):
        if args.get(key):
            cfg[key] = args[key] if isinstance(args[key], str) else tuple(args[key])
    return WeightsSettings(
        arch=_model_name(args.get("model")) or _model_name(ckpt.get("arch")),
        model_kwargs={"in_chans": args["in_chans"]} if args.get("in_chans") else {},
        num_classes=args.get("num_classes") or ckpt.get("num_classes"),
        pretrained_cfg=cfg,
        source="the training arguments saved in the checkpoint (its args)",
    )


def weights_settings(ckpt: Mapping[str, Any]) -> WeightsSettings:
    """What a loaded checkpoint says about its weights: this project's entries (`weights_metadata`), else the saved
    `config` of a checkpoint written before them, else the `args` of timm / torchvision; empty when none."""
    if isinstance(ckpt.get("pretrained_cfg"), Mapping):
        return WeightsSettings(
            arch=_model_name(ckpt.get("arch")),
            model_kwargs=dict(ckpt.get("model_kwargs") or {}),
            num_classes=ckpt.get("num_classes"),
            classes=ckpt.get("classes"),
            pretrained_cfg={k: v for k, v in ckpt["pretrained_cfg"].items() if k != "num_classes"},
            source="the checkpoint",
        )
    config = ckpt.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("data"), Mapping):
        model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
        kwargs = {key: value for key, value in model.items() if key not in RUNTIME_MODEL_KWARGS}
        return WeightsSettings(
            arch=_model_name(ckpt.get("arch")) or _model_name(model.get("name")),
            model_kwargs=kwargs,
            num_classes=ckpt.get("num_classes"),
            classes=ckpt.get("classes"),
            pretrained_cfg=_pretrained_cfg_from_data(config["data"], kwargs.get("in_chans", 3)),
            source="the training config saved in the checkpoint (written before checkpoints carried pretrained_cfg)",
        )
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        return _settings_from_args(args, ckpt)
    return WeightsSettings(arch=_model_name(ckpt.get("arch")), classes=ckpt.get("classes"))


def find_resume_checkpoint(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run (last.pt, last_prev.pt, the newest epoch_NNNN.pt), or None if none.

    A damaged last.pt (e.g. the disk filled up) falls back to an older one with a warning, never silently to scratch.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.pt", ckpt_dir / "last_prev.pt"] + sorted(ckpt_dir.glob("epoch_*.pt"), reverse=True)
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            _logger.warning("skipping damaged checkpoint, trying an older one: %s", e)
    if existing:
        raise CheckpointError(f"no loadable checkpoint in '{ckpt_dir}' (tried {[str(p) for p in existing]})")
    return None


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
            "the checkpoint holds RNG states of %d processes, this run has %d: random augmentation continues from "
            "fresh per-rank seeds (the run is not bit-exact with an uninterrupted one)",
            len(saved),
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


def clean_stale_temp_files(ckpt_dir: str | Path) -> None:
    """Remove temp files left by a process killed in the middle of a write."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
