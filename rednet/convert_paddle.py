"""PaddleClas's RedNet ImageNet weights (``.pdparams``) without paddle: a restricted reader and the key map to ours.

PaddleClas (``ppcls/arch/backbone/model_zoo/rednet.py``) publishes the official RedNet-26...152 ImageNet weights
converted to Paddle. Its RedNet builds on ``paddle.vision.models.resnet`` (ResNet, BottleneckBlock, with the ResNet
stem's ``conv1`` / ``bn1`` set to None and a ``stem`` Sequential added) and its own Involution; it is the official
architecture, stem included (3×3 conv s2 + BN + ReLU, involution K=3, BN, ReLU, 3×3 conv + BN + ReLU, then max-pool),
so its parameter names are ours except for:

- BatchNorm statistics: ``_mean`` / ``_variance`` (ours ``running_mean`` / ``running_var``; Paddle keeps no
  ``num_batches_tracked``, which is filled with 0);
- the classifier: paddle's Linear stores ``fc.weight`` as (in, out) = (2048, 1000), ours (out, in).

The forward passes agree (same involution kernel layout and padding) except that PaddleClas's strided involution
pools with floor instead of our ceil mode, which differs only at odd feature sizes (none at 224 × 224 inputs).

A ``.pdparams`` file is what ``paddle.save(layer.state_dict(), path)`` writes (paddle/framework/io.py,
``_legacy_save``): a pickle (protocol 2, 3 or 4; current Paddle's default is 4) of a dict
``{structured name: numpy.ndarray}`` plus ``"StructuredToParameterName@@"`` (structured name -> paddle's internal
parameter name). Under protocol 2 and 3, arrays of more than (2**30 - 1) / itemsize elements are split into
``name@@.0``, ``name@@.1``, ... (flattened) and described in ``"UnpackBigParamInfor@@"``
({name: {"OriginShape": shape, "slices": [part names]}}). A pickle can run code, so this reader allows only the
globals that NumPy arrays need and refuses anything else before it is called.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PADDLECLAS_URLS",
    "PADDLECLAS_ACCURACY",
    "PaddleWeightsError",
    "read_pdparams",
    "to_paddle_key",
    "convert_state_dict",
    "load_pdparams",
]

_URL_ROOT = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph"
# PaddleClas's MODEL_URLS (ppcls/arch/backbone/model_zoo/rednet.py), by our model name.
PADDLECLAS_URLS: dict[str, str] = {
    f"rednet{depth}": f"{_URL_ROOT}/RedNet{depth}_pretrained.pdparams" for depth in (26, 38, 50, 101, 152)
}
# ImageNet-1k val top-1 / top-5 (%) of those weights as reported by PaddleClas (docs/en/models/RedNet_en.md; the
# model list docs give the same as fractions, e.g. 0.7595), evaluated with resize 256 / center crop 224; not measured
# by this project.
PADDLECLAS_ACCURACY: dict[str, tuple[float, float]] = {
    "rednet26": (75.95, 93.19),
    "rednet38": (77.47, 93.56),
    "rednet50": (78.33, 94.17),
    "rednet101": (78.94, 94.36),
    "rednet152": (79.17, 94.40),
}

NAME_TABLE_KEY = "StructuredToParameterName@@"
SPLIT_INFO_KEY = "UnpackBigParamInfor@@"
_MAX_LISTED = 40  # keys listed per kind in a mismatch error (a wrong file can differ in hundreds)
_NUMERIC_KINDS = "biuf"  # bool, int, uint, float: what weights are; object arrays would hold pickled objects


class PaddleWeightsError(ValueError):
    """A .pdparams file that is not a PaddleClas RedNet state dict (or not one this reader may open)."""


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes (``encode(str, 'latin1')``), and for nothing else."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}: a .pdparams pickle only uses 'latin1'")
    return text.encode("latin1")


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core (numpy.core stays as a deprecated alias); files name either.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # protocol 2 writes bytes as _codecs.encode(str, 'latin1')
    ("collections", "OrderedDict"): OrderedDict,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals NumPy arrays need; any other global is refused, not called."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"the pickle asks for the global {module}.{name}; a .pdparams state dict (NumPy arrays by name) "
                "needs only NumPy's array reconstruction, so nothing else is loaded (a pickle can run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"the pickle holds a persistent id {pid!r}: not a .pdparams state dict")


def _join_split_arrays(contents: dict[str, Any], path: Path) -> None:
    """Undo Paddle's protocol-2/3 splitting of big arrays (``UnpackBigParamInfor@@``), in place."""
    info = contents.pop(SPLIT_INFO_KEY, None)
    if info is None:
        return
    if not isinstance(info, Mapping):
        raise PaddleWeightsError(f"{path}: {SPLIT_INFO_KEY} is a {type(info).__name__}, expected a dict")
    for name, entry in info.items():
        try:
            parts = [contents.pop(part) for part in entry["slices"]]
            contents[name] = np.concatenate([np.ravel(part) for part in parts]).reshape(tuple(entry["OriginShape"]))
        except (KeyError, TypeError, ValueError) as error:
            raise PaddleWeightsError(f"{path}: cannot join the split array {name!r} ({error!r})") from error


def read_pdparams(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a ``paddle.save``d state dict, by structured name (e.g. ``layer1.0.bn1._mean``), paddle-free.

    Args:
        path: a ``.pdparams`` file (pickle protocol 2, 3 or 4).

    Returns:
        {name: numpy.ndarray} with the split arrays joined and the name table dropped; dtypes as stored (float32).

    Raises:
        PaddleWeightsError: the pickle needs a global other than NumPy's array reconstruction (it is refused before
            anything is called), is not a dict of numeric arrays, or is not a readable pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            # latin1, as paddle.load reads: protocol-2 files written by Python 2 hold array bytes as str.
            contents = _ArrayUnpickler(file, encoding="latin1").load()
    except _RefusedGlobal as error:
        raise PaddleWeightsError(f"refusing to read {path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise PaddleWeightsError(f"{path} is not a readable .pdparams pickle ({error!r})") from error
    if not isinstance(contents, dict):
        raise PaddleWeightsError(
            f"{path} holds a {type(contents).__name__}, not the dict paddle.save writes for a state dict"
        )
    contents = dict(contents)
    contents.pop(NAME_TABLE_KEY, None)
    _join_split_arrays(contents, path)
    arrays = {}
    for name, value in contents.items():
        # Paddle 2.1 pickled tensors outside state dicts as (name, array) tuples; accept them too.
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        if not isinstance(value, np.ndarray) or value.dtype.kind not in _NUMERIC_KINDS:
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise PaddleWeightsError(f"{path}: entry {name!r} is {kind}, expected a numeric numpy array")
        arrays[str(name)] = value
    return arrays


def to_paddle_key(key: str) -> str | None:
    """The PaddleClas name of one of our RedNet state-dict keys; None for ``num_batches_tracked`` (Paddle has none).

    Paddle's BatchNorm names its statistics ``_mean`` / ``_variance``; every other name is the same in both (the
    stem's ConvModules are Sequentials named conv / bn / activate in PaddleClas, and the involution's
    ``conv1.conv`` / ``conv1.bn`` / ``conv2.conv`` likewise).
    """
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
        return None
    leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf, leaf)
    return f"{module}.{leaf}" if module else leaf


def _is_linear_weight(key: str) -> bool:
    return key == "fc.weight"  # paddle.nn.Linear stores (in_features, out_features)


def _target_layout(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Size]:
    """Our key -> shape for the RedNet the file describes (depth from its block keys, K from the stem, classes from
    fc); built on the meta device, so nothing is allocated."""
    from rednet.models.rednet import RedNet  # deferred: rednet.models imports this module's tables

    blocks = [0, 0, 0, 0]
    for name in arrays:
        parts = name.split(".")
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit():
            stage = int(parts[0][-1]) - 1
            blocks[stage] = max(blocks[stage], int(parts[1]) + 1)
    layers = tuple(max(count, 1) for count in blocks)  # a stage with no keys at all is reported as missing
    stem_rows = arrays.get("stem.1.conv2.conv.weight", np.empty((18,))).shape[0]
    stem_kernel_size = 7 if stem_rows == 2 * 7**2 else 3  # any other size is reported as a shape mismatch
    # Classes from fc.bias (unambiguous), so that a weight stored the wrong way round shows as a shape mismatch.
    fc, bias = arrays.get("fc.weight"), arrays.get("fc.bias")
    num_classes = bias.shape[0] if bias is not None and bias.ndim == 1 else fc.shape[-1] if fc is not None else 0
    with torch.device("meta"):
        model = RedNet(layers=layers, num_classes=num_classes, stem_kernel_size=stem_kernel_size)
    return {key: value.shape for key, value in model.state_dict().items()}


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {kind}: {shown}{more}"


def convert_state_dict(arrays: Mapping[str, np.ndarray], origin: str = "the .pdparams file") -> dict[str, Tensor]:
    """Our RedNet state dict from PaddleClas RedNet arrays: keys renamed, ``fc.weight`` transposed, every key and
    shape checked.

    Args:
        arrays: {PaddleClas name: array}, as ``read_pdparams`` returns.
        origin: what the arrays came from, for error messages.

    Returns:
        {our key: CPU tensor} for RedNet-<depth> (depth, stem K and class count as the arrays say), with
        ``num_batches_tracked`` = 0 for every BatchNorm.

    Raises:
        PaddleWeightsError: listing every PaddleClas key that maps to none of ours, every key of ours the arrays
            lack, and every shape that differs.
    """
    layout = _target_layout(arrays)
    state_dict: dict[str, Tensor] = {}
    missing, mismatched, used = [], [], set()
    for key, shape in layout.items():
        source = to_paddle_key(key)
        if source is None:
            state_dict[key] = torch.zeros((), dtype=torch.long)
            continue
        if source not in arrays:
            missing.append(f"{key} (PaddleClas {source})")
            continue
        used.add(source)
        array = arrays[source]
        if _is_linear_weight(key) and array.ndim == 2:
            array = array.T
        if tuple(array.shape) != tuple(shape):
            stored = f"{tuple(arrays[source].shape)} stored as (in, out)" if _is_linear_weight(key) else ""
            mismatched.append(f"{source}: {stored or tuple(array.shape)}, expected {tuple(shape)}")
            continue
        state_dict[key] = torch.from_numpy(np.array(array, copy=True, order="C"))
    unmapped = sorted(set(arrays) - used)
    if missing or mismatched or unmapped:
        problems = [
            _listing(kind, items)
            for kind, items in (
                ("PaddleClas keys that map to no RedNet key", unmapped),
                ("RedNet keys missing", missing),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        hint = "expected the parameter names of PaddleClas's ppcls/arch/backbone/model_zoo/rednet.py"
        raise PaddleWeightsError(
            f"{origin} is not a PaddleClas RedNet state dict ({hint}):\n  " + "\n  ".join(problems)
        )
    return state_dict


def load_pdparams(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a PaddleClas RedNet ``.pdparams`` file into our RedNet state dict (see ``read_pdparams`` and
    ``convert_state_dict`` for what is checked and raised)."""
    return convert_state_dict(read_pdparams(path), origin=str(path))
