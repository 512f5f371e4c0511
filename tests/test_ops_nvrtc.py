"""Compiles ops/kernels/involution.cu with NVRTC, as cupy.RawModule does, for every dtype and several GPUs.

No GPU needed: NVRTC (cuda.bindings.nvrtc, which comes with cupy-cuda13x / torch's CUDA wheels) only compiles.
The options are CuPy's own (cupy._core.core.assemble_cupy_compiler_options plus the flags its compiler adds),
with the architecture given explicitly: compute_75 (Turing, the oldest CUDA 13 NVRTC accepts), compute_80
(A100) and compute_90 (H100), and an sm_90 binary to check that nothing spills to local memory.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from ops import cupy_backend

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


def _cupy_options(dtype: torch.dtype) -> list[str]:
    """What cupy.RawModule(code, options=compile_options(dtype)) hands NVRTC, less the architecture."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options
    except ImportError as error:
        _missing(f"CuPy is unavailable ({error}): pip install -e '.[cuda]'")
    options = assemble_cupy_compiler_options(cupy_backend.compile_options(dtype))
    # cupy.cuda.compiler adds these on the way to NVRTC (with -arch, and --pch only when asked for).
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sm90_binary_does_not_spill(nvrtc, dtype: torch.dtype) -> None:
    """CuPy compiles straight to a cubin (-arch=sm_XX); register spills would cost memory traffic."""
    options = [*_cupy_options(dtype), "-arch=sm_90", "--ptxas-options=-v"]
    log, _ = _compile(nvrtc, dtype, options)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(ENTRY_POINTS), f"expected ptxas statistics for every kernel:\n{log}"
    assert not any(spills), f"register spills in the sm_90 build:\n{log}"


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
