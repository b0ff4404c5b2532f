"""Triton kernels against their rooflines and torch twins, the block-config tuners, compile reports."""
