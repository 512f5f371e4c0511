"""ONNX export of RedNet models, and a check of the exported graph against the PyTorch model in ONNX Runtime.

The involution custom op is decomposed into Pad/Slice/Mul/Add on the way (``ops.export_decompositions``), so the
file runs on any ONNX runtime (ONNX Runtime, TensorRT, OpenVINO) without a plugin: the official CuPy op had no
ONNX export at all. Needs ``pip install 'rednet[onnx]'`` (onnx, onnxscript); the check needs onnxruntime.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

import ops

__all__ = ["export_onnx", "check_onnx"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
_EXAMPLE_BATCH = 2  # not 1: torch.export would specialize a batch dim of size 1 to the constant 1


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"ONNX export needs the {module!r} package: pip install {extra}")


def _example_input(model: nn.Module, input_size: tuple[int, int, int], batch_size: int) -> torch.Tensor:
    parameter = next(model.parameters())
    return torch.randn(batch_size, *input_size, device=parameter.device, dtype=parameter.dtype)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] = (3, 224, 224),
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    optimize: bool = False,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file at ``path``, input "images" and output "logits".

    Args:
        model: a RedNet (or any module whose involutions go through ``ops.involution``).
        path: the .onnx file to write; weights are stored inside it.
        input_size: (C, H, W) of the input. H and W are fixed in the graph: they decide which kernel taps can
            reach the image.
        dynamic_batch: leave the batch dimension free (else it is fixed to 1).
        opset_version: the ONNX opset; torch's default when None.
        optimize: run onnxscript's graph optimizer: RedNet-50: ~22k → ~4k nodes and 86 → 64 MiB, but the
            export takes ~4× longer (minutes) and ONNX Runtime, which optimizes at load, runs both equally fast.
    """
    _require("onnx", "'rednet[onnx]'")
    _require("onnxscript", "'rednet[onnx]'")
    if len(input_size) != 3:
        raise ValueError(f"export_onnx: input_size must be (C, H, W), got {input_size!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        example = _example_input(model, input_size, _EXAMPLE_BATCH if dynamic_batch else 1)
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        decompositions = torch.export.default_decompositions()
        decompositions.update(ops.export_decompositions())
        program = program.run_decompositions(decompositions)
        torch.onnx.export(
            program,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset_version,
            external_data=False,
            optimize=optimize,
        )
    finally:
        model.train(was_training)
    return path


def check_onnx(path: str | Path, model: nn.Module, images: torch.Tensor) -> float:
    """Run ``images`` through the ONNX file in ONNX Runtime (CPU) and through ``model``; the largest abs difference."""
    _require("onnxruntime", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().float().numpy()})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(images.to(next(model.parameters()).device)).float().cpu()
    finally:
        model.train(was_training)
    return float((torch.from_numpy(got) - expected).abs().max())
