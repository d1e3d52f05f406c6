"""SynthRAD2025 image metrics, computed as the challenge's evaluation code defines them.

The reference is SynthRAD2025's ``evaluation`` repository (``image_metrics.py``). Its
MAE is SynthRAD2023's (:func:`sct_jax.metrics.mae`); what changes:

* **PSNR** (dB): both images clipped to the fixed range ``[-1024, 3071]`` HU, data
  range 4095, mean squared error over the masked voxels only. ``inf`` when they agree.
* **MS-SSIM** (masked multi-scale SSIM), step by step:

  1. Both images clipped to ``[-1024, 3071]``, voxels outside the mask (``mask > 0``)
     set to -1024 in both, shifted by +1024 (values in ``[0, 4095]``).
  2. Images and mask edge-padded (``np.pad(mode="edge")``) to at least 97 voxels per
     axis: an axis of ``n < 97`` gets ``(97 - n) // 2`` before and the rest after.
     (The mask is padded too: a body touching the border extends into the padding.)
  3. Five levels with weights ``w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``. At each
     level an SSIM map with a 7^3 uniform window, sample covariance (``343 / 342``),
     data range ``R = 4095``, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``, ``C3 = C2 / 2``,
     as three separately clipped terms: ``L = max((2 ux uy + C1) / (ux^2 + uy^2 + C1),
     0)``, ``C = max((2 sx sy + C2) / (vx + vy + C2), 0)`` and ``S = max((vxy + C3) /
     (sx sy + C3), 0)`` with ``sx = sqrt(max(vx, 0))``; the map is ``L^w C^w S^w``:
     the luminance carries the level's weight at *every* level (the reference's
     fallback to Wang et al.'s luminance-at-the-last-level-only never takes effect).
     The level's value is the map's mean over the mask's voxels at least 3 voxels from
     every border (``crop(map, 3)[crop(mask, 3)]``).
  4. Between levels the images are convolved with a 2x2x2 box (``fftconvolve`` in
     ``"same"`` mode, so voxel ``i`` averages ``i - 1`` and ``i`` along each axis, with
     zeros before the first) and every second voxel kept (``[::2]`` from 0); the mask is
     subsampled ``[::2]``.
  5. MS-SSIM = the product over levels of each value clipped to ``[0, 1]``.

  With one level of weight 1 the map is SSIM's ``(2 ux uy + C1)(2 vxy + C2) / ((ux^2 +
  uy^2 + C1)(vx + vy + C2))`` wherever no term is clipped, so with SynthRAD2023's range
  it equals :func:`sct_jax.metrics.ssim` on volumes whose mask stays clear of the
  border (tested).

Everything is float64 (the reference works in its inputs' dtype); the box downsampling
is computed exactly (the reference's FFT adds ~1e-13 relative noise). The map is
computed slab by slab with a 3-voxel halo, so memory stays bounded; only the cropped
interior is ever used, so the filters' border mode never matters.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from sct_jax.errors import DataError
from sct_jax.metrics import _check_inputs, _masked_pair

HU_RANGE_2025 = (-1024.0, 3071.0)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIZE = 97  # the reference pads every axis to at least this
_WINDOW = 7
_K1, _K2 = 0.01, 0.03
_SLAB_VOXELS = 4_000_000

METRIC_NAMES_2025 = ("psnr_2025", "ms_ssim")


def psnr_2025(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2025 PSNR (dB) over the masked voxels, both clipped to [-1024, 3071].

    Args:
      ct, sct: ``(X, Y, Z)`` CT and sCT in HU.
      mask: ``(X, Y, Z)``; voxels > 0 are scored.

    Returns:
      ``10 log10(4095^2 / MSE)``; ``inf`` when the clipped images agree.

    Raises:
      DataError: shape mismatch or empty mask.
    """
    ct_v, sct_v = _masked_pair(*_check_inputs(ct, sct, mask))
    lo, hi = HU_RANGE_2025
    diff = np.clip(ct_v, lo, hi) - np.clip(sct_v, lo, hi)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10((hi - lo) ** 2 / mse))


def ms_ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, *,
            weights=MS_SSIM_WEIGHTS, hu_range=HU_RANGE_2025,
            min_size: int = MS_SSIM_MIN_SIZE) -> float:
    """SynthRAD2025 masked multi-scale SSIM (see the module docstring for the recipe).

    Args:
      ct, sct: ``(X, Y, Z)`` CT and sCT in HU.
      mask: ``(X, Y, Z)``; voxels > 0 are scored.
      weights: one exponent per level (the challenge's five by default).
      hu_range: the clipping range; its width is the data range.
      min_size: every axis is edge-padded to at least this many voxels.

    Returns:
      The product over levels of the masked mean map, each clipped to [0, 1]; NaN when
      at some level no masked voxel lies 3 voxels inside (the reference's mean of an
      empty selection).

    Raises:
      DataError: shape mismatch, empty mask, or a level thinner than the 7-voxel window.
    """
    ct, sct, mask = _check_inputs(ct, sct, mask)
    lo, hi = (float(v) for v in hu_range)
    x, y = _ms_ssim_input(ct, mask, lo, hi), _ms_ssim_input(sct, mask, lo, hi)
    m = mask
    widths = [(max((min_size - n) // 2, 0), max(min_size - n - (min_size - n) // 2, 0))
              for n in ct.shape]
    if any(a or b for a, b in widths):
        x, y, m = (np.pad(v, widths, mode="edge") for v in (x, y, m))
    data_range = hi - lo
    values = []
    for level, weight in enumerate(weights):
        if min(x.shape) < _WINDOW:
            raise DataError(f"MS-SSIM: level {level + 1} of {len(weights)} has shape "
                            f"{x.shape}, thinner than the {_WINDOW}-voxel window")
        total, count = _level_sum(x, y, m, float(weight), data_range)
        values.append(total / count if count else math.nan)
        if level + 1 < len(weights):
            x, y = _downsample(x), _downsample(y)
            m = m[(slice(None, None, 2),) * m.ndim]
    return float(np.prod([min(max(v, 0.0), 1.0) if not math.isnan(v) else v
                          for v in values]))


def _ms_ssim_input(image: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to ``[lo, hi]``, flatten the background to ``lo``, shift to start at 0."""
    x = np.clip(image.astype(np.float64), lo, hi)
    x[~mask] = lo
    x -= lo
    return x


def _downsample(v: np.ndarray) -> np.ndarray:
    """The 2x2x2 box filter of the reference (voxel ``i`` = mean of ``i - 1`` and ``i``
    along each axis, zero before the first) sampled at even indices."""
    for axis in range(v.ndim):
        n = v.shape[axis]
        keep = -(-n // 2)
        zero = np.zeros(v.shape[:axis] + (1,) + v.shape[axis + 1:], v.dtype)
        padded = np.concatenate([zero, v], axis=axis)
        take = [slice(None)] * v.ndim
        take[axis] = slice(0, 2 * keep, 2)
        even = padded[tuple(take)]
        take[axis] = slice(1, 2 * keep, 2)
        v = (even + padded[tuple(take)]) * 0.5
    return v


def _level_sum(x: np.ndarray, y: np.ndarray, m: np.ndarray, weight: float,
               data_range: float) -> tuple[float, int]:
    """Sum and count of the level's map over the masked interior voxels, by slabs."""
    pad = (_WINDOW - 1) // 2
    inner = m[(slice(pad, -pad),) * m.ndim]
    if not inner.any():
        return 0.0, 0
    # Only the bounding box of the scored voxels (plus the window's halo) is computed:
    # most of a padded volume is padding.
    lo, hi = [], []
    for axis in range(m.ndim):
        hit = np.flatnonzero(inner.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        lo.append(int(hit[0]) + pad)
        hi.append(int(hit[-1]) + pad + 1)
    rest = tuple(slice(a, b) for a, b in zip(lo[1:], hi[1:]))
    rest_halo = tuple(slice(a - pad, b + pad) for a, b in zip(lo[1:], hi[1:]))
    plane = math.prod(b - a + 2 * pad for a, b in zip(lo[1:], hi[1:]))
    slab = max(1, _SLAB_VOXELS // plane)
    total, count = 0.0, 0
    for start in range(lo[0], hi[0], slab):
        stop = min(start + slab, hi[0])
        scored = m[(slice(start, stop),) + rest]
        if not scored.any():
            continue
        halo = (slice(start - pad, stop + pad),) + rest_halo
        level_map = _weighted_ssim_map(x[halo], y[halo], weight, data_range)
        total += float(level_map[scored].sum())
        count += int(scored.sum())
    return total, count


def _weighted_ssim_map(x: np.ndarray, y: np.ndarray, weight: float,
                       data_range: float) -> np.ndarray:
    """``L^w C^w S^w`` on the interior of a block (3 voxels of halo on every side)."""
    pad = (_WINDOW - 1) // 2
    interior = (slice(pad, -pad),) * x.ndim

    def box(a):
        return ndimage.uniform_filter(a, size=_WINDOW)[interior]

    n_window = _WINDOW ** x.ndim
    cov_norm = n_window / (n_window - 1)
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    c3 = c2 / 2.0
    ux, uy = box(x), box(y)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    sxy = np.sqrt(np.maximum(vx, 0.0)) * np.sqrt(np.maximum(vy, 0.0))
    luminance = np.maximum((2.0 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0.0)
    contrast = np.maximum((2.0 * sxy + c2) / (vx + vy + c2), 0.0)
    structure = np.maximum((vxy + c3) / (sxy + c3), 0.0)
    return luminance**weight * contrast**weight * structure**weight
