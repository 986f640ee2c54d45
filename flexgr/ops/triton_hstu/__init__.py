"""Triton kernels of HSTU attention (imported only when triton is importable)."""
