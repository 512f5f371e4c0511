"""Memory layouts of the involution tensors.

Two layouts, chosen by x: NCHW (x, out (N, C, ·, ·) contiguous; weight (N, G, K, K, Ho, Wo) contiguous), or
channels_last, where x and out are stored NHWC and weight is "pixel-major": stored as (N, Ho, Wo, G, K, K), the
way a channels_last convolution's (N, G·K·K, Ho, Wo) output lies in memory once viewed as (N, G, K, K, Ho, Wo).
The op's outputs follow x's layout, as convolutions' outputs do, so a channels_last model never converts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "is_channels_last",
    "is_pixel_major",
    "to_layout",
    "weight_to_layout",
    "empty_image",
    "empty_weight",
    "as_output",
]

# (N, G, K, K, Ho, Wo) -> (N, Ho, Wo, G, K, K), and back.
_TO_PIXEL_MAJOR = (0, 4, 5, 1, 2, 3)
_FROM_PIXEL_MAJOR = (0, 3, 4, 5, 1, 2)


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is stored channels_last and is not also plain contiguous (as when C == 1 or H == W == 1,
    where both layouts describe the same memory and NCHW is taken)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def is_pixel_major(weight: Tensor) -> bool:
    """Whether weight (N, G, K, K, Ho, Wo) is stored as a contiguous (N, Ho, Wo, G, K, K)."""
    return weight.permute(_TO_PIXEL_MAJOR).is_contiguous()


def to_layout(t: Tensor, channels_last: bool) -> Tensor:
    """A 4-D tensor in NCHW or channels_last memory (no copy when it already is)."""
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def weight_to_layout(weight: Tensor, channels_last: bool) -> Tensor:
    """weight (N, G, K, K, Ho, Wo), contiguous, or pixel-major for channels_last (no copy when it already is)."""
    if not channels_last:
        return weight.contiguous()
    return weight.permute(_TO_PIXEL_MAJOR).contiguous().permute(_FROM_PIXEL_MAJOR)


def empty_image(like: Tensor, shape: tuple[int, ...], channels_last: bool) -> Tensor:
    """An uninitialized (N, C, H, W) tensor with like's dtype and device, in NCHW or channels_last memory."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def empty_weight(like: Tensor, shape: tuple[int, ...], channels_last: bool) -> Tensor:
    """An uninitialized (N, G, K, K, Ho, Wo) tensor with like's dtype and device, pixel-major for channels_last."""
    if not channels_last:
        return like.new_empty(shape)
    return like.new_empty([shape[i] for i in _TO_PIXEL_MAJOR]).permute(_FROM_PIXEL_MAJOR)


def as_output(t: Tensor, channels_last: bool) -> Tensor:
    """t with exactly the strides empty_image / empty_weight give (copied only if they differ), as the op's fake
    implementations promise them to torch.compile; to_layout alone may keep other strides on size-1 dims."""
    empty = empty_image if t.dim() == 4 else empty_weight
    out = empty(t, tuple(t.shape), channels_last)
    return t if out.stride() == t.stride() else out.copy_(t)
