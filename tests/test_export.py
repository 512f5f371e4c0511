"""Export: the op decomposes into plain aten ops, and a RedNet exported to ONNX runs in ONNX Runtime.

(The decomposition's arithmetic, ``torch_backend.forward_functional``, is checked in test_ops_cpu.py.)"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

import ops
from rednet.export import check_onnx, export_onnx
from rednet.models import Involution, RedNet

REPO = Path(__file__).resolve().parents[1]


def _randomize_batch_norms(model: torch.nn.Module) -> None:
    """Fresh BNs are identities and zero-init last layers make outputs tiny: give the check something to compare."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.2, 0.2, generator=generator)


def test_export_decompositions_remove_the_custom_op():
    module = Involution(32, kernel_size=7, stride=2).eval()
    _randomize_batch_norms(module)
    x = torch.randn(2, 32, 13, 13)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
    assert any("rednet.involution" in str(node.target) for node in program.graph.nodes)
    table = torch.export.default_decompositions()
    table.update(ops.export_decompositions())
    program = program.run_decompositions(table)
    targets = {str(node.target) for node in program.graph.nodes}
    assert not [target for target in targets if "rednet" in target], targets
    x = torch.randn(2, 32, 13, 13)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), module(x))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The dev extra installs them; under CI=true a missing one fails the tests rather than skipping them.
needs_onnx = pytest.mark.skipif(
    not os.environ.get("CI") and not all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime")),
    reason="needs onnx, onnxscript and onnxruntime (the dev extra)",
)


@pytest.mark.slow
@needs_onnx
def test_export_onnx_script_runs_in_onnxruntime(tmp_path, monkeypatch, capsys):
    import onnx

    # A RedNet with one block per stage: the stem's K=3 involution, the stride-2 involutions and the downsamples,
    # at an odd input size (35 → 18 → 9 → 5 → 3). The full RedNet-26 takes a minute longer to export.
    torch.manual_seed(0)
    model = RedNet(layers=(1, 1, 1, 1), num_classes=7)
    _randomize_batch_norms(model)
    script = _load_script("export_onnx")
    monkeypatch.setattr(script.factory, "model_from_weights", lambda *args, **kwargs: model.eval())
    out = tmp_path / "rednet.onnx"
    argv = ["--model", "rednet26", "--img-size", "35", "--out", str(out), "--tolerance", "1e-5", "--time", "2",
            "--batch-size", "2", "--threads", "1"]  # fmt: skip
    difference = script.main(argv)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert re.search(r"batch 2, 1 threads, median of 2: ONNX Runtime [\d.]+ ms, PyTorch [\d.]+ ms", printed), printed

    graph = onnx.load(str(out)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "custom-domain nodes need a runtime plugin"
    assert {"Slice", "Mul", "Add"} <= {node.op_type for node in graph.node}
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch dimension should be dynamic"
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 35, 35]
    assert [output.name for output in graph.output] == ["logits"]

    # The script compared at batch 3 (the export traced batch 2); compare once more at batch 1.
    assert difference is not None and difference < 1e-5
    images = torch.randn(1, 3, 35, 35)
    with torch.no_grad():
        assert model.eval()(images).abs().max() > 1e-2, "outputs this small would make the comparison meaningless"
    assert check_onnx(out, model, images) < 1e-5


class _TwoFeatures(torch.nn.Module):
    """A features_only-like model: a list of two maps, and a BN frozen in eval inside a training model."""

    def __init__(self) -> None:
        super().__init__()
        self.involution = Involution(16, kernel_size=3, stride=2)
        self.frozen = torch.nn.BatchNorm2d(16).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.frozen(x), self.involution(x)]


@needs_onnx
def test_export_onnx_names_each_feature_map_and_restores_training_flags(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = _TwoFeatures()
    _randomize_batch_norms(model)
    assert model.training and not model.frozen.training
    out = export_onnx(model, tmp_path / "features.onnx", input_size=(16, 9, 9), dynamic_batch=False)
    assert model.training and not model.frozen.training and model.involution.training
    assert [output.name for output in onnx.load(str(out)).graph.output] == ["features_0", "features_1"]
    assert check_onnx(out, model, torch.randn(1, 16, 9, 9)) < 1e-5
    assert model.training and not model.frozen.training


def test_export_onnx_refuses_bfloat16_with_the_fix(tmp_path):
    model = Involution(16, kernel_size=3).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16.*model\.float\(\)"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(16, 8, 8))


def test_export_onnx_without_onnx_names_the_install(monkeypatch, tmp_path):
    from rednet import export

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"needs the 'onnx' package: pip install onnx"):
        export.export_onnx(Involution(16, kernel_size=3), tmp_path / "x.onnx", input_size=(16, 8, 8))
