"""The Involution module: kernel generator + operator, odd sizes, and the memory_efficient recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import layout
from rednet import Involution


def reference_involution(x: torch.Tensor, kernels: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
    """out[n, c, i, j] = Σ_uv W[n, c // (C/G), u, v, i, j] · x_pad[n, c, i·s + u·d, j·s + v·d], via F.unfold."""
    n, c, h, w = x.shape
    groups, k, _, h_out, w_out = kernels.shape[1:]
    padding = dilation * (k - 1) // 2
    patches = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).view(n, c, k, k, h_out, w_out)
    per_channel = kernels.repeat_interleave(c // groups, dim=1)  # channel c uses group c // (C / G)
    return (patches * per_channel).sum(dim=(2, 3))


def module(channels: int = 32, **kwargs) -> Involution:
    torch.manual_seed(0)
    layer = Involution(channels, **kwargs)
    with torch.no_grad():
        layer.conv1.bn.weight.uniform_(0.5, 1.5)
        layer.conv1.bn.bias.normal_(0, 0.1)
        layer.conv2.conv.bias.normal_(0, 0.1)
    return layer


def run(layer: Involution, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(
    "kernel_size, stride, dilation, size",
    [(7, 1, 1, (9, 9)), (7, 2, 1, (15, 13)), (3, 2, 2, (11, 12)), (3, 1, 1, (5, 7))],
)
def test_matches_reference_at_odd_sizes(kernel_size, stride, dilation, size):
    layer = module(kernel_size=kernel_size, stride=stride, dilation=dilation).train()
    x = torch.randn(2, 32, *size)
    out = layer(x)
    kernels = layer.generate_kernels(x)
    expected_size = tuple((s - 1) // stride + 1 for s in size)  # ceil(H / s): the pooled map and the op agree
    assert kernels.shape == (2, 2, kernel_size, kernel_size, *expected_size)
    assert out.shape == (2, 32, *expected_size)
    torch.testing.assert_close(out, reference_involution(x, kernels, stride, dilation), rtol=1e-4, atol=1e-5)


def test_parameter_names_follow_mmcv():
    names = [name for name, _ in module().named_parameters()]
    assert names == ["conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv2.conv.weight", "conv2.conv.bias"]
    with pytest.raises(ValueError, match="multiple of group_channels=16"):
        Involution(24)


@pytest.mark.parametrize("stride", [1, 2])
def test_memory_efficient_same_output_gradients_and_bn_statistics(stride):
    x = torch.randn(2, 32, 11, 11)
    plain, efficient = module(stride=stride), module(stride=stride, memory_efficient=True)
    out, grads = run(plain, x)
    out_me, grads_me = run(efficient, x)
    torch.testing.assert_close(out_me, out)
    torch.testing.assert_close(grads_me, grads)
    # conv1's BN runs once per step: recomputing it in backward would update its running statistics twice.
    assert efficient.conv1.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(efficient.conv1.bn.running_mean, plain.conv1.bn.running_mean)


def saved_bytes(layer: Involution, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after a forward."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x.requires_grad_(True))
    return sum(storages.values())


def test_memory_efficient_does_not_store_the_generated_kernels():
    x = torch.randn(2, 64, 16, 16)
    kernel_bytes = 2 * 4 * 7 * 7 * 16 * 16 * 4  # (N, G, K, K, H, W) float32
    output_bytes = x.numel() * 4  # kept instead, so that backward does not rerun the operator (in a RedNet block,
    # the next BN keeps this same tensor anyway)
    stored, stored_me = saved_bytes(module(64), x), saved_bytes(module(64, memory_efficient=True), x)
    assert stored - stored_me >= kernel_bytes - output_bytes
    with torch.no_grad():  # no autograd, nothing to recompute: the plain path
        torch.testing.assert_close(module(64, memory_efficient=True)(x), module(64)(x))


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_channels_last_matches_and_never_converts(memory_efficient):
    """A channels_last layer generates pixel-major kernels (what the NHWC CUDA kernels read, no copy), returns
    channels_last, and trains exactly like the NCHW one."""
    x = torch.randn(2, 32, 10, 10)
    out, grads = run(module(stride=2, memory_efficient=memory_efficient), x)
    layer_cl = module(stride=2, memory_efficient=memory_efficient).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert layout.is_pixel_major(layer_cl.generate_kernels(x_cl))
    out_cl, grads_cl = run(layer_cl, x_cl)
    assert layout.is_channels_last(out_cl) and layout.is_channels_last(grads_cl[0])
    torch.testing.assert_close(out_cl, out)
    for got, expected in zip(grads_cl, grads):  # channels_last convs sum in another order
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_memory_efficient_traces_whole_under_torch_compile():
    # aot_eager: dynamo and AOTAutograd trace the selective checkpoint and the custom op without a graph break,
    # and without paying for inductor's C++ compile (test_models compiles a whole RedNet with inductor).
    x = torch.randn(2, 32, 9, 9)
    layer = module(stride=2, memory_efficient=True)
    out, grads = run(layer, x)
    out_compiled, grads_compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(out_compiled, out)
    torch.testing.assert_close(grads_compiled, grads)
