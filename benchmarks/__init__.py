"""Benchmarks, run from the repository root as modules: `python3 -m benchmarks.<group>.<name> --help`.

Groups: kernels (Triton kernels, tuners, compile reports), model_step (one forward or engine step of
an Air-shaped model), serving (whole processes: end to end, two GPUs, the KV transport). Shared
helpers: benchmarks.measure. See benchmarks/README.md.
"""
