"""Run the native CPU kernels on tensors that end right before an unreadable page: a read past any tensor's last
element (e.g. a whole vector loaded for a row's last few columns) ends this process with SIGSEGV.

    python tests/guard_page_probe.py N,C,G,H,W,K,STRIDE,DILATION,PADDING,DTYPE [...]

Each of x, the kernels and grad_out in turn is placed at the end of its own mapping, followed by a PROT_NONE page;
the three ops run on them and must give the results of ordinary tensors. Prints "ok" when every case passed.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ops import cpu_backend  # noqa: E402
from ops.involution import output_size  # noqa: E402

PROT_NONE = 0
_keep = []  # the mappings must outlive their tensors


def at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose last byte is the last readable byte before a PROT_NONE page."""
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    data_pages = (nbytes + page - 1) // page
    region = mmap.mmap(-1, (data_pages + 1) * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(ctypes.c_void_p(address + data_pages * page), page, PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    _keep.append(region)
    view = torch.frombuffer(region, dtype=t.dtype, count=t.numel(), offset=data_pages * page - nbytes)
    view = view.view(t.shape)
    view.copy_(t)
    return view


def check(case: str) -> None:
    """One case, N,C,G,H,W,K,STRIDE,DILATION,PADDING,DTYPE; SystemExit naming it when a result differs."""
    fields = case.split(",")
    n, c, g, h, w, k, s, d, p = (int(a) for a in fields[:9])
    dtype = getattr(torch, fields[9])
    h_out, w_out = (output_size(size, k, s, p, d) for size in (h, w))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=generator).to(dtype)
    weight = torch.randn(n, g, k, k, h_out, w_out, generator=generator).to(dtype)
    grad_out = torch.randn(n, c, h_out, w_out, generator=generator).to(dtype)
    reference = (
        cpu_backend.forward(x, weight, s, p, d),
        cpu_backend.grad_input(grad_out, weight, (h, w), c, s, p, d),
        cpu_backend.grad_weight(grad_out, x, k, g, s, p, d),
    )
    for guarded in ("x", "weight", "grad_out"):
        xg, wg, gyg = (at_page_end(t) if name == guarded else t for name, t in
                       (("x", x), ("weight", weight), ("grad_out", grad_out)))  # fmt: skip
        results = (
            cpu_backend.forward(xg, wg, s, p, d),
            cpu_backend.grad_input(gyg, wg, (h, w), c, s, p, d),
            cpu_backend.grad_weight(gyg, xg, k, g, s, p, d),
        )
        for name, got, want in zip(("out", "grad_x", "grad_weight"), results, reference):
            if not torch.equal(got, want):
                raise SystemExit(f"{case}: {name} differs with {guarded} at a page end")


if __name__ == "__main__":
    for case in sys.argv[1:]:
        print(case, flush=True)  # the last case printed is the one that faulted
        check(case)
    print("ok")
