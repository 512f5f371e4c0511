"""The "cupy" backend: the CUDA kernels of ops/kernels/involution.cu, compiled by CuPy (NVRTC) and launched on
PyTorch's current stream.

CuPy is imported lazily, so this module imports on machines without it. One module is compiled per device, dtype
and index width (sizes are kernel arguments, so new shapes never recompile); CuPy also caches the binary on disk.

Numerics: CuPy always compiles with -ftz=true, so float32 subnormals (|v| < 1.2e-38) read or produced by the kernels
are flushed to zero; the half types convert to float32 sums, and float64 is not affected. Results differ from the
"torch" backend by at most that (far below float32 rounding of normal values), which the tests' tolerances allow.

CUDA graphs: everything set up once per process, device or thread happens on the first call (the compile check in
probe(), compiling the kernels for the dtype and index width, CuPy's per-thread context set-up); later calls only
look up caches and launch. So capture works after one warm-up call with the same dtypes and sizes on the capturing
thread (as torch.cuda.graphs asks for anyway); a first call inside a capture would break it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ops import layout

__all__ = ["forward", "grad_input", "grad_weight", "is_available", "probe"]

# Runs on CUDA tensors only (see OP_BACKENDS in ops/involution.py).
DEVICE_TYPES = ("cuda",)

KERNEL_FILE = Path(__file__).resolve().parent / "kernels" / "involution.cu"
# Channels of a group and adjacent pixels of a row that one thread handles (registers per thread grow with both);
# RedNet has 16 channels per group.
CHANNELS_PER_THREAD = 16
PIXELS_PER_THREAD = 2
# The 64-bit-index kernels (tensors of 2^31 elements or more) need more registers for the same work: they take a
# smaller split, so that they too fit the register budget below without spilling (sm_100 spilled at 16 x 2).
WIDE_INDEX_SPLIT = (8, 1)
BLOCK_SIZE = 256
# Blocks of BLOCK_SIZE threads that must fit on one SM at once (__launch_bounds__): 2 caps the registers at 128 per
# thread (65,536 per SM), so at least 16 warps are resident to hide memory latency. float64 keeps 1: its sums need
# twice the registers and would spill at 128.
MIN_BLOCKS_PER_SM = 2
MIN_BLOCKS_PER_SM_FLOAT64 = 1
# Enough blocks to fill any current GPU many times over; the kernels loop over the rest (grid-stride).
MAX_BLOCKS = 65536
SCALAR_TYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
}
# The dtypes the kernels build for (see OP_BACKENDS in ops/involution.py): "auto" skips the backend for others.
DTYPES = tuple(SCALAR_TYPES)
KERNEL_KINDS = ("forward", "grad_input", "grad_weight")
LAYOUTS = ("nchw", "nhwc")
# channels_last tensors go to the NHWC kernels; False sends them through NCHW copies instead (for comparisons).
USE_NHWC_KERNELS = True
_INT32_MAX = 2**31 - 1
_INSTALL_HINT = "pip install cupy-cuda13x (CUDA 13 builds of torch) or cupy-cuda12x (CUDA 12 builds)"


class Geometry(NamedTuple):
    """The sizes every kernel takes, in the order of its int32 arguments (struct Geometry in the .cu file)."""

    N: int
    C: int
    H: int
    W: int
    G: int
    K: int
    Ho: int
    Wo: int
    stride: int
    pad: int
    dil: int


class Launch(NamedTuple):
    """One kernel launch: the entry point's name, a 1-D grid and block, the size arguments, and the compiled module
    it comes from (the split of a thread's work and the index width)."""

    kernel: str
    grid: int
    block: int
    geometry: Geometry
    channels_per_thread: int = CHANNELS_PER_THREAD
    pixels_per_thread: int = PIXELS_PER_THREAD
    index_bits: int = 32


def kernel_names(index_bits: int | None = None) -> list[str]:
    """The entry points of the kernel file: all, or those of one index width (32 or 64)."""
    return [
        f"involution_{kind}{'_nhwc' if memory == 'nhwc' else ''}_i{bits}"
        for memory in LAYOUTS
        for kind in KERNEL_KINDS
        for bits in (32, 64)
        if index_bits in (None, bits)
    ]


def default_split(index_bits: int) -> tuple[int, int]:
    """(channels, pixels) per thread of the modules the GPU path compiles for an index width."""
    return (CHANNELS_PER_THREAD, PIXELS_PER_THREAD) if index_bits == 32 else WIDE_INDEX_SPLIT


def min_blocks_per_sm(dtype: torch.dtype) -> int:
    """The blocks per SM that __launch_bounds__ keeps room for, for one dtype."""
    return MIN_BLOCKS_PER_SM_FLOAT64 if dtype == torch.float64 else MIN_BLOCKS_PER_SM


def plan_launch(
    kind: str,
    geometry: Geometry,
    max_blocks: int = MAX_BLOCKS,
    index_bits: int | None = None,
    channels_per_thread: int | None = None,
    pixels_per_thread: int | None = None,
    memory: str = "nchw",
) -> Launch:
    """Choose the entry point and launch shape for one kernel; shared by the GPU path and the host-emulation tests.

    Args:
        kind: "forward", "grad_input" or "grad_weight".
        geometry: the sizes.
        max_blocks: grid size cap (the kernels loop over the remaining work).
        index_bits: force the 32- or 64-bit variant; default: 32 bits whenever every index fits.
        channels_per_thread, pixels_per_thread: the split of a thread's work as compiled (compile_defines); default:
            default_split(index_bits). The NHWC kernels take one pixel.
        memory: "nchw" or "nhwc" (channels_last x, pixel-major weight; see ops/layout.py).

    Raises:
        ValueError: unknown kind, memory or index_bits.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind {kind!r} is unknown: choose one of {', '.join(KERNEL_KINDS)}")
    if memory not in LAYOUTS:
        raise ValueError(f"memory layout {memory!r} is unknown: choose one of {', '.join(LAYOUTS)}")
    if index_bits not in (None, 32, 64):
        raise ValueError(f"index_bits must be 32 or 64, got {index_bits}")
    split_given = channels_per_thread is not None and pixels_per_thread is not None
    if split_given:
        split = (channels_per_thread, pixels_per_thread)
    else:
        split = default_split(index_bits or 32)
    work, grid = _work_and_grid(kind, geometry, memory, split, max_blocks)
    if index_bits is None:
        index_bits = 32 if _largest_index(geometry, split[0], work, grid) <= _INT32_MAX else 64
        if index_bits == 64 and not split_given:
            split = default_split(64)
            work, grid = _work_and_grid(kind, geometry, memory, split, max_blocks)
    suffix = "_nhwc" if memory == "nhwc" else ""
    return Launch(f"involution_{kind}{suffix}_i{index_bits}", grid, BLOCK_SIZE, geometry, *split, index_bits)


def _largest_index(g: Geometry, channels_per_thread: int, work: int, grid: int) -> int:
    """The largest element offset or work index a 32-bit-index kernel may compute for this geometry.

    Tensor offsets count the channels of a group up to whole runs of channels_per_thread: grad_weight forms the
    grad_out offset (c0 + k) * Ho*Wo for every k of a thread's run, the unused channels past the group's end
    included (never read, but the int product must not overflow: with C = 1 and a 12000x12000 image the tensors
    have 1.4e8 elements and that product 2.3e9). The grid-stride loop steps past the last work index by up to one
    grid.
    """
    runs = -(-(g.C // g.G) // channels_per_thread)
    channels = max(g.C, g.G * runs * channels_per_thread)
    largest = max(g.N * channels * g.H * g.W, g.N * channels * g.Ho * g.Wo, g.N * g.G * g.K * g.K * g.Ho * g.Wo)
    return max(largest, work + grid * BLOCK_SIZE)


def _work_and_grid(kind: str, g: Geometry, memory: str, split: tuple[int, int], max_blocks: int) -> tuple[int, int]:
    """Threads' work items of one kernel (as its loop counts them) and the grid that covers them."""
    channels_per_thread, pixels_per_thread = split
    chunks = -(-(g.C // g.G) // channels_per_thread)
    if memory == "nhwc":
        pixels = {"forward": g.Ho * g.Wo, "grad_input": g.H * g.W, "grad_weight": g.Ho * g.Wo}[kind]
        work = g.N * g.G * pixels * (1 if kind == "grad_weight" else chunks)
    elif kind == "forward":
        work = g.N * g.G * chunks * g.Ho * -(-g.Wo // pixels_per_thread)
    elif kind == "grad_input":
        work = g.N * g.G * chunks * g.H * -(-g.W // pixels_per_thread)
    else:
        work = g.N * g.G * g.Ho * -(-g.Wo // pixels_per_thread)
    return work, max(1, min(math.ceil(work / BLOCK_SIZE), max_blocks))


@functools.cache
def kernel_source() -> str:
    """The CUDA source of the three kernels."""
    return KERNEL_FILE.read_text()


def compile_defines(
    dtype: torch.dtype,
    channels_per_thread: int = CHANNELS_PER_THREAD,
    pixels_per_thread: int = PIXELS_PER_THREAD,
    index_bits: int | None = None,
) -> tuple[str, ...]:
    """The -D options that select the element type, the work of one thread, the launch bounds and (unless None,
    which builds both) the index width of one compile.

    Raises:
        TypeError: a dtype the kernels do not support.
    """
    if dtype not in SCALAR_TYPES:
        supported = ", ".join(str(d) for d in SCALAR_TYPES)
        raise TypeError(f"involution backend 'cupy' supports {supported}; got {dtype}: cast the tensors")
    defines = (
        f"-DINVOLUTION_SCALAR={SCALAR_TYPES[dtype]}",
        f"-DINVOLUTION_CHANNELS_PER_THREAD={channels_per_thread}",
        f"-DINVOLUTION_PIXELS_PER_THREAD={pixels_per_thread}",
        f"-DINVOLUTION_BLOCK_SIZE={BLOCK_SIZE}",
        f"-DINVOLUTION_MIN_BLOCKS={min_blocks_per_sm(dtype)}",
    )
    return defines + ((f"-DINVOLUTION_INDEX_BITS={index_bits}",) if index_bits is not None else ())


def _has_fp16_header(directory: str | os.PathLike | None) -> bool:
    return bool(directory) and Path(directory, "cuda_fp16.h").is_file()


def find_cuda_include_dir() -> str | None:
    """A CUDA include directory with cuda_fp16.h/cuda_bf16.h, preferring the one of the NVRTC CuPy loads.

    CUDA 13 pip wheels put the headers under site-packages/nvidia/cu13/include, CUDA 12 wheels under
    nvidia/cuda_runtime/include; a system toolkit has them in $CUDA_PATH/include.
    """
    candidates: list[str | None] = []
    try:  # CuPy's CUDA root is where the NVRTC it loads lives
        import cupy

        root = cupy.cuda.get_cuda_path()
        candidates.append(os.path.join(root, "include") if root else None)
    except Exception:  # any failure just means: look elsewhere
        pass
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        candidates.append(find_nvidia_header_directory("cudart"))
    except Exception:
        pass
    for site in sys.path:
        for sub in ("cu13", "cu12", "cuda_runtime"):
            candidates.append(os.path.join(site, "nvidia", sub, "include"))
    for variable in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(variable):
            candidates.append(os.path.join(os.environ[variable], "include"))
    candidates.append("/usr/local/cuda/include")
    return next((str(c) for c in candidates if _has_fp16_header(c)), None)


@functools.cache
def compile_options(
    dtype: torch.dtype,
    channels_per_thread: int = CHANNELS_PER_THREAD,
    pixels_per_thread: int = PIXELS_PER_THREAD,
    index_bits: int | None = None,
) -> tuple[str, ...]:
    """Options for cupy.RawModule: the defines, plus the CUDA include directory when CuPy does not add one.
    (CuPy adds -ftz=true and the architecture itself.)"""
    options = compile_defines(dtype, channels_per_thread, pixels_per_thread, index_bits)
    try:
        from cupy._core.core import assemble_cupy_compiler_options  # what CuPy adds itself (CuPy 13 and 14)

        cupy_includes = [o[2:] for o in assemble_cupy_compiler_options(()) if o.startswith("-I")]
    except Exception:  # private API; without it, add our own directory
        cupy_includes = []
    if not any(_has_fp16_header(d) for d in cupy_includes):
        include_dir = find_cuda_include_dir()
        if include_dir is not None:
            options += (f"-I{include_dir}",)
    return options


@functools.cache
def is_available() -> tuple[bool, str]:
    """Whether this backend can run here, and if not, why (a message that says what to install)."""
    if importlib.util.find_spec("cupy") is None:
        return False, f"CuPy is not installed: {_INSTALL_HINT}"
    if not torch.cuda.is_available():
        return False, "no CUDA device: torch.cuda.is_available() is False"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # a CuPy built for another CUDA fails in many ways
        return False, (
            f"CuPy cannot use the GPU ({type(error).__name__}: {error}); install the CuPy that matches torch's "
            f"CUDA {torch.version.cuda}: {_INSTALL_HINT}"
        )
    if count < 1:
        return False, "no CUDA device visible to CuPy"
    return True, ""


def probe(device: torch.device) -> str | None:
    """None when the kernels run on device, else why not: CuPy missing or broken, no GPU, or the kernels do not
    compile there (NVRTC or the CUDA headers missing or mismatched, a GPU the NVRTC does not know). Compiles and
    loads the float32 32-bit-index module, so the first call takes seconds (CuPy caches the binary on disk)."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}: move them to a GPU or use backend='torch'"
    available, reason = is_available()
    if not available:
        return reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        _kernels(index, torch.float32, *default_split(32), 32)
    except Exception as error:  # whatever NVRTC, the driver or CuPy raise: the backend cannot run here
        name = torch.cuda.get_device_name(index)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(index))
        return f"the CUDA kernels do not build for cuda:{index} ({name}, {capability}): {error}"
    return None


@functools.cache
def _kernels(
    device_index: int,
    dtype: torch.dtype,
    channels_per_thread: int = CHANNELS_PER_THREAD,
    pixels_per_thread: int = PIXELS_PER_THREAD,
    index_bits: int = 32,
) -> dict[str, object]:
    """Compile (or load from CuPy's cache) the kernels of one index width for one device, dtype and split of the
    work: {entry point name: RawKernel}. Raises RuntimeError with NVRTC's log when they do not compile."""
    import cupy

    names = kernel_names(index_bits)
    options = compile_options(dtype, channels_per_thread, pixels_per_thread, index_bits)
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=options)
        try:
            kernels = {name: module.get_function(name) for name in names}
            for kernel in kernels.values():
                _ = kernel.kernel  # compiles and loads the module on this device now, not at the first launch
            return kernels
        except Exception as error:  # CompileException carries NVRTC's log
            raise RuntimeError(
                f"NVRTC could not compile {KERNEL_FILE} for {dtype} on cuda:{device_index} with options {options}: "
                f"{error}\nIf a CUDA header such as cuda_fp16.h is not found, install CuPy's CUDA headers "
                "(pip install 'cupy-cuda13x[ctk]', or cupy-cuda12x[ctk] for CUDA 12) or set CUDA_PATH to a toolkit."
            ) from error


class _StreamHandle:
    """A raw CUDA stream in the CUDA stream protocol (__cuda_stream__), for cupy.cuda.Stream.from_external."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


@functools.lru_cache(maxsize=256)
def cupy_stream(device_index: int, stream_pointer: int):
    """CuPy's view of a CUDA stream of torch (its cudaStream_t), created once per (device, stream).

    CuPy 14 wraps foreign streams with Stream.from_external (ExternalStream is deprecated there and warns); CuPy 13
    has only ExternalStream. The launch passes this stream explicitly, so neither CuPy's current stream nor
    CUPY_CUDA_PER_THREAD_DEFAULT_STREAM can move a kernel off torch's stream. Neither constructor destroys the
    stream: torch owns it (and keeps its pooled streams alive for the whole process).
    """
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(stream_pointer))
    return cupy.cuda.ExternalStream(stream_pointer, device_index)


def _launch(
    kind: str,
    geometry: Geometry,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    memory: str,
    channels_per_thread: int | None = None,
    pixels_per_thread: int | None = None,
) -> Tensor:
    """Run one kernel on (a, b) -> out (all in `memory` layout, one CUDA device) on torch's current stream there.
    The work split per thread is the compiled default unless given (scripts/tune_kernels.py tries others). An empty
    output launches nothing."""
    if out.numel() == 0:
        return out
    launch = plan_launch(
        kind, geometry, memory=memory, channels_per_thread=channels_per_thread, pixels_per_thread=pixels_per_thread
    )
    _run(launch, a, b, out)
    return out


def _run(launch: Launch, a: Tensor, b: Tensor, out: Tensor) -> None:
    """Launch a planned kernel on out's device (whatever device is current), on torch's current stream there: the
    only part of the backend that needs CuPy and a GPU (the host-emulation tests replace it)."""
    if not out.is_cuda:
        raise RuntimeError(
            f"involution backend 'cupy' needs CUDA tensors, got {out.device}: move them with .to('cuda')"
        )
    import cupy
    import numpy as np

    device_index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    split = (launch.channels_per_thread, launch.pixels_per_thread)
    kernel = _kernels(device_index, out.dtype, *split, launch.index_bits)[launch.kernel]
    args = tuple(np.uint64(t.data_ptr()) for t in (a, b, out)) + tuple(np.int32(s) for s in launch.geometry)
    stream = cupy_stream(device_index, torch.cuda.current_stream(device_index).cuda_stream)
    with cupy.cuda.Device(device_index):
        kernel((launch.grid,), (launch.block,), args, stream=stream)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(
            f"involution backend 'cupy': {name_a} is on {a.device} but {name_b} on {b.device}: put both on one GPU"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"involution backend 'cupy': {name_a} is {a.dtype} but {name_b} is {b.dtype}: cast one")
    compile_defines(a.dtype)  # raises for unsupported dtypes


def _memory(t: Tensor) -> str:
    """The kernels for t's layout: "nhwc" for channels_last, else "nchw"."""
    return "nhwc" if USE_NHWC_KERNELS and layout.is_channels_last(t) else "nchw"


def forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """out (N, C, Ho, Wo) in x's layout from x (N, C, H, W) and weight (N, G, K, K, Ho, Wo); no autograd."""
    _check_pair("x", x, "weight", weight)
    memory = _memory(x)
    channels_last = memory == "nhwc"
    x, weight = layout.to_layout(x, channels_last), layout.weight_to_layout(weight, channels_last)
    n, c, h, w = x.shape
    _, groups, k, _, h_out, w_out = weight.shape
    out = layout.empty_image(x, (n, c, h_out, w_out), channels_last)
    geometry = Geometry(n, c, h, w, groups, k, h_out, w_out, stride, padding, dilation)
    return _launch("forward", geometry, x, weight, out, memory)


def grad_input(
    grad_out: Tensor,
    weight: Tensor,
    input_size: tuple[int, int],
    channels: int,
    stride: int,
    padding: int,
    dilation: int,
    channels_last: bool = False,
) -> Tensor:
    """grad_x (N, C, H, W) from grad_out (N, C, Ho, Wo) and weight; input_size is (H, W), channels is C.
    channels_last: x's layout (grad_out's may be ambiguous, e.g. at Ho == Wo == 1), for grad_x and the kernels."""
    _check_pair("grad_out", grad_out, "weight", weight)
    channels_last = channels_last and USE_NHWC_KERNELS
    memory = "nhwc" if channels_last else "nchw"
    grad_out = layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    n, _, h_out, w_out = grad_out.shape
    _, groups, k, _, _, _ = weight.shape
    h, w = input_size
    grad_x = layout.empty_image(grad_out, (n, channels, h, w), channels_last)
    geometry = Geometry(n, channels, h, w, groups, k, h_out, w_out, stride, padding, dilation)
    return _launch("grad_input", geometry, grad_out, weight, grad_x, memory)


def grad_weight(
    grad_out: Tensor,
    x: Tensor,
    kernel_size: int,
    groups: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    """grad_weight (N, G, K, K, Ho, Wo) from grad_out (N, C, Ho, Wo) and x (N, C, H, W); pixel-major when x is
    channels_last."""
    _check_pair("grad_out", grad_out, "x", x)
    memory = _memory(x)
    channels_last = memory == "nhwc"
    grad_out, x = layout.to_layout(grad_out, channels_last), layout.to_layout(x, channels_last)
    n, c, h, w = x.shape
    h_out, w_out = grad_out.shape[2:]
    shape = (n, groups, kernel_size, kernel_size, h_out, w_out)
    grad_w = layout.empty_weight(x, shape, channels_last)
    geometry = Geometry(n, c, h, w, groups, kernel_size, h_out, w_out, stride, padding, dilation)
    return _launch("grad_weight", geometry, grad_out, x, grad_w, memory)
