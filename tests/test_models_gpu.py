"""RedNet on a GPU: the CuPy kernels inside the full model agree with the PyTorch path, in fp32, under bf16
autocast, in channels_last and with memory_efficient. Skipped without CUDA; scripts/gpu_check.sh runs them."""

from __future__ import annotations

import pytest
import torch

import ops
import rednet
from ops import cupy_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    """TF32 convolutions would hide differences between the two involution paths, and cuDNN may pick other
    (nondeterministic) convolution algorithms from run to run: deterministic ones only, no autotuning."""
    backends = torch.backends
    previous = (
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.deterministic,
        backends.cudnn.benchmark,
    )  # fmt: skip
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.deterministic, backends.cudnn.benchmark = True, False
    yield
    (
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.deterministic,
        backends.cudnn.benchmark,
    ) = previous  # fmt: skip


# Two training steps agree to float32 rounding of sums taken in another order (the involution backends, and
# batch-norm reductions), not bitwise; -ftz in the CuPy kernels only touches values below 1.2e-38.
OUT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
GRAD_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def _model(backend: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return rednet.create_model("rednet26", num_classes=10, involution_backend=backend, zero_init_last=False, **kwargs)


def _step(model, x, memory_format=torch.contiguous_format, autocast_dtype=None):
    model = model.cuda().to(memory_format=memory_format).train()
    x = x.cuda().to(memory_format=memory_format)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x)
    out.float().square().mean().backward()
    return out.float(), {name: p.grad.float() for name, p in model.named_parameters()}


def test_cupy_is_available_on_this_gpu():
    assert "cupy" in ops.available_backends(), cupy_backend.is_available()[1]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cupy_model_matches_torch_model_in_float32(memory_format):
    x = torch.randn(4, 3, 65, 63)  # odd sizes: every stride-2 involution sees an odd input somewhere
    out_ref, grads_ref = _step(_model("torch"), x)
    out, grads = _step(_model("cupy"), x, memory_format)
    torch.testing.assert_close(out, out_ref, **OUT_TOLERANCE)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], **GRAD_TOLERANCE, msg=name)


def test_bf16_autocast_training_step_is_finite_and_close():
    x = torch.randn(8, 3, 64, 64)
    out_ref, _ = _step(_model("torch"), x)
    out, grads = _step(_model("cupy"), x, torch.channels_last, torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert (out - out_ref).abs().max() < 0.05 * out_ref.abs().max() + 0.05


def test_memory_efficient_with_cupy_gives_the_same_gradients():
    x = torch.randn(4, 3, 64, 64)
    out_ref, grads_ref = _step(_model("cupy"), x)
    out, grads = _step(_model("cupy", memory_efficient=True), x)
    torch.testing.assert_close(out, out_ref, **OUT_TOLERANCE)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], **GRAD_TOLERANCE, msg=name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_rednet26_compiles_fullgraph_with_cupy(channels_last):
    """torch.compile(fullgraph=True) of the whole model, the backend chosen by "auto" (cupy here): no graph breaks,
    and the compiled forward and backward agree with eager."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 64, 64)
    out_ref, grads_ref = _step(_model("auto"), x, memory_format)
    torch._dynamo.reset()
    model = _model("auto").cuda().to(memory_format=memory_format)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _step(compiled, x, memory_format)
    torch.testing.assert_close(out, out_ref, **OUT_TOLERANCE)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name.removeprefix("_orig_mod.")], **GRAD_TOLERANCE, msg=name)
