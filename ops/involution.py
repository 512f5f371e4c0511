"""The involution operator: argument checks, backend dispatch, and its torch.library custom op with autograd.

Registering the op (and its two backward ops) with ``torch.library`` gives each a fake implementation, so
``torch.compile(fullgraph=True)`` traces through models that use it instead of breaking the graph.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from ops import layout, shapes, torch_backend
from ops.shapes import output_size

__all__ = ["involution", "available_backends", "export_decompositions", "BACKENDS", "output_size"]

# The backends that implement the three ops, by name: modules with forward, grad_input and grad_weight, a
# DEVICE_TYPES tuple (the device types they run on; None: any), a DTYPES tuple (the dtypes they take; None: any) and
# probe(device) -> None when they can run there, else why not (see ops/cupy_backend.py). Imported on first use.
OP_BACKENDS = {"cupy": "ops.cupy_backend", "cpu": "ops.cpu_backend", "torch": "ops.torch_backend"}
# "auto" takes the first of these that runs on x's device and takes x's dtype ("torch" takes every one).
AUTO_ORDER = ("cupy", "cpu", "torch")
BACKENDS = ("auto", *OP_BACKENDS, "unfold")

# (backend, device) -> None or why the backend cannot run there; filled eagerly, once per process and device.
_probes: dict[tuple[str, str], str | None] = {}
# (device, dtype) -> the backend "auto" chose there; (backend, device) pairs "auto" warned about.
_auto_choices: dict[tuple[str, torch.dtype], str] = {}
_auto_warned: set[tuple[str, str]] = set()


def _backend_module(name: str) -> ModuleType:
    if name not in OP_BACKENDS:
        raise ValueError(f"involution backend {name!r} is unknown: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(OP_BACKENDS[name])


def _runs_on(module: ModuleType, device: torch.device) -> bool:
    return module.DEVICE_TYPES is None or device.type in module.DEVICE_TYPES


def _takes(name: str, dtype: torch.dtype) -> bool:
    dtypes = _backend_module(name).DTYPES
    return dtypes is None or dtype in dtypes


def _probe(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on device, else why not; probed once per process and device (a backend's
    probe may compile its kernels)."""
    key = (name, str(device))
    if key not in _probes:
        _probes[key] = _backend_module(name).probe(device)
    return _probes[key]


# torch.compile must not trace the probes (they call into CuPy and CUDA, which Dynamo cannot trace) nor the backend
# imports: Dynamo calls these functions when it traces and keeps the results as constants. Their arguments (the
# device's type and index, the dtype) are static in a traced graph.


@torch.compiler.assume_constant_result
def _unavailable_reason(name: str, device_type: str, device_index: int) -> str:
    """Why backend `name` cannot run on the device, or "" when it can."""
    return _probe(name, _device(device_type, device_index)) or ""


@torch.compiler.assume_constant_result
def _dtype_refusal(name: str, dtype: torch.dtype) -> str:
    """Why backend `name` does not take `dtype`, or "" when it does."""
    if _takes(name, dtype):
        return ""
    supported = ", ".join(str(d) for d in _backend_module(name).DTYPES)
    return f"involution backend {name!r} supports {supported}; got {dtype}: cast the tensors or use backend='torch'"


@torch.compiler.assume_constant_result
def _auto_backend(device_type: str, device_index: int, dtype: torch.dtype) -> str:
    """The backend "auto" picks: the first of AUTO_ORDER that runs on the device and takes the dtype. Warns once per
    backend and device when a faster backend meant for this device cannot run (e.g. its kernels do not compile)."""
    device = _device(device_type, device_index)
    key = (str(device), dtype)
    if key not in _auto_choices:
        for name in AUTO_ORDER:
            if not _runs_on(_backend_module(name), device) or not _takes(name, dtype):
                continue
            reason = _probe(name, device)
            if reason is None:
                _auto_choices[key] = name
                break
            if (name, str(device)) not in _auto_warned:
                _auto_warned.add((name, str(device)))
                warnings.warn(
                    f"involution backend 'auto': {name!r} cannot run on {device} ({reason}); using the next "
                    f"backend in {AUTO_ORDER} instead (slower)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        else:  # "torch" runs anywhere, so this is only reached with an AUTO_ORDER that lacks it
            raise RuntimeError(f"involution: no backend of {AUTO_ORDER} runs on {device}")
    return _auto_choices[key]


def _device(device_type: str, device_index: int) -> torch.device:
    return torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)


def available_backends() -> list[str]:
    """The backends that work on this machine ("cupy" only when its kernels compile and run on the current GPU)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda", torch.cuda.current_device()))
    names = [name for name in OP_BACKENDS if any(_probe(name, device) is None for device in devices)]
    return names + ["unfold"]


def _resolve_backend(backend: str, x: Tensor) -> str:
    """The op backend for x: "auto" picks one, a named backend is checked to run on x's device."""
    if backend not in BACKENDS:
        raise ValueError(f"involution backend {backend!r} is unknown: choose one of {', '.join(BACKENDS)}")
    index = -1 if x.device.index is None else x.device.index
    if backend == "auto":
        return _auto_backend(x.device.type, index, x.dtype)
    if backend == "unfold":
        return backend
    reason = _unavailable_reason(backend, x.device.type, index)
    if reason:
        raise RuntimeError(f"involution backend {backend!r} is not available: {reason}")
    refusal = _dtype_refusal(backend, x.dtype)
    if refusal:
        raise TypeError(refusal)
    return backend


def _op_backend(backend: str, tensor: Tensor) -> ModuleType:
    """The backend module an op runs on; "auto" and "unfold" (which has no op of its own) resolve as in involution."""
    name = _resolve_backend(backend, tensor)
    return _backend_module("torch" if name == "unfold" else name)


# Each op's output follows x's layout (ops/layout.py): NCHW, or channels_last with pixel-major kernels. The real and
# fake implementations apply the same rule, because torch.compile trusts the fake's strides.


@torch.library.custom_op("rednet::involution", mutates_args=())
def _involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, backend: str) -> Tensor:
    shapes.check_forward(x, weight, stride, padding, dilation)  # the ops are public: torch.ops.rednet.*
    out = _op_backend(backend, x).forward(x, weight, stride, padding, dilation)
    return layout.as_output(out, layout.is_channels_last(x))


@_involution_op.register_fake
def _(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, backend: str) -> Tensor:
    shape = (x.shape[0], x.shape[1], weight.shape[-2], weight.shape[-1])
    return layout.empty_image(x, shape, layout.is_channels_last(x))


@torch.library.custom_op("rednet::involution_grad_input", mutates_args=())
def _grad_input_op(
    grad_out: Tensor, weight: Tensor, height: int, width: int, channels: int, stride: int, padding: int,
    dilation: int, backend: str, channels_last: bool,
) -> Tensor:  # fmt: skip
    shapes.check_grad_input(grad_out, weight, height, width, channels, stride, padding, dilation)
    module = _op_backend(backend, grad_out)  # each backend reads grad_out in whatever layout it needs
    grad_x = module.grad_input(grad_out, weight, (height, width), channels, stride, padding, dilation, channels_last)
    return layout.as_output(grad_x, channels_last)


@_grad_input_op.register_fake
def _(grad_out, weight, height, width, channels, stride, padding, dilation, backend, channels_last) -> Tensor:
    return layout.empty_image(grad_out, (grad_out.shape[0], channels, height, width), channels_last)


@torch.library.custom_op("rednet::involution_grad_weight", mutates_args=())
def _grad_weight_op(
    grad_out: Tensor, x: Tensor, kernel_size: int, groups: int, stride: int, padding: int, dilation: int,
    backend: str,
) -> Tensor:  # fmt: skip
    shapes.check_grad_weight(grad_out, x, kernel_size, groups, stride, padding, dilation)
    module = _op_backend(backend, x)
    grad_w = module.grad_weight(grad_out, x, kernel_size, groups, stride, padding, dilation)
    return layout.as_output(grad_w, layout.is_channels_last(x))


@_grad_weight_op.register_fake
def _(grad_out, x, kernel_size, groups, stride, padding, dilation, backend) -> Tensor:
    n, _, h_out, w_out = grad_out.shape
    shape = (n, groups, kernel_size, kernel_size, h_out, w_out)
    return layout.empty_weight(grad_out, shape, layout.is_channels_last(x))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, ctx.stride, ctx.padding, ctx.dilation, ctx.backend = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    conv = (ctx.stride, ctx.padding, ctx.dilation, ctx.backend)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        height, width, channels = x.shape[2], x.shape[3], x.shape[1]
        grad_x = _grad_input_op(grad_out, weight, height, width, channels, *conv, layout.is_channels_last(x))
    if ctx.needs_input_grad[1]:
        grad_w = _grad_weight_op(grad_out, x, weight.shape[2], weight.shape[1], *conv)
    return grad_x, grad_w, None, None, None, None


_involution_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, grad: Tensor):
    raise NotImplementedError(
        "involution: double backward (a gradient of the gradient, e.g. a gradient penalty under create_graph=True) "
        "is not implemented by the 'auto', 'cupy', 'cpu' and 'torch' backends; use backend='unfold' (plain autograd)"
    )


# The backward ops are differentiable in principle, but nothing here implements it: say so when it is asked for,
# rather than torch's "no autograd formula was registered" for an op the user never called.
for _op in (_grad_input_op, _grad_weight_op):
    _op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _involution_decomposed(
    x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, backend: str
) -> Tensor:  # fmt: skip
    return torch_backend.forward_functional(x, weight, stride, padding, dilation)


def export_decompositions() -> dict[torch._ops.OpOverload, Callable[..., Tensor]]:
    """Decompositions of the op into plain aten ops, for ``ExportedProgram.run_decompositions``.

    ONNX and other exporters do not know the ``rednet::involution`` custom op; decomposed, it reaches them as
    pad/slice/mul/add (``torch_backend.forward_functional``). Inference graphs only: the op's backward is not
    decomposed.
    """
    return {torch.ops.rednet.involution.default: _involution_decomposed}


def _autocast_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.autocast, run in the autocast dtype, as convolutions do (float64 stays float64, as for conv)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or not (x.is_floating_point() and weight.is_floating_point()):
        return x, weight
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return x, weight
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype)


def involution(
    x: Tensor,
    weight: Tensor,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Involution of x with per-pixel kernels (Li et al., CVPR 2021).

    out[n, c, i, j] = Σ_{u,v<K} weight[n, c // (C/G), u, v, i, j] · x[n, c, i·s + u·d − p, j·s + v·d − p]

    Args:
        x: input (N, C, H, W), floating point.
        weight: generated kernels (N, G, K, K, Ho, Wo); C must be divisible by G, and Ho, Wo follow the
            convolution formula.
        stride: s. padding: p, default d·(K−1)//2 ("same" at stride 1). dilation: d.
        backend: "auto" (CuPy kernels for CUDA tensors when CuPy works, else "torch"), "cupy", "torch"
            (pure PyTorch, memory-efficient) or "unfold" (reference).

    Returns:
        (N, C, Ho, Wo), in x's dtype and memory format.
    """
    x, weight = _autocast_inputs(x, weight)
    kernel_size = weight.shape[2] if weight.dim() == 6 else 0
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    shapes.check_forward(x, weight, stride, padding, dilation)
    backend = _resolve_backend(backend, x)
    if backend == "unfold":
        out = torch_backend.involution_unfold(x, weight, stride, padding, dilation)
        return layout.to_layout(out, layout.is_channels_last(x))
    return _involution_op(x, weight, stride, padding, dilation, backend)
