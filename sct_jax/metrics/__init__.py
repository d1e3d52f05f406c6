"""SynthRAD2023 image metrics, computed exactly as the challenge computes them.

The reference is the challenge's own scoring code (SynthRAD2023/metrics,
``functions/image_metrics.py``), which calls scikit-image. This module reproduces
its numbers without depending on scikit-image at run time:

* **MAE** (HU): ``sum(|ct - sct| * mask) / sum(mask)`` with ``mask = mask > 0``. No
  clipping: an sCT of 4000 HU where the CT says 3000 costs 1000 HU.
* **PSNR** (dB): both images clipped to ``[-1024, 3000]`` HU, data range 4024, mean
  squared error over the masked voxels only. A perfect prediction gives ``inf``.
* **SSIM**: both images clipped to ``[-1024, 3000]``, voxels outside the mask set to
  -1024 in both, shifted by +1024 (so air is 0), then scikit-image's 3D SSIM with
  its defaults: 7x7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance
  (``N / (N - 1)``), data range 4024. The SSIM map is averaged over the mask after
  cropping 3 voxels (``(7 - 1) // 2``) from every border. Masking before SSIM matters:
  the background becomes a flat 0 in both images, so the windows that straddle the
  body outline compare the outline itself.

Beyond the challenge: ME (bias, ``mean(sct - ct)``), MAE per tissue class of the
*real* CT (air < -200 HU, soft tissue -200..250 HU, bone > 250 HU) and the Dice of
bone (> 250 HU) in CT and sCT inside the mask.

SynthRAD2025's PSNR over [-1024, 3071] HU and its masked multi-scale SSIM are in
:mod:`sct_jax.metrics.synthrad2025`; the Dice and HD95 (mm) of bone and air in
:mod:`sct_jax.metrics.geometry`.

Inputs are NumPy arrays of any real dtype and equal shape; everything is computed in
float64 and returned as Python floats (the challenge casts volumes to float32 first, so
scikit-image works in float32 there: on test volumes the SSIMs differ by ~1e-10,
relative). Axis order does not matter (the SSIM window and
crop are the same along every axis), so NIfTI ``(X, Y, Z)`` and SimpleITK
``(Z, Y, X)`` arrays give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from sct_jax.errors import DataError

HU_MIN = -1024.0
HU_MAX = 3000.0
DATA_RANGE = HU_MAX - HU_MIN  # 4024: the challenge's fixed population range.
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Tissue classes of the real CT, in HU (bone threshold also used for the Dice).
AIR_BELOW = -200.0
BONE_ABOVE = 250.0
# Voxels per SSIM slab: bounds the memory of the ~10 float64 work arrays (~32 MB each).
_SSIM_SLAB_VOXELS = 4_000_000

METRIC_NAMES = ("mae", "psnr", "ssim", "me", "mae_air", "mae_soft", "mae_bone",
                "dice_bone")


def _check_inputs(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray):
    """Validates shapes and the mask; returns ``(ct, sct, mask_bool)``.

    Raises:
      DataError: shapes differ, or the mask has no voxel > 0.
    """
    ct, sct, mask = np.asarray(ct), np.asarray(sct), np.asarray(mask)
    if not (ct.shape == sct.shape == mask.shape):
        raise DataError(f"shape mismatch: ct {ct.shape}, sct {sct.shape}, "
                        f"mask {mask.shape}")
    mask = mask > 0
    if not mask.any():
        raise DataError(f"empty mask (no voxel > 0) of shape {mask.shape}")
    return ct, sct, mask


def _masked_pair(ct, sct, mask):
    """The masked voxels of both images as float64 vectors ``(N,)``."""
    return ct[mask].astype(np.float64), sct[mask].astype(np.float64)


def _mae(ct_v: np.ndarray, sct_v: np.ndarray) -> float:
    if ct_v.size == 0:
        return math.nan
    return float(np.abs(ct_v - sct_v).sum() / ct_v.size)


def _psnr(ct_v: np.ndarray, sct_v: np.ndarray) -> float:
    diff = np.clip(ct_v, HU_MIN, HU_MAX) - np.clip(sct_v, HU_MIN, HU_MAX)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        # The reference divides by zero here (numpy warning, inf); say it plainly.
        return math.inf
    return float(10.0 * np.log10(DATA_RANGE**2 / mse))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two boolean arrays of one shape.

    The project's one Dice (bone Dice here, the body outline of the QA checks).
    Convention: NaN when both are empty. The overlap of nothing with nothing is
    undefined, and a case without bone must not score as a perfect bone match: NaN is
    left out of the case means (``ScoreReport.summary``), where 1.0 would inflate them.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return math.nan
    return float(2.0 * np.logical_and(a, b).sum() / total)


def mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in HU inside the mask (no clipping).

    Args:
      ct: ``(X, Y, Z)`` real CT in HU.
      sct: ``(X, Y, Z)`` synthetic CT in HU.
      mask: ``(X, Y, Z)``; voxels > 0 are scored.

    Returns:
      ``sum(|ct - sct| * mask) / sum(mask)``.

    Raises:
      DataError: shape mismatch or empty mask.
    """
    return _mae(*_masked_pair(*_check_inputs(ct, sct, mask)))


def me(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Mean error (bias) ``mean(sct - ct)`` in HU inside the mask; > 0: sCT too dense.

    Args and Raises: as :func:`mae`.
    """
    ct_v, sct_v = _masked_pair(*_check_inputs(ct, sct, mask))
    return float((sct_v - ct_v).sum() / ct_v.size)


def psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) over the masked voxels.

    Both images are clipped to ``[-1024, 3000]`` HU; data range 4024.

    Args and Raises: as :func:`mae`.

    Returns:
      ``10 log10(4024^2 / MSE)``; ``inf`` when the clipped images agree on every masked
      voxel (MSE 0).
    """
    return _psnr(*_masked_pair(*_check_inputs(ct, sct, mask)))


def tissue_mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE per tissue class of the real CT, inside the mask.

    Classes: air ``ct < -200``, soft tissue ``-200 <= ct <= 250``, bone ``ct > 250``.

    Args and Raises: as :func:`mae`.

    Returns:
      ``{"mae_air", "mae_soft", "mae_bone"}``; NaN for a class with no voxel.
    """
    ct_v, sct_v = _masked_pair(*_check_inputs(ct, sct, mask))
    return _tissue_mae(ct_v, sct_v)


def _tissue_mae(ct_v: np.ndarray, sct_v: np.ndarray) -> dict[str, float]:
    # One labelled pass (0 air, 1 soft, 2 bone) instead of three boolean selections.
    labels = (ct_v >= AIR_BELOW).astype(np.intp) + (ct_v > BONE_ABOVE)
    sums = np.bincount(labels, weights=np.abs(ct_v - sct_v), minlength=3)
    counts = np.bincount(labels, minlength=3)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty class: NaN
        per_class = sums / counts
    return {"mae_air": float(per_class[0]), "mae_soft": float(per_class[1]),
            "mae_bone": float(per_class[2])}


def dice_bone(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Dice of bone (> 250 HU) in CT and sCT, inside the mask.

    Args and Raises: as :func:`mae`.

    Returns:
      ``2 |A & B| / (|A| + |B|)``; NaN when neither image has bone in the mask.
    """
    ct_v, sct_v = _masked_pair(*_check_inputs(ct, sct, mask))
    return dice(ct_v > BONE_ABOVE, sct_v > BONE_ABOVE)


def ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2023 masked 3D SSIM (see the module docstring for the recipe).

    Equal to the challenge's ``structural_similarity(..., full=True)`` map averaged
    over ``crop(mask, 3)``. The map is computed slab by slab along axis 0 (each slab
    with a 3-voxel halo), so a 512 x 512 x 100 volume needs a few hundred MB, not GBs.
    Only the cropped interior is ever needed, where every 7^3 window lies inside the
    volume, so the filters' border mode never matters.

    Args:
      ct: ``(X, Y, Z)`` real CT in HU, every side >= 7.
      sct: ``(X, Y, Z)`` synthetic CT in HU.
      mask: ``(X, Y, Z)``; voxels > 0 are scored.

    Returns:
      The mean SSIM over masked voxels at least 3 voxels from every border; NaN when
      no masked voxel is that far inside (the reference's mean of an empty array).

    Raises:
      DataError: shape mismatch, empty mask, or a side shorter than 7 voxels.
    """
    ct, sct, mask = _check_inputs(ct, sct, mask)
    if min(ct.shape, default=0) < SSIM_WINDOW:
        raise DataError(f"SSIM needs every side >= {SSIM_WINDOW} voxels, got shape "
                        f"{ct.shape}")
    pad = (SSIM_WINDOW - 1) // 2
    # Only voxels >= 3 from every border are scored (skimage's crop): the bounding box
    # of those masked voxels is all the map we need; the rest of the volume only
    # contributes its 3-voxel halo.
    cropped = mask[(slice(pad, -pad),) * mask.ndim]
    if not cropped.any():
        return math.nan
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(cropped.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(int(hit[0]) + pad)
        hi.append(int(hit[-1]) + pad + 1)
    window = tuple(slice(a - pad, b + pad) for a, b in zip(lo[1:], hi[1:]))
    slab = max(1, _SSIM_SLAB_VOXELS // math.prod(b - a + 2 * pad for a, b in
                                                 zip(lo[1:], hi[1:])))
    total, count = 0.0, 0
    for start in range(lo[0], hi[0], slab):
        stop = min(start + slab, hi[0])
        halo = (slice(start - pad, stop + pad),) + window
        s_map = _ssim_map_interior(_ssim_input(ct[halo], mask[halo]),
                                   _ssim_input(sct[halo], mask[halo]))
        scored = mask[halo][(slice(pad, -pad),) * mask.ndim]
        total += float(s_map[scored].sum())
        count += int(scored.sum())
    return total / count


def _ssim_input(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip to the population range, flatten the background to -1024, shift to >= 0."""
    x = np.clip(image.astype(np.float64), HU_MIN, HU_MAX)
    x[~mask] = HU_MIN
    x -= HU_MIN
    return x


def _ssim_map_interior(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scikit-image's SSIM map (uniform window, sample covariance) inside a block.

    Args:
      x, y: ``(A + 6, B + 6, C + 6)`` float64 blocks, 3 voxels of halo on every side.

    Returns:
      ``(A, B, C)``: the map where the 7^3 window fits inside the block.
    """
    pad = (SSIM_WINDOW - 1) // 2
    interior = (slice(pad, -pad),) * x.ndim

    def box(a):  # mean over the 7^3 window centred on each interior voxel
        return ndimage.uniform_filter(a, size=SSIM_WINDOW)[interior]

    n_window = SSIM_WINDOW**x.ndim
    cov_norm = n_window / (n_window - 1)  # sample covariance, as skimage's default
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    # In-place arithmetic on few buffers: the map is memory-bound.
    ux, uy = box(x), box(y)
    cov_xy = box(x * y)
    cov_xy -= ux * uy
    var_sum = box(x * x)
    var_sum -= ux * ux
    var_y = box(y * y)
    var_y -= uy * uy
    var_sum += var_y
    del var_y
    # A2 = 2 vxy + C2, B2 = vx + vy + C2.
    cov_xy *= 2.0 * cov_norm
    cov_xy += c2
    var_sum *= cov_norm
    var_sum += c2
    # A1 = 2 ux uy + C1, B1 = ux^2 + uy^2 + C1.
    ssim_map = ux * uy
    ssim_map *= 2.0
    ssim_map += c1
    ux *= ux
    uy *= uy
    ux += uy
    ux += c1
    ssim_map *= cov_xy
    ux *= var_sum
    ssim_map /= ux
    return ssim_map


def synthrad_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All metrics of one case.

    Args:
      ct: ``(X, Y, Z)`` real CT in HU.
      sct: ``(X, Y, Z)`` synthetic CT in HU, same grid.
      mask: ``(X, Y, Z)`` body mask; voxels > 0 are scored.

    Returns:
      ``{"mae", "psnr", "ssim", "me", "mae_air", "mae_soft", "mae_bone",
      "dice_bone"}`` as Python floats (order of :data:`METRIC_NAMES`).

    Raises:
      DataError: shape mismatch, empty mask, or a side shorter than 7 voxels.
    """
    ct, sct, mask = _check_inputs(ct, sct, mask)
    ct_v, sct_v = _masked_pair(ct, sct, mask)
    result = {
        "mae": _mae(ct_v, sct_v),
        "psnr": _psnr(ct_v, sct_v),
        "ssim": ssim(ct, sct, mask),
        "me": float((sct_v - ct_v).sum() / ct_v.size),
        **_tissue_mae(ct_v, sct_v),
        "dice_bone": dice(ct_v > BONE_ABOVE, sct_v > BONE_ABOVE),
    }
    return {name: result[name] for name in METRIC_NAMES}
