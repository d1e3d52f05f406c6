"""The project's speed and memory benchmarks; each prints JSON lines.

``sct-bench`` (:mod:`sct_jax.cli.bench`) runs one (``sct-bench conv ...``) or a suite
(:mod:`sct_jax.bench.run`); ``python -m sct_jax.bench.<name>`` runs one directly.
:mod:`sct_jax.bench.timing` holds the measuring helpers. Results documents are kept
under ``benchmarks/results/`` and quoted in ``BENCHMARKS.md``. Nothing here is imported
by training or evaluation.
"""
