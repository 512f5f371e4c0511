"""RedNet under torch.fx and TorchScript (CPU, 64×64 inputs): traced, feature-extracted and scripted models compute
what the eager model computes; a scripted model saves, loads and picks the involution backend eager would."""

from __future__ import annotations

import io
import sys

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import ops
import rednet
from ops import cupy_backend
from rednet.models.involution import Involution

involution_module = sys.modules["ops.involution"]  # (ops.involution is also the function)

# The deepest models only add blocks: their scripting and feature runs (most of this file's time) are slow tests.
MODELS = [pytest.param(name, marks=pytest.mark.slow) if name in ("rednet101", "rednet152") else name
          for name in rednet.list_models()]  # fmt: skip
FEATURES = ["stem", "layer1", "layer2", "layer3", "layer4"]  # feature_info's modules, forward_intermediates' order

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN affine parameters, so that no block is silenced by the zero-init of bn3; scales below 1 keep the
    residual sums of RedNet-152's 50 blocks finite."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5 + 0.25)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def calibrate_norms(model: torch.nn.Module) -> torch.nn.Module:
    """BN running statistics averaged over 16 images (the test batch among them): with fresh ones (0 mean, 1 variance),
    or those of 2 images (8 values per channel at 2×2), eval-mode activations of an untrained RedNet overflow."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average
    with torch.no_grad():
        model.train()(torch.cat([image(), torch.randn(14, 3, 64, 64, generator=torch.Generator().manual_seed(3))]))
    return model.eval()


def make(name: str, **kwargs) -> torch.nn.Module:
    """An eval-mode RedNet with 10 classes whose every block contributes and whose activations stay finite."""
    torch.manual_seed(0)
    return calibrate_norms(randomize_norms(rednet.create_model(name, num_classes=10, **kwargs)))


def image(batch: int = 2, size: int = 64, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical: each path runs the same kernels in the same order."""
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def script_and_reload(model: torch.nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("name", rednet.list_models())
def test_fx_symbolic_trace_matches_eager(name):
    model = make(name)
    graph_module = torch.fx.symbolic_trace(model)
    # Each involution is one node: its Python checks and dispatch never see a proxy.
    involution_nodes = [node for node in graph_module.graph.nodes if node.op == "call_function" and
                        node.target.__name__ == "_involution"]  # fmt: skip
    assert len(involution_nodes) == sum(isinstance(m, Involution) for m in model.modules())
    x = image()
    with torch.no_grad():
        assert_same(graph_module(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extractors_match_forward_intermediates(name):
    model = make(name)
    x = image()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        features = create_feature_extractor(model, return_nodes=FEATURES)(x)
    assert list(features) == FEATURES
    for actual, wanted in zip(features.values(), expected):
        assert_same(actual, wanted)

    # timm's fx feature wrapper (Involution is a leaf there) against its default one, with the same weights.
    default = timm.create_model(name, features_only=True).eval()
    fx_features = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    assert type(fx_features).__name__ == "FeatureGraphNet"
    state = calibrate_norms(randomize_norms(default)).state_dict()
    fx_features.load_state_dict({f"graph_module.{key}": value for key, value in state.items()})
    with torch.no_grad():
        expected = default(x)
        actual = fx_features(x)
    assert len(actual) == len(expected) == 5
    for got, wanted in zip(actual, expected):
        assert_same(got, wanted)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager_in_eval_and_train_mode(name):
    model = make(name)
    scripted = torch.jit.script(model)
    x = image()
    with torch.no_grad():
        assert_same(scripted(x), model(x))
        model.train()
        scripted.train()
        assert_same(scripted(x), model(x))


def test_torchscript_memory_efficient_gradients_and_save_load():
    # Scripted, memory_efficient keeps the kernels (TorchScript cannot run torch.utils.checkpoint): same values,
    # same gradients, also after torch.jit.save / load.
    model = make("rednet26", memory_efficient=True).train()
    x = image()
    weights = torch.linspace(-1, 1, 10)
    scripted = script_and_reload(model)

    out = model(x)
    (out * weights).sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    scripted_out = scripted(x)
    (scripted_out * weights).sum().backward()
    assert_same(scripted_out, out.detach())
    grads = {name: p.grad for name, p in scripted.named_parameters()}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)

    scripted.eval()
    model.eval()
    with torch.no_grad():
        assert_same(scripted(x), model(x))


def test_torchscript_under_autocast_matches_eager():
    # The scripted path casts as ops.involution does under autocast: here a float32 input and bfloat16 kernels.
    layer = randomize_norms(Involution(32, kernel_size=3)).eval()
    x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    scripted_layer = torch.jit.script(layer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        assert expected.dtype == torch.bfloat16
        assert_same(scripted_layer(x), expected)

    # The whole model, with TorchScript's own autocast pass off: that pass picks some dtypes unlike eager autocast
    # (scripted blocks end in float32, so logits differ by bfloat16 rounding), beside the point here.
    model = make("rednet26")
    scripted_model = torch.jit.script(model)
    jit_autocast = torch._C._jit_set_autocast_mode(False)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert_same(scripted_model(image()), model(image()))
    finally:
        torch._C._jit_set_autocast_mode(jit_autocast)


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(("backend", "runs"), [("auto", "auto"), ("torch", "torch"), ("unfold", "torch")])
def test_torchscript_backend_choice_on_cpu(monkeypatch, backend, runs):
    # The scripted layer hands its backend to the op, which resolves "auto" at run time as eager mode does (so the
    # same backend runs and the values are identical); "unfold" runs as "torch".
    layer = Involution(16, kernel_size=3, backend=backend).eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(1, 16, 8, 8)
    chosen = involution_module._resolve_backend(runs, x)
    with torch.no_grad():
        expected = layer(x)
        calls = count_calls(monkeypatch, involution_module._backend_module(chosen), "forward")
        out = scripted(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected)
    if backend != "unfold":
        assert_same(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torchscript_picks_cupy_on_cuda(monkeypatch):
    if "cupy" not in ops.available_backends():
        pytest.skip("CuPy does not work here")
    model = make("rednet26").cuda()
    scripted = torch.jit.script(model)
    x = image().cuda()
    with torch.no_grad():
        expected = model(x)
        calls = count_calls(monkeypatch, cupy_backend, "forward")
        torch.testing.assert_close(scripted(x), expected)
    assert len(calls) == sum(isinstance(m, Involution) for m in model.modules())
