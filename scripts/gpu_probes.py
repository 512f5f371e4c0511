"""The Python steps of scripts/gpu_check.sh that are not tests or benchmarks (torch and CuPy only, no hydra).

    python scripts/gpu_probes.py versions           # versions and the cupy backend's status; exit 3: no CUDA device
    python scripts/gpu_probes.py kernels OUT.md     # registers, local memory and blocks per SM of every kernel here
    python scripts/gpu_probes.py sanitizer-cases    # one small run of each of the 12 kernels (for compute-sanitizer)

Any other failure exits non-zero with the traceback, so gpu_check.sh reports the real error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops  # noqa: E402
from ops import cupy_backend, layout, occupancy  # noqa: E402

NO_CUDA_DEVICE = 3


def versions() -> int:
    """Prints what the report needs to name the machine; NO_CUDA_DEVICE when torch sees no GPU."""
    print("python", sys.version.split()[0])
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
    try:
        import cupy

        print("cupy", cupy.__version__, "CUDA path", cupy.cuda.get_cuda_path())
    except Exception as error:  # report it; the tests will say what fails because of it
        print(f"cupy unusable: {type(error).__name__}: {error}")
    if not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False")
        return NO_CUDA_DEVICE
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    print(f"device cuda:{index} {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB")  # fmt: skip
    reason = cupy_backend.probe(torch.device("cuda", index))
    print("cupy backend:", "available" if reason is None else f"NOT available: {reason}")
    print("backends:", ops.available_backends())
    return 0


def kernels(out: Path) -> int:
    """A markdown table of every kernel as loaded on this GPU; exit 1 when one spills (local memory) or an
    fp32/fp16/bf16 kernel leaves room for fewer than MIN_BLOCKS_PER_SM blocks per SM."""
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    limits = occupancy.SMLimits(
        registers=props.regs_per_multiprocessor,
        max_warps=props.max_threads_per_multi_processor // props.warp_size,
        shared_bytes=props.shared_memory_per_multiprocessor,
    )
    lines = [
        f"Kernels on {props.name} (sm_{props.major}{props.minor}): {limits.registers} registers and "
        f"{limits.max_warps} warps per SM; {cupy_backend.BLOCK_SIZE} threads per block.",
        "",
        "| dtype | kernel | channels × pixels per thread | registers | local bytes | blocks/SM | warps/SM |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    failures = []
    for dtype in cupy_backend.SCALAR_TYPES:
        for bits in (32, 64):
            split = cupy_backend.default_split(bits)
            for name, kernel in cupy_backend._kernels(index, dtype, *split, bits).items():
                registers, local = kernel.num_regs, kernel.local_size_bytes
                blocks = occupancy.blocks_per_sm(registers, cupy_backend.BLOCK_SIZE, kernel.shared_size_bytes, limits)
                warps = blocks * cupy_backend.BLOCK_SIZE // props.warp_size
                lines.append(
                    f"| {str(dtype).removeprefix('torch.')} | {name} | {split[0]} × {split[1]} | {registers} | "
                    f"{local} | {blocks} | {warps} |"
                )
                if local or blocks < cupy_backend.min_blocks_per_sm(dtype):
                    failures.append(f"{dtype} {name}: {registers} registers, {local} B local, {blocks} blocks/SM")
    lines += ["", "Below target: " + ("; ".join(failures) if failures else "none.")]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def sanitizer_cases() -> int:
    """Forward and backward through every kernel (both layouts, both index widths) on small float32 inputs."""
    plan = cupy_backend.plan_launch
    for bits in (32, 64):
        cupy_backend.plan_launch = lambda *args, b=bits, **kwargs: plan(*args, **{**kwargs, "index_bits": b})
        for channels_last in (False, True):
            generator = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(2, 36, 11, 9, device="cuda", generator=generator)
            weight = torch.randn(2, 2, 5, 5, 6, 5, device="cuda", generator=generator)
            x = layout.to_layout(x, channels_last).requires_grad_()
            weight = layout.weight_to_layout(weight, channels_last).requires_grad_()
            out = ops.involution(x, weight, stride=2, backend="cupy")
            grads = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
            torch.cuda.synchronize()
            assert all(g.isfinite().all() for g in (out, *grads)), (bits, channels_last)
    cupy_backend.plan_launch = plan
    print("ran forward, grad_input and grad_weight in NCHW and NHWC with 32- and 64-bit indexing")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions")
    sub.add_parser("kernels").add_argument("out", type=Path)
    sub.add_parser("sanitizer-cases")
    args = parser.parse_args()
    if args.command == "versions":
        sys.exit(versions())
    if args.command == "kernels":
        sys.exit(kernels(args.out))
    sys.exit(sanitizer_cases())


if __name__ == "__main__":
    main()
