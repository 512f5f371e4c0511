"""Runs the CUDA kernels of ops/kernels/involution.cu on the CPU and checks them against the "unfold" reference.

The unchanged .cu file is compiled by the host C++ compiler through tests/host_emulation/cuda_host_shim.h, and
tests/host_emulation/launcher.cpp runs each grid block by block, thread by thread, with the launch shape the GPU
path uses (cupy_backend.plan_launch), in both memory layouts (NCHW, and NHWC for channels_last). Inputs sit
between NaN guard bands, so a read out of bounds shows up as NaN, and outputs start as NaN, so an element no thread
writes shows up too. float32 and float64 only: the half types need CUDA's headers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import ops
from ops import cupy_backend, layout, shapes
from ops.cupy_backend import Geometry

SHIM_DIR = Path(__file__).resolve().parent / "host_emulation"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
GUARD = 64  # NaN elements either side of every tensor

# (N, C, G, H, W, K, stride, dilation, padding or None for the default d*(K-1)//2)
CASES = [
    (2, 6, 2, 9, 11, 3, 1, 1, None),
    (1, 8, 1, 7, 9, 5, 2, 1, None),  # odd sizes, stride 2
    (2, 4, 4, 10, 13, 7, 1, 2, None),  # dilation 2, one channel per group
    (2, 32, 2, 11, 9, 7, 2, 1, None),  # 16 channels per group (RedNet), odd, stride 2
    (1, 36, 2, 8, 7, 3, 2, 2, None),  # 18 channels per group: two runs of channels per thread
    (1, 4, 2, 9, 8, 3, 1, 1, 0),  # no padding
    (1, 6, 3, 12, 11, 5, 2, 2, 1),  # padding smaller than the window reach
]
DTYPES = [torch.float32, torch.float64]
MANY_BLOCKS_CASE = (2, 8, 2, 23, 21, 3, 1, 1, None)  # about 2000 threads per kernel: several blocks


def _case_id(case: tuple) -> str:
    n, c, g, h, w, k, s, d, p = case
    return f"N{n}C{c}G{g}-{h}x{w}-K{k}s{s}d{d}p{p}"


class EmulatedKernels:
    """The kernel file built for the host, one shared library per (dtype, channels and pixels per thread)."""

    def __init__(self, compiler: str, build_dir: Path) -> None:
        self.compiler, self.build_dir = compiler, build_dir
        self._libraries: dict[tuple, ctypes.CDLL] = {}

    def library(self, dtype: torch.dtype, channels: int, pixels: int) -> ctypes.CDLL:
        key = (dtype, channels, pixels)
        if key not in self._libraries:
            library = self.build_dir / f"libinvolution_{cupy_backend.SCALAR_TYPES[dtype]}_{channels}x{pixels}.so"
            command = [
                self.compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing",
                "-Wall", "-Wno-unknown-pragmas", "-include", str(SHIM_DIR / "cuda_host_shim.h"),
                *cupy_backend.compile_defines(dtype, channels, pixels),
                f'-DINVOLUTION_KERNEL_FILE="{cupy_backend.KERNEL_FILE}"',
                str(SHIM_DIR / "launcher.cpp"), "-o", str(library),
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            assert result.returncode == 0, f"host build failed:\n{' '.join(command)}\n{result.stderr}"
            self._libraries[key] = ctypes.CDLL(str(library))
        return self._libraries[key]

    def run(
        self,
        kind: str,
        geometry: Geometry,
        a: Tensor,
        b: Tensor,
        out_shape: tuple[int, ...],
        channels: int = cupy_backend.CHANNELS_PER_THREAD,
        pixels: int = cupy_backend.PIXELS_PER_THREAD,
        misalign: bool = False,
        memory: str = "nchw",
        **plan,
    ) -> Tensor:
        """Launch one kernel on guarded copies of a and b (one element off vector alignment if misalign), as
        cupy_backend would launch it; check the guard bands; return the output. Tensors and out_shape are in
        memory order (see _to_memory)."""
        launch = cupy_backend.plan_launch(
            kind, geometry, channels_per_thread=channels, pixels_per_thread=pixels, memory=memory, **plan
        )
        return self.run_planned(launch, a, b, out_shape, misalign)

    def run_planned(
        self, launch: cupy_backend.Launch, a: Tensor, b: Tensor, out_shape: tuple[int, ...], misalign: bool = False
    ) -> Tensor:
        """Run a launch as planned (its kernel, grid, block and compiled split) on guarded copies; see run."""
        offset = GUARD + int(misalign)
        a, a_buffer = _guarded(a, offset)
        b, b_buffer = _guarded(b, offset)
        out, out_buffer = _guarded(torch.full(out_shape, float("nan"), dtype=a.dtype), offset)
        values = [ctypes.c_void_p(t.data_ptr()) for t in (a, b, out)] + [ctypes.c_int32(s) for s in launch.geometry]
        args = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        library = self.library(a.dtype, launch.channels_per_thread, launch.pixels_per_thread)
        getattr(library, f"emulate_{launch.kernel}")(ctypes.c_uint(launch.grid), ctypes.c_uint(launch.block), args)
        for inner, buffer in ((a, a_buffer), (b, b_buffer), (out, out_buffer)):
            guards = torch.cat([buffer[:offset], buffer[offset + inner.numel() :]])
            assert guards.isnan().all(), f"{launch.kernel} wrote outside its output"
        return out


@pytest.fixture(scope="session")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> EmulatedKernels:
    """Builds on demand, once per test session."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        message = "no host C++ compiler (g++ or $CXX) to build the kernel emulation: apt-get install g++"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return EmulatedKernels(compiler, tmp_path_factory.mktemp("host_emulation"))


def _guarded(t: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """A contiguous copy of t at `offset` elements into a NaN-filled buffer; returns (copy, buffer)."""
    buffer = torch.full((t.numel() + offset + GUARD,), float("nan"), dtype=t.dtype)
    inner = buffer[offset : offset + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner, buffer


def _problem(case: tuple, dtype: torch.dtype, seed: int = 0):
    n, c, g, h, w, k, s, d, p = case
    p = d * (k - 1) // 2 if p is None else p
    h_out, w_out = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in (h, w))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64)
    weight = torch.randn(n, g, k, k, h_out, w_out, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(n, c, h_out, w_out, generator=generator, dtype=torch.float64)
    geometry = Geometry(n, c, h, w, g, k, h_out, w_out, s, p, d)
    return geometry, x.to(dtype), weight.to(dtype), grad_out.to(dtype)


def _reference(geometry: Geometry, x: Tensor, weight: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Forward, grad_x and grad_weight of the "unfold" backend in float64 (gradients by autograd)."""
    x = x.double().requires_grad_()
    weight = weight.double().requires_grad_()
    out = ops.involution(x, weight, geometry.stride, geometry.pad, geometry.dil, backend="unfold")
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out.double())
    return out.detach(), grad_x, grad_w


def _tolerances(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


def _to_memory(t: Tensor, memory: str) -> Tensor:
    """t in the order the kernels of `memory` read it: NHWC images, (N, Ho, Wo, G, K, K) weights."""
    if memory == "nchw":
        return t
    return t.permute(0, 2, 3, 1).contiguous() if t.dim() == 4 else t.permute(0, 4, 5, 1, 2, 3).contiguous()


def _from_memory(t: Tensor, memory: str) -> Tensor:
    """The logical (N, C, H, W) or (N, G, K, K, Ho, Wo) view of a kernel's output."""
    if memory == "nchw":
        return t
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t.permute(0, 3, 4, 5, 1, 2)


def _memory_shape(shape: tuple[int, ...], memory: str) -> tuple[int, ...]:
    if memory == "nchw":
        return shape
    order = (0, 2, 3, 1) if len(shape) == 4 else (0, 4, 5, 1, 2, 3)
    return tuple(shape[i] for i in order)


def _run_logical(emulated, kind, geometry, a, b, shape, memory="nchw", **options) -> Tensor:
    """emulated.run on logical tensors and shape, laid out for `memory` and back."""
    a, b = _to_memory(a, memory), _to_memory(b, memory)
    out = emulated.run(kind, geometry, a, b, _memory_shape(shape, memory), memory=memory, **options)
    return _from_memory(out, memory)


def _check_all_kernels(
    emulated: EmulatedKernels, case: tuple, dtype: torch.dtype, seed: int = 0, memory: str = "nchw", **options
) -> None:
    """Forward, grad-input and grad-weight of one case against the unfold reference."""
    geometry, x, weight, grad_out = _problem(case, dtype, seed)
    expected_out, expected_gx, expected_gw = _reference(geometry, x, weight, grad_out)
    n, c, h, w, g, k, h_out, w_out = geometry[:8]
    tolerances = _tolerances(dtype)
    out = _run_logical(emulated, "forward", geometry, x, weight, (n, c, h_out, w_out), memory, **options)
    torch.testing.assert_close(out.double(), expected_out, **tolerances, msg=lambda m: f"{memory} forward: {m}")
    grad_x = _run_logical(emulated, "grad_input", geometry, grad_out, weight, (n, c, h, w), memory, **options)
    torch.testing.assert_close(grad_x.double(), expected_gx, **tolerances, msg=lambda m: f"{memory} grad_x: {m}")
    shape = (n, g, k, k, h_out, w_out)
    grad_w = _run_logical(emulated, "grad_weight", geometry, grad_out, x, shape, memory, **options)
    torch.testing.assert_close(grad_w.double(), expected_gw, **tolerances, msg=lambda m: f"{memory} grad_w: {m}")


@pytest.mark.parametrize("memory", cupy_backend.LAYOUTS)
@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_match_unfold(emulated, case, dtype, index_bits, memory) -> None:
    _check_all_kernels(emulated, case, dtype, index_bits=index_bits, memory=memory)


@pytest.mark.parametrize("memory", cupy_backend.LAYOUTS)
@pytest.mark.parametrize("case", CASES[:5], ids=_case_id)
def test_unaligned_tensors(emulated, case, memory) -> None:
    """Tensors one element off vector alignment take the scalar paths; results must not change."""
    _check_all_kernels(emulated, case, torch.float32, seed=3, misalign=True, memory=memory)


@pytest.mark.parametrize("memory", cupy_backend.LAYOUTS)
@pytest.mark.parametrize("channels,pixels", [(4, 1), (4, 4), (1, 2)])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[6]], ids=_case_id)
def test_other_work_splits(emulated, case, channels, pixels, memory) -> None:
    """The source stays correct for other compile-time splits of the work (groups over several runs of
    channels, one or four pixels per thread), so they can be tuned on a GPU without rewriting."""
    _check_all_kernels(emulated, case, torch.float64, seed=4, channels=channels, pixels=pixels, memory=memory)


@pytest.mark.parametrize("memory", cupy_backend.LAYOUTS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=_case_id)
def test_64bit_kernels_with_their_own_split(emulated, case, memory) -> None:
    """The GPU path compiles the 64-bit-index kernels with cupy_backend.WIDE_INDEX_SPLIT (fewer registers)."""
    channels, pixels = cupy_backend.default_split(64)
    _check_all_kernels(
        emulated, case, torch.float32, seed=7, channels=channels, pixels=pixels, index_bits=64, memory=memory
    )


@pytest.mark.parametrize("memory", cupy_backend.LAYOUTS)
@pytest.mark.parametrize("kind", cupy_backend.KERNEL_KINDS)
def test_grid_stride_loop_covers_all_work(emulated, kind, memory) -> None:
    """With fewer threads than work items (one block), each thread loops; the result must not change."""
    geometry, x, weight, grad_out = _problem(MANY_BLOCKS_CASE, torch.float64, seed=1)
    n, c, h, w, g, k, h_out, w_out = geometry[:8]
    inputs, shape = {
        "forward": ((x, weight), (n, c, h_out, w_out)),
        "grad_input": ((grad_out, weight), (n, c, h, w)),
        "grad_weight": ((grad_out, x), (n, g, k, k, h_out, w_out)),
    }[kind]
    assert cupy_backend.plan_launch(kind, geometry, memory=memory).grid > 1, "pick a case that needs several blocks"
    full = _run_logical(emulated, kind, geometry, *inputs, shape, memory)
    one_block = _run_logical(emulated, kind, geometry, *inputs, shape, memory, max_blocks=1)
    torch.testing.assert_close(one_block, full, rtol=0, atol=0)


def test_every_entry_point_is_built(emulated) -> None:
    """The names plan_launch can return exist in the compiled source."""
    geometry = _problem(CASES[0], torch.float32)[0]
    library = emulated.library(torch.float32, cupy_backend.CHANNELS_PER_THREAD, cupy_backend.PIXELS_PER_THREAD)
    planned = {
        cupy_backend.plan_launch(kind, geometry, index_bits=bits, memory=memory).kernel
        for kind in cupy_backend.KERNEL_KINDS
        for bits in (32, 64)
        for memory in cupy_backend.LAYOUTS
    }
    assert planned == set(cupy_backend.kernel_names())
    for name in planned:
        assert hasattr(library, f"emulate_{name}"), name


def _kind_and_memory(kernel: str) -> tuple[str, str]:
    """("grad_input", "nhwc") from "involution_grad_input_nhwc_i32"."""
    kind = next(k for k in cupy_backend.KERNEL_KINDS if kernel.startswith(f"involution_{k}_"))
    return kind, "nhwc" if "_nhwc_" in kernel else "nchw"


@pytest.fixture
def gpu_launches(emulated, monkeypatch) -> list[tuple[str, str]]:
    """Swaps cupy_backend's CuPy launch (_run) for the emulation, so everything before it (the backend functions,
    _launch, plan_launch) runs as on a GPU; returns the (kind, memory) of every launch made."""
    launches = []

    def run(launch, a, b, out):
        kind, memory = _kind_and_memory(launch.kernel)
        launches.append((kind, memory))
        assert out.numel() > 0, "an empty output launches nothing"
        as_memory = [_to_memory(t, memory) for t in (a, b, out)]
        # The kernels read raw memory: each tensor must already lie in the layout's order, without a copy.
        for t, m in zip((a, b, out), as_memory):
            assert t.data_ptr() == m.data_ptr() and m.is_contiguous(), (kind, memory, t.shape, t.stride())
        as_memory[2].copy_(emulated.run_planned(launch, *as_memory[:2], tuple(as_memory[2].shape)))

    monkeypatch.setattr(cupy_backend, "_run", run)
    return launches


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_case_id)
def test_backend_functions_with_emulated_launch(gpu_launches, case, channels_last) -> None:
    """cupy_backend.forward/grad_input/grad_weight end to end, with only the CuPy launch swapped for the emulation:
    checks the Python side (layouts, output shapes and strides, argument order) that a GPU run relies on."""
    geometry, x, weight, grad_out = _problem(case, torch.float64, seed=2)
    expected_out, expected_gx, expected_gw = _reference(geometry, x, weight, grad_out)
    if channels_last:  # as in a channels_last model: NHWC images, pixel-major kernels
        x, grad_out = (
            x.contiguous(memory_format=torch.channels_last),
            grad_out.contiguous(memory_format=torch.channels_last),
        )
        weight = weight.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)
    else:  # same values, other strides: the backend makes them contiguous
        weight = weight.transpose(-1, -2).contiguous().transpose(-1, -2)
        grad_out = grad_out.transpose(-1, -2).contiguous().transpose(-1, -2)
    conv = (geometry.stride, geometry.pad, geometry.dil)

    out = cupy_backend.forward(x, weight, *conv)
    grad_x = cupy_backend.grad_input(grad_out, weight, (geometry.H, geometry.W), geometry.C, *conv, channels_last)
    grad_w = cupy_backend.grad_weight(grad_out, x, geometry.K, geometry.G, *conv)
    assert [memory for _, memory in gpu_launches] == ["nhwc" if channels_last else "nchw"] * 3
    for result, expected in ((out, expected_out), (grad_x, expected_gx), (grad_w, expected_gw)):
        torch.testing.assert_close(result, expected, **_tolerances(torch.float64))
    assert layout.is_channels_last(out) == layout.is_channels_last(grad_x) == channels_last
    assert layout.is_pixel_major(grad_w) == channels_last


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_op_with_autograd_on_emulated_kernels(gpu_launches, monkeypatch, channels_last) -> None:
    """ops.involution with backend "cupy" through the custom ops and autograd, the kernels emulated: a channels_last
    model's tensors go to the NHWC kernels without conversions, and gradients come back in the same layouts."""
    geometry, x, weight, grad_out = _problem(CASES[3], torch.float64, seed=5)
    expected = _reference(geometry, x, weight, grad_out)
    # After the reference: from here on, every backend resolves to "cupy" (CPU tensors included).
    monkeypatch.setattr(sys.modules["ops.involution"], "_resolve_backend", lambda backend, x: "cupy")
    x = layout.to_layout(x.detach(), channels_last).requires_grad_()
    weight = layout.weight_to_layout(weight.detach(), channels_last).requires_grad_()
    grad_out = layout.to_layout(grad_out, channels_last)
    out = ops.involution(x, weight, geometry.stride, geometry.pad, geometry.dil, backend="cupy")
    out.backward(grad_out)
    memory = "nhwc" if channels_last else "nchw"
    assert sorted(gpu_launches) == [(kind, memory) for kind in sorted(cupy_backend.KERNEL_KINDS)]
    for result, reference in zip((out, x.grad, weight.grad), expected):
        torch.testing.assert_close(result.detach(), reference, **_tolerances(torch.float64))
    assert layout.is_channels_last(out) == layout.is_channels_last(x.grad) == channels_last
    assert layout.is_pixel_major(weight.grad) == channels_last


def test_tuning_script_on_emulated_kernels(gpu_launches, monkeypatch) -> None:
    """scripts/tune_kernels.py, its GPU launches and timer swapped for the emulation: every split it would try on a
    GPU builds, runs in both layouts and agrees with the default split (so a lent GPU's minutes are not lost)."""
    from scripts import benchmark_op, tune_kernels

    monkeypatch.setattr(tune_kernels, "time_launch", lambda launch: (launch(), 0.0)[1])
    shape = benchmark_op.Shape("tiny", channels=32, size=9, kernel_size=3, stride=2)
    for memory, splits in tune_kernels.SPLITS.items():
        problems = tune_kernels.kernel_problems(shape, 2, torch.float64, memory, device="cpu")
        for kind, problem in problems.items():
            assert tune_kernels.time_splits(kind, memory, splits, *problem) == [0.0] * len(splits)
            assert not problem[-1].isnan().any(), (kind, memory)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[3], (1, 32, 2, 9, 9, 3, 9, 1, None)], ids=_case_id)  # the 2nd: Ho = Wo = 1
def test_op_copies_nothing_when_inputs_are_in_layout(monkeypatch, case, channels_last) -> None:
    """With inputs already in x's layout (as a model hands them over), the "cupy" path from ops.involution to the
    kernels, and its backward, move no data besides the kernels' own (the launch is stubbed out here)."""
    launched = []
    monkeypatch.setattr(
        cupy_backend, "_launch", lambda kind, geometry, a, b, out, memory: launched.append(memory) or out
    )
    geometry, x, weight, grad_out = _problem(case, torch.float64, seed=6)
    monkeypatch.setattr(sys.modules["ops.involution"], "_resolve_backend", lambda backend, x: "cupy")
    x = layout.to_layout(x.detach(), channels_last).requires_grad_()
    weight = layout.weight_to_layout(weight.detach(), channels_last).requires_grad_()
    grad_out = layout.to_layout(grad_out, channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = ops.involution(x, weight, geometry.stride, geometry.pad, geometry.dil, backend="cupy")
        out.backward(grad_out)
    copies = [e.name for e in profile.events() if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy")]
    assert copies == [], copies
    assert launched == ["nhwc" if channels_last else "nchw"] * 3


@pytest.mark.parametrize(
    "geometry,bits",
    [
        # C = 1, 12000 x 12000: every tensor has 1.44e8 elements, but grad_weight's threads form the offset
        # (c0 + k) * Ho*Wo for all 16 channels of their run: 2.3e9, past int32.
        (Geometry(1, 1, 12000, 12000, 1, 3, 12000, 12000, 1, 1, 1), 64),
        (Geometry(1, 16, 11000, 11000, 1, 3, 11000, 11000, 1, 1, 1), 32),  # 1.94e9: a full run, still int32
        (Geometry(1, 16, 11600, 11600, 1, 3, 11600, 11600, 1, 1, 1), 64),  # 2.15e9 elements
        (Geometry(2, 32, 7, 7, 2, 3, 7, 7, 1, 1, 1), 32),
    ],
    ids=["C1-12000px", "C16-11000px", "C16-11600px", "small"],
)
def test_index_width_covers_every_offset_a_thread_forms(geometry, bits) -> None:
    """plan_launch takes the 32-bit kernels only when no index or offset a thread computes can pass int32, the
    unused channels of a thread's last run included."""
    for kind in cupy_backend.KERNEL_KINDS:
        for memory in cupy_backend.LAYOUTS:
            assert cupy_backend.plan_launch(kind, geometry, memory=memory).index_bits == bits, (kind, memory)


# (N, C, G, H, W, K, stride, dilation, padding): sizes at the edges of what the kernels and their planning handle.
EDGE_CASES = {
    "empty_batch": (0, 16, 2, 9, 9, 3, 1, 1, 1),
    "no_channels": (2, 0, 2, 5, 5, 3, 1, 1, 1),
    "one_pixel_input": (2, 4, 2, 1, 1, 3, 1, 1, 1),
    "one_output_pixel": (2, 16, 2, 9, 9, 3, 9, 1, 1),
    "K1": (2, 16, 2, 9, 8, 1, 1, 1, 0),
    "even_K": (1, 4, 2, 6, 7, 4, 1, 1, 1),
    "even_K_stride2_dilation2": (1, 6, 3, 9, 8, 2, 2, 2, 1),
    "window_larger_than_image": (1, 4, 1, 3, 2, 7, 1, 1, 3),
    "padding_beyond_window": (2, 16, 2, 5, 6, 3, 1, 1, 4),
    "stride_beyond_window": (1, 8, 2, 11, 10, 3, 4, 1, 1),
    "one_channel_per_group_dilation3": (1, 5, 5, 6, 6, 3, 1, 3, 3),
}


def _edge_inputs(case: tuple, layout_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """x, weight and a (C, Wo) gradient for out.sum(dim=(0, 2)), in one of three layouts: "nchw", "channels_last"
    (as a channels_last model hands them over) or "strided" (x a strided view, weight with transposed strides)."""
    n, c, g, h, w, k, s, d, p = case
    h_out, w_out = (shapes.output_size(size, k, s, p, d) for size in (h, w))
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(n, c, h, 2 * w, generator=generator, dtype=torch.float64)
    weight = torch.randn(n, g, k, k, w_out, h_out, generator=generator, dtype=torch.float64).transpose(-1, -2)
    grad = torch.randn(c, w_out, generator=generator, dtype=torch.float64)
    if layout_name == "strided":
        return x[..., ::2], weight, grad
    channels_last = layout_name == "channels_last"
    return layout.to_layout(x[..., ::2], channels_last), layout.weight_to_layout(weight, channels_last), grad


def _forward_backward(x, weight, grad, conv, backend, needs=(True, True)):
    """out and the two gradients of out.sum(dim=(0, 2)) against grad: grad_out reaches the op expanded (stride 0
    along N and Ho), as from any sum."""
    x, weight = x.detach().requires_grad_(needs[0]), weight.detach().requires_grad_(needs[1])
    out = ops.involution(x, weight, *conv, backend=backend)
    inputs = [t for t in (x, weight) if t.requires_grad]
    grads = iter(torch.autograd.grad(out.sum(dim=(0, 2)), inputs, grad))  # the op's own outputs, not accumulated
    return out.detach(), *(next(grads) if t.requires_grad else None for t in (x, weight))


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("case", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_shapes_on_emulated_kernels(gpu_launches, monkeypatch, case, layout_name) -> None:
    """ops.involution(backend="cupy") end to end, kernels emulated, at edge sizes (empty batch, no channels, 1-pixel
    input and output, even K, windows larger than the image, stride beyond the window), for NCHW, channels_last and
    strided inputs, with an expanded grad_out: shapes, dtypes, layouts and values equal the "unfold" and "torch"
    backends', and an empty output launches no kernel."""
    x, weight, grad = _edge_inputs(case, layout_name)
    conv = (case[6], case[8], case[7])  # stride, padding, dilation
    expected = _forward_backward(x, weight, grad, conv, "unfold")
    torch_results = _forward_backward(x, weight, grad, conv, "torch")
    monkeypatch.setattr(sys.modules["ops.involution"], "_resolve_backend", lambda backend, x: "cupy")
    results = _forward_backward(x, weight, grad, conv, "cupy")
    for name, got, reference, other in zip(("out", "grad_x", "grad_weight"), results, expected, torch_results):
        assert got.shape == reference.shape == other.shape, name
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    channels_last = layout.is_channels_last(x)  # the layout of the outputs, with exactly the strides of the fakes
    for got in results:
        empty = layout.empty_image if got.dim() == 4 else layout.empty_weight
        assert got.stride() == empty(got, tuple(got.shape), channels_last).stride()
    n, c = case[:2]
    kinds = sorted(kind for kind, _ in gpu_launches)
    if n == 0:
        assert kinds == []
    elif c == 0:
        assert kinds == ["grad_weight"]  # its output (N, G, K, K, Ho, Wo) is not empty: zeros
    else:
        assert kinds == sorted(cupy_backend.KERNEL_KINDS)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["x_only", "weight_only"])
def test_backward_launches_only_the_needed_kernels(gpu_launches, monkeypatch, needs) -> None:
    case = EDGE_CASES["padding_beyond_window"]
    x, weight, grad = _edge_inputs(case, "nchw")
    conv = (case[6], case[8], case[7])
    monkeypatch.setattr(sys.modules["ops.involution"], "_resolve_backend", lambda backend, x: "cupy")
    _, grad_x, grad_w = _forward_backward(x, weight, grad, conv, "cupy", needs)
    assert (grad_x is not None, grad_w is not None) == needs
    expected = ["forward", "grad_input" if needs[0] else "grad_weight"]
    assert [kind for kind, _ in gpu_launches] == expected


@pytest.mark.parametrize("backend", ["cupy", "torch"])
def test_double_backward_is_refused_clearly(gpu_launches, monkeypatch, backend) -> None:
    """create_graph=True works (first-order gradients are exact), but differentiating those gradients raises an
    error that names the cause and the backend that can do it."""
    x, weight, grad = _edge_inputs(EDGE_CASES["even_K"], "nchw")
    conv = (1, 1, 1)
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    expected = _forward_backward(x, weight, grad, conv, "unfold")
    if backend == "cupy":
        monkeypatch.setattr(sys.modules["ops.involution"], "_resolve_backend", lambda backend, x: "cupy")
    out = ops.involution(x, weight, *conv, backend=backend)
    grad_x, grad_w = torch.autograd.grad(out.sum(dim=(0, 2)), (x, weight), grad, create_graph=True)
    torch.testing.assert_close((grad_x, grad_w), expected[1:])
    for first_order in (grad_x, grad_w):
        with pytest.raises(NotImplementedError, match="double backward.*backend='unfold'"):
            first_order.square().sum().backward(retain_graph=True)
    assert len(gpu_launches) == (3 if backend == "cupy" else 0)
