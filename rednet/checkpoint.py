"""Checkpoint files: the project's one torch.load, and the settings that travel with a checkpoint's weights.

`read_torch_file` is the project's one torch.load: every loader (resume, eval, pretrained=, the scripts) reads through
it. It unpickles tensors, plain containers and a short allow-list of harmless metadata types that other tools write
(timm's and torchvision's `args` Namespace, numpy scalars in mmcv's `meta`), never arbitrary objects.

Besides the training state (rednet.run_state), a checkpoint carries what belongs to its weights (`weights_metadata`):
`arch`, `model_kwargs` (shape arguments such as stem_kernel_size), `num_classes`, `classes` and a timm-style
`pretrained_cfg` (input_size, crop_pct, interpolation, mean, std as the data config used them). `weights_settings`
reads them back, also from older checkpoints (their saved `config`) and from timm / torchvision checkpoints (their
`args`). A tensors-only weights file (scripts/convert_checkpoint.py's) carries them in a sidecar JSON beside it, which
`rednet.weights.read_checkpoint` merges in as these entries (`SIDECAR_KEY` then names the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import pathlib
import pickle
import re
import types
import typing
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_logger = logging.getLogger(__name__)

# Model arguments that change how a model runs or trains, not the shape of its weights: not carried with them.
RUNTIME_MODEL_KWARGS = frozenset(
    ("name", "drop_rate", "drop_path_rate", "drop_block_rate", "memory_efficient", "involution_backend",
     "pretrained_cfg_overlay", "cache_dir", "use_ema")
)  # fmt: skip
# The data-config keys that belong to weights, and their timm pretrained_cfg names.
PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")
# The entry rednet.weights.read_checkpoint adds when the settings came from a weights file's sidecar JSON: its path.
SIDECAR_KEY = "weights_sidecar"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the run."""


class InertMetadata:
    """Stands in for a training tool's bookkeeping object in a checkpoint (e.g. mmengine's HistoryBuffer in
    `message_hub`): its state is kept as a plain attribute and none of the tool's code runs."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _defaultdict_as_dict(default_factory: Any = None) -> dict:
    """A pickled collections.defaultdict read as a plain dict (weights_only fills only plain dicts)."""
    return {}


def _safe_globals() -> list[Any]:
    """Globals that torch.load(weights_only=True) may build, beyond tensors and plain containers: plain data types
    whose construction runs no code of the file's choosing.

    - argparse.Namespace and types.SimpleNamespace (timm's CheckpointSaver and torchvision's references save `args`);
    - numpy scalars, arrays and dtypes of numbers, bools, strings, bytes and dates (mmcv's `meta`; under numpy 2 and
      numpy 1 names); never the object dtype, whose items are arbitrary pickles;
    - pathlib paths (as pure paths: a Windows checkpoint's WindowsPath reads on Linux), datetime values,
      collections.defaultdict (read as a plain dict) and the builtins its factories name;
    - omegaconf containers (Lightning's `hyper_parameters` of a Hydra config), and mmengine's log buffers as
      `InertMetadata`.
    """
    from numpy._core.multiarray import _reconstruct, scalar
    from omegaconf import DictConfig, ListConfig, base, nodes

    numeric = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGUSMm"]
    omegaconf_types = [DictConfig, ListConfig, base.Metadata, base.ContainerMetadata, nodes.AnyNode,
                       nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.BytesNode,
                       nodes.PathNode, typing.Any]  # fmt: skip
    return [
        argparse.Namespace,
        types.SimpleNamespace,
        np.dtype,
        np.ndarray,
        _reconstruct,
        scalar,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (InertMetadata, "mmengine.logging.history_buffer.HistoryBuffer"),
        *numeric,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        (pathlib.PurePosixPath, "pathlib.PosixPath"),
        (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        (_defaultdict_as_dict, "collections.defaultdict"),
        dict,
        list,
        tuple,
        int,
        float,
        str,
        bool,
        *omegaconf_types,
    ]


def _allowed_names() -> set[str]:
    names = {name for g in _safe_globals() if isinstance(g, tuple) for name in g[1:]}
    for g in _safe_globals():
        if not isinstance(g, tuple):
            names.add("typing.Any" if g is typing.Any else f"{g.__module__}.{g.__qualname__}")
    return names


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals a refused file asks for (all of them when torch can list them, else the one that failed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip-format file: fall back to the error message
        names = re.findall(r"GLOBAL (\S+)", str(error))
    allowed = _allowed_names()
    return sorted(name for name in names if name not in allowed)


def unreadable_reason(path: str | os.PathLike) -> str:
    """Why a file cannot be a checkpoint, from its size and first bytes (and a zip's directory): empty, a web page,
    a truncated or foreign zip, a compressed file; "" when it may be one (cheap: does not read the whole file)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes): an interrupted download or copy? Fetch or copy it again"
    with open(path, "rb") as file:
        head = file.read(512)
    if head.startswith(b"PK"):  # torch's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return f"a zip archive that is truncated or damaged ({size} bytes): copy or download it again"
        if not any(name.endswith("data.pkl") for name in names):
            return f"a zip archive but not a torch checkpoint (it holds {names[:5]}): give the .pth/.pt file"
        return ""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return (
            "it is an HTML/XML page, not weights: a download link that returned a web page (login, error or "
            "redirect page)? Download the file itself"
        )
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        return "a compressed file (gzip/bzip2/xz): unpack it and give the .pth/.pt file inside"
    return ""


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def _refusal(path: Path, unsafe: list[str]) -> CheckpointError:
    """The error for a file holding pickled objects: a whole model (torch.save(model)) or other classes."""
    shown = ", ".join(unsafe[:6]) + (f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else "")
    if any(name.startswith("torch.nn.modules.") for name in unsafe):
        return CheckpointError(
            f"'{path}' is a whole pickled model (torch.save(model); classes {shown}), not a state dict: rednet reads "
            "checkpoints with torch.load(weights_only=True) and will not unpickle it (unpickling runs code the file "
            'chooses). If you trust the file, save its weights once with python -c "import torch; '
            f"torch.save(torch.load('{path}', weights_only=False).state_dict(), 'clean.pth')\" (for a dict holding "
            "the model, call .state_dict() on that entry) and load clean.pth"
        )
    return CheckpointError(
        f"'{path}' holds pickled objects of {shown}: rednet reads checkpoints with torch.load(weights_only=True) "
        "and will not unpickle these (unpickling runs code the file chooses). If you trust the file, save its "
        'weights as plain tensors once, e.g. python -c "import torch; '
        f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, "
        "'clean.pth')\" (the key that holds the weights may be 'model' or another), and load clean.pth"
    )


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the harmless globals of `_safe_globals` allowed for this call only.

    Raises:
        CheckpointError: the file does not exist, is not a torch file (empty, a web page, another archive, truncated:
            the message says which), or holds other pickled objects, e.g. a whole model from torch.save(model): they
            are not unpickled (that would run code the file chooses); the message names them and how to convert the
            file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give the path of a .pt/.pth file")
    kind = unreadable_reason(path)
    if kind:
        raise CheckpointError(f"'{path}' is not a readable checkpoint: {kind}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise _refusal(path, unsafe) from None
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"'{path}' is not a readable checkpoint ({_first_line(e)}): truncated, damaged, or not a torch file"
        ) from e


def _model_name(name: Any) -> str | None:
    """`name` if it is a registered model name (timm's CheckpointSaver writes a class name when it has no args)."""
    import timm  # rednet's models are registered: this module is part of the rednet package

    return name if isinstance(name, str) and timm.is_model(name) else None


def check_arch(ckpt: Mapping[str, Any], arch: str, path: str | Path) -> None:
    """Refuse a checkpoint of another architecture before any weights are touched: the architecture its `arch`
    names, or its training arguments (timm's and torchvision's `args.model`; timm's own `arch` is a class name)."""
    saved = weights_settings(ckpt).arch
    if saved not in (None, arch):
        said = f" (says its settings file '{ckpt[SIDECAR_KEY]}')" if SIDECAR_KEY in ckpt else ""
        raise CheckpointError(
            f"checkpoint '{path}' holds a {saved}{said} but the run builds {arch}; set model={saved} "
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


def pretrained_cfg_from_data(data: Mapping[str, Any], in_chans: int) -> dict[str, Any]:
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
    pretrained_cfg = pretrained_cfg_from_data(config["data"], kwargs.get("in_chans", 3))
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
            source=f"the settings file {ckpt[SIDECAR_KEY]}" if SIDECAR_KEY in ckpt else "the checkpoint",
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
            pretrained_cfg=pretrained_cfg_from_data(config["data"], kwargs.get("in_chans", 3)),
            source="the training config saved in the checkpoint (written before checkpoints carried pretrained_cfg)",
        )
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        return _settings_from_args(args, ckpt)
    return WeightsSettings(
        arch=_model_name(ckpt.get("arch")), classes=ckpt.get("classes"), **_settings_from_mmpretrain(ckpt)
    )


def _settings_from_mmpretrain(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """mean/std of an mmpretrain ImageClassifier's data preprocessor, when its buffers were saved (0-255 scale ->
    timm's 0-1)."""
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, Mapping):
        return {}
    cfg = {
        key: tuple(round(float(v) / 255, 6) for v in state_dict[f"data_preprocessor.{key}"].flatten())
        for key in ("mean", "std")
        if isinstance(state_dict.get(f"data_preprocessor.{key}"), torch.Tensor)
    }
    source = "the checkpoint's mmpretrain data_preprocessor"
    return {"pretrained_cfg": cfg, "source": source} if cfg else {}
