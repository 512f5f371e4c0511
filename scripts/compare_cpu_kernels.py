"""A/B timing of two sources of the native CPU kernels (ops/kernels/involution_cpu.cpp), calls interleaved.

    git show 72b9f44:ops/kernels/involution_cpu.cpp > /tmp/before.cpp
    python scripts/compare_cpu_kernels.py /tmp/before.cpp                  # vs the working tree's kernels
    python scripts/compare_cpu_kernels.py /tmp/before.cpp other.cpp --threads 1 --shapes layer1 layer2

Both sources are built (cached like the backend's own build) and loaded into one process; forward, grad-input and
grad-weight run on the same tensors, alternating between the two builds call by call, so both see the same
machine state: on a shared host, where separate runs differ by 30%, the ratio is what to quote. Prints the minimum
over --repeats calls of each (less sensitive to interference than the median), their ratio, the largest absolute
difference of the results, and the total as a multiple of the bandwidth floor (scripts/benchmark_op.py's: the bytes
the three ops must move over a large copy timed in this run; that script gives the full table with the compute
floor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ops import cpu_backend  # noqa: E402
from scripts.benchmark_op import SHAPES, Shape, bytes_moved, copy_bandwidth  # noqa: E402

KERNELS = ("forward", "grad_input", "grad_weight")


def load(source: Path):
    """The ctypes library built from `source` (SystemExit with the compiler's error when it does not build)."""
    try:
        return cpu_backend.load_library(source)
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"{source}: {error}") from None


def calls(shape: Shape, batch: int) -> dict:
    """The three kernels on one problem of `shape`, float32 NCHW."""
    k, s, h, ho = shape.kernel_size, shape.stride, shape.size, shape.out_size
    p, c, g = (k - 1) // 2, shape.channels, shape.groups
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, h, generator=generator)
    weight = torch.randn(batch, g, k, k, ho, ho, generator=generator)
    grad_out = torch.randn(batch, c, ho, ho, generator=generator)
    return {
        "forward": lambda: cpu_backend.forward(x, weight, s, p, 1),
        "grad_input": lambda: cpu_backend.grad_input(grad_out, weight, (h, h), c, s, p, 1),
        "grad_weight": lambda: cpu_backend.grad_weight(grad_out, x, k, g, s, p, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="kernel source A")
    parser.add_argument("after", type=Path, nargs="?", default=cpu_backend.KERNEL_FILE, help="B (default: ours)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=None, help="benchmark_op layer names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libraries = {"A": load(args.before.resolve()), "B": load(args.after.resolve())}
    bandwidth = copy_bandwidth("cpu")
    print(f"A = {args.before}, B = {args.after}; {args.threads} threads, batch {args.batch}, float32 NCHW; min of "
          f"{args.repeats} interleaved calls; copy bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print("| layer | kernel | A ms | B ms | A/B | max abs diff |\n|---|---|---:|---:|---:|---:|")
    unsteady = []
    for shape in [s for s in SHAPES if args.shapes is None or s.name in args.shapes]:
        problem = calls(shape, args.batch)
        totals = {"A": 0.0, "B": 0.0}
        for kernel in KERNELS:
            results, best, worst = {}, {"A": float("inf"), "B": float("inf")}, {"A": 0.0, "B": 0.0}
            for round_ in range(args.repeats + 2):
                for label, library in libraries.items():
                    with cpu_backend.using(library):
                        start = time.perf_counter()
                        results[label] = problem[kernel]()
                        seconds = time.perf_counter() - start
                    if round_ >= 2:  # the first two rounds warm up
                        best[label], worst[label] = min(best[label], seconds), max(worst[label], seconds)
            if max(worst.values()) > 2 * min(best.values()):
                unsteady.append(f"{shape.name} {kernel}")
            difference = (results["A"] - results["B"]).abs().max().item()
            for label in totals:
                totals[label] += best[label]
            print(f"| {shape.name} | {kernel} | {best['A'] * 1e3:.2f} | {best['B'] * 1e3:.2f} | "
                  f"{best['A'] / best['B']:.2f} | {difference:.1e} |")  # fmt: skip
        floor = bytes_moved(shape, args.batch, 4)[1] / bandwidth
        a, b = totals["A"], totals["B"]
        print(f"| {shape.name} | all three | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} | "
              f"x floor: {a / floor:.1f} -> {b / floor:.1f} |")  # fmt: skip
    if unsteady:
        print(
            f"\nWarning: call times varied more than 2x ({', '.join(unsteady)}): other processes were probably using "
            "the cores. Rerun on a quiet machine, with more --repeats or --threads below the core count."
        )


if __name__ == "__main__":
    main()
