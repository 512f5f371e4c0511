"""The "cupy" backend on a GPU: agreement with "unfold" for every kernel, dtype, layout and index width, gradcheck,
autocast, memory formats, misaligned views, edge shapes, streams, CUDA graphs, determinism, 64-bit indexing and
torch.compile. Skipped without CUDA; scripts/gpu_check.sh runs these on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ops
from ops import cupy_backend, layout
from ops.involution import output_size

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (N, C, G, H, W, K, stride, dilation): odd sizes, stride 1 and 2, dilation 1 and 2, K = 3, 5, 7, several G,
# runs of channels per thread that are partial (6/2), full (32/2) and more than one (36/2); two RedNet-50 layers.
CASES = [
    (2, 6, 2, 9, 11, 3, 1, 1),
    (1, 8, 1, 7, 9, 5, 2, 1),
    (2, 4, 4, 10, 13, 7, 1, 2),
    (2, 32, 2, 11, 9, 7, 2, 1),
    (1, 36, 2, 8, 7, 3, 2, 2),
    (2, 64, 4, 56, 56, 7, 1, 1),
    (2, 128, 8, 29, 27, 7, 2, 1),
]
# Tolerances against a float64 reference computed from the same (rounded) inputs. The absolute parts also cover
# CuPy's -ftz=true (float32 subnormals, below 1.2e-38, flushed to zero).
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 5e-3, "atol": 1e-2},
    torch.bfloat16: {"rtol": 2e-2, "atol": 5e-2},
}


@pytest.fixture(scope="module", autouse=True)
def cupy_works() -> None:
    available, reason = cupy_backend.is_available()
    assert available, f"a CUDA device is here but the cupy backend is not available: {reason}"


def _case_id(case: tuple) -> str:
    n, c, g, h, w, k, s, d = case
    return f"N{n}C{c}G{g}-{h}x{w}-K{k}s{s}d{d}"


def _inputs(case: tuple, dtype: torch.dtype, seed: int = 0):
    n, c, g, h, w, k, s, d = case
    p = d * (k - 1) // 2
    h_out, w_out = (output_size(size, k, s, p, d) for size in (h, w))
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, h, w, device="cuda", generator=generator).to(dtype)
    weight = torch.randn(n, g, k, k, h_out, w_out, device="cuda", generator=generator).to(dtype)
    grad_out = torch.randn(n, c, h_out, w_out, device="cuda", generator=generator).to(dtype)
    return x, weight, grad_out, s, d


def _forward_backward(x, weight, grad_out, stride, dilation, backend):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = ops.involution(x, weight, stride=stride, dilation=dilation, backend=backend)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    return out, grad_x, grad_w


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cupy_matches_unfold(case, dtype, channels_last) -> None:
    """NCHW, and channels_last as a channels_last model hands it over (NHWC images, pixel-major kernels): the NHWC
    kernels, with outputs and gradients in the same layouts."""
    x, weight, grad_out, stride, dilation = _inputs(case, dtype)
    expected = _forward_backward(x.double(), weight.double(), grad_out.double(), stride, dilation, "unfold")
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    results = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    assert layout.is_channels_last(results[0]) == layout.is_channels_last(results[1]) == channels_last
    assert layout.is_pixel_major(results[2]) == channels_last
    for name, result, reference in zip(("out", "grad_x", "grad_weight"), results, expected):
        assert result.dtype == dtype, name
        torch.testing.assert_close(result.double(), reference, **TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", [(1, 4, 2, 6, 7, 3, 1, 1), (2, 6, 3, 7, 6, 3, 2, 2), (1, 2, 1, 8, 5, 5, 2, 1)])
def test_gradcheck_float64(case) -> None:
    x, weight, _, stride, dilation = _inputs(case, torch.float64)
    x.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: ops.involution(a, b, stride=stride, dilation=dilation, backend="cupy"), (x, weight)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(dtype) -> None:
    """Under autocast a conv makes the kernels in low precision while x stays float32: the op runs in dtype."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 15, 15, device="cuda", requires_grad=True)
    make_weight = nn.Conv2d(32, 2 * 9, 1).cuda()
    with torch.autocast("cuda", dtype=dtype):
        weight = make_weight(x).view(2, 2, 3, 3, 15, 15)
        out = ops.involution(x, weight, backend="cupy")
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    assert make_weight.weight.grad is not None and make_weight.weight.grad.isfinite().all()
    reference = ops.involution(x.detach().double(), weight.detach().double(), backend="unfold")
    torch.testing.assert_close(out.double(), reference, **TOLERANCES[dtype])


@pytest.mark.parametrize("nhwc_kernels", [True, False], ids=["nhwc_kernels", "nchw_copies"])
def test_channels_last_and_non_contiguous_inputs(monkeypatch, nhwc_kernels) -> None:
    """Mixed layouts (channels_last x with NCHW-strided kernels and gradients, and the reverse) are converted to x's
    layout; with USE_NHWC_KERNELS off, channels_last goes through NCHW copies. All agree with plain NCHW."""
    monkeypatch.setattr(cupy_backend, "USE_NHWC_KERNELS", nhwc_kernels)
    x, weight, grad_out, stride, dilation = _inputs((2, 32, 2, 14, 13, 7, 2, 1), torch.float32)
    expected = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight_strided = weight.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    grad_strided = grad_out.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not weight_strided.is_contiguous() and not grad_strided.is_contiguous()
    weight_pixel_major = layout.weight_to_layout(weight, channels_last=True)
    for inputs in (
        (x_cl, weight_strided, grad_strided),
        (x, weight_pixel_major, grad_out.contiguous(memory_format=torch.channels_last)),
    ):
        results = _forward_backward(*inputs, stride, dilation, "cupy")
        assert layout.is_channels_last(results[0]) == layout.is_channels_last(inputs[0])
        for result, reference in zip(results, expected):
            torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)


def test_runs_on_the_current_stream() -> None:
    """The kernel must wait for work queued before it on torch's current stream, here a slow copy into x."""
    x, weight, _, stride, dilation = _inputs((2, 16, 2, 33, 31, 7, 1, 1), torch.float32)
    expected = ops.involution(x, weight, stride=stride, dilation=dilation, backend="cupy")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        delayed = torch.zeros_like(x)
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for tens of milliseconds
        delayed.copy_(x)
        out = ops.involution(delayed, weight, stride=stride, dilation=dilation, backend="cupy")
    side.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_64bit_indexing() -> None:
    """Tensors of more than 2**31 elements take the 64-bit kernels; their last rows must match the torch backend."""
    n, c, g, size, k = 1, 16, 1, 11600, 3
    geometry = cupy_backend.Geometry(n, c, size, size, g, k, size, size, 1, 1, 1)
    for kind in cupy_backend.KERNEL_KINDS:
        for memory in cupy_backend.LAYOUTS:
            assert cupy_backend.plan_launch(kind, geometry, memory=memory).kernel.endswith("_i64"), (kind, memory)
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip(f"needs 32 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x, grad_out = (torch.randn(n, c, size, size, device="cuda", generator=generator).bfloat16() for _ in range(2))
    weight = torch.randn(n, g, k, k, size, size, device="cuda", generator=generator).bfloat16()
    results = _forward_backward(x, weight, grad_out, 1, 1, "cupy")
    # Recompute the last rows from a crop; the crop's first row sees padding that the full image does not have.
    rows = slice(size - 8, size)
    expected = _forward_backward(x[..., rows, :], weight[..., rows, :], grad_out[..., rows, :], 1, 1, "torch")
    for name, result, reference in zip(("out", "grad_x", "grad_weight"), results, expected):
        torch.testing.assert_close(
            result[..., rows, :][..., 1:, :].float(),
            reference[..., 1:, :].float(),
            **TOLERANCES[torch.bfloat16],
            msg=lambda m, n=name: f"{n}: {m}",
        )


class _TinyInvolutionNet(nn.Module):
    """A conv that generates kernels, the involution, and a head: enough to exercise torch.compile."""

    def __init__(self, channels: int = 16, groups: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.groups, self.kernel_size = groups, kernel_size
        self.make_kernels = nn.Conv2d(channels, groups * kernel_size**2, 1)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        weight = self.make_kernels(x).view(n, self.groups, self.kernel_size, self.kernel_size, h, w)
        return self.head(ops.involution(x, weight, backend="cupy")).mean(dim=(2, 3))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_compile_fullgraph(channels_last) -> None:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = _TinyInvolutionNet().cuda().to(memory_format=memory_format)
    x = torch.randn(2, 16, 11, 11, device="cuda").contiguous(memory_format=memory_format)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    # Loose enough for cuDNN choosing other (TF32) convolution algorithms in the compiled graph.
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-4)
    for grad, expected in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4)


# --- what gpu_check.sh's report lists: index widths, alignment, edge shapes, streams, graphs, determinism ---


@pytest.fixture
def force_64bit_indexing(monkeypatch):
    """Every launch takes the 64-bit kernels (their own module and split of the work), whatever the sizes."""
    plan = cupy_backend.plan_launch

    def plan_64bit(*args, **kwargs):
        return plan(*args, **{**kwargs, "index_bits": 64})

    monkeypatch.setattr(cupy_backend, "plan_launch", plan_64bit)


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_every_kernel_and_index_width(request, dtype, channels_last, index_bits) -> None:
    """Forward, grad_input and grad_weight (every entry point through its layout and index width) against unfold,
    on a case with partial channel runs and odd sizes at stride 2."""
    if index_bits == 64:
        request.getfixturevalue("force_64bit_indexing")
    test_cupy_matches_unfold((1, 36, 2, 11, 9, 5, 2, 1), dtype, channels_last)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t one element past an aligned address (same strides), so vector loads cannot be used."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape) if t.is_contiguous() else None
    if view is None:  # channels_last images, pixel-major weights: keep their strides
        view = torch.as_strided(buffer, t.shape, t.stride(), storage_offset=1)
    view.copy_(t)
    return view


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views(dtype, channels_last) -> None:
    x, weight, grad_out, stride, dilation = _inputs((2, 32, 2, 13, 12, 7, 1, 1), dtype)
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    expected = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    views = [_misaligned(t) for t in (x, weight, grad_out)]
    assert all(v.data_ptr() % 16 == dtype.itemsize for v in views)  # torch's allocations are 512-byte aligned
    results = _forward_backward(*views, stride, dilation, "cupy")
    for result, reference in zip(results, expected):
        torch.testing.assert_close(result, reference, rtol=0, atol=0)


# (N, C, G, H, W, K, stride, dilation, padding)
EDGE_CASES = {
    "empty_batch": (0, 16, 2, 9, 9, 3, 1, 1, 1),
    "one_output_pixel": (2, 16, 2, 9, 9, 3, 9, 1, 1),
    "K1": (2, 16, 2, 9, 8, 1, 1, 1, 0),
    "padding_beyond_window": (2, 16, 2, 5, 6, 3, 1, 1, 4),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_shapes(case, channels_last) -> None:
    n, c, g, h, w, k, stride, dilation, padding = case
    h_out, w_out = (output_size(size, k, stride, padding, dilation) for size in (h, w))
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", generator=generator, dtype=torch.float64)
    weight = torch.randn(n, g, k, k, h_out, w_out, device="cuda", generator=generator, dtype=torch.float64)
    grad_out = torch.randn(n, c, h_out, w_out, device="cuda", generator=generator, dtype=torch.float64)
    results = {}
    for backend in ("cupy", "unfold"):
        xb = layout.to_layout(x, channels_last).requires_grad_()
        wb = layout.weight_to_layout(weight, channels_last).requires_grad_()
        out = ops.involution(xb, wb, stride, padding, dilation, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (xb, wb), layout.to_layout(grad_out, channels_last)))
    for got, expected in zip(results["cupy"], results["unfold"]):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


def test_forward_and_backward_on_a_side_stream() -> None:
    """Forward and backward queued behind slow work on a side stream must wait for it (torch's current stream)."""
    x, weight, grad_out, stride, dilation = _inputs((2, 16, 2, 33, 31, 7, 1, 1), torch.float32)
    expected = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        delayed = torch.zeros_like(x)
        torch.cuda._sleep(100_000_000)
        delayed.copy_(x)
        results = _forward_backward(delayed, weight, grad_out, stride, dilation, "cupy")
    side.synchronize()
    for result, reference in zip(results, expected):
        torch.testing.assert_close(result, reference, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_graph_capture_after_one_warm_up(channels_last) -> None:
    """As torch.cuda.graphs documents: one warm-up call on a side stream (compiles the kernels, sets CuPy up), then
    capture forward and backward; replays with new inputs match eager calls."""
    x, weight, grad_out, stride, dilation = _inputs((2, 32, 2, 15, 14, 7, 1, 1), torch.bfloat16)
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    static = [t.clone() for t in (x, weight, grad_out)]
    warm_up = torch.cuda.Stream()
    warm_up.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm_up):
        _forward_backward(*static, stride, dilation, "cupy")
    torch.cuda.current_stream().wait_stream(warm_up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _forward_backward(*static, stride, dilation, "cupy")
    for seed in (1, 2):
        new = _inputs((2, 32, 2, 15, 14, 7, 1, 1), torch.bfloat16, seed=seed)[:3]
        new = (
            layout.to_layout(new[0], channels_last),
            layout.weight_to_layout(new[1], channels_last),
            layout.to_layout(new[2], channels_last),
        )
        for target, source in zip(static, new):
            target.copy_(source)
        graph.replay()
        expected = _forward_backward(*static, stride, dilation, "cupy")
        for result, reference in zip(captured, expected):
            torch.testing.assert_close(result, reference, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reruns_are_bitwise_equal(dtype, channels_last) -> None:
    """No atomics and a fixed summation order per thread: the same inputs give the same bits."""
    x, weight, grad_out, stride, dilation = _inputs((4, 64, 4, 28, 28, 7, 1, 1), dtype)
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    first = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    second = _forward_backward(x, weight, grad_out, stride, dilation, "cupy")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_picks_cupy_for_cuda_tensors(monkeypatch) -> None:
    x, weight, *_ = _inputs((1, 16, 2, 9, 9, 3, 1, 1), torch.float32)
    launched = []
    launch = cupy_backend._launch
    monkeypatch.setattr(
        cupy_backend, "_launch", lambda *args, **kwargs: launched.append(args[0]) or launch(*args, **kwargs)
    )
    ops.involution(x, weight)
    assert launched == ["forward"]
