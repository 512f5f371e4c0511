"""The "cpu" backend: fused C++ kernels (ops/kernels/involution_cpu.cpp) for CPU tensors, built on first use.

Why this build path: the kernel file is plain C++ with an extern "C" API on raw pointers, element strides and sizes,
compiled with the system C++ compiler (``$CXX``, else ``c++``) as ``-O3 -march=native -fopenmp -shared -fPIC`` and
loaded with ctypes. Without torch headers a build takes seconds, not the minute ``torch.utils.cpp_extension.load``
needs, and needs no ninja. ``-march=native`` gives the host's vector units (AVX2/AVX-512 here); the library is
therefore cached per machine: the cache key hashes the source, the compiler's identity, the flags and the CPU's
model and feature flags, so a cache directory shared between machines never hands one machine another's build.
Builds go to a temporary file and are renamed into place, so concurrent processes never load a half-written
library. If ``-march=native`` or OpenMP is refused, the build retries without them (portable code, one thread).

Cache directory: ``$REDNET_CPU_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/rednet/cpu_kernels`` (``~/.cache/...``).

Results are independent of the thread count (``torch.get_num_threads()`` threads): each output element is summed by
one thread in a fixed order, as the CUDA kernels do. float32 and bfloat16 accumulate in float32, float64 in
float64. Outputs follow x's layout (ops/layout.py); inputs may have any strides.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ops import layout

__all__ = ["forward", "grad_input", "grad_weight", "is_available", "status", "SUPPORTED_DTYPES"]

KERNEL_FILE = Path(__file__).resolve().parent / "kernels" / "involution_cpu.cpp"
SUPPORTED_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# For the dispatch in ops/involution.py.
DEVICE_TYPES = ("cpu",)
DTYPES = tuple(SUPPORTED_DTYPES)
BASE_FLAGS = ("-std=c++17", "-O3", "-ffp-contract=fast", "-shared", "-fPIC")
# Tried in order until one builds: the fastest first.
OPTIONAL_FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())

SERIAL_BELOW = 2**16  # output elements x K^2 below which a call runs on one thread
_state: dict[str, object] = {}  # "library" (ctypes.CDLL) or "error" (str), once per process


def compiler() -> str:
    """The C++ compiler the build uses: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


def cache_dir() -> Path:
    if os.environ.get("REDNET_CPU_KERNEL_CACHE"):
        return Path(os.environ["REDNET_CPU_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rednet" / "cpu_kernels"


def _cpu_identity() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(dict.fromkeys(wanted))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_identity(cxx: str) -> str:
    result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return f"{shutil.which(cxx)}\n{result.stdout}"


def _build(cxx: str, source_file: Path) -> Path:
    """Compile (or find cached) the kernel library; raises RuntimeError naming the cause when no flag set builds."""
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} found (set $CXX, or install g++ or clang++)")
    source = source_file.read_bytes()
    identity = _compiler_identity(cxx)
    errors = []
    for optional in OPTIONAL_FLAG_SETS:
        flags = (*BASE_FLAGS, *optional)
        parts = [source, identity.encode(), " ".join(flags).encode(), _cpu_identity().encode()]
        key = hashlib.sha256(b"\0".join(parts))
        target = cache_dir() / f"involution_cpu_{key.hexdigest()[:20]}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        command = [cxx, *flags, str(source_file), "-o", temporary]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            os.replace(temporary, target)  # atomic: another process sees the old state or the whole library
            return target
        os.unlink(temporary)
        errors.append((" ".join(command), result.stderr.strip()))
    # The compiler's output once (the flag sets usually fail alike), then the other commands with their first error.
    (first_command, first_output), *others = errors
    lines = [f"building the CPU involution kernels failed:\n{first_command}:\n{first_output[-1500:]}"]
    for command, output in others:
        first_error = next((line for line in output.splitlines() if "error" in line), output[:200])
        lines.append(f"also failed: {command}: {first_error}")
    raise RuntimeError("\n".join(lines))


def load_library(source_file: Path | None = None) -> ctypes.CDLL:
    """The kernels built from `source_file` (default: ours, KERNEL_FILE), cached like the backend's own build.

    For comparing kernel sources (scripts/compare_*.py, with `using`). Raises RuntimeError with the compiler's
    error, OSError when the library does not load.
    """
    library = ctypes.CDLL(str(_build(compiler(), Path(source_file or KERNEL_FILE))))
    pointer, strides, ints = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32)
    for name in ("forward", "grad_input", "grad_weight"):
        function = getattr(library, f"involution_cpu_{name}")
        function.argtypes = [ctypes.c_int, pointer, strides, pointer, strides, pointer, strides, ints, ctypes.c_int]
        function.restype = ctypes.c_int
    return library


def status() -> tuple[bool, str]:
    """Whether the kernels build and load here, and why not (tried once per process; the build is cached on disk)."""
    if not _state:
        try:
            _state["library"] = load_library()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _state["error"] = str(error)
    return "library" in _state, str(_state.get("error", ""))


def is_available() -> bool:
    return status()[0]


def probe(device: torch.device) -> str | None:
    """None when the kernels build and load here (CPU tensors only), else why not."""
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got {device}: use backend='auto' or 'cupy'"
    ok, reason = status()
    return None if ok else reason


@contextlib.contextmanager
def using(library: ctypes.CDLL):
    """Run the backend's calls inside the block on `library` (from `load_library`) instead of its own build."""
    status()
    saved = dict(_state)
    _state.clear()
    _state["library"] = library
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def reset() -> None:
    """Forget this process's build result (for tests that change $CXX)."""
    _state.clear()


def _library() -> ctypes.CDLL:
    ok, reason = status()
    if not ok:
        raise RuntimeError(f"involution backend 'cpu' is not available: {reason}")
    return _state["library"]  # type: ignore[return-value]


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"involution backend 'cpu' supports {supported}; got {dtype}: cast the tensors or use 'torch'")


def _strides(t: Tensor):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _call(name: str, a: Tensor, b: Tensor, out: Tensor, geometry: tuple[int, ...]) -> Tensor:
    check_dtype(out.dtype)
    if out.numel() == 0:
        return out
    if a.numel() == 0 or b.numel() == 0:  # nothing to sum (e.g. C = 0 channels): zeros
        return out.zero_()
    function = getattr(_library(), f"involution_cpu_{name}")
    sizes = (ctypes.c_int32 * len(geometry))(*geometry)
    # Small problems run on one thread: starting the others costs more than they save (results are the same).
    threads = torch.get_num_threads() if out.numel() * geometry[5] ** 2 >= SERIAL_BELOW else 1
    code = function(
        SUPPORTED_DTYPES[out.dtype], a.data_ptr(), _strides(a), b.data_ptr(), _strides(b), out.data_ptr(),
        _strides(out), sizes, threads,
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"involution_cpu_{name} failed with code {code}")
    return out


def _check_cpu(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise RuntimeError(f"involution backend 'cpu' needs CPU tensors, got one on {t.device}")


def forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """out (N, C, Ho, Wo) in x's layout, from x (N, C, H, W) and weight (N, G, K, K, Ho, Wo), any strides."""
    _check_cpu(x, weight)
    n, c, h, w = x.shape
    groups, k, _, h_out, w_out = weight.shape[1:]
    out = layout.empty_image(x, (n, c, h_out, w_out), layout.is_channels_last(x))
    return _call("forward", x, weight, out, (n, c, h, w, groups, k, h_out, w_out, stride, padding, dilation))


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
    """grad_x (N, C, H, W), channels_last if x was, from grad_out (N, C, Ho, Wo) and weight, any strides."""
    _check_cpu(grad_out, weight)
    n = grad_out.shape[0]
    groups, k, _, h_out, w_out = weight.shape[1:]
    h, w = input_size
    grad_x = layout.empty_image(grad_out, (n, channels, h, w), channels_last)
    geometry = (n, channels, h, w, groups, k, h_out, w_out, stride, padding, dilation)
    return _call("grad_input", grad_out, weight, grad_x, geometry)


def grad_weight(
    grad_out: Tensor, x: Tensor, kernel_size: int, groups: int, stride: int, padding: int, dilation: int
) -> Tensor:
    """grad_weight (N, G, K, K, Ho, Wo), pixel-major if x is channels_last, from grad_out and x, any strides."""
    _check_cpu(grad_out, x)
    n, c, h, w = x.shape
    h_out, w_out = grad_out.shape[-2:]
    shape = (n, groups, kernel_size, kernel_size, h_out, w_out)
    grad_w = layout.empty_weight(x, shape, layout.is_channels_last(x))
    geometry = (n, c, h, w, groups, kernel_size, h_out, w_out, stride, padding, dilation)
    return _call("grad_weight", grad_out, x, grad_w, geometry)
