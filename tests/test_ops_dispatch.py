"""The op's dispatch on the CPU: backends are probed once and outside traced code, "auto" falls back with one warning
when the CUDA kernels cannot build, every public op checks its shapes before a backend runs, and the CuPy stream
wrapper is made once per torch stream. The GPU itself is faked here; tests/test_ops_gpu.py runs the real thing."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import ops
from ops import cupy_backend, torch_backend
from ops.involution import _resolve_backend

dispatch = sys.modules["ops.involution"]


@pytest.fixture
def fresh_probes(monkeypatch):
    """Empty probe and "auto" caches for one test (they are per process otherwise)."""
    monkeypatch.setattr(dispatch, "_probes", {})
    monkeypatch.setattr(dispatch, "_auto_choices", {})
    monkeypatch.setattr(dispatch, "_auto_warned", set())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cupy_on_cpu(monkeypatch, fresh_probes):
    """Lets the "cupy" backend be considered for CPU tensors, which stand in for CUDA ones."""
    monkeypatch.setattr(cupy_backend, "DEVICE_TYPES", None)


def test_compiled_dispatch_does_not_trace_the_gpu_probe(monkeypatch, cupy_on_cpu) -> None:
    """torch.compile(fullgraph=True) of code that resolves the backend while CuPy reports a GPU: the probe calls
    into CuPy (compiled code Dynamo cannot trace, as cupy.cuda.runtime.getDeviceCount on a GPU machine); it must run
    once, eagerly, and the dispatch must trace as a constant."""
    cupy = pytest.importorskip("cupy")
    probed = []

    def probe(device: torch.device) -> None:
        probed.append(device)
        try:
            cupy.cuda.runtime.getDeviceCount()  # what is_available() calls on a GPU machine
        except cupy.cuda.runtime.CUDARuntimeError:  # no driver here
            pass
        return None

    monkeypatch.setattr(cupy_backend, "probe", probe)

    def resolve_twice(x: torch.Tensor) -> torch.Tensor:
        return x * len(_resolve_backend("auto", x)) + len(_resolve_backend("cupy", x))

    out = torch.compile(resolve_twice, fullgraph=True)(torch.ones(3))
    torch.testing.assert_close(out, torch.full((3,), 8.0))  # "cupy" both times
    assert probed == [torch.device("cpu")]


def test_auto_falls_back_to_torch_with_one_warning_when_the_kernels_do_not_build(monkeypatch, cupy_on_cpu) -> None:
    """The real probe, with NVRTC failing: "auto" warns once, naming the cause, and runs "torch"; "cupy" raises."""
    monkeypatch.setattr(cupy_backend, "is_available", lambda: (True, ""))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 1))

    def fail_to_compile(*args):
        raise RuntimeError("NVRTC could not compile involution.cu: cuda_fp16.h: No such file or directory")

    monkeypatch.setattr(cupy_backend, "_kernels", fail_to_compile)
    reason = cupy_backend.probe(torch.device("cuda", 0))
    assert "do not build for cuda:0 (Fake GPU, sm_121)" in reason and "cuda_fp16.h" in reason

    monkeypatch.setattr(cupy_backend, "probe", lambda device: reason)  # the same failure for the CPU stand-in
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 2, 3, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match=r"'auto': 'cupy' cannot run on cpu .*cuda_fp16\.h.*using the next"):
        out = ops.involution(x, weight)
    torch.testing.assert_close(out, ops.involution(x, weight, backend="unfold"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device, not per call
        ops.involution(x, weight)
    with pytest.raises(RuntimeError, match=r"backend 'cupy' is not available: .*cuda_fp16\.h"):
        ops.involution(x, weight, backend="cupy")


def test_auto_on_cpu_never_probes_cupy(monkeypatch, fresh_probes) -> None:
    monkeypatch.setattr(cupy_backend, "probe", lambda device: pytest.fail("probed the GPU backend for CPU tensors"))
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 2, 3, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.involution(x, weight)


def test_cupy_backend_for_cpu_tensors_says_what_to_do(fresh_probes) -> None:
    assert "needs CUDA tensors" in cupy_backend.probe(torch.device("cpu"))
    assert "backend='torch'" in cupy_backend.probe(torch.device("cpu"))


# --- every public op checks its shapes before any backend runs ---


@pytest.fixture
def backends_must_not_run(monkeypatch) -> None:
    for module in (torch_backend, cupy_backend):
        for name in ("forward", "grad_input", "grad_weight"):
            monkeypatch.setattr(module, name, lambda *args, n=name: pytest.fail(f"a backend's {n} ran"))


N, C, G, H, K = 2, 8, 2, 7, 3  # Ho = Wo = 7 at stride 1, padding 1
CONV = (1, 1, 1)  # stride, padding, dilation


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


FORWARD_CASES = [
    ((_t(N, C, H, H), _t(N, G, K, K, H, H - 1)), r"Ho×Wo = 7×6.*gives 7×7"),
    ((_t(N, C, H, H), _t(N + 1, G, K, K, H, H)), r"x has N=2, weight has N=3"),
    ((_t(N, C, H, H), _t(N, 3, K, K, H, H)), r"C=8 of x must be divisible by groups G=3"),
    ((_t(N, C, H, H), _t(N, G, K, K + 2, H, H)), r"square, got K×K = 3×5"),
    ((_t(N, C, H), _t(N, G, K, K, H, H)), r"x must be \(N, C, H, W\), got shape \(2, 8, 7\)"),
]
GRAD_INPUT_CASES = [
    ((_t(N, C, H, H), _t(N, G, K, K, H, H), H, H, C + 2), r"grad_out has C=8 channels .* channels=10"),
    ((_t(N, C, H, H), _t(N, G, K, K, H, H), H + 3, H, C), r"grad_out .* Ho×Wo = 7×7 .* gives 10×7"),
    ((_t(N, C, H, H), _t(N, G, K, K, H - 1, H), H, H, C), r"weight has Ho×Wo = 6×7 .* grad_out has 7×7"),
    ((_t(N, C, H, H), _t(N - 1, G, K, K, H, H), H, H, C), r"grad_out has N=2, weight has N=1"),
    ((_t(N, C, H, H), _t(N, 3, K, K, H, H), H, H, C), r"C=8 of the input must be divisible by groups G=3"),
]
GRAD_WEIGHT_CASES = [
    ((_t(N, C, H, H), _t(N, C, H, H), K, 3), r"C=8 of x must be divisible by groups G=3"),
    ((_t(N, C, H, H), _t(N, C, H + 2, H), K, G), r"grad_out .* Ho×Wo = 7×7 .* gives 9×7"),
    ((_t(N, C, H, H), _t(N, C + 8, H, H), K, G), r"grad_out has N, C = 2, 8 but x has 2, 16"),
    ((_t(N, C, H, H), _t(N, C, H, H), 0, G), r"need K >= 1.*K=0"),
]


@pytest.mark.parametrize("backend", ["torch", "cupy", "auto", "unfold"])
@pytest.mark.parametrize("args,message", FORWARD_CASES)
def test_involution_op_checks_shapes(backends_must_not_run, backend, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        torch.ops.rednet.involution(*args, *CONV, backend)


@pytest.mark.parametrize("backend", ["torch", "cupy", "auto"])
@pytest.mark.parametrize("args,message", GRAD_INPUT_CASES)
def test_grad_input_op_checks_shapes(backends_must_not_run, backend, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        torch.ops.rednet.involution_grad_input(*args, *CONV, backend, False)


@pytest.mark.parametrize("backend", ["torch", "cupy", "auto"])
@pytest.mark.parametrize("args,message", GRAD_WEIGHT_CASES)
def test_grad_weight_op_checks_shapes(backends_must_not_run, backend, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        torch.ops.rednet.involution_grad_weight(*args, *CONV, backend)


def test_ops_check_dtypes_and_devices(backends_must_not_run) -> None:
    x, weight, grad_out = _t(N, C, H, H), _t(N, G, K, K, H, H), _t(N, C, H, H)
    with pytest.raises(TypeError, match="grad_out is torch.float64 but weight is torch.float32"):
        torch.ops.rednet.involution_grad_input(grad_out.double(), weight, H, H, C, *CONV, "cupy", False)
    with pytest.raises(TypeError, match="floating-point tensors, got x of dtype torch.int64"):
        torch.ops.rednet.involution_grad_weight(grad_out, x.long(), K, G, *CONV, "cupy")


def test_valid_direct_op_calls_still_run() -> None:
    x, weight, grad_out = torch.randn(N, C, H, H), torch.randn(N, G, K, K, H, H), torch.randn(N, C, H, H)
    out = torch.ops.rednet.involution(x, weight, *CONV, "torch")
    torch.testing.assert_close(out, ops.involution(x, weight, backend="unfold"))
    assert torch.ops.rednet.involution_grad_input(grad_out, weight, H, H, C, *CONV, "torch", False).shape == x.shape
    grad_w = torch.ops.rednet.involution_grad_weight(grad_out, x, K, G, *CONV, "torch")
    assert grad_w.shape == weight.shape


# --- CuPy's view of torch's stream ---


def _fake_cupy(monkeypatch, from_external: bool) -> list:
    made = []

    class Stream:
        pass

    if from_external:
        Stream.from_external = classmethod(lambda cls, obj: made.append(("from_external", obj)) or object())

    def external_stream(pointer, device_id=-1):
        warnings.warn("ExternalStream is deprecated", DeprecationWarning, stacklevel=2)  # as CuPy 14 does
        made.append(("ExternalStream", pointer, device_id))
        return object()

    cuda = types.SimpleNamespace(Stream=Stream, ExternalStream=external_stream)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    cupy_backend.cupy_stream.cache_clear()
    return made


@pytest.mark.parametrize("from_external", [True, False], ids=["cupy14", "cupy13"])
def test_stream_wrapper_is_made_once_per_device_and_stream(monkeypatch, from_external) -> None:
    made = _fake_cupy(monkeypatch, from_external)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if from_external else "ignore", DeprecationWarning)
            first = cupy_backend.cupy_stream(0, 0xABC)
            assert cupy_backend.cupy_stream(0, 0xABC) is first
            assert cupy_backend.cupy_stream(1, 0xABC) is not first
            cupy_backend.cupy_stream(0, 0xDEF)
    finally:
        cupy_backend.cupy_stream.cache_clear()
    assert len(made) == 3
    if from_external:  # CuPy 14: the CUDA stream protocol, no deprecated class
        assert [kind for kind, *_ in made] == ["from_external"] * 3
        assert [obj.__cuda_stream__() for _, obj in made] == [(0, 0xABC), (0, 0xABC), (0, 0xDEF)]
    else:  # CuPy 13
        assert made == [("ExternalStream", 0xABC, 0), ("ExternalStream", 0xABC, 1), ("ExternalStream", 0xDEF, 0)]


def test_stream_wrapper_with_the_installed_cupy() -> None:
    """CuPy 14 (installed here) wraps a stream without a GPU and without a DeprecationWarning."""
    cupy = pytest.importorskip("cupy")
    cupy_backend.cupy_stream.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            stream = cupy_backend.cupy_stream(0, 0x1234)
        assert stream.ptr == 0x1234 and isinstance(stream, cupy.cuda.Stream)
    finally:
        cupy_backend.cupy_stream.cache_clear()


def test_launch_passes_the_torch_stream_explicitly(monkeypatch) -> None:
    """_launch hands CuPy torch's current stream as an argument (no `with stream:`, no per-launch wrapper)."""
    calls = []

    class Kernel:
        def __call__(self, grid, block, args, **kwargs):
            calls.append(kwargs)

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(
        cupy_backend, "_kernels", lambda *args: {name: Kernel() for name in cupy_backend.kernel_names()}
    )
    stream_object = object()
    monkeypatch.setattr(cupy_backend, "cupy_stream", lambda device, pointer: (device, pointer) and stream_object)
    current = types.SimpleNamespace(cuda_stream=0x77)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    out = types.SimpleNamespace(
        is_cuda=True, numel=lambda: 1, device=torch.device("cuda", 0), dtype=torch.float32, data_ptr=lambda: 0
    )
    tensor = types.SimpleNamespace(data_ptr=lambda: 0)
    geometry = cupy_backend.Geometry(1, 4, 5, 5, 1, 3, 5, 5, 1, 1, 1)
    cupy_backend._launch("forward", geometry, tensor, tensor, out, "nchw")
    assert calls == [{"stream": stream_object}]
