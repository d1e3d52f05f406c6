"""Scoring helpers and the no-model rows every seed table carries.

A *reference* is ``(ct, mask)``: a CT in HU ``(X, Y, Z)`` float32 and its body mask
``(X, Y, Z)`` bool. Phantom cases carry the CT as their MR sees it
(``ct_aligned`` / ``mask_aligned``, see :mod:`sct_jax.data.phantom`):
:func:`load_reference` scores against those when present, so a misaligned training
pair does not penalise a correct sCT.

The baselines themselves (constant soft tissue, intensity lookup, mean training CT, the
perfect-model floor) are :mod:`sct_jax.evaluation.baselines`, the same functions every
``evaluate.py`` report uses; this module turns them into table rows.
"""

from __future__ import annotations

import math

import numpy as np

from sct_jax import metrics
from sct_jax.data import synthrad
from sct_jax.data.io import load_volume
from sct_jax.evaluation import baselines as evaluation_baselines
from sct_jax.evaluation.baselines import find_volume, ideal_prediction  # noqa: F401 (re-exported)

SOFT_TISSUE_HU = evaluation_baselines.SOFT_TISSUE_HU
_ROW_METRICS = {"mae": "mae", "psnr": "psnr", "ssim": "ssim", "bone_mae": "mae_bone",
                "bone_dice": "dice_bone"}


def load_reference(case: synthrad.Case) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(ct, mask, aligned)``: the case's CT in the MR's frame when the folder has one
    (``ct_aligned`` and ``mask_aligned``; ``aligned`` True), else its ``ct``/``mask``."""
    ct_path = find_volume(case.dir, "ct_aligned")
    mask_path = find_volume(case.dir, "mask_aligned")
    aligned = ct_path is not None and mask_path is not None
    if not aligned:
        data = synthrad.load_case(case)
        return data.ct.data.astype(np.float32), np.asarray(data.mask, bool), False
    return (load_volume(ct_path).data.astype(np.float32),
            load_volume(mask_path).data > 0, True)


def score(pairs) -> dict[str, float]:
    """Mean SynthRAD metrics over ``(sct, (ct, mask))`` pairs, as row keys.

    Returns:
      ``{"mae", "psnr", "ssim", "bone_mae", "bone_dice"}`` (NaN-aware means; NaN when
      no case has the tissue).
    """
    per_case = [metrics.synthrad_metrics(ct, sct, mask) for sct, (ct, mask) in pairs]
    out = {}
    for key, name in _ROW_METRICS.items():
        values = [c[name] for c in per_case if math.isfinite(c[name])]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def row(method: str, scores: dict, seed: int | None = None, wall_s: float = math.nan,
        note: str = "") -> dict:
    """A table row (see :mod:`sct_jax.reproduce.table`)."""
    return {"method": method, "seed": seed, **{k: float(scores.get(k, math.nan))
                                               for k in _ROW_METRICS},
            "wall_s": float(wall_s), "note": note}


def constant_row(references, hu: float = SOFT_TISSUE_HU) -> dict:
    """Every body voxel at ``hu`` (air outside): the floor any model must beat."""
    pairs = [(evaluation_baselines.constant_sct(mask, hu), (ct, mask))
             for ct, mask in references]
    return row(f"constant {hu:g} HU", score(pairs), note="body voxels at soft tissue")


def mean_training_ct_row(train_pairs, references) -> dict:
    """The mean training CT on each test case's body box as its sCT (a model that
    ignores the MR; :func:`sct_jax.evaluation.baselines.mean_ct_on_boxes`).

    Args:
      train_pairs: ``(ct, mask)`` of the training cases, read one at a time.
      references: the test ``(ct, mask)``.
    """
    references = list(references)
    boxes = evaluation_baselines.mean_ct_on_boxes(
        train_pairs, [evaluation_baselines.box_shape(mask) for _, mask in references])
    pairs = [(evaluation_baselines.place_in_body(box, mask), (ct, mask))
             for box, (ct, mask) in zip(boxes, references)]
    return row("mean training CT", score(pairs), note="ignores the MR")


def lookup_row(lookup: evaluation_baselines.IntensityLookup, unit_mrs, references) -> dict:
    """The intensity lookup's sCT of each test MR (normalised, ``unit_mrs``) scored
    against its reference: the simplest model that uses the MR."""
    pairs = [(lookup.predict(unit, mask), (ct, mask))
             for unit, (ct, mask) in zip(unit_mrs, references)]
    return row("intensity lookup", score(pairs),
               note=f"HU per MR intensity bin ({lookup.hu.size} bins)")


def fitted_rows(config, train_cases, test_cases, references) -> list[dict]:
    """The intensity-lookup and mean-training-CT rows, fitted on ``train_cases`` (the
    first :data:`~sct_jax.evaluation.baselines.MAX_TRAINING_CASES` with a CT, one in
    memory at a time) exactly as ``evaluate.py`` fits them.

    Args:
      config: the experiment's config (MR percentiles).
      train_cases, test_cases: the splits.
      references: case id -> ``(ct, mask)`` of each test case (:func:`load_reference`).
    """
    refs = [references[c.id] for c in test_cases]
    fitted = evaluation_baselines.fit_from_cases(
        config, train_cases, [evaluation_baselines.box_shape(mask) for _, mask in refs])
    units = (evaluation_baselines.unit_mr(config, synthrad.load_case(c)) for c in test_cases)
    mean_pairs = [(evaluation_baselines.place_in_body(box, mask), (ct, mask))
                  for box, (ct, mask) in zip(fitted.mean_boxes, refs)]
    note = f"fitted on {fitted.n_training} training case(s)"
    return [lookup_row(fitted.lookup, units, refs) | {"note": note + "; uses the MR"},
            row("mean training CT", score(mean_pairs), note=note + "; ignores the MR")]
