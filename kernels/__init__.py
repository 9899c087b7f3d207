"""Triton kernels (installed as effdense.kernels)."""
