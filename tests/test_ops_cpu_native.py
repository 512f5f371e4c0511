"""The native "cpu" backend (ops/kernels/involution_cpu.cpp through ops/cpu_backend.py) against the "unfold" reference:
forward, grad-input and grad-weight in both layouts, gradcheck, torch.compile, the build fallback, thread counts."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import ops
from ops import cpu_backend, layout
from ops.involution import output_size

involution_module = sys.modules["ops.involution"]  # (ops.involution is also the function)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# (N, C, G, H, W, K, stride, dilation, padding or None for d*(K-1)//2): odd sizes, stride 2, dilation 2, K 3/5/7,
# several G (1 to 16 channels per group, and 18 = a group wider than the 4 channels summed side by side), N = 0,
# a 1x1 output, padding other than "same".
CASES = [
    (2, 16, 1, 9, 9, 3, 1, 1, None),
    (2, 32, 2, 11, 7, 7, 2, 1, None),
    (1, 24, 3, 13, 10, 5, 2, 2, None),
    (2, 16, 4, 8, 9, 3, 1, 2, None),
    (1, 32, 2, 15, 15, 7, 1, 1, None),
    (1, 36, 2, 8, 7, 3, 2, 2, None),
    (1, 6, 3, 12, 11, 5, 2, 2, 1),
    (1, 4, 4, 10, 13, 7, 1, 2, None),
    (2, 16, 1, 3, 3, 7, 2, 1, None),
    (1, 8, 2, 9, 9, 3, 9, 1, None),  # Ho = Wo = 1
    (0, 8, 2, 7, 7, 3, 1, 1, None),  # empty batch
    (1, 8, 1, 6, 5, 3, 1, 1, 0),
]


def _case_id(case) -> str:
    n, c, g, h, w, k, s, d, p = case
    return f"N{n}C{c}G{g}-{h}x{w}-K{k}s{s}d{d}p{p}"


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels must build here (CI has g++); elsewhere, without a compiler, the module is skipped."""
    ok, reason = cpu_backend.status()
    if not ok:
        if IN_CI:
            pytest.fail(f"the CPU kernels must build in CI: {reason}")
        pytest.skip(reason)


def _problem(case, dtype=torch.float64, channels_last=False, seed=0):
    n, c, g, h, w, k, s, d, p = case
    p = d * (k - 1) // 2 if p is None else p
    h_out, w_out = (output_size(size, k, s, p, d) for size in (h, w))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(n, g, k, k, h_out, w_out, generator=generator, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(n, c, h_out, w_out, generator=generator, dtype=torch.float64).to(dtype)
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    return x, layout.weight_to_layout(weight, channels_last), grad_out, (s, p, d)


def _run(backend, x, weight, grad_out, conv):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = ops.involution(x, weight, *conv, backend=backend)
    out.backward(grad_out)
    return out, x.grad, weight.grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_unfold_forward_and_backward(case, channels_last):
    x, weight, grad_out, conv = _problem(case, channels_last=channels_last)
    expected = _run("unfold", x, weight, grad_out, conv)
    got = _run("cpu", x, weight, grad_out, conv)
    for name, a, b in zip(("out", "grad_x", "grad_weight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    if channels_last and x.numel():  # outputs follow x's layout (ops/layout.py; a 1x1 output is both layouts)
        assert layout.is_channels_last(got[0]) or got[0].shape[-2:] == (1, 1)
        assert layout.is_channels_last(got[1]) and layout.is_pixel_major(got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_accumulate_in_float32(dtype):
    x, weight, grad_out, conv = _problem((2, 32, 2, 11, 9, 7, 1, 1, None), dtype=dtype)
    expected = _run("unfold", x.double(), weight.double(), grad_out.double(), conv)
    got = _run("cpu", x, weight, grad_out, conv)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # float32 sums: far below bfloat16's rounding of the result
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        assert ((a.double() - b).abs().max() / b.abs().max()) < tolerance


# float32 rows of at least one 16-pixel vector: the kernels are read in place (with a packed tail), rows span
# several work items, and the register blocks (4 rows x 4 channels; grad-weight 3 or 4 rows x all K taps of a
# column) leave remainders of 2 and 1 rows. Stride 1 / dilation 1 at K 3, 5, 7 take grad-weight's blocked path,
# the others its general one.
WIDE_FLOAT32_CASES = [
    (2, 32, 2, 21, 37, 7, 1, 1, None),
    (1, 16, 1, 19, 35, 3, 1, 1, None),
    (1, 32, 2, 18, 33, 5, 1, 1, None),
    (1, 32, 2, 20, 34, 7, 2, 1, None),
    (1, 16, 1, 17, 40, 3, 1, 2, None),
    (1, 16, 1, 30, 20, 7, 1, 1, None),  # two work items of rows: 16 + 14 (forward, grad-weight), 24 + 6 (grad-input)
    (1, 16, 2, 53, 18, 7, 2, 1, None),  # stride 2 over items 16 + 11 (27 output rows) and 24 + 24 + 5 input rows
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", WIDE_FLOAT32_CASES, ids=_case_id)
def test_float32_wide_rows_match_unfold_at_any_thread_count(case, channels_last):
    x, weight, grad_out, conv = _problem(case, dtype=torch.float32, channels_last=channels_last)
    expected = _run("unfold", x.double(), weight.double(), grad_out.double(), conv)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_run("cpu", x, weight, grad_out, conv))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], expected):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-5
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


def test_kernels_read_in_place_from_an_offset_view():
    """In-place kernel reads start at the view's own offset: a slice of a larger batch gives the slice's results."""
    x, weight, grad_out, conv = _problem((3, 32, 2, 12, 35, 7, 1, 1, None), dtype=torch.float32)
    expected = _run("cpu", x[1:2].contiguous(), weight[1:2].contiguous(), grad_out[1:2].contiguous(), conv)
    for a, b in zip(_run("cpu", x[1:2], weight[1:2], grad_out[1:2], conv), expected):
        assert torch.equal(a, b)


# Edges of the register blocks and of the in-place kernel reads: Wo an exact multiple of the vector (16 float32,
# 8 float64) and below it, even K (grad-weight's blocked path at K 2 and 4, its general path at K 6), K = 1,
# padding 0 and padding beyond "same", K larger than the image, dilation with stride, C/G = 1, bfloat16 wide rows.
EDGE_CASES = [
    ((1, 8, 2, 9, 32, 3, 1, 1, None), torch.float32),
    ((1, 8, 2, 10, 16, 7, 1, 1, None), torch.float64),
    ((1, 8, 2, 9, 8, 3, 1, 1, None), torch.float64),
    ((1, 8, 2, 11, 18, 2, 1, 1, 0), torch.float32),
    ((1, 8, 2, 11, 19, 4, 1, 1, 1), torch.float32),
    ((1, 8, 2, 13, 21, 6, 1, 1, 2), torch.float32),
    ((1, 4, 2, 10, 17, 1, 1, 1, None), torch.float32),
    ((1, 8, 1, 13, 40, 7, 1, 1, 0), torch.float32),
    ((1, 8, 1, 9, 17, 3, 1, 1, 5), torch.float32),
    ((1, 8, 2, 3, 4, 7, 1, 1, 3), torch.float64),
    ((1, 12, 3, 17, 37, 3, 2, 2, 2), torch.float32),
    ((1, 4, 4, 10, 33, 3, 1, 1, None), torch.float32),
    ((1, 10, 2, 10, 33, 5, 1, 1, None), torch.bfloat16),
]


@pytest.mark.parametrize("case,dtype", EDGE_CASES, ids=[f"{_case_id(c)}-{str(t)[6:]}" for c, t in EDGE_CASES])
def test_edge_geometries_match_unfold(case, dtype):
    x, weight, grad_out, conv = _problem(case, dtype=dtype)
    expected = _run("unfold", x.double(), weight.double(), grad_out.double(), conv)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, a, b in zip(("out", "grad_x", "grad_weight"), _run("cpu", x, weight, grad_out, conv), expected):
        assert ((a.double() - b).abs().max() / b.abs().max()) < tolerance, name


def _weight_view(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A view whose rows are contiguous (so the forward reads them in place) but whose other strides are unusual."""
    if kind == "broadcast_n":  # stride 0 along N
        return weight[:1].expand_as(weight)
    if kind == "permuted":  # rows contiguous, (n, g, u, v, i) strides in another order
        return weight.permute(4, 2, 0, 3, 1, 5).contiguous().permute(2, 4, 1, 3, 0, 5)
    if kind == "padded_rows":  # a row stride larger than Wo, NaN between the rows (what a whole-vector read of a
        # row's last columns brings into the lanes past Wo, which must never reach a result)
        big = torch.full((*weight.shape[:-1], weight.shape[-1] + 3), float("nan"), dtype=weight.dtype)
        big[..., : weight.shape[-1]] = weight
        return big[..., : weight.shape[-1]]
    # "storage_end": an offset view that ends exactly where its storage ends (the last row's reads end there)
    storage = torch.full((weight.numel() + 5,), float("nan"), dtype=weight.dtype)
    view = storage[5:].view(weight.shape)
    view.copy_(weight)
    return view


@pytest.mark.parametrize("kind", ["broadcast_n", "permuted", "padded_rows", "storage_end"])
@pytest.mark.parametrize("case,dtype", [((2, 8, 2, 9, 32, 3, 1, 1, None), torch.float32),
                                        ((2, 8, 2, 9, 16, 5, 1, 1, None), torch.float64),
                                        ((2, 8, 2, 11, 35, 3, 2, 1, None), torch.float32),
                                        ((2, 8, 2, 9, 21, 7, 1, 1, None), torch.float32)],
                         ids=["Wo32-f32", "Wo16-f64", "Wo18-s2-f32", "Wo21-f32"])  # fmt: skip
def test_kernels_read_in_place_with_unusual_strides(case, dtype, kind):
    x, weight, grad_out, conv = _problem(case, dtype=dtype)
    weight = _weight_view(weight, kind)
    assert weight.stride(-1) == 1
    expected = _run("unfold", x.double(), weight.double(), grad_out.double(), conv)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("out", "grad_x", "grad_weight"), _run("cpu", x, weight, grad_out, conv), expected):
        assert ((a.double() - b).abs().max() / b.abs().max()) < tolerance, name


def _guarded(t: torch.Tensor, guard: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """t's values in a view followed by `guard` NaNs of the same storage: a read past t gives NaN, a write shows."""
    storage = torch.full((t.numel() + guard,), float("nan"), dtype=t.dtype)
    view = storage[: t.numel()].view(t.shape)
    view.copy_(t)
    return view, storage


# s > p + W (or H): stride phases that lie wholly right of the padded image have no columns (the kernels once
# rounded their count toward zero, read a column past the image and wrote one past grad_x's end).
STRIDE_BEYOND_IMAGE = [
    (1, 2, 1, 5, 1, 3, 3, 1, 1),
    (1, 2, 1, 9, 1, 1, 2, 1, 0),
    (1, 4, 2, 6, 2, 3, 4, 1, 1),
    (2, 2, 1, 7, 1, 3, 4, 2, 2),
    (1, 2, 1, 1, 9, 3, 3, 1, 1),
]


@pytest.mark.parametrize("case", STRIDE_BEYOND_IMAGE, ids=_case_id)
def test_stride_wider_than_the_padded_image(case):
    """Output columns whose taps partly fall right of the image when s > p + W; the kernels are called directly on
    guarded buffers, because through ops.involution the stray write lands in the heap."""
    x, weight, grad_out, (s, p, d) = _problem(case)
    expected = _run("unfold", x, weight, grad_out, (s, p, d))
    n, c, h, w = x.shape
    geometry = (n, c, h, w, weight.shape[1], weight.shape[2], *grad_out.shape[-2:], s, p, d)
    x, _ = _guarded(x)
    out, out_storage = _guarded(torch.zeros_like(grad_out))
    grad_x, grad_x_storage = _guarded(torch.zeros_like(x))
    grad_w, grad_w_storage = _guarded(torch.zeros_like(weight))
    cpu_backend._call("forward", x, weight, out, geometry)
    cpu_backend._call("grad_input", grad_out, weight, grad_x, geometry)
    cpu_backend._call("grad_weight", grad_out, x, grad_w, geometry)
    for name, got, storage, want in zip(
        ("out", "grad_x", "grad_weight"), (out, grad_x, grad_w), (out_storage, grad_x_storage, grad_w_storage), expected
    ):
        assert storage[got.numel() :].isnan().all(), f"{name}: written past its end"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


# Each tensor ends right before an unreadable page (tests/guard_page_probe.py): reads of whole vectors past a row's
# last column must stop at the tensor's end. Output widths below and above one float32 vector (16) and a double one;
# padding 0 where the last kernel row is read at all (with "same" padding its bottom taps fall outside the image).
PAGE_END_CASES = [
    ((2, 16, 2, 12, 27, 7, 1, 1, 0), "float32"),
    ((1, 16, 1, 9, 20, 7, 1, 1, 0), "float32"),
    ((2, 8, 2, 8, 9, 3, 1, 1, 0), "float32"),
    ((2, 16, 2, 9, 21, 7, 1, 1, 3), "float32"),
    ((1, 16, 2, 11, 35, 7, 2, 1, 0), "float32"),
    ((2, 8, 2, 9, 13, 3, 1, 1, 0), "float64"),
    ((1, 8, 1, 9, 19, 5, 1, 1, 0), "bfloat16"),
]


@pytest.mark.skipif(platform.system() != "Linux", reason="mprotect'ed guard pages: Linux")
def test_no_read_past_a_tensor_end_at_a_guard_page():
    probe = [sys.executable, os.path.join(os.path.dirname(__file__), "guard_page_probe.py")]
    cases = [",".join(map(str, (*case, dtype))) for case, dtype in PAGE_END_CASES]
    result = subprocess.run([*probe, *cases], capture_output=True, text=True, timeout=300)
    last = result.stdout.split()[-1:] or ["(none)"]
    assert result.returncode == 0 and last == ["ok"], (
        f"exit {result.returncode} (-11: a read past a tensor's end) at case {last[0]}\n{result.stderr[-2000:]}"
    )


def test_non_contiguous_inputs():
    x, weight, grad_out, conv = _problem((2, 16, 2, 9, 9, 3, 1, 1, None))
    expected = _run("unfold", x, weight, grad_out, conv)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # W-major storage
    w_big = torch.stack([weight, -weight], dim=-1)[..., 0]  # a strided slice
    g_t = grad_out.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (x_t.is_contiguous() or w_big.is_contiguous() or g_t.is_contiguous())
    for a, b in zip(_run("cpu", x_t, w_big, g_t, conv), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 3), (2, 1, 5), (2, 2, 3)])
def test_gradcheck_float64(stride, dilation, k):
    x, weight, _, (s, p, d) = _problem((1, 4, 2, 7, 6, k, stride, dilation, None))
    x.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.involution(a, b, s, p, d, backend="cpu"), (x, weight))


def test_results_do_not_depend_on_the_thread_count():
    """Bitwise: every output element is summed by one thread in one fixed order."""
    x, weight, grad_out, conv = _problem((3, 32, 2, 13, 11, 7, 1, 1, None), dtype=torch.float32)
    assert x.numel() * 49 >= cpu_backend.SERIAL_BELOW  # large enough to run on several threads
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_run("cpu", x, weight, grad_out, conv))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


class TinyInvolutionNet(torch.nn.Module):
    def __init__(self, backend: str, channels=16, groups=2, kernel_size=3):
        super().__init__()
        self.backend, self.groups, self.kernel_size = backend, groups, kernel_size
        self.generate = torch.nn.Conv2d(channels, groups * kernel_size**2, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        weight = self.generate(x).view(n, self.groups, self.kernel_size, self.kernel_size, h, w)
        return ops.involution(x, weight, backend=self.backend).relu()


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_compile_fullgraph_matches_eager(backend, channels_last):
    torch.manual_seed(0)
    model = TinyInvolutionNet(backend)
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


def test_auto_picks_cpu_and_lists_it():
    assert "cpu" in ops.available_backends()
    x, weight, _, conv = _problem((1, 8, 2, 7, 7, 3, 1, 1, None))
    assert involution_module._resolve_backend("auto", x) == "cpu"
    assert involution_module._resolve_backend("auto", x.half()) == "torch"  # a dtype the kernels do not take


def test_unsupported_dtype_is_a_clear_error():
    x, weight, _, conv = _problem((1, 8, 2, 7, 7, 3, 1, 1, None), dtype=torch.float16)
    with pytest.raises(TypeError, match="backend 'cpu' supports.*got torch.float16"):
        ops.involution(x, weight, *conv, backend="cpu")


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """A compiler that does not exist, an empty cache: the build fails as on a machine without a C++ compiler."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REDNET_CPU_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(involution_module, "_probes", {})  # the dispatch's per-process probe and "auto" caches
    monkeypatch.setattr(involution_module, "_auto_choices", {})
    monkeypatch.setattr(involution_module, "_auto_warned", set())
    cpu_backend.reset()
    yield
    cpu_backend.reset()


def test_auto_falls_back_to_torch_with_one_warning_when_the_build_fails(broken_build):
    x, weight, _, conv = _problem((1, 8, 2, 7, 7, 3, 1, 1, None))
    expected = ops.involution(x, weight, *conv, backend="unfold")
    with pytest.warns(RuntimeWarning, match="no-such-compiler") as record:
        out = ops.involution(x, weight, *conv)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per call
        torch.testing.assert_close(ops.involution(x, weight, *conv), expected)
    assert "cpu" not in ops.available_backends()


def test_explicit_cpu_backend_raises_when_the_build_fails(broken_build):
    x, weight, _, conv = _problem((1, 8, 2, 7, 7, 3, 1, 1, None))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available.*no-such-compiler"):
        ops.involution(x, weight, *conv, backend="cpu")


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    """A fresh cache directory gets one library and no temporary files; the next build reuses it untouched.
    (A tiny stand-in source keeps this fast: the caching does not depend on what is compiled.)"""
    if shutil.which(cpu_backend.compiler()) is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int involution_cpu_has_openmp(void) { return 0; }\n')
    cache = tmp_path / "cache"
    monkeypatch.setenv("REDNET_CPU_KERNEL_CACHE", str(cache))
    first = cpu_backend._build(cpu_backend.compiler(), source)
    assert [p.name for p in cache.iterdir()] == [first.name]
    mtime = first.stat().st_mtime_ns
    assert cpu_backend._build(cpu_backend.compiler(), source) == first
    assert first.stat().st_mtime_ns == mtime
    source.write_text(source.read_text() + "// changed\n")  # another source: another library
    assert cpu_backend._build(cpu_backend.compiler(), source) != first


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_build_without_avx512_matches_unfold(monkeypatch, tmp_path):
    """The register blocks are sized for AVX-512's 32 registers; without AVX-512 (AVX2 machines) smaller blocks and
    grad-weight's general path are compiled instead: they must give the same sums."""
    monkeypatch.setenv("REDNET_CPU_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_backend, "OPTIONAL_FLAG_SETS", (("-march=native", "-mno-avx512f", "-fopenmp"),))
    cpu_backend.reset()
    try:
        assert cpu_backend.is_available(), cpu_backend.status()[1]
        for case in WIDE_FLOAT32_CASES[:3]:
            x, weight, grad_out, conv = _problem(case, dtype=torch.float32)
            expected = _run("unfold", x.double(), weight.double(), grad_out.double(), conv)
            for a, b in zip(_run("cpu", x, weight, grad_out, conv), expected):
                assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-5
    finally:
        cpu_backend.reset()


def test_compare_cpu_kernels_script_times_two_builds(monkeypatch, capsys, tmp_path):
    """scripts/compare_cpu_kernels.py: two copies of the kernel source give the same results and a table row each."""
    from scripts import compare_cpu_kernels

    copy = tmp_path / "copy.cpp"
    copy.write_text(cpu_backend.KERNEL_FILE.read_text())
    argv = ["compare_cpu_kernels.py", str(copy), "--batch", "1", "--repeats", "1", "--shapes", "layer4"]
    monkeypatch.setattr(sys, "argv", argv)
    compare_cpu_kernels.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| layer4 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["forward", "grad_input", "grad_weight", "all three"]
    assert all(row.split("|")[6].strip() == "0.0e+00" for row in rows[:3])
