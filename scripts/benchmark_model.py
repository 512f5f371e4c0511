"""Training and inference throughput and peak memory of RedNet-26/50/101 next to timm's ResNet-26/50/101.

    python scripts/benchmark_model.py                                    # CUDA if present: bf16 + channels_last
    python scripts/benchmark_model.py --device cpu --threads 1 --batch-size 8 --out model.md  # for docs/benchmarks.md

All models run in the same invocation with the same settings, each in a fresh process so that one model's memory
does not count against the next. A training step is forward + backward + SGD step; inference is a forward under
torch.inference_mode. Memory: peak CUDA allocation on GPU; on CPU the growth of the peak resident set size over the
process's size before the model was built. Writes a markdown table (stdout, and --out if given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rednet  # noqa: E402  (registers the RedNets with timm)
from rednet import monitor  # noqa: E402

PAIRS = (("rednet26", "resnet26"), ("rednet50", "resnet50"), ("rednet101", "resnet101"))
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def benchmark(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """img/s and peak memory (MB) of one model, inference first (its peak is the lower one), then training."""
    torch.manual_seed(0)
    # The high-water mark so far holds the imports' transient peaks: start it again, so the peak is the model's.
    peak_valid = device.type == "cuda" or monitor.reset_peak_rss()
    base_mb = monitor.current_rss_bytes() / 2**20
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    extra = {"involution_backend": args.involution_backend} if name.startswith("rednet") else {}
    model = timm.create_model(name, num_classes=1000, **extra).to(device=device, memory_format=memory_format)
    runner = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = AMP[args.amp]

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            runner(x)

    def train_step() -> None:
        with autocast():
            loss = torch.nn.functional.cross_entropy(runner(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def peak_mb() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return monitor.peak_rss_bytes() / 2**20 - base_mb if peak_valid else float("nan")

    model.eval()
    infer_s = _timed(infer_step, device, args.warmup, args.iters)
    infer_mb = peak_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_s = _timed(train_step, device, args.warmup, args.iters)
    return {
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "train": args.batch_size / train_s,
        "infer": args.batch_size / infer_s,
        "train_mb": peak_mb(),
        "infer_mb": infer_mb,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--amp", choices=list(AMP), default=None, help="default bf16 on GPU, none on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10 GPU, 2 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 30 GPU, 5 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 gives stable numbers on a busy host)")
    parser.add_argument("--involution-backend", default="auto", help="the RedNets' ops.involution backend")
    parser.add_argument("--models", nargs="+", default=[m for pair in PAIRS for m in pair])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: benchmark one model
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.amp = args.amp or ("bf16" if gpu else "none")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.iters = args.iters or (30 if gpu else 5)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(benchmark(args.worker, args, device)))
        return
    assert rednet.list_models(), "the RedNets are not registered"

    rows = []
    for name in args.models:
        worker = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--worker", name], capture_output=True, text=True, check=True
        )
        result = json.loads(worker.stdout.strip().splitlines()[-1])
        print(f"{name}: {result}", file=sys.stderr, flush=True)
        label = f"{name} ({args.involution_backend})" if name.startswith("rednet") else name
        rows.append(
            f"| {label} | {result['params']:.2f} | {result['train']:.1f} | {result['infer']:.1f} "
            f"| {result['train_mb']:.0f} | {result['infer_mb']:.0f} |"
        )
    settings = (
        f"batch {args.batch_size}, {args.img_size}x{args.img_size}, amp {args.amp}, "
        f"channels_last {args.channels_last}, compile {args.compile}, {args.iters} timed steps after {args.warmup}"
    )
    memory = "peak CUDA allocation" if device.type == "cuda" else "peak resident memory above the process before"
    table = "\n".join(
        [
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {device_name(device)} (torch {torch.__version__}, "
            f"timm {timm.__version__}); {settings}. Memory: {memory}.",
            "",
            "| model | params (M) | train img/s | infer img/s | train peak MB | infer peak MB |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
