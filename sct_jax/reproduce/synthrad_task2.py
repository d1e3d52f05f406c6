"""SynthRAD Task 2 (CBCT -> CT) on the brain phantom's CBCTs or your data.

  sct-reproduce synthrad_task2 [--seeds 3] [--tiny] [--out runs/reproduce/synthrad_task2]
                               [--only ldm_concat,ldm_controlnet,pix2pix]
                               [--data ROOT [--region R]] [--dose]

The rows of seed 03 (:mod:`sct_jax.reproduce.seed03`: the brain LDM with each
conditioning and pix2pix on axial slices), each trained on cone-beam CT input instead of
MR (``config.data.input=cbct``, the ``cbct`` config word's settings: the phantom's Task 2
cases, CBCTs normalised by a fixed HU window, the CTs registered to their CBCTs for
training, ``data.register_target``), scored on the held-out heads against the CT in
the CBCT's frame. Baselines: constant, intensity lookup (CBCT HU -> CT HU), mean
training CT, **the CBCT itself** (its own HU as the sCT: what doing nothing gives; its
offset, cupping, scatter, streaks and truncation are what a model must remove) and the
perfect-model floor. ``--data ROOT`` reads ``ROOT/Task2/<region>/<id>/{cbct,ct,mask}``.
"""

from __future__ import annotations

from pathlib import Path

from sct_jax.reproduce import seed03


def run(out_dir: Path, seeds: int, tiny: bool, only: tuple[str, ...] | None = None,
        data_root: str | None = None, region: str | None = None,
        dose_rx: float | None = None, anatomy_variation: float = 1.0) -> list[dict]:
    """Seed 03's rows on CBCT input, plus the CBCT-itself row (see the module)."""
    return seed03.run(out_dir, seeds, tiny, only=only, data_root=data_root, region=region,
                      dose_rx=dose_rx, input="cbct", anatomy_variation=anatomy_variation)
