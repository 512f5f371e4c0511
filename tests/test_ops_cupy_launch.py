"""The CuPy launch of the "cupy" backend without a GPU: the device, stream and compiled module it uses for a tensor
on another GPU than the current one, the launch keyword of the installed CuPy, and the dtypes the dispatch offers
the backend. tests/test_ops_gpu.py runs the real thing on a GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ops import cupy_backend

dispatch = sys.modules["ops.involution"]


def test_launch_uses_the_tensors_device_not_the_current_one(monkeypatch) -> None:
    """A tensor on cuda:1 while cuda:0 is current: the module compiled for device 1, torch's current stream of
    device 1, and CuPy's current device set to 1 around the launch."""
    events = []
    current = {"device": 0}

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self):
            self.previous, current["device"] = current["device"], self.index
            return self

        def __exit__(self, *exc) -> bool:
            current["device"] = self.previous
            return False

    class Kernel:
        def __call__(self, grid, block, args, **kwargs):
            events.append(("launch", current["device"], kwargs["stream"]))

    def kernels(device_index, dtype, *module):
        events.append(("compile", device_index, dtype, module))
        return {name: Kernel() for name in cupy_backend.kernel_names()}

    def current_stream(device=None):
        events.append(("stream of", device))
        return types.SimpleNamespace(cuda_stream=0x100 + device)

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device)))
    monkeypatch.setattr(cupy_backend, "_kernels", kernels)
    monkeypatch.setattr(cupy_backend, "cupy_stream", lambda device, pointer: ("stream", device, pointer))
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    out = types.SimpleNamespace(
        is_cuda=True, numel=lambda: 1, device=torch.device("cuda", 1), dtype=torch.bfloat16, data_ptr=lambda: 0
    )
    tensor = types.SimpleNamespace(data_ptr=lambda: 0)
    geometry = cupy_backend.Geometry(1, 4, 5, 5, 1, 3, 5, 5, 1, 1, 1)
    cupy_backend._launch("grad_weight", geometry, tensor, tensor, out, "nhwc")
    assert events == [
        ("compile", 1, torch.bfloat16, (*cupy_backend.default_split(32), 32)),
        ("stream of", 1),
        ("launch", 1, ("stream", 1, 0x101)),
    ]
    assert current["device"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the keyword without a GPU; the GPU tests launch")
def test_installed_cupy_launcher_takes_the_stream_keyword() -> None:
    """The launch passes stream= to the kernel (RawKernel.__call__ forwards it to Function.__call__): the installed
    CuPy accepts it and goes on to the driver, which is missing here, instead of refusing the keyword."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda.function import Function

    function = Function.__new__(Function)  # no module: the call fails in the driver, after the arguments are taken
    stream = cupy_backend.cupy_stream(0, 0x1234)
    try:
        with pytest.raises(Exception) as refused:
            function((1,), (1,), (), stream=stream)
    finally:
        cupy_backend.cupy_stream.cache_clear()
    assert not isinstance(refused.value, TypeError), refused.value
    assert isinstance(refused.value, cupy.cuda.runtime.CUDARuntimeError | cupy.cuda.driver.CUDADriverError)
    with pytest.raises(TypeError, match="unexpected keyword"):  # the check above can tell a refused keyword
        function((1,), (1,), (), streams=stream)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_dispatch_offers_cupy_the_dtypes_its_kernels_build(dtype) -> None:
    assert dispatch._dtype_refusal("cupy", dtype) == ""
    assert cupy_backend.compile_defines(dtype)


def test_dispatch_refuses_cupy_a_dtype_without_kernels() -> None:
    """A floating dtype the kernels do not build (float8) is refused by the dispatch, which "auto" then skips,
    instead of being sent to the backend as supported."""
    dtype = torch.float8_e4m3fn
    with pytest.raises(TypeError):
        cupy_backend.compile_defines(dtype)
    refusal = dispatch._dtype_refusal("cupy", dtype)
    assert "float8_e4m3fn" in refusal and "torch.bfloat16" in refusal and "backend='torch'" in refusal
    assert not dispatch._takes("cupy", dtype)
