"""Intensity normalisation, centred crop/pad and body masks.

Conventions: CT is clipped to ``[HU_MIN, HU_MAX]`` and mapped
linearly to ``[-1, 1]``; MR is normalised per patient by robust percentiles inside the
body mask. Models see ``[-1, 1]`` on both sides; predictions go back to HU with
:func:`unit_to_ct`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

HU_MIN = -1024.0
HU_MAX = 3000.0
# [-1, 1] spans the clipped CT range: an L1 of 1 in network units is this many HU.
HU_PER_UNIT = (HU_MAX - HU_MIN) / 2.0


def _array_module(x):
    """``jnp`` for JAX arrays (so the maps trace inside ``jit``), ``np`` otherwise."""
    return jnp if isinstance(x, jax.Array) else np


def ct_to_unit(hu):
    """Maps CT numbers to ``[-1, 1]``.

    Args:
      hu: CT in Hounsfield units, any shape; a NumPy array (or scalar/list) or a JAX
        array.

    Returns:
      float32 array of the same shape and kind: ``HU_MIN -> -1``, ``HU_MAX -> 1``,
      values outside the window clipped.
    """
    xp = _array_module(hu)
    hu = xp.asarray(hu, dtype=xp.float32)
    # Divide, then double: the window ends and its midpoint (988 HU) map exactly to
    # -1, 1 and 0 (a precomputed 2/4024 factor is off by an ulp at the top).
    fraction = (xp.clip(hu, HU_MIN, HU_MAX) - np.float32(HU_MIN)) / np.float32(HU_MAX - HU_MIN)
    return fraction * np.float32(2.0) - np.float32(1.0)


def unit_to_ct(x):
    """Inverse of :func:`ct_to_unit`: ``[-1, 1]`` to HU (``x`` clipped to ``[-1, 1]``).

    Args:
      x: network output in ``[-1, 1]``, any shape, NumPy or JAX.

    Returns:
      float32 HU of the same shape, in ``[HU_MIN, HU_MAX]``.
    """
    xp = _array_module(x)
    x = xp.clip(xp.asarray(x, dtype=xp.float32), -1.0, 1.0)
    return (x + np.float32(1.0)) * np.float32((HU_MAX - HU_MIN) / 2.0) + np.float32(HU_MIN)


def mr_percentile_window(mr: np.ndarray, mask: np.ndarray | None = None,
                         lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """The robust intensity window ``(lo, hi)`` of an MR inside ``mask``.

    Args:
      mr: MR in scanner units, any shape.
      mask: boolean array of ``mr``'s shape, or ``None`` for every voxel.
      lo_pct, hi_pct: the percentiles, ``0 <= lo_pct < hi_pct <= 100``.

    Returns:
      ``(lo, hi)`` with ``lo <= hi`` (equal for a constant image).

    Raises:
      ValueError: bad percentiles, an empty mask or non-finite values. Callers that
        know the file add its path.
    """
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"need 0 <= lo_pct < hi_pct <= 100, got {lo_pct}, {hi_pct}")
    mr = np.asarray(mr)
    values = mr if mask is None else mr[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("MR mask is empty: no voxels to compute percentiles from")
    lo, hi = np.percentile(values.astype(np.float64), [lo_pct, hi_pct])
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("MR has non-finite values inside the mask")
    return float(lo), float(hi)


def mr_to_unit(mr: np.ndarray, mask: np.ndarray | None = None, lo_pct: float = 0.5,
               hi_pct: float = 99.5) -> np.ndarray:
    """Per-patient robust MR normalisation to ``[-1, 1]``.

    Args:
      mr: ``(X, Y, Z)`` (any shape) MR in scanner units.
      mask: boolean array of the same shape selecting the voxels the percentiles are
        computed over (the body); ``None``: the whole volume.
      lo_pct, hi_pct: percentiles mapped to -1 and 1; values beyond are clipped.

    Returns:
      float32 array of ``mr``'s shape in ``[-1, 1]``. A constant image (zero-width
      window) maps to -1 everywhere rather than dividing by zero.

    Raises:
      ValueError: see :func:`mr_percentile_window`.
    """
    lo, hi = mr_percentile_window(mr, mask, lo_pct, hi_pct)
    width = hi - lo if hi > lo else 1.0
    mr = np.clip(np.asarray(mr, dtype=np.float64), lo, hi)
    return ((mr - lo) * (2.0 / width) - 1.0).astype(np.float32)


def _crop_or_pad_widths(length: int, target: int) -> tuple[int, int]:
    """``(start, before)``: where a centred window of ``target`` starts in ``length``
    (crop) or how much goes before ``length`` inside ``target`` (pad).

    Both use ``floor(|length - target| / 2)``: that shared convention is what makes
    cropping to ``target`` and then cropping/padding back to ``length`` an exact inverse.
    """
    return (max(length - target, 0) // 2, max(target - length, 0) // 2)


def crop_or_pad(arr: np.ndarray, size: int | Sequence[int], axes: int | Sequence[int],
                value: float = 0) -> np.ndarray:
    """Centred crop or pad of ``axes`` to ``size``.

    Along each axis a longer array is cropped to its centre (the extra odd voxel is
    dropped at the end) and a shorter one padded with ``value`` (the extra odd voxel
    goes at the end).

    Args:
      arr: NumPy array of any rank.
      size: target length of each axis in ``axes`` (an int applies to all).
      axes: the axes to change, e.g. ``(0, 1)`` for the ``(X, Y)`` plane of an
        ``(X, Y, Z)`` volume.
      value: the pad value (``-1`` for normalised MR/CT, ``0`` for masks).

    Returns:
      A new array whose ``axes`` have lengths ``size``; other axes unchanged.
    """
    arr = np.asarray(arr)
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    sizes = (size,) * len(axes) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sizes) != len(axes):
        raise ValueError(f"{len(sizes)} sizes for {len(axes)} axes")
    axes = tuple(a % arr.ndim for a in axes)
    crop_index = [slice(None)] * arr.ndim
    pad_widths = [(0, 0)] * arr.ndim
    for axis, target in zip(axes, sizes):
        length = arr.shape[axis]
        start, before = _crop_or_pad_widths(length, target)
        crop_index[axis] = slice(start, start + min(length, target))
        pad_widths[axis] = (before, max(target - length, 0) - before)
    out = arr[tuple(crop_index)]
    if any(w != (0, 0) for w in pad_widths):
        out = np.pad(out, pad_widths, mode="constant", constant_values=value)
    return np.array(out, copy=True) if out.base is not None else out


def undo_crop_or_pad(arr: np.ndarray, original_size: int | Sequence[int],
                     axes: int | Sequence[int], value: float = 0) -> np.ndarray:
    """Exact inverse placement of :func:`crop_or_pad`.

    A prediction made on ``crop_or_pad(x, size, axes)`` goes back to ``x``'s grid:
    voxels that were padded are dropped, the region that was cropped away is filled with
    ``value``. Because both directions centre with the same ``floor`` convention this is
    ``crop_or_pad`` to the original size.

    Args:
      arr: array whose ``axes`` have the crop/pad sizes.
      original_size: the lengths of ``axes`` before :func:`crop_or_pad`.
      axes: the same axes as given to :func:`crop_or_pad`.
      value: fill value of the region that was cropped away.

    Returns:
      Array with ``axes`` of lengths ``original_size``.
    """
    return crop_or_pad(arr, original_size, axes, value)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of values (maximum between-class variance).

    Args:
      values: any array; flattened.
      bins: histogram bins over ``[min, max]``.

    Returns:
      The threshold: voxels ``> threshold`` are the bright class.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = np.cumsum(counts[::-1])[::-1][1:].astype(np.float64)
    mean_low = np.cumsum(counts * centres)[:-1] / np.maximum(weight_low, 1)
    mean_high = (np.cumsum((counts * centres)[::-1])[::-1][1:]
                 / np.maximum(weight_high, 1))
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[:-1][np.argmax(between)])


def body_mask_from_mr(mr: np.ndarray, *, dilation: int = 2,
                      smoothing_sigma: float = 1.0) -> np.ndarray:
    """A body mask from the MR alone (for cases shipped without ``mask``).

    Otsu threshold of a Gaussian-smoothed MR (smoothing removes Rician noise specks in
    the air), the largest 3D connected component (drops coil artefacts and detached
    noise), hole filling per axial slice (bone, air cavities and bowel gas are dark in
    MR but belong to the body; per slice because a 3D fill leaks through open ends) and
    a small dilation (SynthRAD masks are dilated so the skin is inside).

    Args:
      mr: ``(X, Y, Z)`` MR in any units.
      dilation: binary dilation steps with the 3D cross (0: none).
      smoothing_sigma: Gaussian sigma in voxels.

    Returns:
      ``(X, Y, Z)`` bool mask (all False for a constant image).
    """
    mr = np.asarray(mr, dtype=np.float32)
    if mr.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {mr.shape}")
    smooth = ndimage.gaussian_filter(mr, smoothing_sigma) if smoothing_sigma > 0 else mr
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(mr.shape, dtype=bool)
    foreground = smooth > otsu_threshold(smooth)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    if dilation > 0:
        mask = ndimage.binary_dilation(mask, iterations=dilation)
    return mask
