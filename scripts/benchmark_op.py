"""Time and memory of the involution backends at RedNet-50's involution shapes.

Prints (and with --out writes) a markdown table: median forward and forward+backward time (the backward ops' work
only: torch.autograd.grad, no accumulation into .grad), peak memory growth of forward+backward, and each time as a
multiple of the bandwidth floor (the bytes the op must move divided by the bandwidth of a large copy on the device
measured in the same run), and fwd+bwd as a multiple of the compute floor (the op's multiply-adds at the FLOP rate
of a large matrix multiply in the same run; on a CPU whose FLOP rate per byte of bandwidth is below the op's
arithmetic intensity, about 5 FLOP per byte in float32, this floor is the higher one). On CPU the backends include
"cpu" (the native kernels) when they build.

    python scripts/benchmark_op.py                      # CPU, float32, batch 8
    python scripts/benchmark_op.py --device cuda --dtypes float32 bfloat16 float16 --out docs/op_h100.md

On GPU the tensors are also laid out as a channels_last model hands them over (NHWC images, pixel-major kernels),
which the "cupy" backend runs with its NHWC kernels; the row "cupy-nchw-copies" runs the same inputs through copies
to NCHW and the NCHW kernels instead, the comparison that decides whether channels_last pays for RedNet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops  # noqa: E402
from ops import cupy_backend, layout  # noqa: E402
from ops.involution import output_size  # noqa: E402
from rednet import monitor  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LAYOUTS = ("nchw", "channels_last")
# Pseudo-backend: "cupy" with the NHWC kernels turned off, so channels_last inputs go through NCHW copies.
NCHW_COPIES = "cupy-nchw-copies"


@dataclass(frozen=True)
class Shape:
    """One involution layer of RedNet-50 (G = C / 16)."""

    name: str
    channels: int
    size: int
    kernel_size: int = 7
    stride: int = 1

    @property
    def groups(self) -> int:
        return self.channels // 16

    @property
    def out_size(self) -> int:
        k = self.kernel_size
        return output_size(self.size, k, self.stride, (k - 1) // 2, 1)


SHAPES = [
    Shape("stem K=3", 32, 112, kernel_size=3),
    Shape("layer1", 64, 56),
    Shape("layer2", 128, 28),
    Shape("layer3", 256, 14),
    Shape("layer4", 512, 7),
    Shape("layer2.0 s2", 128, 56, stride=2),
    Shape("layer3.0 s2", 256, 28, stride=2),
    Shape("layer4.0 s2", 512, 14, stride=2),
]


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, device: str, channels_last: bool = False):
    k, h_out = shape.kernel_size, shape.out_size
    x = torch.randn(batch, shape.channels, shape.size, shape.size, device=device, dtype=dtype)
    weight = torch.randn(batch, shape.groups, k, k, h_out, h_out, device=device, dtype=dtype)
    grad_out = torch.randn(batch, shape.channels, h_out, h_out, device=device, dtype=dtype)
    x, grad_out = layout.to_layout(x, channels_last), layout.to_layout(grad_out, channels_last)
    weight = layout.weight_to_layout(weight, channels_last)
    return x.requires_grad_(), weight.requires_grad_(), grad_out


def bytes_moved(shape: Shape, batch: int, element_size: int) -> tuple[int, int]:
    """Bytes the op must move at least: forward, and forward + backward."""
    x = batch * shape.channels * shape.size**2
    y = batch * shape.channels * shape.out_size**2
    w = batch * shape.groups * shape.kernel_size**2 * shape.out_size**2
    forward = x + w + y
    backward = (y + w + x) + (y + x + w)  # grad-input: dY, W → dX; grad-weight: dY, X → dW
    return forward * element_size, (forward + backward) * element_size


def measure(
    shape: Shape,
    backend: str,
    batch: int,
    dtype: torch.dtype,
    device: str,
    min_run_time: float,
    channels_last: bool = False,
) -> dict:
    """Peak memory growth of one forward+backward and the median times.

    Returns {"peak_bytes": bytes above the memory held before the step (the inputs excluded; NaN on CPU where
    the peak RSS cannot be reset), "forward": s, "forward_backward": s}. The peak is taken first, from reset CUDA
    peak stats or a reset RSS high-water mark; run it on CPU through `measure_in_child`.
    """
    if backend == NCHW_COPIES:
        cupy_backend.USE_NHWC_KERNELS = False
        try:
            return measure(shape, "cupy", batch, dtype, device, min_run_time, channels_last)
        finally:
            cupy_backend.USE_NHWC_KERNELS = True
    x, weight, grad_out = make_inputs(shape, batch, dtype, device, channels_last)

    def step(backward: bool) -> None:
        out = ops.involution(x, weight, shape.stride, backend=backend)
        if backward:  # the gradients themselves: .backward() would also add them into x.grad and weight.grad
            torch.autograd.grad(out, (x, weight), grad_out)

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        # Warm up on one sample first: the first call loads code and thread pools that would count as growth.
        x_warm, weight_warm, grad_warm = make_inputs(shape, 1, dtype, device)
        out_warm = ops.involution(x_warm, weight_warm, shape.stride, backend=backend)
        torch.autograd.grad(out_warm, (x_warm, weight_warm), grad_warm)
        del x_warm, weight_warm, grad_warm, out_warm
        # The high-water mark so far holds the imports, the native build and the warm-up: start it again here, so
        # the peak is this one step's. Where the kernel refuses, there is no honest number to give.
        peak = monitor.peak_rss_rise(lambda: step(True))
    times = {}
    for label, backward in (("forward", False), ("forward_backward", True)):
        # torch.utils.benchmark.Timer runs on one thread unless told: time with the threads the table reports.
        timer = Timer(
            "step(backward)", globals={"step": step, "backward": backward}, num_threads=torch.get_num_threads()
        )
        times[label] = timer.blocked_autorange(min_run_time=min_run_time).median
    return {"peak_bytes": peak, **times}


def measure_in_child(
    shape: Shape, backend: str, batch: int, dtype: str, min_run_time: float, channels_last: bool = False
) -> dict:
    """`measure` on CPU in a fresh process: its peak RSS growth is the op's alone, not memory that an earlier
    measurement freed but the allocator kept (an op reusing those pages would read as using none)."""
    code = (
        "import json, sys, torch; sys.argv = ['x']; from scripts.benchmark_op import measure, Shape, DTYPES;"
        f"torch.set_num_threads({torch.get_num_threads()}); torch.manual_seed(0);"
        f"print(json.dumps(measure(Shape(**{asdict(shape)!r}), {backend!r}, {batch}, "
        f"DTYPES[{dtype!r}], 'cpu', {min_run_time}, {channels_last})))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    source = torch.empty(256 * 2**20, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    globals_ = {"source": source, "target": target}
    timer = Timer("target.copy_(source)", globals=globals_, num_threads=torch.get_num_threads())
    seconds = timer.blocked_autorange().median
    return 2 * source.numel() * source.element_size() / seconds


def matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Floating-point operations per second of a large matrix multiply (the compute roof: BLAS / cuBLAS reach most
    of the device's peak multiply-add rate)."""
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timer = Timer("torch.mm(a, b)", globals={"a": a, "b": b, "torch": torch}, num_threads=torch.get_num_threads())
    return 2 * size**3 / timer.blocked_autorange(min_run_time=1.0).median


def forward_backward_flops(shape: Shape, batch: int) -> int:
    """2 x the multiply-adds of forward, grad-input and grad-weight (each N·C·K²·Ho·Wo)."""
    return 3 * 2 * batch * shape.channels * shape.kernel_size**2 * shape.out_size**2


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "CPU")
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument("--shapes", nargs="+", default=None, help="layer names to run (default: all)")
    parser.add_argument("--layouts", nargs="+", default=None, choices=LAYOUTS, help="default: both on GPU, nchw on CPU")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1 CPU, 0.3 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    on_gpu = args.device == "cuda"
    batch = args.batch or (64 if on_gpu else 8)
    dtypes = args.dtypes or (["float32", "bfloat16"] if on_gpu else ["float32"])
    min_run_time = args.min_run_time or (0.3 if on_gpu else 1.0)
    backends = args.backends or [b for b in ops.available_backends() if on_gpu or b != "cupy"]
    layouts = args.layouts or (list(LAYOUTS) if on_gpu else ["nchw"])
    shapes = [s for s in SHAPES if args.shapes is None or s.name in args.shapes]
    bandwidth = copy_bandwidth(args.device)
    roofs = {dtype: matmul_flops(args.device, DTYPES[dtype]) for dtype in dtypes}

    lines = [
        f"Device: {device_name(args.device)}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"batch {batch}; median times.",
    ]
    lines.append(f"Large-copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s (the floor's denominator).")
    roof_text = ", ".join(f"{dtype} {roof / 1e9:.0f} GFLOP/s" for dtype, roof in roofs.items())
    lines.append(f"Large matrix multiply in this run: {roof_text} (the compute floor's denominator).")
    lines += [
        "",
        "| layer (C, H, K, s) | dtype | layout | backend | forward ms | fwd+bwd ms | peak fwd+bwd MiB |"
        + " fwd × floor | fwd+bwd × floor | fwd+bwd × compute floor |"
        + ("" if on_gpu else " fwd+bwd vs unfold |"),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + ("" if on_gpu else "---:|"),
    ]
    print("\n".join(lines), flush=True)
    for shape, dtype, memory in itertools.product(shapes, dtypes, layouts):
        channels_last = memory == "channels_last"
        rows = {}
        for backend in backends + ([NCHW_COPIES] if channels_last and "cupy" in backends else []):
            if on_gpu:
                torch.manual_seed(0)
                rows[backend] = measure(shape, backend, batch, DTYPES[dtype], "cuda", min_run_time, channels_last)
                torch.cuda.empty_cache()
            else:
                rows[backend] = measure_in_child(shape, backend, batch, dtype, min_run_time, channels_last)
        for backend, row in rows.items():
            label = f"{shape.name} ({shape.channels}, {shape.size}, {shape.kernel_size}, {shape.stride})"
            line = (
                f"| {label} | {dtype} | {memory} | {backend} | {row['forward'] * 1e3:.3f} | "
                f"{row['forward_backward'] * 1e3:.3f} | {row['peak_bytes'] / 2**20:.1f} |"
            )
            floor_fwd, floor_all = (b / bandwidth for b in bytes_moved(shape, batch, DTYPES[dtype].itemsize))
            line += f" {row['forward'] / floor_fwd:.2f} | {row['forward_backward'] / floor_all:.2f} |"
            compute_floor = forward_backward_flops(shape, batch) / roofs[dtype]
            line += f" {row['forward_backward'] / compute_floor:.2f} |"
            if not on_gpu:
                if "unfold" in rows:
                    line += f" {rows['unfold']['forward_backward'] / row['forward_backward']:.1f}× faster |"
                else:
                    line += " (unfold not run) |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
