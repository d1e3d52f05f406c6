"""Geometry of the structures that matter for dose: bone and air, CT vs sCT.

Per case, inside the body mask (``mask > 0``): bone is ``> 250 HU`` (SynthRAD2023's
bone threshold, :data:`sct_jax.metrics.BONE_ABOVE`), air ``< -400 HU``. For each, the
Dice overlap of the CT's and the sCT's structure and their 95th-percentile Hausdorff
distance in mm.

**HD95** (as MONAI's ``HausdorffDistanceMetric(percentile=95)``, which SynthRAD2025's
segmentation metrics use): the surface of a structure is its voxels with a face
neighbour outside it (``mask & ~binary_erosion(mask)``, 6-connectivity; a voxel on the
volume's border is surface). For every surface voxel of A, the Euclidean distance in mm
(voxel spacing applied) to the nearest surface voxel of B, from an exact distance
transform (:func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing``);
the 95th percentile of those (numpy's linear interpolation); the same from B to A; the
larger of the two. Conventions: NaN when neither image has the structure (as the
Dice), ``inf`` when only one has it (no surface to measure to: an sCT without bone is
infinitely far from the CT's bone, not a perfect match).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from sct_jax.errors import DataError
from sct_jax.metrics import BONE_ABOVE, _check_inputs, dice

AIR_BELOW_GEOMETRY = -400.0
HD_PERCENTILE = 95.0

GEOMETRY_NAMES = ("dice_bone", "dice_air", "hd95_bone", "hd95_air")


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a face neighbour outside it (or outside the volume)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DataError(f"voxel spacing {tuple(spacing.tolist())}: need {ndim} positive mm "
                        "values")
    return spacing


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """The symmetric 95th-percentile Hausdorff distance (mm) of two boolean masks.

    Args:
      a, b: ``(X, Y, Z)`` boolean structures on one grid.
      spacing: voxel size in mm per axis.

    Returns:
      ``max(P95(d(surface A -> surface B)), P95(d(surface B -> surface A)))``; NaN when
      both are empty, ``inf`` when one is.

    Raises:
      DataError: shapes differ or the spacing is not positive.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"shape mismatch: {a.shape} vs {b.shape}")
    spacing = _check_spacing(spacing, a.ndim)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not (has_a or has_b):
        return math.nan
    if not (has_a and has_b):
        return math.inf
    surf_a, surf_b = surface(a), surface(b)
    # The distance transform only needs the box holding both surfaces: every nearest
    # surface voxel lies inside it, so the distances are exact.
    both = surf_a | surf_b
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(both))
    surf_a, surf_b = surf_a[box], surf_b[box]
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)[surf_b]
    return float(max(np.percentile(to_b, HD_PERCENTILE), np.percentile(to_a, HD_PERCENTILE)))


def geometry_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray,
                     spacing: Sequence[float]) -> dict[str, float]:
    """Dice and HD95 (mm) of bone (> 250 HU) and air (< -400 HU) inside the body.

    Args:
      ct, sct: ``(X, Y, Z)`` CT and sCT in HU on one grid.
      mask: ``(X, Y, Z)`` body mask; voxels > 0 are scored.
      spacing: voxel size in mm per axis.

    Returns:
      ``{"dice_bone", "dice_air", "hd95_bone", "hd95_air"}`` (NaN: neither image has
      the structure; HD95 ``inf``: only one has).

    Raises:
      DataError: shape mismatch, empty mask or a bad spacing.
    """
    ct, sct, mask = _check_inputs(ct, sct, mask)
    spacing = _check_spacing(spacing, ct.ndim)
    out = {}
    for name, select in (("bone", lambda v: v > BONE_ABOVE),
                         ("air", lambda v: v < AIR_BELOW_GEOMETRY)):
        a, b = select(ct) & mask, select(sct) & mask
        out[f"dice_{name}"] = dice(a, b)
        out[f"hd95_{name}"] = hd95(a, b, spacing)
    return {name: out[name] for name in GEOMETRY_NAMES}
