"""Peak memory on CPU: rednet.monitor's RSS high-water mark, and the op benchmark's "peak fwd+bwd MiB" column."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rednet import monitor

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self")


def hold_briefly(nbytes: int) -> None:
    """Make `nbytes` resident in this process, then free them: the process's peak RSS is now at least that."""
    torch.ones(nbytes // 4, dtype=torch.float32)


def load_benchmark_op():
    return importlib.import_module("scripts.benchmark_op")  # as its children import it


def test_peak_rss_rises_with_an_allocation_and_resets():
    assert monitor.reset_peak_rss()
    start = monitor.peak_rss_bytes()
    assert start <= monitor.current_rss_bytes() + 8 * MiB  # reset: the peak starts again from the current RSS
    hold_briefly(256 * MiB)
    assert monitor.peak_rss_bytes() >= start + 200 * MiB
    assert monitor.reset_peak_rss()
    assert monitor.peak_rss_bytes() < start + 64 * MiB


def test_a_child_does_not_inherit_its_parents_peak():
    # The kernel carries getrusage's ru_maxrss across exec: a child of a process that once held 1 GB read 1 GB.
    hold_briefly(1024 * MiB)
    code = "from rednet import monitor; print(monitor.peak_rss_bytes(), monitor.current_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    peak, current = map(int, child.stdout.split())
    assert peak < current + 128 * MiB  # the child's own imports: its peak is about what it holds now


SHAPE = dict(name="small", channels=64, size=28)  # x: 0.8 MiB, kernels: 2.3 MiB at batch 4


def assert_one_forward_backward(benchmark, peak_bytes: float, batch: int) -> None:
    shape = benchmark.Shape(**SHAPE)
    x = batch * shape.channels * shape.size**2 * 4
    y = batch * shape.channels * shape.out_size**2 * 4
    w = batch * shape.groups * shape.kernel_size**2 * shape.out_size**2 * 4
    # At the end of backward the output, grad-input and grad-weight are all alive; unfold keeps K² copies of x.
    assert y + x + w <= peak_bytes <= y + x + w + 4 * shape.kernel_size**2 * x + 64 * MiB


def test_benchmark_op_peak_is_one_forward_backward():
    """The column read about 1 GB for every shape: the peak of the parent, which had just measured the copy
    bandwidth with 1 GiB buffers, carried into each child. Reproduce that parent, then measure a small op."""
    benchmark = load_benchmark_op()
    hold_briefly(1024 * MiB)
    row = benchmark.measure_in_child(benchmark.Shape(**SHAPE), "torch", 4, "float32", min_run_time=0.01)
    assert_one_forward_backward(benchmark, row["peak_bytes"], 4)


def test_benchmark_op_peak_leaves_out_what_came_before():
    """Whatever the process did before the step (imports, a native build, a big buffer) is not the op's peak."""
    benchmark = load_benchmark_op()
    code = (
        "import torch; from scripts.benchmark_op import measure, Shape; torch.ones(2**28);"  # 1 GiB, freed
        f"print(measure(Shape(**{SHAPE!r}), 'torch', 4, torch.float32, 'cpu', 0.01)['peak_bytes'])"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert_one_forward_backward(benchmark, float(child.stdout.split()[-1]), 4)
