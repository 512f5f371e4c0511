"""Pure-PyTorch involution, for any device.

``forward`` / ``grad_input`` / ``grad_weight`` are the memory-efficient "torch" backend: a loop over the K² kernel
taps that never materializes the K²-times unfolded input (peak extra memory is one padded copy of the input and one
output-sized buffer). ``involution_unfold`` is the simple reference built on ``F.unfold`` and plain autograd.
``forward_functional`` is the forward as a sum of plain pad/slice/mul/add ops, for exporters (ONNX) that cannot
take the custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["forward", "forward_functional", "grad_input", "grad_weight", "involution_unfold", "probe"]

# Runs on every device type (see OP_BACKENDS in ops/involution.py).
DEVICE_TYPES = None
DTYPES = None


def probe(device: torch.device) -> str | None:
    """Always None: plain PyTorch runs wherever torch does."""
    return None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs accumulate in float32, as the CUDA kernels do.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tap_slices(tap: int, size_out: int, stride: int, dilation: int) -> slice:
    """The padded-input rows (or columns) that kernel tap ``tap`` reads for every output row."""
    start = tap * dilation
    return slice(start, start + stride * (size_out - 1) + 1, stride)


def _taps(kernel_size: int, size_in: int, size_out: int, stride: int, padding: int, dilation: int):
    """(tap, slice) for each kernel tap that reads at least one real (non-padding) row; the others add zeros.

    Skipping them matters at RedNet's small late-stage maps, where most of a 7×7 window lies in the padding.
    """
    for tap in range(kernel_size):
        first, last = tap * dilation, tap * dilation + stride * (size_out - 1)
        if last >= padding and first < padding + size_in:
            yield tap, _tap_slices(tap, size_out, stride, dilation)


def _pad_grouped(x: Tensor, groups: int, padding: int, dtype: torch.dtype) -> Tensor:
    """Zero-padded copy of x in ``dtype``, viewed as (N, G, C/G, H + 2p, W + 2p)."""
    n, c, h, w = x.shape
    padded = x.new_zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    return padded.view(n, groups, c // groups, h + 2 * padding, w + 2 * padding)


def forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """out[n, c, i, j] = Σ_uv weight[n, g(c), u, v, i, j] · x_pad[n, c, i·s + u·d, j·s + v·d]."""
    n, c = x.shape[:2]
    groups, kernel_size, _, h_out, w_out = weight.shape[1:]
    acc = _accumulation_dtype(x.dtype)
    x_pad = _pad_grouped(x, groups, padding, acc)
    out = x.new_zeros((n, groups, c // groups, h_out, w_out), dtype=acc)
    conv = (stride, padding, dilation)
    for u, rows in _taps(kernel_size, x.shape[2], h_out, *conv):
        for v, cols in _taps(kernel_size, x.shape[3], w_out, *conv):
            out.addcmul_(x_pad[..., rows, cols], weight[:, :, u, v].unsqueeze(2).to(acc))
    return out.view(n, c, h_out, w_out).to(x.dtype)


def forward_functional(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """``forward`` without in-place ops: out = Σ_taps slice(pad(x)) · weight[:, :, u, v].

    Traced by torch.export, this becomes Pad, Slice, Mul and Add nodes only, which every ONNX runtime runs, with
    no K²-times unfolded buffer. The image size must be static (a dynamic batch is fine): it picks the taps.
    """
    n, c, height, width = x.shape
    groups, kernel_size, _, h_out, w_out = weight.shape[1:]
    acc = _accumulation_dtype(x.dtype)
    x_pad = F.pad(x.to(acc), (padding, padding, padding, padding))
    x_pad = x_pad.reshape(n, groups, c // groups, height + 2 * padding, width + 2 * padding)
    # One split of the kernels (an ONNX Split) rather than a pair of index ops per tap.
    tap_weights = weight.to(acc).reshape(n, groups, 1, kernel_size * kernel_size, h_out, w_out).unbind(3)
    conv = (stride, padding, dilation)
    out = None
    for u, rows in _taps(kernel_size, height, h_out, *conv):
        x_rows = x_pad[..., rows, :]
        for v, cols in _taps(kernel_size, width, w_out, *conv):
            term = x_rows[..., cols] * tap_weights[u * kernel_size + v]
            out = term if out is None else out + term
    if out is None:  # every tap reads only padding (a large padding on a tiny map)
        return x.new_zeros((n, c, h_out, w_out))
    return out.reshape(n, c, h_out, w_out).to(x.dtype)


def grad_input(
    grad_out: Tensor,
    weight: Tensor,
    input_size: tuple[int, int],
    channels: int,
    stride: int,
    padding: int,
    dilation: int,
    channels_last: bool = False,
) -> Tensor:
    """Gradient of ``forward`` with respect to x: scatter-add of grad_out · weight over the K² taps.

    channels_last (x's layout) is accepted for the backends' common signature; the result is NCHW either way and
    the op converts it."""
    n = grad_out.shape[0]
    groups, kernel_size, _, h_out, w_out = weight.shape[1:]
    height, width = input_size
    acc = _accumulation_dtype(grad_out.dtype)
    grad_out = grad_out.reshape(n, groups, channels // groups, h_out, w_out).to(acc)
    grad_pad = grad_out.new_zeros((n, groups, channels // groups, height + 2 * padding, width + 2 * padding))
    conv = (stride, padding, dilation)
    for u, rows in _taps(kernel_size, height, h_out, *conv):
        for v, cols in _taps(kernel_size, width, w_out, *conv):
            grad_pad[..., rows, cols].addcmul_(grad_out, weight[:, :, u, v].unsqueeze(2).to(acc))
    grad_x = grad_pad[..., padding : padding + height, padding : padding + width]
    return grad_x.reshape(n, channels, height, width).to(weight.dtype)


def grad_weight(
    grad_out: Tensor,
    x: Tensor,
    kernel_size: int,
    groups: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    """Gradient of ``forward`` with respect to weight: per tap, Σ over the group's channels of grad_out · x."""
    n, c = x.shape[:2]
    h_out, w_out = grad_out.shape[-2:]
    acc = _accumulation_dtype(x.dtype)
    x_pad = _pad_grouped(x, groups, padding, acc)
    grad_out = grad_out.reshape(n, groups, c // groups, h_out, w_out).to(acc)
    grad_w = x.new_zeros((n, groups, kernel_size, kernel_size, h_out, w_out), dtype=acc)
    conv = (stride, padding, dilation)
    for u, rows in _taps(kernel_size, x.shape[2], h_out, *conv):
        for v, cols in _taps(kernel_size, x.shape[3], w_out, *conv):
            torch.sum(grad_out * x_pad[..., rows, cols], dim=2, out=grad_w[:, :, u, v])
    return grad_w.to(x.dtype)


def involution_unfold(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """Reference involution through ``F.unfold``: simple and obviously right, but K² times the input's memory."""
    n, c = x.shape[:2]
    groups, kernel_size, _, h_out, w_out = weight.shape[1:]
    shape = (n, groups, c // groups, kernel_size, kernel_size, h_out, w_out)
    if c == 0:  # F.unfold refuses C = 0; there is nothing to gather (an empty view keeps x in the graph)
        cols = x.reshape(n, groups, 0, 1, 1, 1, 1).expand(shape)
    else:
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride).view(shape)
    return (cols * weight.unsqueeze(2)).sum(dim=(3, 4)).view(n, c, h_out, w_out)
