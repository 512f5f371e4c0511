"""The involution operator on the CPU: backends agree, gradients are right, errors are clear, torch.compile works."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ops
from ops import layout, torch_backend
from ops.involution import output_size

# (N, C, G, H, W, K, stride, dilation): odd sizes, stride 1 and 2, dilation 1 and 2, K = 3, 5, 7, several G.
SHAPES = [
    (2, 16, 1, 9, 9, 3, 1, 1),
    (2, 32, 2, 11, 7, 7, 2, 1),
    (1, 24, 3, 13, 10, 5, 2, 2),
    (2, 16, 4, 8, 9, 3, 1, 2),
    (1, 32, 2, 15, 15, 7, 1, 1),
]


def make_inputs(n, c, g, h, w, k, stride, dilation, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    padding = dilation * (k - 1) // 2
    h_out, w_out = (output_size(size, k, stride, padding, dilation) for size in (h, w))
    x = torch.randn(n, c, h, w, dtype=dtype, generator=generator)
    weight = torch.randn(n, g, k, k, h_out, w_out, dtype=dtype, generator=generator)
    return x, weight


def direct_involution(x, weight, stride, padding, dilation):
    """The defining formula, one output element at a time (tiny inputs only)."""
    n, c, h, w = x.shape
    groups, k = weight.shape[1], weight.shape[2]
    out = torch.zeros(n, c, weight.shape[4], weight.shape[5], dtype=x.dtype)
    for ch in range(c):
        g = ch // (c // groups)
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                for u in range(k):
                    for v in range(k):
                        row, col = i * stride + u * dilation - padding, j * stride + v * dilation - padding
                        if 0 <= row < h and 0 <= col < w:
                            out[:, ch, i, j] += weight[:, g, u, v, i, j] * x[:, ch, row, col]
    return out


@pytest.mark.parametrize("backend", ["torch", "unfold"])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_matches_the_defining_formula(backend, stride, dilation):
    x, weight = make_inputs(1, 4, 2, 7, 6, 3, stride, dilation)
    expected = direct_involution(x, weight, stride, dilation, dilation)
    torch.testing.assert_close(ops.involution(x, weight, stride, dilation=dilation, backend=backend), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_unfold_forward_and_backward(shape):
    x, weight = make_inputs(*shape)
    stride, dilation = shape[6], shape[7]
    results = {}
    for backend in ("torch", "unfold"):
        xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = ops.involution(xb, wb, stride, dilation=dilation, backend=backend)
        grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        results[backend] = (out, xb.grad, wb.grad)
    for got, expected in zip(results["torch"], results["unfold"]):
        torch.testing.assert_close(got, expected)


# + a map smaller than the window, and paddings other than "same" (the last one leaves only padding under every tap)
FUNCTIONAL_CASES = [(shape, None) for shape in SHAPES] + [
    ((1, 16, 4, 3, 3, 7, 1, 1), None),
    ((2, 8, 2, 6, 5, 3, 2, 1), 0),
    ((1, 8, 1, 5, 4, 3, 1, 2), 4),
    ((1, 4, 1, 1, 1, 3, 3, 2), 3),
]


@pytest.mark.parametrize("shape,padding", FUNCTIONAL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_functional_forward_for_export_matches_unfold(shape, padding, dtype):
    k, stride, dilation = shape[5:]
    padding = dilation * (k - 1) // 2 if padding is None else padding
    n, c, _, h, w = shape[:5]
    h_out, w_out = (output_size(size, k, stride, padding, dilation) for size in (h, w))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=generator).to(dtype)
    weight = torch.randn(n, shape[2], k, k, h_out, w_out, generator=generator).to(dtype)
    # The reference sees the same (rounded) inputs in float64: what remains is the accumulation's rounding, which
    # float32 accumulation keeps far below bfloat16 accumulation's.
    expected = torch_backend.involution_unfold(x.double(), weight.double(), stride, padding, dilation)
    got = torch_backend.forward_functional(x, weight, stride, padding, dilation)
    assert got.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("backend", ["torch", "unfold"])
@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 3), (2, 1, 5), (2, 2, 3)])
def test_gradcheck_float64(backend, stride, dilation, k):
    x, weight = make_inputs(1, 4, 2, 7, 6, k, stride, dilation)
    x.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: ops.involution(a, b, stride, dilation=dilation, backend=backend), (x, weight)
    )


def test_explicit_padding_changes_output_size():
    x, _ = make_inputs(1, 4, 1, 8, 8, 3, 1, 1)
    weight = torch.randn(1, 1, 3, 3, 6, 6, dtype=x.dtype)
    out = ops.involution(x, weight, padding=0, backend="torch")
    torch.testing.assert_close(out, ops.involution(x, weight, padding=0, backend="unfold"))
    assert out.shape == (1, 4, 6, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    x, weight = make_inputs(2, 32, 2, 9, 9, 7, 1, 1, dtype=torch.float32)
    expected = ops.involution(x.double(), weight.double(), backend="unfold")
    out = ops.involution(x.to(dtype), weight.to(dtype), backend="torch")
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error < tolerance


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_in_the_autocast_dtype(weight_dtype):
    x, weight = make_inputs(1, 16, 1, 8, 8, 3, 1, 1, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.involution(x, weight.to(weight_dtype), backend="torch")
        out_fp64 = ops.involution(x.double(), weight.double(), backend="torch")
    assert out.dtype == torch.bfloat16
    assert out_fp64.dtype == torch.float64  # as convolutions: autocast leaves float64 alone
    torch.testing.assert_close(out.float(), ops.involution(x, weight, backend="unfold"), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["torch", "unfold"])
def test_non_contiguous_and_channels_last_inputs(backend):
    x, weight = make_inputs(2, 16, 2, 9, 9, 3, 1, 1)
    expected = ops.involution(x, weight, backend="unfold")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = ops.involution(x_cl, weight, backend=backend)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Non-contiguous views: x through a transpose, weight through a strided slice of a larger tensor.
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    w_big = torch.stack([weight, -weight], dim=-1)[..., 0]
    assert not x_t.is_contiguous() and not w_big.is_contiguous()
    torch.testing.assert_close(ops.involution(x_t, w_big, backend=backend), expected)


def test_channels_last_backward_matches():
    x, weight = make_inputs(2, 16, 2, 9, 9, 3, 2, 1)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xb = x.clone(memory_format=memory_format).requires_grad_()
        wb = weight.clone().requires_grad_()
        ops.involution(xb, wb, 2, backend="torch").square().sum().backward()
        grads.append((xb.grad, wb.grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


class TinyInvolutionNet(torch.nn.Module):
    """A 1×1 conv generates the kernels, as RedNet's Involution does."""

    def __init__(self, channels=16, groups=2, kernel_size=3):
        super().__init__()
        self.groups, self.kernel_size = groups, kernel_size
        self.generate = torch.nn.Conv2d(channels, groups * kernel_size**2, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        weight = self.generate(x).view(n, self.groups, self.kernel_size, self.kernel_size, h, w)
        return ops.involution(x, weight, backend="torch").relu()


def test_outputs_and_gradients_follow_the_layout_of_x():
    """As for convolutions: channels_last in, channels_last out (and gradients), so a channels_last model never
    converts; the kernels' gradient is pixel-major, the layout a channels_last conv produced them in."""
    x, weight = make_inputs(2, 16, 2, 9, 9, 3, 1, 1)
    for channels_last in (False, True):
        xb = layout.to_layout(x.detach(), channels_last).requires_grad_()
        wb = layout.weight_to_layout(weight.detach(), channels_last).requires_grad_()
        out = ops.involution(xb, wb, backend="torch")
        out.square().sum().backward()
        assert layout.is_channels_last(out) == layout.is_channels_last(xb.grad) == channels_last
        assert layout.is_pixel_major(wb.grad) == channels_last
        assert wb.grad.is_contiguous() != channels_last


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_compile_fullgraph_matches_eager(channels_last):
    torch.manual_seed(0)
    model = TinyInvolutionNet()
    x = torch.randn(2, 16, 10, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    eager = model(x)
    eager.sum().backward()
    eager_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip([x.grad] + [p.grad for p in model.parameters()], eager_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("size,stride", [(6, 1), (9, 9)], ids=["6x6", "to_1x1"])  # 1×1 output: size-1 dims
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_library_op_passes_opcheck(channels_last, size, stride):
    """Includes the fake implementations' strides, which follow x's layout, exactly, size-1 dims included."""
    x, weight = make_inputs(1, 8, 2, size, size, 3, stride, 1)
    x, weight = layout.to_layout(x.detach(), channels_last), layout.weight_to_layout(weight.detach(), channels_last)
    conv = (stride, 1, 1, "torch")
    torch.library.opcheck(
        torch.ops.rednet.involution.default,
        (x.requires_grad_(), weight.requires_grad_(), *conv),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    h_out = weight.shape[-1]
    grad_out = layout.to_layout(torch.randn(1, 8, h_out, h_out, dtype=x.dtype), channels_last)
    for op, args in (
        (
            torch.ops.rednet.involution_grad_input.default,
            (grad_out, weight.detach(), size, size, 8, *conv, channels_last),
        ),
        (torch.ops.rednet.involution_grad_weight.default, (grad_out, x.detach(), 3, 2, *conv)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    # opcheck overlooks the strides of size-1 dims; torch.compile's layouts come from the fakes, so match exactly.
    mode = FakeTensorMode()
    for op, args in (
        (torch.ops.rednet.involution.default, (x.detach(), weight.detach(), *conv)),
        (
            torch.ops.rednet.involution_grad_input.default,
            (grad_out, weight.detach(), size, size, 8, *conv, channels_last),
        ),
        (torch.ops.rednet.involution_grad_weight.default, (grad_out, x.detach(), 3, 2, *conv)),
    ):
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            fake = op(*fake_args)
        assert fake.stride() == op(*args).stride(), op


def test_available_backends_lists_cpu_paths():
    backends = ops.available_backends()
    assert {"torch", "unfold"} <= set(backends)
    if not torch.cuda.is_available():
        assert "cupy" not in backends


def test_auto_picks_torch_on_cpu_and_matches():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    torch.testing.assert_close(ops.involution(x, weight), ops.involution(x, weight, backend="unfold"))


# --- errors: each names the bad value and what to do ---


def test_cupy_backend_on_cpu_tensors_is_a_clear_error():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(RuntimeError, match=r"backend 'cupy'.*(pip install|CUDA|GPU)"):
        ops.involution(x, weight, backend="cupy")


def test_unknown_backend():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(ValueError, match=r"'triton' is unknown.*auto, cupy, cpu, torch, unfold"):
        ops.involution(x, weight, backend="triton")


def test_integer_tensors():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(TypeError, match="floating-point.*x of dtype torch.int64"):
        ops.involution(x.long(), weight)


def test_dtype_mismatch():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(TypeError, match="x is torch.float32 but weight is torch.float64"):
        ops.involution(x.float(), weight)


def test_device_mismatch():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(ValueError, match="x is on cpu but weight is on meta"):
        ops.involution(x, weight.to("meta"))


def test_channels_not_divisible_by_groups():
    x, _ = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    weight = torch.randn(1, 3, 3, 3, 7, 7, dtype=x.dtype)
    with pytest.raises(ValueError, match="C=8 of x must be divisible by groups G=3"):
        ops.involution(x, weight)


@pytest.mark.parametrize(
    "weight_shape,message",
    [
        ((2, 2, 3, 3, 7, 7), "x has N=1, weight has N=2"),
        ((1, 2, 3, 3, 6, 7), "Ho×Wo = 6×7.*gives 7×7"),
        ((1, 2, 3, 5, 7, 7), "square, got K×K = 3×5"),
        ((1, 2, 3, 3, 7), r"\(N, G, K, K, Ho, Wo\), got shape \(1, 2, 3, 3, 7\)"),
    ],
)
def test_shapes_that_disagree(weight_shape, message):
    x, _ = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(ValueError, match=message):
        ops.involution(x, torch.randn(weight_shape, dtype=x.dtype))


def test_bad_stride():
    x, weight = make_inputs(1, 8, 2, 7, 7, 3, 1, 1)
    with pytest.raises(ValueError, match="stride=0"):
        ops.involution(x, weight, stride=0)


@pytest.mark.parametrize("size,stride", [(1, 1), (2, 1), (3, 2), (2, 2)])
def test_maps_smaller_than_the_kernel(size, stride):
    # Most taps of a 7×7 window then read only padding (the torch backend skips them): late RedNet stages on small
    # images. Taps that only touch padding must still get a zero weight gradient.
    x, weight = make_inputs(2, 16, 1, size, size, 7, stride, 1)
    results = {}
    for backend in ("torch", "unfold"):
        xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = ops.involution(xb, wb, stride, backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = (out, xb.grad, wb.grad)
    for got, expected in zip(results["torch"], results["unfold"]):
        torch.testing.assert_close(got, expected)
