"""The involution operator (Li et al., CVPR 2021): CuPy CUDA kernels, and PyTorch paths for CPU and reference."""

from ops.involution import BACKENDS, available_backends, export_decompositions, involution

__all__ = ["involution", "available_backends", "export_decompositions", "BACKENDS"]
