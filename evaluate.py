"""Scores synthetic CTs with the SynthRAD2023 metrics (MAE, PSNR, SSIM, and more).

Predict the evaluation split of a trained run, then score it (sCT NIfTIs, metrics
CSV/JSON, a PNG panel per case)::

  python evaluate.py --workdir runs/pix2pix_pelvis_small   # the run's own config.json
  python evaluate.py --config configs/pix2pix_pelvis.py:small --workdir runs/pix2pix_pelvis_small
  python evaluate.py --config configs/ldm_brain.py:controlnet --workdir runs/ldm_brain_controlnet \
      --samples 8     # sampling methods: mean sCT scored, per-voxel std -> <id>/sct_std.nii.gz
  python evaluate.py --config configs/pgan_pelvis.py --workdir runs/pgan_pelvis \
      --samples 8 --qa  # GANs sample by test-time dropout; --qa: <id>/qa.json, qa.png
  python evaluate.py --workdir ... --checkpoint latest   # or best (default), or a step

Score a folder of predictions (``PRED/<id>/sct.nii.gz``, ``PRED/<id>.nii.gz`` or
``PRED/<id>_sct.nii.gz``) against the cases of a SynthRAD-layout data root::

  python evaluate.py --pred runs/pix2pix/predictions --data data/synthrad \
      [--region pelvis] [--out results/pix2pix.json]

Writes the JSON summary (default ``PRED/metrics.json``), the per-case CSV and
``report.html`` (one self-contained page: the case table, and with ``--workdir`` each
case's panel, the baseline, the QA verdicts and the std maps of ``--samples``) next to
it, and prints a table. Bad input ends the run with one ``error: ...`` line and exit
status 2, before anything is written.
"""

from sct_jax.cli import evaluate as _cli

_cli.define_flags()
main = _cli.main  # the flags are parsed by absl; tests call main directly

if __name__ == "__main__":
    _cli.run_main()
