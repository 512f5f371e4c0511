"""Interleaved training and inference throughput of several models in one process: ratios that hold on a noisy host.

    python scripts/compare_models.py resnet50 rednet50 rednet50@torch rednet50@ideal --threads 2
    python scripts/compare_models.py resnet26 rednet26 rednet26@/tmp/before.cpp --threads 2

Each model is given as NAME[@VARIANT]: VARIANT is an ops.involution backend ("auto", "cpu", "torch", "unfold"),
"ideal" (a bound, not a result: the operator replaced by one elementwise product, so the RedNet shows the fastest it
can get from the operator's speed alone), "shared" (a looser bound: every Involution module, kernel generator
included, replaced by x[:, :, ::s, ::s], leaving the stem convs, the bottlenecks' 1x1 convs, BNs, ReLUs and pooling
that RedNet shares with ResNet: no involution design, fused or not, makes the RedNet faster than this), or a path
to a source of the native CPU kernels, built and used for that model only (before/after comparisons of
ops/kernels/involution_cpu.cpp). The models are timed step by step in turn,
A B C A B C ..., so a slow spell of a shared machine falls on all of them: quote the ratios. Timing only: peak
memory needs a process per model (scripts/benchmark_model.py). A training step is forward + backward + SGD step on
random data; inference a forward under torch.inference_mode; fp32, NCHW unless --channels-last.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops  # noqa: E402
import rednet  # noqa: E402  (registers the RedNets with timm)
from ops import cpu_backend  # noqa: E402
from rednet.models.involution import Involution  # noqa: E402


def _nearly_free_aggregate(self: Involution, x: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    """Involution._aggregate with the operator replaced by one elementwise product: wrong values, the same shapes
    and autograd graph (the kernel generator still runs forward and backward)."""
    kernels = self._kernels_from_features(reduced)
    per_group = x.shape[1] // kernels.shape[1]
    return x[:, :, :: self.stride, :: self.stride] * kernels[:, :, 0, 0].repeat_interleave(per_group, dim=1)


def _skip_involution(self: Involution, x: torch.Tensor) -> torch.Tensor:
    """Involution.forward with the whole module (kernel generator and operator) replaced by its output's shape."""
    return x[:, :, :: self.stride, :: self.stride]


class Entry:
    """One model to time: its spec, the module, the native kernel build it runs with (None: ours), step times."""

    def __init__(self, spec: str, model: torch.nn.Module, library: object = None) -> None:
        self.spec, self.model, self.library = spec, model, library
        self.seconds: dict[str, list[float]] = {"train": [], "infer": []}


VARIANTS = (*ops.BACKENDS, "ideal", "shared")


def build(spec: str, channels_last: bool) -> Entry:
    """The model of one NAME[@VARIANT] spec; SystemExit naming the spec when it cannot be built."""
    name, at, variant = spec.partition("@")
    kwargs, library = {}, None
    if name not in timm.list_models():
        raise SystemExit(f"{spec}: no timm model {name!r} (RedNets: {', '.join(rednet.list_models())})")
    if at and not name.startswith("rednet"):
        raise SystemExit(f"{spec}: only RedNets take @VARIANT")
    if at and variant not in VARIANTS and not variant.endswith(".cpp"):
        raise SystemExit(f"{spec}: @{variant} is not one of {', '.join(VARIANTS)} or a path to a .cpp kernel source")
    if variant in ops.BACKENDS and variant != "auto" and variant not in ops.available_backends():
        raise SystemExit(f"{spec}: backend {variant!r} is not available here ({', '.join(ops.available_backends())})")
    if variant.endswith(".cpp"):
        try:
            library = cpu_backend.load_library(Path(variant).resolve())
        except (OSError, RuntimeError) as error:
            raise SystemExit(f"{spec}: the kernels do not build: {error}") from None
        kwargs = {"involution_backend": "cpu"}
    elif variant and variant not in ("ideal", "shared"):
        kwargs = {"involution_backend": variant}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, **kwargs)
    if variant == "ideal":
        for module in model.modules():
            if isinstance(module, Involution):
                module._aggregate = types.MethodType(_nearly_free_aggregate, module)
    if variant == "shared":
        for module in model.modules():
            if isinstance(module, Involution):
                module.forward = types.MethodType(_skip_involution, module)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Entry(spec, model, library)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="NAME[@VARIANT], see above")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of every model each)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    entries = [build(spec, args.channels_last) for spec in args.models]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch_size,))

    def step(entry: Entry, mode: str, optimizer: torch.optim.Optimizer) -> float:
        kernels = cpu_backend.using(entry.library) if entry.library else contextlib.nullcontext()
        with kernels:
            start = time.perf_counter()
            if mode == "infer":
                with torch.inference_mode():
                    entry.model(x)
            else:
                torch.nn.functional.cross_entropy(entry.model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    for mode in ("infer", "train"):
        optimizers = {}
        for entry in entries:
            entry.model.train(mode == "train")
            optimizers[entry.spec] = torch.optim.SGD(entry.model.parameters(), lr=1e-4, momentum=0.9)
        for round_ in range(args.warmup + args.rounds):
            for entry in entries:
                seconds = step(entry, mode, optimizers[entry.spec])
                if round_ >= args.warmup:
                    entry.seconds[mode].append(seconds)
    baseline = entries[0]
    print(
        f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.img_size}x{args.img_size}, fp32, "
        f"channels_last {args.channels_last}; median of {args.rounds} interleaved steps after {args.warmup}; "
        f"torch {torch.__version__}, timm {timm.__version__}\n"
    )
    print(f"| model | train img/s | infer img/s | train vs {baseline.spec} | infer vs {baseline.spec} |")
    print("|---|---:|---:|---:|---:|")
    unsteady = [
        f"{entry.spec} {mode}"
        for entry in entries
        for mode in ("train", "infer")
        if max(entry.seconds[mode]) > 2 * min(entry.seconds[mode])
    ]
    for entry in entries:
        rate = {mode: args.batch_size / statistics.median(entry.seconds[mode]) for mode in ("train", "infer")}
        base = {mode: args.batch_size / statistics.median(baseline.seconds[mode]) for mode in ("train", "infer")}
        print(
            f"| {entry.spec} | {rate['train']:.2f} | {rate['infer']:.2f} | {rate['train'] / base['train']:.2f}x "
            f"| {rate['infer'] / base['infer']:.2f}x |"
        )
    if unsteady:
        print(
            f"\nWarning: step times varied more than 2x ({', '.join(unsteady)}): other processes were probably using "
            "the cores. Rerun on a quiet machine or with --threads below the core count; these ratios are unreliable."
        )


if __name__ == "__main__":
    main()
