"""Triton kernels for nanov4, each with a plain PyTorch reference beside it."""
