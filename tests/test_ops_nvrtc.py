"""Compiles ops/kernels/involution.cu with NVRTC, as cupy.RawModule does, for every dtype and several GPUs.

No GPU needed: NVRTC (cuda.bindings.nvrtc, which comes with cupy-cuda13x / torch's CUDA wheels) only compiles.
The options are CuPy's own (cupy._core.core.assemble_cupy_compiler_options plus the flags its compiler adds),
with the architecture given explicitly: compute_75 (Turing, the oldest CUDA 13 NVRTC accepts), compute_80
(A100) and compute_90 (H100), and sm_80/sm_90/sm_100 binaries, as CuPy builds them, to check that no kernel
spills to local memory and that the registers leave room for two blocks per SM.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from ops import cupy_backend, occupancy

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARCHITECTURES = ["compute_75", "compute_80", "compute_90"]
DTYPES = list(cupy_backend.SCALAR_TYPES)
ENTRY_POINTS = cupy_backend.kernel_names()


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as error:
        _missing(f"cuda.bindings.nvrtc is unavailable ({error}): pip install -e '.[cuda]' (cuda-bindings)")
    return nvrtc


def _cupy_options(dtype: torch.dtype, *module: int) -> list[str]:
    """What cupy.RawModule(code, options=compile_options(dtype, *module)) hands NVRTC, less the architecture."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options
    except ImportError as error:
        _missing(f"CuPy is unavailable ({error}): pip install -e '.[cuda]'")
    options = assemble_cupy_compiler_options(cupy_backend.compile_options(dtype, *module))
    # cupy.cuda.compiler adds these on the way to NVRTC (with -arch, and --pch only when asked for). -ftz=true flushes
    # float32 subnormals to zero in the kernels (see ops/cupy_backend.py); CuPy gives no way to turn it off.
    return [*options, "-ftz=true", "--device-as-default-execution-space"]


def _compile(nvrtc, dtype: torch.dtype, options: list[str]) -> tuple[str, bytes]:
    """Compile the kernel source; returns (NVRTC's log, PTX). Fails the test with the log on any error."""
    error, program = nvrtc.nvrtcCreateProgram(cupy_backend.kernel_source().encode(), b"involution.cu", 0, [], [])
    assert error == nvrtc.nvrtcResult.NVRTC_SUCCESS, error
    try:
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        # A mutable buffer: NVRTC writes into it, and writing into `b" " * size` would corrupt CPython's shared
        # one-byte bytes objects when size is 1 (an empty log), breaking torch.save/torch.load for the whole process.
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(program, log)
        log = bytes(log).rstrip(b"\0 ").decode(errors="replace")
        assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, (
            f"NVRTC failed for {cupy_backend.SCALAR_TYPES[dtype]} with options {options}:\n{log}"
        )
        _, size = nvrtc.nvrtcGetPTXSize(program)
        ptx = bytearray(size)
        nvrtc.nvrtcGetPTX(program, ptx)
        return log, bytes(ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiles_to_ptx(nvrtc, dtype: torch.dtype, architecture: str) -> None:
    log, ptx = _compile(nvrtc, dtype, [*_cupy_options(dtype), f"--gpu-architecture={architecture}"])
    assert "warning" not in log.lower(), f"NVRTC warnings for {cupy_backend.SCALAR_TYPES[dtype]}:\n{log}"
    entries = set(re.findall(rb"\.entry\s+(\w+)", ptx))
    missing = [name for name in ENTRY_POINTS if name.encode() not in entries]
    assert not missing, f"entry points missing from the PTX: {missing} (found {sorted(entries)})"
    # Pixel runs (NCHW) and channel runs (NHWC) are meant to move as vectors when aligned: the compiler must have
    # kept them as such, in every kernel that loads them.
    assert re.search(rb"ld\.global(\.nc)?\.v\d\.", ptx) and re.search(rb"st\.global\.v\d\.", ptx), "no vector loads"
    for name in ENTRY_POINTS:
        if "_nhwc_" in name:
            body = ptx[ptx.index(b".entry " + name.encode()) :]
            body = body[: body.index(b"\n}\n")]
            assert re.search(rb"ld\.global(\.nc)?\.v\d\.", body), f"{name}: channels are not loaded as vectors"


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("architecture", list(occupancy.SM_LIMITS))
def test_kernels_fit_two_blocks_per_sm_without_spills(nvrtc, architecture, dtype, index_bits) -> None:
    """Each module as the GPU path compiles it (its dtype, index width and split of the work), to a cubin as CuPy
    does (-arch=sm_XX): no kernel spills to local memory, and every fp32/fp16/bf16 kernel's registers leave room for
    MIN_BLOCKS_PER_SM (2) blocks of BLOCK_SIZE threads per SM, so at least 16 warps hide memory latency."""
    split = cupy_backend.default_split(index_bits)
    options = [*_cupy_options(dtype, *split, index_bits), f"-arch={architecture}", "--ptxas-options=-v"]
    log, _ = _compile(nvrtc, dtype, options)
    kernels = occupancy.parse_ptxas_log(log)
    names = cupy_backend.kernel_names(index_bits)
    assert sorted(kernels) == sorted(names), f"expected ptxas statistics for every kernel:\n{log}"
    spills = {name: r for name, r in kernels.items() if r.spill_stores or r.spill_loads or r.stack_bytes}
    assert not spills, f"{architecture} {dtype}: kernels spill to local memory: {spills}"
    limits = occupancy.SM_LIMITS[architecture]
    blocks = {
        name: occupancy.blocks_per_sm(r.registers, cupy_backend.BLOCK_SIZE, r.shared_bytes, limits)
        for name, r in kernels.items()
    }
    required = cupy_backend.min_blocks_per_sm(dtype)
    assert required == (1 if dtype == torch.float64 else 2)
    low = {name: (kernels[name].registers, b) for name, b in blocks.items() if b < required}
    assert not low, f"{architecture} {dtype}: (registers, blocks per SM) below {required} blocks: {low}"


def test_blocks_per_sm_follows_the_register_file() -> None:
    """256 threads = 8 warps; 65,536 registers per SM allocated per warp in units of 256."""
    assert occupancy.blocks_per_sm(128, 256) == 2  # 4096 registers per warp: 16 warps
    assert occupancy.blocks_per_sm(129, 256) == 1  # rounded up to 4352 per warp: 15 warps
    assert occupancy.blocks_per_sm(64, 256) == 4
    assert occupancy.blocks_per_sm(16, 256) == 8  # the 64-warp limit
    assert occupancy.blocks_per_sm(32, 256, shared_bytes=100 * 1024, limits=occupancy.SM_LIMITS["sm_80"]) == 1


def test_ptxas_log_is_parsed() -> None:
    log = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 1024 bytes smem, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
"""
    assert occupancy.parse_ptxas_log(log) == {
        "k1": occupancy.KernelResources(128, 4, 12, 1024, 8),
        "k2": occupancy.KernelResources(40, 0, 0, 0, 0),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cupy_compiler_builds_every_entry_point(monkeypatch, dtype: torch.dtype) -> None:
    """Through CuPy's own compile_using_nvrtc, the path RawModule takes, with whatever CuPy is installed.

    CuPy 13 and 14 add different options (13 adds --std=c++11, for one); scripts/check_cupy13.sh runs this test
    under CuPy 13. CuPy asks the current GPU for its architecture; without one, it is given here.
    """
    try:
        from cupy._core.core import assemble_cupy_compiler_options
        from cupy.cuda import compiler
    except ImportError as error:
        _missing(f"CuPy is unavailable ({error}): pip install -e '.[cuda]'")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=compute_{arch}", "ptx"))
    options = assemble_cupy_compiler_options(cupy_backend.compile_options(dtype))
    ptx, _ = compiler.compile_using_nvrtc(cupy_backend.kernel_source(), options=options, arch="75")
    ptx = ptx if isinstance(ptx, bytes) else ptx.encode()
    entries = set(re.findall(rb"\.entry\s+(\w+)", ptx))
    missing = [name for name in ENTRY_POINTS if name.encode() not in entries]
    assert not missing, f"CuPy {_cupy_version()} built no {missing} (found {sorted(entries)})"


def _cupy_version() -> str:
    import cupy

    return cupy.__version__


def test_cuda_headers_are_found() -> None:
    """cuda_fp16.h / cuda_bf16.h must be reachable: from CuPy's own include options or the backend's search."""
    if importlib.util.find_spec("cupy") is None:
        _missing("CuPy is not installed: pip install -e '.[cuda]'")
    directory = cupy_backend.find_cuda_include_dir()
    assert directory is not None and Path(directory, "cuda_bf16.h").is_file(), directory


def test_is_available_says_what_is_missing(monkeypatch) -> None:
    if not torch.cuda.is_available():
        available, reason = cupy_backend.is_available.__wrapped__()
        assert not available and "no CUDA device" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    available, reason = cupy_backend.is_available.__wrapped__()
    assert not available and "pip install cupy-cuda13x" in reason and "cupy-cuda12x" in reason
