"""The involution operator: argument checks, backend dispatch, and its torch.library custom op with autograd.

Registering the op (and its two backward ops) with ``torch.library`` gives each a fake implementation, so
``torch.compile(fullgraph=True)`` traces through models that use it instead of breaking the graph.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ops import layout, torch_backend

__all__ = ["involution", "available_backends", "export_decompositions", "BACKENDS"]

BACKENDS = ("auto", "cupy", "torch", "unfold", "cpu")


@functools.cache
def _cupy_status() -> tuple[bool, str]:
    """Whether the CuPy backend can run here, and why not (checked once per process)."""
    try:
        from ops import cupy_backend
    except ImportError as error:  # the module itself is always shipped; this guards a broken install
        return False, f"ops.cupy_backend failed to import: {error}"
    return cupy_backend.is_available()


def available_backends() -> list[str]:
    """The backends that work on this machine ("cupy" only with CuPy and a CUDA device)."""
    names = ["torch", "unfold"]
    if _cpu_status()[0]:
        names.insert(0, "cpu")
    if _cupy_status()[0]:
        names.insert(0, "cupy")
    return names


def _backend_module(name: str):
    if name == "cpu":
        from ops import cpu_backend

        return cpu_backend
    if name == "cupy":
        from ops import cupy_backend

        return cupy_backend
    return torch_backend


def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"involution backend {backend!r} is unknown: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if x.is_cuda and _cupy_status()[0]:
            return "cupy"
        return "cpu" if _cpu_usable(x) else "torch"
    if backend == "cpu":
        _check_cpu_backend(x)
    if backend == "cupy":
        ok, reason = _cupy_status()
        if not ok:
            raise RuntimeError(f"involution backend 'cupy' is not available: {reason}")
        if not x.is_cuda:
            raise RuntimeError(
                f"involution backend 'cupy' needs CUDA tensors, got x on {x.device}: "
                "move the tensors to a GPU or use backend='torch'"
            )
    return backend


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """The convolution formula: (size + 2p − d·(K−1) − 1) // s + 1."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _check_arguments(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> None:
    for name, tensor in (("x", x), ("weight", weight)):
        if not tensor.is_floating_point():
            raise TypeError(f"involution needs floating-point tensors, got {name} of dtype {tensor.dtype}")
    if x.device != weight.device:
        raise ValueError(f"involution: x is on {x.device} but weight is on {weight.device}: put both on one device")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"involution: x is {x.dtype} but weight is {weight.dtype}: cast one of them (or run under torch.autocast)"
        )
    if x.dim() != 4:
        raise ValueError(f"involution: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 6:
        raise ValueError(f"involution: weight must be (N, G, K, K, Ho, Wo), got shape {tuple(weight.shape)}")
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"involution: need stride >= 1, dilation >= 1, padding >= 0; got stride={stride}, "
            f"dilation={dilation}, padding={padding}"
        )
    n, c, h, w = x.shape
    n_w, groups, k_h, k_w, h_out, w_out = weight.shape
    if k_h != k_w:
        raise ValueError(f"involution: weight kernel must be square, got K×K = {k_h}×{k_w} (dims 2 and 3)")
    if n_w != n:
        raise ValueError(f"involution: batch size differs: x has N={n}, weight has N={n_w} (dim 0)")
    if groups < 1 or c % groups != 0:
        raise ValueError(f"involution: channels C={c} of x must be divisible by groups G={groups} (weight dim 1)")
    expected = (output_size(h, k_h, stride, padding, dilation), output_size(w, k_h, stride, padding, dilation))
    if expected[0] < 1 or expected[1] < 1:
        raise ValueError(
            f"involution: input {h}×{w} is too small for K={k_h}, stride={stride}, padding={padding}, "
            f"dilation={dilation} (output would be {expected[0]}×{expected[1]})"
        )
    if (h_out, w_out) != expected:
        raise ValueError(
            f"involution: weight has output size Ho×Wo = {h_out}×{w_out} (dims 4, 5) but x of {h}×{w} with "
            f"K={k_h}, stride={stride}, padding={padding}, dilation={dilation} gives {expected[0]}×{expected[1]}"
        )


# Each op's output follows x's layout (ops/layout.py): NCHW, or channels_last with pixel-major kernels. The real and
# fake implementations apply the same rule, because torch.compile trusts the fake's strides.


@torch.library.custom_op("rednet::involution", mutates_args=())
def _involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, backend: str) -> Tensor:
    out = _backend_module(backend).forward(x, weight, stride, padding, dilation)
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
    module = _backend_module(backend)  # each backend reads grad_out in whatever layout it needs
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
    module = _backend_module(backend)
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
    _check_arguments(x, weight, stride, padding, dilation)
    backend = _resolve_backend(backend, x)
    if backend == "unfold":
        out = torch_backend.involution_unfold(x, weight, stride, padding, dilation)
        return layout.to_layout(out, layout.is_channels_last(x))
    return _involution_op(x, weight, stride, padding, dilation, backend)


# --- the native CPU backend ("cpu", ops/cpu_backend.py): its registration in the dispatch above is the "cpu" entry
# of BACKENDS, the "cpu" branch of _backend_module, and the two calls in _resolve_backend ("auto": _cpu_usable;
# "cpu": _check_cpu_backend). ---

_cpu_warned = False


def _cpu_status() -> tuple[bool, str]:
    """Whether the CPU kernels build and load here, and why not (built once per machine, probed once per process)."""
    from ops import cpu_backend

    return cpu_backend.status()


def _cpu_usable(x: Tensor) -> bool:
    """For "auto": CPU tensors of a dtype the kernels take, and kernels that built; warns once when they did not."""
    global _cpu_warned
    from ops import cpu_backend

    if x.device.type != "cpu" or x.dtype not in cpu_backend.SUPPORTED_DTYPES:
        return False
    ok, reason = _cpu_status()
    if not ok and not _cpu_warned:
        _cpu_warned = True
        warnings.warn(
            f"involution: the native CPU kernels are unavailable, backend 'auto' uses 'torch' (slower): {reason}",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


def _check_cpu_backend(x: Tensor) -> None:
    """backend="cpu" needs kernels that built, CPU tensors and a dtype they take; raises naming what is missing."""
    from ops import cpu_backend

    ok, reason = _cpu_status()
    if not ok:
        raise RuntimeError(f"involution backend 'cpu' is not available: {reason}")
    if x.device.type != "cpu":
        raise RuntimeError(
            f"involution backend 'cpu' needs CPU tensors, got x on {x.device}: use backend='auto' or 'cupy'"
        )
    cpu_backend.check_dtype(x.dtype)
