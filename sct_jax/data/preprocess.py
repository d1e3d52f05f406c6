"""Intensity normalisation, crop/pad and body masks.

CT: clipped to [-1024, 3000] HU and mapped linearly to [-1, 1] (and back). MR: each
patient scaled by robust percentiles inside the body mask to [-1, 1], because MR has no
absolute units and scanners ("centres") differ in gain. Crop/pad is centred and exactly
invertible so a prediction made on a fixed-size slice is placed back on the MR grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

HU_MIN = -1024.0
HU_MAX = 3000.0
_HU_HALF_RANGE = (HU_MAX - HU_MIN) / 2.0
_HU_CENTRE = (HU_MAX + HU_MIN) / 2.0


def _xp(x):
    """numpy or jax.numpy, whichever the array belongs to."""
    if type(x).__module__.startswith("jax") or hasattr(x, "aval"):
        import jax.numpy as jnp
        return jnp
    return np


def ct_to_unit(hu):
    """HU -> [-1, 1] after clipping to ``[HU_MIN, HU_MAX]`` (numpy or jax arrays)."""
    xp = _xp(hu)
    hu = xp.clip(xp.asarray(hu, dtype=xp.float32), HU_MIN, HU_MAX)
    return (hu - _HU_CENTRE) / _HU_HALF_RANGE


def unit_to_ct(x):
    """[-1, 1] -> HU (``x`` clipped to [-1, 1] first)."""
    xp = _xp(x)
    x = xp.clip(xp.asarray(x, dtype=xp.float32), -1.0, 1.0)
    return x * _HU_HALF_RANGE + _HU_CENTRE


def mr_to_unit(mr: np.ndarray, mask: np.ndarray | None = None, lo_pct: float = 0.5,
               hi_pct: float = 99.5) -> np.ndarray:
    """Robust per-patient MR normalisation to [-1, 1].

    Args:
      mr: ``(X, Y, Z)`` MR in scanner units.
      mask: body mask (percentiles are taken inside it); ``None`` for the whole volume.
      lo_pct, hi_pct: percentiles mapped to -1 and +1; values beyond are clipped.

    Returns:
      float32 array of ``mr``'s shape in [-1, 1].
    """
    mr = np.asarray(mr, dtype=np.float32)
    values = mr[np.asarray(mask) > 0] if mask is not None and np.any(mask) else mr.ravel()
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    scale = float(hi - lo) if hi > lo else 1.0
    out = (mr - lo) / scale * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _crop_pad_slices(old: int, new: int) -> tuple[slice, slice]:
    """Source and destination slices of a centred crop (new < old) or pad (new >= old)."""
    if new <= old:
        start = (old - new) // 2
        return slice(start, start + new), slice(0, new)
    start = (new - old) // 2
    return slice(0, old), slice(start, start + old)


def crop_or_pad(arr: np.ndarray, size: Sequence[int], axes: Sequence[int],
                value: float = 0.0) -> np.ndarray:
    """Centred crop or constant pad of ``axes`` of ``arr`` to ``size``.

    Args:
      arr: any array.
      size: target length per axis in ``axes``.
      axes: which axes to change.
      value: the padding value.

    Returns:
      A new array; other axes unchanged.
    """
    arr = np.asarray(arr)
    out_shape = list(arr.shape)
    src = [slice(None)] * arr.ndim
    dst = [slice(None)] * arr.ndim
    for axis, new in zip(axes, size):
        out_shape[axis] = int(new)
        src[axis], dst[axis] = _crop_pad_slices(arr.shape[axis], int(new))
    out = np.full(out_shape, value, dtype=arr.dtype)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def undo_crop_or_pad(arr: np.ndarray, original_size: Sequence[int], axes: Sequence[int],
                     value: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: back to ``original_size``, lost parts = ``value``."""
    arr = np.asarray(arr)
    out_shape = list(arr.shape)
    src = [slice(None)] * arr.ndim
    dst = [slice(None)] * arr.ndim
    for axis, old in zip(axes, original_size):
        out_shape[axis] = int(old)
        # The forward map took src (in the original) to dst (in arr): swap them.
        fwd_src, fwd_dst = _crop_pad_slices(int(old), arr.shape[axis])
        src[axis], dst[axis] = fwd_dst, fwd_src
    out = np.full(out_shape, value, dtype=arr.dtype)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def body_mask_from_mr(mr: np.ndarray, dilation: int = 2) -> np.ndarray:
    """A body mask when none is given: Otsu threshold, largest component, filled holes.

    Args:
      mr: ``(X, Y, Z)`` MR.
      dilation: voxels of dilation after filling (SynthRAD masks are dilated too).

    Returns:
      bool ``(X, Y, Z)``.
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(mr, np.float32), 1.0)
    threshold = _otsu(smooth)
    fg = smooth > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(mr.shape, bool)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    # Fill per axial slice: cortical bone and air are dark in MR and would leave holes.
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    if dilation:
        body = ndimage.binary_dilation(body, iterations=dilation)
    return body


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])
