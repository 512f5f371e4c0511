"""Output sizes and the argument checks of the involution ops, shared by the dispatch and every backend.

Each check is cheap (shapes, dtypes, devices: no data is read) and runs before any backend, so a call with
inconsistent shapes raises here instead of reading or writing out of bounds in a CUDA kernel.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["output_size", "check_forward", "check_grad_input", "check_grad_weight"]


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """The convolution formula: (size + 2p − d·(K−1) − 1) // s + 1."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _check_tensors(op: str, first: tuple[str, Tensor], second: tuple[str, Tensor]) -> None:
    """Floating point, one device, one dtype."""
    for name, tensor in (first, second):
        if not tensor.is_floating_point():
            raise TypeError(f"{op} needs floating-point tensors, got {name} of dtype {tensor.dtype}")
    (name_a, a), (name_b, b) = first, second
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} is on {a.device} but {name_b} is on {b.device}: put both on one device")
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}: {name_a} is {a.dtype} but {name_b} is {b.dtype}: cast one of them (or run under torch.autocast)"
        )


def _check_dims(op: str, name: str, tensor: Tensor, layout: str) -> None:
    expected = layout.count(",") + 1
    if tensor.dim() != expected:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(tensor.shape)}")


def _check_convolution(op: str, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"{op}: need K >= 1, stride >= 1, dilation >= 1, padding >= 0; got K={kernel_size}, stride={stride}, "
            f"dilation={dilation}, padding={padding}"
        )


def _check_groups(op: str, channels: int, source: str, groups: int, groups_source: str) -> None:
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"{op}: channels C={channels} of {source} must be divisible by groups G={groups} ({groups_source})"
        )


def _check_output_size(
    op: str, name: str, got: tuple[int, int], size: tuple[int, int], conv: tuple[int, int, int, int]
) -> None:
    """got (Ho, Wo) must be what an input of `size` (H, W) gives with conv = (K, stride, padding, dilation)."""
    k, stride, padding, dilation = conv
    expected = tuple(output_size(s, k, stride, padding, dilation) for s in size)
    if expected[0] < 1 or expected[1] < 1:
        raise ValueError(
            f"{op}: input {size[0]}×{size[1]} is too small for K={k}, stride={stride}, padding={padding}, "
            f"dilation={dilation} (output would be {expected[0]}×{expected[1]})"
        )
    if tuple(got) != expected:
        raise ValueError(
            f"{op}: {name} has output size Ho×Wo = {got[0]}×{got[1]} but an input of {size[0]}×{size[1]} with "
            f"K={k}, stride={stride}, padding={padding}, dilation={dilation} gives {expected[0]}×{expected[1]}"
        )


def check_forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> None:
    """x (N, C, H, W) and weight (N, G, K, K, Ho, Wo) of rednet::involution.

    Raises:
        TypeError: a tensor is not floating point, or the dtypes differ.
        ValueError: devices differ, or a size disagrees with the others or the convolution formula.
    """
    op = "involution"
    _check_tensors(op, ("x", x), ("weight", weight))
    _check_dims(op, "x", x, "(N, C, H, W)")
    _check_dims(op, "weight", weight, "(N, G, K, K, Ho, Wo)")
    n, c, h, w = x.shape
    n_w, groups, k_h, k_w, h_out, w_out = weight.shape
    if k_h != k_w:
        raise ValueError(f"{op}: weight kernel must be square, got K×K = {k_h}×{k_w} (dims 2 and 3)")
    _check_convolution(op, k_h, stride, padding, dilation)
    if n_w != n:
        raise ValueError(f"{op}: batch size differs: x has N={n}, weight has N={n_w} (dim 0)")
    _check_groups(op, c, "x", groups, "weight dim 1")
    _check_output_size(op, "weight (dims 4, 5)", (h_out, w_out), (h, w), (k_h, stride, padding, dilation))


def check_grad_input(
    grad_out: Tensor, weight: Tensor, height: int, width: int, channels: int, stride: int, padding: int, dilation: int
) -> None:
    """grad_out (N, C, Ho, Wo) and weight (N, G, K, K, Ho, Wo) of rednet::involution_grad_input, for an input of
    (N, channels, height, width). Raises as check_forward."""
    op = "involution_grad_input"
    _check_tensors(op, ("grad_out", grad_out), ("weight", weight))
    _check_dims(op, "grad_out", grad_out, "(N, C, Ho, Wo)")
    _check_dims(op, "weight", weight, "(N, G, K, K, Ho, Wo)")
    n, c, h_out, w_out = grad_out.shape
    n_w, groups, k_h, k_w = weight.shape[:4]
    if k_h != k_w:
        raise ValueError(f"{op}: weight kernel must be square, got K×K = {k_h}×{k_w} (dims 2 and 3)")
    _check_convolution(op, k_h, stride, padding, dilation)
    if n_w != n:
        raise ValueError(f"{op}: batch size differs: grad_out has N={n}, weight has N={n_w} (dim 0)")
    if c != channels:
        raise ValueError(f"{op}: grad_out has C={c} channels (dim 1) but the input has channels={channels}")
    _check_groups(op, channels, "the input", groups, "weight dim 1")
    if tuple(weight.shape[4:]) != (h_out, w_out):
        raise ValueError(
            f"{op}: weight has Ho×Wo = {weight.shape[4]}×{weight.shape[5]} (dims 4, 5) but grad_out has "
            f"{h_out}×{w_out} (dims 2, 3)"
        )
    _check_output_size(op, "grad_out (dims 2, 3)", (h_out, w_out), (height, width), (k_h, stride, padding, dilation))


def check_grad_weight(
    grad_out: Tensor, x: Tensor, kernel_size: int, groups: int, stride: int, padding: int, dilation: int
) -> None:
    """grad_out (N, C, Ho, Wo) and x (N, C, H, W) of rednet::involution_grad_weight. Raises as check_forward."""
    op = "involution_grad_weight"
    _check_tensors(op, ("grad_out", grad_out), ("x", x))
    _check_dims(op, "grad_out", grad_out, "(N, C, Ho, Wo)")
    _check_dims(op, "x", x, "(N, C, H, W)")
    _check_convolution(op, kernel_size, stride, padding, dilation)
    n, c, h, w = x.shape
    if tuple(grad_out.shape[:2]) != (n, c):
        raise ValueError(
            f"{op}: grad_out has N, C = {grad_out.shape[0]}, {grad_out.shape[1]} but x has {n}, {c} (dims 0, 1)"
        )
    _check_groups(op, c, "x", groups, "the groups argument")
    conv = (kernel_size, stride, padding, dilation)
    _check_output_size(op, "grad_out (dims 2, 3)", tuple(grad_out.shape[2:]), (h, w), conv)
