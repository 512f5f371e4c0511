"""Export a RedNet to ONNX (plain Pad/Slice/Mul/Add for involution: no plugin needed), then check it in ONNX Runtime.

    python scripts/export_onnx.py --model rednet50 --weights outputs/run/checkpoints/best.pt --out rednet50.onnx
    python scripts/export_onnx.py --model rednet50 --out /tmp/r50.onnx --time 20 --threads 1   # ORT vs PyTorch

--weights takes any checkpoint rednet reads (train.py's, official mmcls, timm, a URL); the architecture, class count,
stem kernel size and input size come from it unless --model / --num-classes / --img-size say otherwise. Needs
``pip install 'rednet[onnx]'``, and onnxruntime for the check.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import resolve_data_config
from torch import nn

import rednet
from rednet import factory, weights
from rednet.export import INPUT_NAME, check_onnx, export_onnx


def _seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_inference(
    path: Path, model: nn.Module, images: torch.Tensor, iters: int, threads: int | None, warmup: int = 2
) -> tuple[float, float]:
    """Median ms per batch on the CPU: (ONNX Runtime, PyTorch eager under inference_mode), same thread count.

    The two alternate call by call, so a busy spell on a shared machine slows both rather than one."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: images.numpy()}
    steps = (lambda: session.run(None, feed), lambda: model(images))
    times: tuple[list[float], list[float]] = ([], [])
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)
    try:
        with torch.inference_mode():
            for i in range(warmup + iters):
                for step, samples in zip(steps, times):
                    elapsed = _seconds(step)
                    if i >= warmup:
                        samples.append(elapsed)
    finally:
        torch.set_num_threads(torch_threads)
    onnx_ms, torch_ms = (statistics.median(samples) * 1e3 for samples in times)
    return onnx_ms, torch_ms


def _check(path: Path, model: nn.Module, size: tuple[int, int, int], batch: int, tolerance: float) -> float | None:
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is not installed: skipped the check (pip install onnxruntime)")
        return None
    difference = check_onnx(path, model, torch.randn(batch, *size))
    print(f"ONNX Runtime vs PyTorch, batch {batch}: largest difference {difference:.2e} of the largest logit")
    if difference > tolerance:
        raise SystemExit(f"the ONNX model differs from PyTorch by {difference:.2e} > --tolerance {tolerance}")
    return difference


def main(argv: list[str] | None = None) -> float | None:
    """Export, then (unless --no-check) return the difference from PyTorch on a random batch (see check_onnx)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, choices=rednet.list_models(), help="default: the checkpoint's, else rednet50"
    )
    parser.add_argument("--weights", default=None, help="checkpoint path or URL (default: random weights)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    parser.add_argument(
        "--img-size", type=int, default=None, help="input height and width, fixed in the graph (default: the weights')"
    )
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--optimize", action="store_true", help="shrink the graph (slower export; same ORT speed)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime check")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest difference the check allows, relative to the logits"
    )
    parser.add_argument("--time", type=int, default=0, metavar="ITERS", help="time ORT vs PyTorch (median of ITERS)")
    parser.add_argument("--batch-size", type=int, default=1, help="the batch --time runs")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for --time (both runtimes)")
    args = parser.parse_args(argv)
    if args.static_batch and args.batch_size != 1:
        parser.error(f"--static-batch fixes the batch to 1, so --batch-size {args.batch_size} cannot run")

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = factory.model_from_weights(args.weights, args.model, "rednet50", **kwargs)
    # The input size the weights were trained and evaluated at (their pretrained_cfg), unless --img-size.
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    # The channels are the model's (a checkpoint's in_chans), not its architecture's pretrained_cfg (3, H, W).
    size = (weights.model_in_chans(model), *resolve_data_config(overrides, model=model)["input_size"][1:])
    dynamic_batch = not args.static_batch
    path = export_onnx(model, args.out, size, dynamic_batch, opset_version=args.opset, optimize=args.optimize)
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), input {INPUT_NAME!r} (N, {', '.join(map(str, size))})"
    )
    # Batch 3 is not the export's example batch, so the check exercises the dynamic batch.
    difference = _check(path, model, size, 3 if dynamic_batch else 1, args.tolerance) if args.check else None
    if args.time:
        images = torch.randn(args.batch_size, *size)
        onnx_ms, torch_ms = time_inference(path, model, images, args.time, args.threads)
        print(
            f"batch {len(images)}, {args.threads or 'default'} threads, median of {args.time}: ONNX Runtime "
            f"{onnx_ms:.1f} ms, PyTorch {torch_ms:.1f} ms (ONNX Runtime {torch_ms / onnx_ms:.2f}x as fast)"
        )
    return difference


if __name__ == "__main__":
    main()
