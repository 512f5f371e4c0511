"""Runs the CUDA kernels of ops/kernels/involution.cu on the CPU and checks them against the "unfold" reference.

The unchanged .cu file is compiled by the host C++ compiler through tests/host_emulation/cuda_host_shim.h, and
tests/host_emulation/launcher.cpp runs each grid block by block, thread by thread, with the launch shape the GPU
path uses (cupy_backend.plan_launch). Inputs sit between NaN guard bands, so a read out of bounds shows up as
NaN, and outputs start as NaN, so an element no thread writes shows up too. float32 and float64 only: the
half types need CUDA's headers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import Tensor

import ops
from ops import cupy_backend
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


@pytest.fixture(scope="session")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, ctypes.CDLL]:
    """The kernels built for the host, one shared library per dtype (built once per test session)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        message = "no host C++ compiler (g++ or $CXX) to build the kernel emulation: apt-get install g++"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    build_dir = tmp_path_factory.mktemp("host_emulation")
    libraries = {}
    for dtype in DTYPES:
        library = build_dir / f"libinvolution_{cupy_backend.SCALAR_TYPES[dtype]}.so"
        command = [
            compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
            "-include", str(SHIM_DIR / "cuda_host_shim.h"),
            *cupy_backend.compile_defines(dtype),
            f'-DINVOLUTION_KERNEL_FILE="{cupy_backend.KERNEL_FILE}"',
            str(SHIM_DIR / "launcher.cpp"), "-o", str(library),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"host build failed:\n{' '.join(command)}\n{result.stderr}"
        libraries[dtype] = ctypes.CDLL(str(library))
    return libraries


def _guarded(t: Tensor) -> tuple[Tensor, Tensor]:
    """A contiguous copy of t inside a NaN-filled buffer; returns (copy, buffer)."""
    buffer = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    inner = buffer[GUARD : GUARD + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner, buffer


def _run(lib: ctypes.CDLL, kind: str, geometry: Geometry, a: Tensor, b: Tensor, out_shape, **plan) -> Tensor:
    """Launch one emulated kernel on guarded copies of a, b; check the guards; return the output."""
    a, a_buffer = _guarded(a)
    b, b_buffer = _guarded(b)
    out, out_buffer = _guarded(torch.full(out_shape, float("nan"), dtype=a.dtype))
    launch = cupy_backend.plan_launch(kind, geometry, **plan)
    values = [ctypes.c_void_p(t.data_ptr()) for t in (a, b, out)] + [ctypes.c_int32(s) for s in launch.geometry]
    args = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    getattr(lib, f"emulate_{launch.kernel}")(ctypes.c_uint(launch.grid), ctypes.c_uint(launch.block), args)
    for buffer in (a_buffer, b_buffer, out_buffer):
        guards = torch.cat([buffer[:GUARD], buffer[-GUARD:]])
        assert guards.isnan().all(), f"{launch.kernel} wrote outside its output"
    return out


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


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_match_unfold(emulated, case, dtype, index_bits) -> None:
    geometry, x, weight, grad_out = _problem(case, dtype)
    expected_out, expected_gx, expected_gw = _reference(geometry, x, weight, grad_out)
    lib = emulated[dtype]
    plan = {"index_bits": index_bits}
    n, c, h, w, g, k, h_out, w_out = geometry[:8]

    out = _run(lib, "forward", geometry, x, weight, (n, c, h_out, w_out), **plan)
    torch.testing.assert_close(out.double(), expected_out, **_tolerances(dtype))
    grad_x = _run(lib, "grad_input", geometry, grad_out, weight, (n, c, h, w), **plan)
    torch.testing.assert_close(grad_x.double(), expected_gx, **_tolerances(dtype))
    grad_w = _run(lib, "grad_weight", geometry, grad_out, x, (n, g, k, k, h_out, w_out), **plan)
    torch.testing.assert_close(grad_w.double(), expected_gw, **_tolerances(dtype))


@pytest.mark.parametrize("kind", cupy_backend.KERNEL_KINDS)
def test_grid_stride_loop_covers_all_work(emulated, kind) -> None:
    """With fewer threads than work items (one block), each thread loops; the result must not change."""
    geometry, x, weight, grad_out = _problem(MANY_BLOCKS_CASE, torch.float64, seed=1)
    lib = emulated[torch.float64]
    n, c, h, w, g, k, h_out, w_out = geometry[:8]
    inputs, shape = {
        "forward": ((x, weight), (n, c, h_out, w_out)),
        "grad_input": ((grad_out, weight), (n, c, h, w)),
        "grad_weight": ((grad_out, x), (n, g, k, k, h_out, w_out)),
    }[kind]
    assert cupy_backend.plan_launch(kind, geometry).grid > 1, "pick a case that needs several blocks"
    full = _run(lib, kind, geometry, *inputs, shape)
    one_block = _run(lib, kind, geometry, *inputs, shape, max_blocks=1)
    torch.testing.assert_close(one_block, full, rtol=0, atol=0)


def test_every_entry_point_is_built(emulated) -> None:
    """The names plan_launch can return exist in the compiled source."""
    geometry = _problem(CASES[0], torch.float32)[0]
    for kind in cupy_backend.KERNEL_KINDS:
        for bits in (32, 64):
            name = cupy_backend.plan_launch(kind, geometry, index_bits=bits).kernel
            assert hasattr(emulated[torch.float32], f"emulate_{name}"), name


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_case_id)
def test_backend_functions_with_emulated_launch(emulated, monkeypatch, case) -> None:
    """cupy_backend.forward/grad_input/grad_weight end to end, with only the CuPy launch swapped for the emulation:
    checks the Python side (layouts made contiguous, output shapes, argument order) that a GPU run relies on."""

    def emulated_launch(kind, geometry, a, b, out):
        assert a.is_contiguous() and b.is_contiguous() and out.is_contiguous()
        return out.copy_(_run(emulated[out.dtype], kind, geometry, a, b, out.shape))

    monkeypatch.setattr(cupy_backend, "_launch", emulated_launch)
    geometry, x, weight, grad_out = _problem(case, torch.float64, seed=2)
    expected_out, expected_gx, expected_gw = _reference(geometry, x, weight, grad_out)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    grad_out = grad_out.transpose(-1, -2).contiguous().transpose(-1, -2)
    conv = (geometry.stride, geometry.pad, geometry.dil)

    out = cupy_backend.forward(x, weight, *conv)
    grad_x = cupy_backend.grad_input(grad_out, weight, (geometry.H, geometry.W), geometry.C, *conv)
    grad_w = cupy_backend.grad_weight(grad_out, x, geometry.K, geometry.G, *conv)
    for result, expected in ((out, expected_out), (grad_x, expected_gx), (grad_w, expected_gw)):
        torch.testing.assert_close(result, expected, **_tolerances(torch.float64))
