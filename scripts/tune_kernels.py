"""Time the CUDA kernels under other compile-time splits of a thread's work (needs a GPU).

One thread handles a run of channels of a group and, in the NCHW kernels, a few adjacent pixels of a row; both are
compile-time constants (ops/cupy_backend.py: CHANNELS_PER_THREAD, PIXELS_PER_THREAD), and the register count, so the
occupancy, grows with them. This times each kernel alone, in both layouts, at RedNet-50's involution shapes for
several splits, checks every split's output against the default's, and prints a markdown table of microseconds
with the fastest split of each row in bold.

    python scripts/tune_kernels.py                               # bfloat16, batch 64
    python scripts/tune_kernels.py --dtype float32 --layouts nhwc --out tune.md
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ops import cupy_backend, layout  # noqa: E402
from scripts.benchmark_op import DTYPES, SHAPES, Shape, device_name  # noqa: E402

# (channels per thread, pixels per thread); the NHWC kernels take one pixel, so only the channels vary there.
SPLITS = {
    "nchw": [(16, 1), (16, 2), (16, 4), (8, 2), (8, 4), (4, 4)],
    "nhwc": [
        (16, cupy_backend.PIXELS_PER_THREAD),
        (8, cupy_backend.PIXELS_PER_THREAD),
        (4, cupy_backend.PIXELS_PER_THREAD),
    ],
}
DEFAULT_SPLIT = (cupy_backend.CHANNELS_PER_THREAD, cupy_backend.PIXELS_PER_THREAD)


def kernel_problems(
    shape: Shape, batch: int, dtype: torch.dtype, memory: str, device: str = "cuda"
) -> dict[str, tuple]:
    """{kind: (geometry, a, b, out)} for the three kernels, the tensors laid out for `memory`."""
    channels_last = memory == "nhwc"
    k, size, h_out = shape.kernel_size, shape.size, shape.out_size
    n, c, g = batch, shape.channels, shape.groups
    geometry = cupy_backend.Geometry(n, c, size, size, g, k, h_out, h_out, shape.stride, (k - 1) // 2, 1)

    def image(height: int) -> torch.Tensor:
        return layout.to_layout(torch.randn(n, c, height, height, device=device, dtype=dtype), channels_last)

    x, grad_out = image(size), image(h_out)
    weight_shape = (n, g, k, k, h_out, h_out)
    weight = layout.weight_to_layout(torch.randn(weight_shape, device=device, dtype=dtype), channels_last)
    return {
        "forward": (geometry, x, weight, torch.empty_like(grad_out)),
        "grad_input": (geometry, grad_out, weight, torch.empty_like(x)),
        "grad_weight": (geometry, grad_out, x, layout.empty_weight(x, weight_shape, channels_last)),
    }


def time_launch(launch, repeats: int = 5, calls: int = 20) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back launches, in seconds."""
    launch()  # compiles on first use
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            launch()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def time_splits(kind: str, memory: str, splits: list[tuple[int, int]], geometry, a, b, out) -> list[float]:
    """Seconds per launch of one kernel for each split; each split's output must match the default split's."""
    cupy_backend._launch(kind, geometry, a, b, out, memory, *DEFAULT_SPLIT)
    expected = out.clone()
    times = []
    for split in splits:
        out.fill_(float("nan"))
        launch = functools.partial(cupy_backend._launch, kind, geometry, a, b, out, memory, *split)
        times.append(time_launch(launch))
        torch.testing.assert_close(out, expected, msg=lambda m, s=split: f"{kind} {memory} split {s}: {m}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", nargs="+", default=None, help="layer names (default: all of benchmark_op's)")
    parser.add_argument("--layouts", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    available, reason = cupy_backend.is_available()
    if not available:
        sys.exit(f"tune_kernels.py needs a CUDA GPU with the cupy backend: {reason}")

    dtype = DTYPES[args.dtype]
    shapes = [s for s in SHAPES if args.shapes is None or s.name in args.shapes]
    lines = [f"Device: {device_name('cuda')}; {args.dtype}; batch {args.batch}; µs per kernel, median.", ""]
    print("\n".join(lines), flush=True)
    for memory in args.layouts:
        splits = SPLITS[memory]
        header = " | ".join(f"{c} ch × {p} px" if memory == "nchw" else f"{c} ch" for c, p in splits)
        table = [f"| layer ({memory}) | kernel | {header} |", "|---|---|" + "---:|" * len(splits)]
        print("\n".join(table), flush=True)
        for shape in shapes:
            torch.manual_seed(0)
            for kind, (geometry, a, b, out) in kernel_problems(shape, args.batch, dtype, memory).items():
                times = time_splits(kind, memory, splits, geometry, a, b, out)
                best = min(times)
                cells = " | ".join(f"**{t * 1e6:.1f}**" if t == best else f"{t * 1e6:.1f}" for t in times)
                row = f"| {shape.name} | {kind} | {cells} |"
                table.append(row)
                print(row, flush=True)
        lines += table + [""]
    if args.out:
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
