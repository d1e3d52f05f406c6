"""One command per seed paper: train its methods' configs, score them, print one table.

  sct-reproduce seed02 [--seeds 3] [--tiny] [--out runs/reproduce/seed02]
  python -m sct_jax.reproduce seed03 --tiny
  sct-reproduce seed03 --data ROOT [--region brain]   # a SynthRAD-layout dataset

Each seed module (``seed02``, ``seed03``) has ``run(out_dir, seeds, tiny, ...,
data_root=None, region=None) -> rows``; the rows (one per method and seed, baselines
with seed ``None``) are aggregated into mean ± std over seeds by
:mod:`sct_jax.reproduce.table` and written as ``table.md`` and ``table.csv`` in
``out_dir``. Runs live in ``out_dir/<method>/seed<k>/`` and a finished
one is reused when the command is run again.
"""
