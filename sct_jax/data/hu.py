"""Is this CT in Hounsfield units? A check of CTs read for training or scoring and of
sCTs scored, checked or exported.

A CT in HU has air near -1000 and body tissue near 0 (fat -100, muscle 40, bone 400+).
Three common mistakes give other numbers and would train or score silently wrong:

- stored values without the DICOM rescale (slope 1, intercept -1024): no negative
  voxel at all, body tissue near +1000;
- attenuation coefficients (mu in 1/cm, about 0..0.5) or intensities normalised to
  [0, 1] / [-1, 1]: the whole volume spans a range of a few units;
- a rescale applied twice, or any other scale: body tissue far from 0.

A user whose data really is on another scale says so with ``SCT_JAX_ALLOW_NON_HU=1``.
"""

from __future__ import annotations

import os

import numpy as np

from sct_jax.errors import DataError

ALLOW_ENV = "SCT_JAX_ALLOW_NON_HU"
# Body tissue of a CT in HU: soft tissue near 0-60, the median of a body mask (fat,
# muscle, organs, some bone) lies well inside this.
BODY_MEDIAN_RANGE_HU = (-500.0, 500.0)


def non_hu_problem(data: np.ndarray, mask: np.ndarray | None = None,
                   scale_only: bool = False) -> str | None:
    """Why ``data`` does not look like a CT in HU, or ``None`` when it does.

    Args:
      data: ``(X, Y, Z)`` CT or sCT values.
      mask: optional ``(X, Y, Z)`` bool body mask (sharpens the body-median test).
      scale_only: only the narrow-range test (for sCTs: a barely trained model's sCT
        sits near the middle of the HU window, 988 HU, and is scored, not refused).

    Returns:
      A short reason naming the likely cause, or ``None``.
    """
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return None  # non-finite volumes are reported elsewhere
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= 10.0:
        return (f"values span only [{lo:.3g}, {hi:.3g}]: attenuation coefficients or "
                "normalised intensities, not HU (air is -1000 HU, bone 400+)")
    if scale_only:
        return None
    if lo >= 0.0:
        return (f"no negative value (range [{lo:.4g}, {hi:.4g}]): looks like stored values "
                "without the rescale slope/intercept (HU = value - 1024), not HU")
    if mask is not None and np.any(mask):
        body = data[np.asarray(mask, bool) & np.isfinite(data)]
        if body.size:
            median = float(np.median(body))
            if not BODY_MEDIAN_RANGE_HU[0] <= median <= BODY_MEDIAN_RANGE_HU[1]:
                return (f"body voxels have median {median:.0f}, not tissue HU (about 0): "
                        "a wrong or twice-applied rescale slope/intercept?")
    return None


def checking() -> bool:
    """False when the user set ``SCT_JAX_ALLOW_NON_HU=1``."""
    return os.environ.get(ALLOW_ENV, "") in ("", "0")


def check_hu(data: np.ndarray, path, mask: np.ndarray | None = None, what: str = "CT",
             scale_only: bool = False) -> None:
    """Raises a one-line :class:`DataError` naming ``path`` when ``data`` is not HU.

    Skipped when the environment sets ``SCT_JAX_ALLOW_NON_HU=1`` (the user's explicit
    word that the scale is intended).
    """
    if not checking():
        return
    problem = non_hu_problem(data, mask, scale_only)
    if problem is not None:
        raise DataError(f"{path}: {what} {problem} (set {ALLOW_ENV}=1 if this scale is "
                        "intended)")
