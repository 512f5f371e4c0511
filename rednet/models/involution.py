"""The involution layer of RedNet: a per-pixel kernel generator followed by the involution operator.

Parameter names follow the official mmcv modules (``conv1.conv``, ``conv1.bn``, ``conv2.conv``), so official
checkpoints load by a prefix rename only. The layer works under torch.fx (the operator stays one graph node) and
torch.jit.script (it calls the registered ``torch.ops.rednet.involution`` op directly).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.fx
import torch.nn as nn
from timm.layers import register_notrace_module
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import ops

__all__ = ["ConvModule", "Involution"]


def _keep_involution_output(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # The operator's output is kept (the following BN keeps that same tensor anyway), so backward recomputes only
    # the cheap 1×1 conv that generates the kernels, not the aggregation itself.
    if func is torch.ops.rednet.involution.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_KERNELS_ONLY = functools.partial(create_selective_checkpoint_contexts, _keep_involution_output)
# Let saved-tensor hooks (e.g. torch.autograd.graph.save_on_cpu) see the kept output too, where torch can.
_CHECKPOINT_OPTIONS = {"use_reentrant": False, "context_fn": _RECOMPUTE_KERNELS_ONLY}
if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
    _CHECKPOINT_OPTIONS["respect_saved_tensors_hooks"] = True


def _involution(x: Tensor, kernels: Tensor, stride: int, dilation: int, backend: str) -> Tensor:
    return ops.involution(x, kernels, stride=stride, dilation=dilation, backend=backend)


# torch.fx records the operator as one call: its argument checks and backend dispatch are Python that a trace
# cannot run on proxies.
torch.fx.wrap("_involution")


def _involution_scripted(x: Tensor, kernels: Tensor, stride: int, dilation: int, backend: str) -> Tensor:
    """The involution for TorchScript: what ops.involution does around its custom op (autocast cast, default
    padding), then ``torch.ops.rednet.involution``. ``backend`` is "cupy" or "torch", already resolved; the shapes
    are right by construction, so ops.involution's argument checks are not repeated."""
    # ops.involution casts both inputs to the autocast dtype. Here the kernels, a conv output, already have it, and
    # without autocast x has their dtype (conv1 refuses any other), so x goes to the kernels' dtype. TorchScript
    # cannot ask for the autocast state: torch.is_autocast_cpu_enabled() crashes when scripted under autocast.
    x = x.to(kernels.dtype)
    padding = dilation * (kernels.shape[2] - 1) // 2
    return torch.ops.rednet.involution(x, kernels, stride, padding, dilation, backend)


class ConvModule(nn.Module):
    """Conv → optional BatchNorm → optional ReLU, named like mmcv's ConvModule (``conv``, ``bn``, ``activate``).

    As in mmcv, the convolution has a bias only when there is no norm layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not norm
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


@register_notrace_module  # one node in timm's fx feature extractors, which then keep memory_efficient at run time
class Involution(nn.Module):
    """Involution (Li et al., CVPR 2021): K×K kernels generated per pixel, shared by the channels of a group.

    Kernel generator: avg-pool s×s (``ceil_mode=True``, so odd sizes work) when s > 1 → ``conv1`` (1×1, C → C/r,
    BN, ReLU) → ``conv2`` (1×1, C/r → K²·G, bias); the kernels then go to ``ops.involution``.

    Args:
        channels: input and output channels C.
        kernel_size: K.
        stride: s, applied by the operator (and by the generator's pooling).
        reduction_ratio: r, the generator's bottleneck reduction.
        group_channels: channels per group (C/G); G = C // group_channels.
        dilation: d of the operator.
        memory_efficient: recompute the generated kernels in backward instead of storing the K²·G-channel kernel
            tensor, about 3× the input's size at K=7 (selective activation checkpointing: only ``conv2`` runs again,
            the operator's output is kept). Costs one extra 1×1 conv per step.
        backend: operator backend ("auto", "cupy", "torch", "unfold"; see ``ops.involution``).

    Under torch.jit.script and a plain torch.fx trace the layer stores the kernels even when memory_efficient
    (neither can run torch.utils.checkpoint; timm's grad_checkpointing is skipped the same way); the output is the
    same. A scripted layer passes its backend to the registered op, which resolves "auto" when it runs, as in eager
    mode; "unfold" runs as "torch" (the same values; the reference is not scripted).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        reduction_ratio: int = 4,
        group_channels: int = 16,
        dilation: int = 1,
        memory_efficient: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"Involution: channels={channels} must be a multiple of group_channels={group_channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = channels // group_channels
        self.memory_efficient = memory_efficient
        self.backend = backend
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv1 = ConvModule(channels, channels // reduction_ratio)
        self.conv2 = ConvModule(channels // reduction_ratio, kernel_size**2 * self.groups, norm=False, act=False)

    def generate_kernels(self, x: Tensor) -> Tensor:
        """The per-pixel kernels (N, G, K, K, Ho, Wo) for input x."""
        return self._kernels_from_features(self.conv1(self.avgpool(x)))

    def _kernels_from_features(self, reduced: Tensor) -> Tensor:
        # Channel index g·K² + u·K + v, as the official code lays the kernels out; a view even in channels_last.
        return self.conv2(reduced).unflatten(1, (self.groups, self.kernel_size, self.kernel_size))

    def _aggregate(self, x: Tensor, reduced: Tensor) -> Tensor:
        kernels = self._kernels_from_features(reduced)
        if torch.jit.is_scripting():
            return _involution_scripted(x, kernels, self.stride, self.dilation, self._scripted_backend())
        return _involution(x, kernels, self.stride, self.dilation, self.backend)

    def forward(self, x: Tensor) -> Tensor:
        # conv1 (with its BN) runs outside the checkpoint: recomputing it would update BN running stats twice.
        reduced = self.conv1(self.avgpool(x))
        if torch.jit.is_scripting():
            return self._aggregate(x, reduced)
        if self.memory_efficient and torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy):
            return self._checkpointed_aggregate(x, reduced)
        return self._aggregate(x, reduced)

    @torch.jit.unused  # torch.utils.checkpoint is Python that TorchScript cannot compile
    def _checkpointed_aggregate(self, x: Tensor, reduced: Tensor) -> Tensor:
        return checkpoint(self._aggregate, x, reduced, **_CHECKPOINT_OPTIONS)

    def _scripted_backend(self) -> str:
        # The custom op resolves "auto" (and checks a named backend) when it runs, as in eager mode, on the machine
        # that runs the scripted model; "unfold" has no op of its own and runs as "torch" (the same values).
        return "torch" if self.backend == "unfold" else self.backend

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}, "
            f"dilation={self.dilation}, memory_efficient={self.memory_efficient}, backend={self.backend!r}"
        )
