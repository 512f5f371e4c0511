"""ONNX export of RedNet models, and a check of the exported graph against the PyTorch model in ONNX Runtime.

The involution custom op is decomposed into Pad/Slice/Mul/Add on the way (``ops.export_decompositions``), so the
file holds standard ONNX ops only and needs no runtime plugin (checked with ONNX Runtime): the official CuPy op had
no ONNX export at all. Needs the onnx and onnxscript packages (the project's ``onnx`` extra); the check needs
onnxruntime.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import ops

__all__ = ["export_onnx", "check_onnx", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"  # a classifier's one output; features_only models give features_0, features_1, ...
_EXAMPLE_BATCH = 2  # not 1: torch.export would specialize a batch dim of size 1 to the constant 1


def _require(module: str, purpose: str = "ONNX export") -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs the {module!r} package: pip install {module}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each submodule's own flag back (a frozen BN stays frozen)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _outputs(result: Tensor | list | tuple) -> list[Tensor]:
    return [result] if isinstance(result, Tensor) else list(result)


def _output_names(count: int) -> list[str]:
    return [OUTPUT_NAME] if count == 1 else [f"features_{i}" for i in range(count)]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] = (3, 224, 224),
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    optimize: bool = False,
) -> Path:
    """Export ``model`` (run in eval mode) to an ONNX file at ``path``: input "images", output "logits".

    Args:
        model: a RedNet (or any module whose involutions go through ``ops.involution``), float32 or float16. A
            ``features_only`` model's outputs are named features_0, features_1, ...
        path: the .onnx file to write; weights are stored inside it.
        input_size: (C, H, W) of the input. H and W are fixed in the graph: they decide which kernel taps can
            reach the image.
        dynamic_batch: leave the batch dimension free (else it is fixed to 1).
        opset_version: the ONNX opset; torch's default when None.
        optimize: run onnxscript's graph optimizer: RedNet-50 goes from ~22k to ~4k nodes and 86 to 64 MiB, but the
            export takes ~4× longer (minutes), and ONNX Runtime, which optimizes at load, runs both as fast.
    """
    _require("onnx")
    _require("onnxscript")
    if len(input_size) != 3:
        raise ValueError(f"export_onnx: input_size must be (C, H, W), got {input_size!r}")
    parameter = next(model.parameters())
    if parameter.dtype == torch.bfloat16:
        # ONNX Runtime rejects bfloat16 AveragePool; TensorRT and co. take bfloat16 as a build flag instead.
        raise ValueError(
            "export_onnx: the model is bfloat16, which ONNX Runtime cannot run: export model.float() (and let the "
            "runtime lower the precision, e.g. TensorRT's --bf16) or model.half()"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = _EXAMPLE_BATCH if dynamic_batch else 1
    example = torch.randn(batch, *input_size, device=parameter.device, dtype=parameter.dtype)
    with _eval_mode(model):
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
            output_names=_output_names(len(program.graph_signature.user_outputs)),
            opset_version=opset_version,
            external_data=False,
            optimize=optimize,
        )
    return path


def check_onnx(path: str | Path, model: nn.Module, images: Tensor) -> float:
    """Run ``images`` through the ONNX file (ONNX Runtime, CPU) and through ``model`` (eval mode).

    Returns the largest abs difference over all outputs, relative to the largest abs PyTorch output (at least 1):
    float32 rounding alone gives ~1e-7 to 1e-6 on a RedNet.
    """
    _require("onnxruntime", "the ONNX Runtime check")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parameter = next(model.parameters())
    images = images.to(device=parameter.device, dtype=parameter.dtype)
    got = session.run(None, {INPUT_NAME: images.cpu().numpy()})
    with _eval_mode(model), torch.no_grad():
        expected = [output.float().cpu().numpy() for output in _outputs(model(images))]
    if len(got) != len(expected):
        raise RuntimeError(f"{path} has {len(got)} outputs but the model returns {len(expected)}")
    scale = max(1.0, *(float(np.abs(output).max()) for output in expected))
    difference = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(got, expected))
    return difference / scale
