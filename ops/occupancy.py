"""Register use and occupancy of the CUDA kernels: ptxas statistics and resident blocks per SM.

Used by tests/test_ops_nvrtc.py (from NVRTC's ptxas log, no GPU) and scripts/gpu_probes.py (from the loaded kernels
on a GPU) to check that every kernel leaves room for cupy_backend.MIN_BLOCKS_PER_SM blocks per SM and spills nothing.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["SMLimits", "SM_LIMITS", "KernelResources", "blocks_per_sm", "parse_ptxas_log"]


class SMLimits(NamedTuple):
    """What one streaming multiprocessor holds (CUDA C Programming Guide, "Compute Capabilities" table)."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 228 * 1024


DEFAULT_SM = SMLimits()  # A100, H100, B200 alike in registers and warps

# The GPUs the kernels are checked for: A100 (sm_80), H100/H200 (sm_90), B200 (sm_100).
SM_LIMITS = {
    "sm_80": SMLimits(shared_bytes=164 * 1024),
    "sm_90": SMLimits(),
    "sm_100": SMLimits(),
}


class KernelResources(NamedTuple):
    """ptxas's statistics for one entry point (bytes for the memory figures)."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int = 0
    stack_bytes: int = 0


def blocks_per_sm(registers: int, block_size: int, shared_bytes: int = 0, limits: SMLimits = DEFAULT_SM) -> int:
    """Blocks of block_size threads resident on one SM at once, limited by registers, warps, blocks and shared
    memory (the CUDA occupancy calculator's rules; 0 registers counts as 1)."""
    warps_per_block = -(-block_size // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // limits.register_unit) * limits.register_unit
    by_registers = (limits.registers // registers_per_warp) // warps_per_block
    by_warps = limits.max_warps // warps_per_block
    by_shared = limits.shared_bytes // shared_bytes if shared_bytes else limits.max_blocks
    return min(by_registers, by_warps, by_shared, limits.max_blocks)


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """{entry point: resources} from a ptxas -v log (nvcc -Xptxas -v, or NVRTC's --ptxas-options=-v)."""
    resources: dict[str, KernelResources] = {}
    name, stack = None, (0, 0, 0)
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            name, stack = match.group(1), (0, 0, 0)
        elif (match := _STACK.search(line)) and name:
            stack = tuple(int(v) for v in match.groups())
        elif (match := _USED.search(line)) and name:
            shared = int(match.group(2) or 0)
            resources[name] = KernelResources(int(match.group(1)), stack[1], stack[2], shared, stack[0])
            name = None
    return resources
