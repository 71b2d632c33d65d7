"""Triton kernels of the target's own forward (see :mod:`specdec.gemm_pick`)."""
