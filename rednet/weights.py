"""Pretrained RedNet weights: the registry, downloads through torch.hub with sha256 checks, checkpoint conversion.

Accepted checkpoints: official mmcls / mmpretrain files (``{"state_dict", "meta"}``, keys prefixed ``backbone.`` /
``head.``), plain state dicts, this project's training checkpoints (``{"model", "model_ema", ...}``), timm's
CheckpointSaver files (``{"state_dict", "state_dict_ema", "args", ...}``), torchvision's reference scripts
(``{"model", "model_ema", "args", ...}``, the EMA an AveragedModel), Lightning checkpoints (``{"state_dict", ...}``
with the LightningModule's attribute, e.g. ``model.``, before every key), with DDP (``module.``) and torch.compile
(``_orig_mod.``) prefixes; as torch files (read by ``rednet.checkpoint.read_torch_file``: weights_only, no arbitrary
objects) or safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rednet import convert_paddle
from rednet.checkpoint import (
    SIDECAR_KEY,
    CheckpointError,
    WeightsSettings,
    check_arch,
    pretrained_cfg_from_data,
    read_torch_file,
    unreadable_reason,
    weights_settings,
)

__all__ = [
    "PRETRAINED",
    "WeightsSpec",
    "register_weights",
    "fetch",
    "read_checkpoint",
    "sidecar_path",
    "sidecar_config",
    "read_sidecar",
    "to_state_dict",
    "load_state_dict",
    "load_weights",
    "model_in_chans",
    "preprocessing_from_cfg",
    "resolve_preprocessing",
    "describe_preprocessing",
    "load_pretrained",
    "sha256_file",
]

_logger = logging.getLogger(__name__)

# torch.hub's convention: a file named NAME-<first hex digits of its sha256>.ext carries its own check.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_WRAPPER_NAMES = {"module.": "DistributedDataParallel / DataParallel", "_orig_mod.": "torch.compile"}
# An mmcls / mmpretrain ImageClassifier checkpoint (any backbone, RedNet's official release among them):
# backbone.<the network's keys>, head.fc.*. RedNet's checkpoint_filter_fn maps its official names too.
_MMCLS_PREFIXES = ("backbone.", "head.")
_LIGHTNING_KEYS = ("pytorch-lightning_version", "lightning_version", "hyper_parameters", "loops")


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
    """Where a model's pretrained weights come from.

    Attributes:
        url: direct download URL ("" when none is published).
        sha256: full hex digest of the file ("" to rely only on a NAME-<hash prefix>.ext file name).
        file_name: name in the torch.hub checkpoint cache; defaults to the URL's file name. A file placed there by
            hand loads without network.
    """

    url: str = ""
    sha256: str = ""
    file_name: str = ""

    def cache_name(self, model_name: str) -> str:
        return self.file_name or _url_file_name(self.url) or f"{model_name}.pth"


# The official ImageNet checkpoints (mmcls format) were published as OneDrive share links, which are dead
# (d-li14/involution issues #54, #55, #62). PaddleClas publishes them converted to Paddle (.pdparams, read and
# converted by rednet.convert_paddle); no sha256 is published for them, so the first download records its digest in
# the cached file's name and later loads check it (see download). Pin one with register_weights(..., sha256=...).
PRETRAINED: dict[str, WeightsSpec] = {
    name: WeightsSpec(url=url) for name, url in convert_paddle.PADDLECLAS_URLS.items()
}


def register_weights(model_name: str, url: str, sha256: str = "", file_name: str = "") -> None:
    """Register (or replace) the weights that ``pretrained=True`` loads for ``model_name``."""
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"sha256 {sha256!r} for {model_name} is not a 64-digit lowercase hex digest")
    PRETRAINED[model_name] = WeightsSpec(url=url, sha256=sha256, file_name=file_name)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _url_file_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path) if url else ""


def _checkpoint_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"


def _expected_digest(file_name: str, sha256: str) -> str:
    """The full digest if known, else the hash prefix in a NAME-<prefix>.ext file name, else ""."""
    if sha256:
        return sha256
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match else ""


def _check_digest(path: Path, expected: str, origin: str) -> None:
    actual = sha256_file(path)
    if expected and not actual.startswith(expected):
        raise RuntimeError(f"sha256 mismatch for {origin}: expected {expected}, got {actual} (file {path})")


def download(
    url: str,
    sha256: str = "",
    file_name: str = "",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` into the torch.hub checkpoint cache (once) and check its sha256; return the local path.

    A cached file is used without network. A download whose hash does not match is deleted. When no digest is known
    (no ``sha256``, no NAME-<hash>.ext name), the first download records its own: it is cached as
    NAME-<sha256[:16]>.ext, the digest is logged (a warning) with how to pin it, and later calls check the cached file
    against it (a file placed by hand under the plain NAME.ext is used as it is).
    """
    file_name = file_name or _url_file_name(url)
    if not file_name:
        raise ValueError(f"cannot name a cache file for {url!r}: give file_name, e.g. 'rednet50.pth'")
    directory = _checkpoint_dir(cache_dir)
    destination = directory / file_name
    expected = _expected_digest(file_name, sha256)
    recorded = _recorded_download(directory, file_name, expected)
    if recorded is not None:
        destination, expected = recorded, expected or _expected_digest(recorded.name, "")
    if destination.is_file():
        try:
            _check_digest(destination, expected, f"cached file {destination}")
        except RuntimeError as error:
            raise RuntimeError(f"{error}: delete it to download {url} again, or put the right file there") from None
        reason = unreadable_reason(destination)
        if reason:  # e.g. left by a copy or download that was cut short
            raise CheckpointError(
                f"cached file {destination} is not a readable checkpoint ({reason}): delete it to download {url} again"
            )
        return destination
    # Named NAME.partial.ext: read_checkpoint checks it by its extension (.pdparams, ...) before it is cached.
    partial = destination.with_name(f"{destination.stem}.partial{destination.suffix}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial.touch()
    except OSError as error:
        raise RuntimeError(
            f"cannot write the download cache {directory} ({error}): set TORCH_HOME (or cache_dir) to a writable "
            f"directory, or download {url} by hand and pass its local path as pretrained='/path/to/{file_name}'"
        ) from error
    try:
        # A bar only on a terminal: in a batch job's or a redirected log its frames would fill the file (issue 9.9).
        progress = progress and sys.stderr.isatty()
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=None, progress=progress)
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError and HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({type(error).__name__}: {error}). Download it by hand and save it as "
            f"{destination}, or pass its local path as pretrained='/path/to/{file_name}'"
        ) from error
    actual = sha256_file(partial)
    if not expected:  # a pinned digest that matches proves the file; else read it before its digest is recorded
        _check_download(url, partial)
    if expected and not actual.startswith(expected):
        partial.unlink()
        raise RuntimeError(
            f"sha256 mismatch for {url}: expected {expected}, got {actual}; the download was deleted. "
            "Check the URL, or register the right sha256 (rednet.weights.register_weights)"
        )
    if not expected:
        destination = _with_recorded_digest(destination, actual)
        _logger.warning(
            "downloaded %s: no sha256 was registered; its sha256 is %s, recorded in the cache file name %s (later "
            "loads check it). Pin it with rednet.weights.register_weights(<model>, url=%r, sha256=%r)",
            url, actual, destination, url, actual,
        )  # fmt: skip
    os.replace(partial, destination)
    return destination


def _check_download(url: str, partial: Path) -> None:
    """Read a finished download before it is cached: a web page, a cut-short or damaged file is deleted with an error
    naming the URL, so no corrupt file stays in the cache (torch.hub does not compare the size with Content-Length).
    """
    try:
        read_checkpoint(partial)
    except Exception as error:  # CheckpointError, or the .pdparams reader's errors
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"the download of {url} is not a readable checkpoint and was deleted: {error}. Check the URL (a link that "
            "answers with a web page?) and try again, or download it by hand and pass its local path as pretrained="
        ) from None


_RECORDED_DIGEST_DIGITS = 16  # 64 bits of sha256 in the cache file's name


def _with_recorded_digest(path: Path, digest: str) -> Path:
    """NAME.ext -> NAME-<digest[:16]>.ext: torch.hub's convention for a file that carries its own check."""
    return path.with_name(f"{path.stem}-{digest[:_RECORDED_DIGEST_DIGITS]}{path.suffix}")


def _recorded_download(directory: Path, file_name: str, expected: str) -> Path | None:
    """The cached NAME-<digest prefix>.ext of an earlier first download of ``file_name`` (one whose prefix agrees
    with ``expected`` when a digest is pinned), else None."""
    stem, suffix = Path(file_name).stem, Path(file_name).suffix
    pattern = re.compile(re.escape(stem) + rf"-([0-9a-f]{{{_RECORDED_DIGEST_DIGITS}}}){re.escape(suffix)}")
    found = [
        path
        for path in sorted(directory.glob(f"{glob.escape(stem)}-*{glob.escape(suffix)}"))
        if (match := pattern.fullmatch(path.name)) and (not expected or expected.startswith(match.group(1)))
    ]
    if len(found) > 1:
        raise RuntimeError(
            f"several recorded downloads of {file_name} in {directory}: {[path.name for path in found]}; "
            "delete all but the one you trust"
        )
    return found[0] if found else None


def fetch(
    source: str | os.PathLike,
    sha256: str = "",
    file_name: str = "",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """A local path for ``source``: a file path, a file:// URL, or an http(s) URL (downloaded into the cache)."""
    source = str(source)
    scheme = urllib.parse.urlparse(source).scheme
    if scheme in ("http", "https"):
        return download(source, sha256, file_name, cache_dir, progress)
    path = (
        Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
        if scheme == "file"
        else Path(source).expanduser()
    )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {source!r} does not exist (expected a file, or an http(s)/file URL)")
    if sha256:
        _check_digest(path, sha256, str(path))
    return path


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a torch checkpoint, a safetensors file, or a PaddleClas ``.pdparams`` file (returned converted to our
    key names; see ``rednet.convert_paddle``) into a dict, on the CPU.

    Raises:
        rednet.checkpoint.CheckpointError: unreadable, not a dict, or pickled objects other than harmless metadata
            (see ``rednet.checkpoint.read_torch_file``).
    """
    path = Path(path)
    if path.suffix == ".pdparams":  # PaddleClas weights: a pickle of NumPy arrays, read without running code
        checkpoint = convert_paddle.load_pdparams(path)
    elif path.is_file() and _is_safetensors(path):
        from safetensors.torch import load_file

        checkpoint = load_file(str(path), device="cpu")
    else:
        checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a dict of weights: save a state dict "
            "(torch.save(model.state_dict(), path)) or a dict with one under 'state_dict'"
        )
    return _with_sidecar(path, checkpoint)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The settings file that travels with a weights file: the same name with ``.json`` (mine-1a2b3c4d.pth ->
    mine-1a2b3c4d.json), as scripts/convert_checkpoint.py writes it."""
    return Path(path).with_suffix(".json")


# timm's config.json (timm.models.push_to_hub / load_model_config_from_hf) -> this project's checkpoint entries
# (rednet.checkpoint.weights_metadata, read back by weights_settings).
_SIDECAR_PREPROCESSING = ("input_size", "crop_pct", "interpolation", "mean", "std")


def sidecar_config(settings: WeightsSettings) -> dict[str, Any]:
    """The sidecar JSON of weights whose checkpoint said ``settings``, in timm's config.json layout: ``architecture``,
    ``num_classes``, ``label_names``, ``model_args``, ``pretrained_cfg`` (input_size as [C, H, W], crop_pct,
    interpolation, mean, std); only the entries the checkpoint had ({} when it had none)."""
    pretrained_cfg = {
        key: list(value) if isinstance(value, (tuple, list)) else value
        for key, value in settings.pretrained_cfg.items()
        if key in _SIDECAR_PREPROCESSING
    }
    config = {
        "architecture": settings.arch,
        "num_classes": settings.num_classes,
        "label_names": list(settings.classes) if settings.classes is not None else None,
        "model_args": dict(settings.model_kwargs) or None,
        "pretrained_cfg": pretrained_cfg or None,
    }
    return {key: value for key, value in config.items() if value is not None}


def _sidecar_error(json_path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"weights settings file '{json_path}' {what}: correct it, or delete it to load the weights with the "
        "model's defaults (it is read because it sits beside the weights file with the same name)"
    )


def read_sidecar(json_path: str | os.PathLike) -> dict[str, Any]:
    """A sidecar JSON (`sidecar_config`'s layout; other keys timm writes are ignored) as checkpoint entries: arch,
    num_classes, classes, model_kwargs, pretrained_cfg (input_size, mean, std as tuples), as a training checkpoint
    holds them.

    Raises:
        CheckpointError: not JSON, not an object, an entry of the wrong type, an architecture that is not a
            registered model, or num_classes and label_names that disagree; the message names the file.
    """
    import timm

    json_path = Path(json_path)
    try:
        config = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _sidecar_error(json_path, f"cannot be read as JSON ({error})") from None
    if not isinstance(config, dict):
        raise _sidecar_error(json_path, f"holds a {type(config).__name__}, not a JSON object")
    expected = {"architecture": str, "num_classes": int, "label_names": list, "model_args": dict,
                "pretrained_cfg": dict}  # fmt: skip
    for key, kind in expected.items():
        if key in config and not isinstance(config[key], kind):
            raise _sidecar_error(json_path, f"has {key}={config[key]!r}, not a {kind.__name__}")
    arch = config.get("architecture")
    if arch is not None and not timm.is_model(arch):
        raise _sidecar_error(json_path, f"names the architecture {arch!r}, which is not a registered model")
    cfg = config.get("pretrained_cfg", {})
    classes = config.get("label_names", cfg.get("label_names"))
    num_classes = config.get("num_classes", cfg.get("num_classes"))
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise _sidecar_error(json_path, f"has num_classes={num_classes} but {len(classes)} label_names")
    metadata: dict[str, Any] = {
        "pretrained_cfg": {
            key: tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
            for key in _SIDECAR_PREPROCESSING
            if cfg.get(key) is not None
        }
    }
    for key, value in (("arch", arch), ("num_classes", num_classes), ("classes", classes),
                       ("model_kwargs", config.get("model_args"))):  # fmt: skip
        if value is not None:
            metadata[key] = value
    return metadata


def _with_sidecar(path: Path, checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """``checkpoint`` with the entries of its sidecar JSON (`sidecar_path`), when one exists and the file itself
    carries no settings of its own (a published weights file holds tensors only); else ``checkpoint`` unchanged."""
    json_path = sidecar_path(path)
    if json_path == path or not json_path.is_file():
        return checkpoint
    if weights_settings(checkpoint).source:
        _logger.warning("%s carries its own weights settings: the settings file %s beside it is not read",
                        path, json_path)  # fmt: skip
        return checkpoint
    metadata = read_sidecar(json_path)
    _check_sidecar_classifier(checkpoint, metadata, json_path, path)
    _logger.info("weights settings of %s: from %s", path, json_path)
    return {**checkpoint, **metadata, SIDECAR_KEY: str(json_path)}


def _check_sidecar_classifier(
    checkpoint: Mapping[str, Any], metadata: Mapping[str, Any], json_path: Path, path: Path
) -> None:
    """Refuse a sidecar whose class count differs from the weights' classifier (the settings of other weights)."""
    count = metadata.get("num_classes", len(metadata.get("classes") or ()) or None)
    if count is None:
        return
    import timm

    arch = metadata.get("arch")
    arch_cfg = timm.models.get_pretrained_cfg(arch) if arch else None
    names = arch_cfg.classifier if arch_cfg is not None else "fc"
    try:
        tensors = to_state_dict(checkpoint, origin=str(path))
    except CheckpointError:
        return  # no weights: the loader names that
    for name in (names,) if isinstance(names, str) else names or ():
        weight = tensors.get(f"{name}.weight")
        if weight is not None and weight.shape[0] != count:
            raise _sidecar_error(
                json_path,
                f"says the weights predict {count} classes but '{path}' has a {weight.shape[0]}-class classifier "
                f"({name}.weight): it belongs to other weights",
            )


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _strip_wrappers(tensors: Mapping[str, Tensor], where: str = "") -> dict[str, Tensor]:
    """``tensors`` without the DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes of their keys, logging
    (INFO) each prefix removed, with its wrapper and how many keys had it; ``where`` names the part of the checkpoint
    for that line."""
    stripped: dict[str, Tensor] = {}
    removed: dict[str, int] = {}
    for key, value in tensors.items():
        plain = _strip_prefixes(key, _WRAPPER_PREFIXES)
        stripped[plain] = value
        if plain != key:
            head = key[: len(key) - len(plain)]
            removed[head] = removed.get(head, 0) + 1
    for head, count in removed.items():
        wrappers = " + ".join(_WRAPPER_NAMES[prefix] for prefix in re.findall(r"module\.|_orig_mod\.", head))
        _logger.info("removed the prefix %r (%s) from %d of %d keys%s", head, wrappers, count, len(tensors), where)
    return stripped


# (raw weights key, EMA weights key) of each training tool's layout, most specific first.
_WEIGHTS_KEYS = (("model", "model_ema"), ("state_dict", "state_dict_ema"))
# Keys of an mmpretrain ImageClassifier that are not the network's: its data preprocessor's mean/std buffers
# (read as preprocessing by rednet.checkpoint.weights_settings).
_MMCLS_EXTRA_PREFIXES = ("data_preprocessor.",)


def _weights_entry(checkpoint: Mapping[str, Any], use_ema: bool) -> Mapping[str, Any]:
    """The dict of weights of a checkpoint: its raw or EMA entry (either alone when the file has only one), else
    the checkpoint itself (a plain state dict)."""
    for model_key, ema_key in _WEIGHTS_KEYS:
        raw, ema = checkpoint.get(model_key), checkpoint.get(ema_key)
        raw, ema = (entry if isinstance(entry, Mapping) and entry else None for entry in (raw, ema))
        if raw is None and ema is None:
            continue
        use = ema_key if ema is not None and (use_ema or raw is None) else model_key
        if use == ema_key and not use_ema:
            _logger.warning("the checkpoint holds only EMA weights (%r): loading them although use_ema is off", use)
        elif raw is None:
            _logger.info("the checkpoint holds only EMA weights: loading its %r entry", use)
        else:
            kind = "EMA" if use == ema_key else "raw (not EMA)" if ema is not None else "model"
            _logger.info("loading the %s weights of the checkpoint: its %r entry", kind, use)
        return checkpoint[use]
    return checkpoint


_LIGHTNING_NETWORK_NAMES = ("model", "net", "network", "module")  # what LightningModules call their network


def _lightning_network(tensors: dict[str, Tensor], use_ema: bool) -> dict[str, Tensor]:
    """The network among a LightningModule's attributes: the only attribute, else the one named model / net /
    network / module, or its EMA copy (an attribute named *ema* with the same keys) when ``use_ema``; other
    attributes (a loss's weights, metrics) are dropped with a log line. Keys are returned unchanged when the
    LightningModule is the network itself (no such attribute)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if "." not in key:  # a tensor of the LightningModule itself
            return tensors
        attribute, rest = key.split(".", 1)
        groups.setdefault(attribute, {})[rest] = value
    named = [name for name in _LIGHTNING_NETWORK_NAMES if name in groups]
    if len(groups) > 1 and not named:
        return tensors
    chosen = named[0] if named else next(iter(groups))
    keys = {name: {_strip_prefixes(key, _WRAPPER_PREFIXES) for key in group} for name, group in groups.items()}
    same_keys = [name for name in groups if name != chosen and keys[name] == keys[chosen]]
    emas = [name for name in same_keys if "ema" in name.lower()]
    if use_ema and emas:
        chosen = emas[0]
    dropped = sorted(set(groups) - {chosen})
    others = f", not those of {dropped}" if dropped else ""
    _logger.info("Lightning checkpoint: loading the %r attribute's weights (prefix %r removed)%s", chosen,
                 f"{chosen}.", others)  # fmt: skip
    return _strip_wrappers(groups[chosen], f" of the Lightning attribute {chosen!r}")


def to_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True, origin: str = "") -> dict[str, Tensor]:
    """The model's state dict from any accepted checkpoint layout, without the training framework's prefixes (DDP,
    torch.compile, Lightning, mmcls's backbone./head.); model-specific renames are the model's checkpoint filter
    (RedNet's: ``rednet.models.rednet.checkpoint_filter_fn``).

    Args:
        checkpoint: a loaded checkpoint (see the module docstring for the layouts).
        use_ema: take the EMA weights when the checkpoint has them (``model_ema`` / ``state_dict_ema``); a file with
            only EMA weights gives them either way.
        origin: the file, for error messages.

    Raises:
        CheckpointError: the checkpoint is not a dict, or holds no tensors where weights belong (its keys named).
    """
    named = f"checkpoint '{origin}'" if origin else "the checkpoint"
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{named} holds a {type(checkpoint).__name__}, not a dict of weights: save a state dict "
            "(torch.save(model.state_dict(), path)) or a dict with one under 'state_dict'"
        )
    source = checkpoint
    checkpoint = _weights_entry(checkpoint, use_ema)
    tensors = _strip_wrappers(
        {
            key: value
            for key, value in checkpoint.items()
            if isinstance(value, Tensor) and key.rsplit(".", 1)[-1] != "n_averaged"  # AveragedModel's update count
        }
    )
    if not tensors:
        raise CheckpointError(
            f"{named} holds no weights: no tensors under {[key for pair in _WEIGHTS_KEYS for key in pair]} "
            f"or at its top level (its keys: {list(source)[:12]}); give a state dict or a training checkpoint"
        )
    if any(key in source for key in _LIGHTNING_KEYS):  # the LightningModule's attribute that holds the network
        tensors = _lightning_network(tensors, use_ema)
    if any(key.startswith("backbone.") for key in tensors):  # mmcls layout; timm models keep their own head.* keys
        _logger.info("mmcls / mmpretrain layout: removed the prefixes 'backbone.' and 'head.'")
        tensors = {
            _strip_prefixes(key, _MMCLS_PREFIXES): value
            for key, value in tensors.items()
            if not key.startswith(_MMCLS_EXTRA_PREFIXES)
        }
    return tensors


def _classifier_keys(model: nn.Module) -> list[str]:
    """The classifier's parameter names, from timm's pretrained_cfg ("head.fc" for ConvNeXt, ...), else "fc"."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    return [f"{name}.{kind}" for name in ((names,) if isinstance(names, str) else names) for kind in ("weight", "bias")]


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict (``to_state_dict``'s output) into a RedNet or another timm model strictly, except for the
    classifier.

    A RedNet's goes through its ``checkpoint_filter_fn`` first (mmcls names, stem kernel size, classifier, key
    check). A checkpoint for another num_classes loses its classifier with a warning (the model keeps its fresh
    one); another input channel count adapts the first conv (pretrained_cfg ``first_conv``) as timm does; any other
    missing or unexpected key is an error that lists them.
    """
    from rednet.models.rednet import RedNet, checkpoint_filter_fn  # deferred: rednet.models imports this module

    state_dict = checkpoint_filter_fn(state_dict, model) if isinstance(model, RedNet) else dict(state_dict)
    own = model.state_dict()
    dropped = [
        key
        for key in _classifier_keys(model)
        # another class count only: another input width is another architecture (the shape check names it)
        if key in state_dict and (key not in own or own[key].shape[:1] != state_dict[key].shape[:1])
    ]
    if dropped:
        warnings.warn(
            f"checkpoint classifier has {state_dict[dropped[0]].shape[0]} classes, the model "
            f"{getattr(model, 'num_classes', 0)}: the classifier ({', '.join(dropped)}) is left at its fresh "
            "initialization",
            stacklevel=2,
        )
        for key in dropped:
            del state_dict[key]
    _adapt_first_conv(model, state_dict)
    _check_shapes(model, state_dict, own)
    result = model.load_state_dict(state_dict, strict=False)
    # A RedNet's filter has dropped (with its warning) a classifier of another class count already.
    fresh = set(dropped) | (set(_classifier_keys(model)) if isinstance(model, RedNet) else set())
    missing = [key for key in result.missing_keys if key not in fresh]
    if missing or result.unexpected_keys:
        unexpected = result.unexpected_keys
        raise RuntimeError(
            f"checkpoint does not match {type(model).__name__}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )


def _check_shapes(model: nn.Module, state_dict: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> None:
    """Refuse tensors whose shapes differ from the model's (another architecture or width) with a short list, instead
    of torch's size-mismatch error for every tensor."""
    differ = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and isinstance(value, Tensor) and value.shape != own[key].shape
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__}: {len(differ)} tensors have other shapes "
            f"(checkpoint vs model): {', '.join(differ[:4])}: a checkpoint of another architecture or size? "
            "Build the model it was trained as (model=<name> and its arguments)"
        )


def _adapt_first_conv(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Adapt the first conv (pretrained_cfg ``first_conv``) of ``state_dict`` to the model's input channels, as
    timm's load_pretrained does (timm.models.adapt_input_conv)."""
    from timm.models import adapt_input_conv

    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    for name in (first_conv,) if isinstance(first_conv, str) else first_conv or ():
        weight = state_dict.get(f"{name}.weight")
        module = model.get_submodule(name) if weight is not None else None
        if isinstance(module, nn.Conv2d) and weight.ndim == 4 and weight.shape[1] != module.weight.shape[1]:
            # Plain stems only (one weight channel per image channel): base_chans is the checkpoint's count.
            state_dict[f"{name}.weight"] = adapt_input_conv(module.weight.shape[1], weight, base_chans=weight.shape[1])


def preprocessing_from_cfg(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data-config keys (img_size, crop_pct, interpolation, mean, std) of those a timm pretrained_cfg holds.

    img_size is an int for square inputs, else [H, W]; mean and std are lists.
    """
    values: dict[str, Any] = {}
    if pretrained_cfg.get("input_size"):
        height, width = pretrained_cfg["input_size"][-2:]
        values["img_size"] = height if height == width else [height, width]
    for key in ("crop_pct", "interpolation"):
        if pretrained_cfg.get(key) is not None:
            values[key] = pretrained_cfg[key]
    for key in ("mean", "std"):
        if pretrained_cfg.get(key) is not None:
            values[key] = [float(v) for v in pretrained_cfg[key]]
    return values


def model_in_chans(model: nn.Module) -> int:
    """The number of image channels ``model`` takes: its ``in_chans`` (RedNet, many timm models), else the input
    channels of its first conv (pretrained_cfg ``first_conv``, else the first Conv2d), else pretrained_cfg
    ``input_size[0]``, else 3.

    Not pretrained_cfg first: timm keeps an architecture's (3, H, W) there when the model is built with in_chans=1.
    """
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = pretrained_cfg.get("first_conv")
    for name in (first_conv,) if isinstance(first_conv, str) else first_conv or ():
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
            if isinstance(module, nn.modules.conv._ConvNd):
                return module.in_channels
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is not None:
        return conv.in_channels
    return int((pretrained_cfg.get("input_size") or (3,))[0])


# ITU-R 601-2 luma weights: the gray value Pillow's convert("L") (and so rednet.data.to_gray) makes of R, G, B.
_LUMA = (0.299, 0.587, 0.114)


def _per_channel(key: str, values: list[float], in_chans: int, given: bool) -> list[float]:
    """``values`` (mean or std) with one value per channel of an ``in_chans``-channel model.

    One value is repeated (timm's resolve_data_config rule); RGB values for a 1-channel model, when they come from the
    weights or timm's defaults (an RGB architecture's pretrained_cfg), become their luma-weighted sum: for the mean,
    the mean of the gray images exactly; for the std, an upper bound reached when the channels are fully correlated
    (ImageNet's mean/std give 0.4589 / 0.2256). timm's own rule stops there (it asserts on a user's value and
    leaves the weights' 3 values, which a 1-channel tensor cannot be normalized with).

    Raises:
        ValueError: the user gave (``given``) another number of values than 1 or ``in_chans``, naming data.<key>.
    """
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if not given and in_chans == 1 and len(values) == 3:
        return [round(sum(w * v for w, v in zip(_LUMA, values)), 6)]
    # A 1-channel model takes exactly one value: "one per channel or one for all" would say it twice.
    counts = "1 value" if in_chans == 1 else f"{in_chans} values (one per channel) or 1 (for every channel)"
    if given:
        raise ValueError(
            f"data.{key}={values} has {len(values)} values but the model takes {in_chans}-channel images: give "
            f"{counts}, or leave data.{key} null for the weights' values"
        )
    raise ValueError(
        f"the weights' {key} {values} has {len(values)} values but the model takes {in_chans}-channel images: set "
        f"data.{key} to {counts}"
    )


def resolve_preprocessing(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation preprocessing of ``model``'s weights, as data-config keys (see `preprocessing_from_cfg`).

    Each value is the override when it is not None, else the model's ``pretrained_cfg`` (registered weights, or a
    checkpoint's values that ``factory.model_from_checkpoint`` / ``create_model(pretrained=path)`` merged in), else
    timm's default (224 px, crop_pct 0.875, bicubic, ImageNet mean/std), resolved by
    ``timm.data.resolve_data_config``. mean and std get one value per channel the model takes (`model_in_chans`;
    see `_per_channel`).

    Raises:
        ValueError: an override mean/std with another number of values than 1 or the model's channels.
    """
    from timm.data import resolve_data_config

    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    in_chans = model_in_chans(model)
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key in ("mean", "std"):  # checked here: timm only asserts
        if key in overrides:
            overrides[key] = _per_channel(key, [float(v) for v in overrides[key]], in_chans, given=True)
    args = {**pretrained_cfg_from_data(overrides, in_chans), "in_chans": in_chans}
    resolved = preprocessing_from_cfg(resolve_data_config(args, pretrained_cfg=pretrained_cfg, model=model))
    for key in ("mean", "std"):
        resolved[key] = _per_channel(key, resolved[key], in_chans, given=False)
    return resolved


def describe_preprocessing(resolved: Mapping[str, Any], sources: list[tuple[str, Mapping[str, Any]]]) -> str:
    """`resolve_preprocessing`'s values with where each came from, for the log: "img_size=224 (config), ...".

    Args:
        resolved: the values.
        sources: (label, the values that source set), most binding first; a key none of them holds is timm's default.
    """

    def origin(key: str) -> str:
        return next((label for label, values in sources if key in values), "timm's default")

    return ", ".join(f"{key}={value} ({origin(key)})" for key, value in resolved.items())


def load_weights(
    model: nn.Module,
    source: str | os.PathLike,
    use_ema: bool = True,
    sha256: str = "",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """Load weights into ``model`` from a path or an http(s)/file URL, in any accepted layout; return the model.

    Args:
        model: a RedNet.
        source: local path, ``file://`` URL, or http(s) URL (downloaded into $TORCH_HOME/hub/checkpoints).
        use_ema: prefer EMA weights in training checkpoints.
        sha256: expected digest (full, or a prefix); URLs named NAME-<hash prefix>.ext are checked anyway.
        cache_dir: download directory instead of the torch.hub checkpoint cache.
        progress: show a download progress bar.
    """
    path = fetch(source, sha256=sha256, cache_dir=cache_dir, progress=progress)
    load_state_dict(model, to_state_dict(read_checkpoint(path), use_ema=use_ema, origin=str(path)))
    return model


def _resolve_pretrained_source(
    model_name: str,
    pretrained: bool | str,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
) -> tuple[Any, WeightsSpec]:
    """Where ``pretrained`` points: a state dict, or a path/URL with its sha256 and cache name."""
    spec = PRETRAINED.get(model_name, WeightsSpec())
    if isinstance(pretrained, (str, os.PathLike)):
        return str(pretrained), WeightsSpec()
    # timm's overrides first (pretrained_cfg_overlay=dict(file=...) or dict(url=...)), then the registry.
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(model_name, pretrained_cfg, pretrained_cfg_overlay)
    if cfg.state_dict:
        return cfg.state_dict, WeightsSpec()
    if cfg.file:
        return cfg.file, WeightsSpec()
    if cfg.url and cfg.url != spec.url:
        return cfg.url, WeightsSpec(url=cfg.url)
    return spec.url, spec


def load_pretrained(
    model_name: str,
    pretrained: bool | str = True,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_ema: bool = True,
    progress: bool = True,
) -> tuple[dict[str, Tensor], WeightsSettings]:
    """The converted state dict that ``create_model(model_name, pretrained=...)`` loads, and what the checkpoint
    says about its weights (``rednet.checkpoint.weights_settings``: preprocessing, model arguments, ...)."""
    source, spec = _resolve_pretrained_source(model_name, pretrained, pretrained_cfg, pretrained_cfg_overlay)
    if isinstance(source, Mapping):
        return to_state_dict(source, use_ema=use_ema), weights_settings(source)
    if source:
        path = fetch(source, spec.sha256, spec.file_name, cache_dir, progress)
    else:
        cached = _checkpoint_dir(cache_dir) / spec.cache_name(model_name)
        if not cached.is_file():
            raise RuntimeError(
                f"no download URL is registered for {model_name} (the official OneDrive links are dead). "
                f"Put the checkpoint at {cached}, pass pretrained='/path/or/url', or register one with "
                f"rednet.weights.register_weights({model_name!r}, url=..., sha256=...)"
            )
        path = fetch(cached, _expected_digest(cached.name, spec.sha256))
    checkpoint = read_checkpoint(path)
    check_arch(checkpoint, model_name, path)  # its arch entry or sidecar names another model: say so, not the keys
    return to_state_dict(checkpoint, use_ema=use_ema, origin=str(path)), weights_settings(checkpoint)
