"""User-facing benchmarks that print JSON (``python -m sct_jax.bench.<name>``).

:mod:`sct_jax.bench.timing` holds the measuring helpers (matmul peak, median timing,
XLA FLOP counts, peak RSS); ``benchmarks/`` at the repository root wraps these modules
for ``benchmarks/run.py``. Nothing here is imported by training or evaluation.
"""
