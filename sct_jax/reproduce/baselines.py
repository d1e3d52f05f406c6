"""Scoring helpers and the no-model rows every seed table carries.

A *reference* is ``(ct, mask)``: a CT in HU ``(X, Y, Z)`` float32 and its body mask
``(X, Y, Z)`` bool. Phantom cases carry the CT as their MR sees it
(``ct_aligned`` / ``mask_aligned``, see :mod:`sct_jax.data.phantom`):
:func:`load_reference` scores against those when present, so a misaligned training
pair does not penalise a correct sCT.
"""

from __future__ import annotations

import math

import numpy as np

from sct_jax.data import synthrad
from sct_jax.data.io import VOLUME_SUFFIXES, load_volume
from sct_jax import metrics

# The constant baseline: every body voxel soft tissue (cli/run.py's SOFT_TISSUE_HU).
SOFT_TISSUE_HU = 40.0
_ROW_METRICS = {"mae": "mae", "psnr": "psnr", "ssim": "ssim", "bone_mae": "mae_bone",
                "bone_dice": "dice_bone"}


def _find(case_dir, stem):
    for suffix in VOLUME_SUFFIXES:
        path = case_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_reference(case: synthrad.Case) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(ct, mask, aligned)``: the case's CT in the MR's frame when the folder has one
    (``ct_aligned`` and ``mask_aligned``; ``aligned`` True), else its ``ct``/``mask``."""
    ct_path, mask_path = _find(case.dir, "ct_aligned"), _find(case.dir, "mask_aligned")
    aligned = ct_path is not None and mask_path is not None
    if not aligned:
        data = synthrad.load_case(case)
        return data.ct.data.astype(np.float32), np.asarray(data.mask, bool), False
    return (load_volume(ct_path).data.astype(np.float32),
            load_volume(mask_path).data > 0, True)


def ideal_prediction(case: synthrad.Case) -> np.ndarray | None:
    """A phantom case's noise-free CT in the MR's frame (``ct_ideal``), or None."""
    path = _find(case.dir, "ct_ideal")
    return None if path is None else load_volume(path).data.astype(np.float32)


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
    pairs = [(np.where(mask, np.float32(hu), np.float32(-1000.0)), (ct, mask))
             for ct, mask in references]
    return row(f"constant {hu:g} HU", score(pairs), note="body voxels at soft tissue")


def _fit(volume: np.ndarray, shape) -> np.ndarray:
    """``volume`` centre-cropped or padded (with -1000 HU) to ``shape``."""
    out = np.full(shape, -1000.0, np.float32)
    src, dst = [], []
    for n_in, n_out in zip(volume.shape, shape):
        if n_in >= n_out:
            a = (n_in - n_out) // 2
            src.append(slice(a, a + n_out))
            dst.append(slice(0, n_out))
        else:
            a = (n_out - n_in) // 2
            src.append(slice(0, n_in))
            dst.append(slice(a, a + n_in))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def mean_ct(train_cts) -> np.ndarray:
    """The voxel-wise mean of training CTs in HU (each fitted to the first's shape)."""
    train_cts = list(train_cts)
    shape = train_cts[0].shape
    return np.mean([_fit(np.asarray(ct, np.float32), shape) for ct in train_cts], axis=0)


def mean_training_ct_row(train_cts, references) -> dict:
    """The mean training CT (voxel-wise, fitted to each test grid) as every case's sCT:
    a model that ignores the MR. Air outside the body mask."""
    average = mean_ct(train_cts)
    pairs = [(np.where(mask, _fit(average, ct.shape), np.float32(-1000.0)), (ct, mask))
             for ct, mask in references]
    return row("mean training CT", score(pairs), note="ignores the MR")
