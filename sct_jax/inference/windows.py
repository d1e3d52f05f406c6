"""Whole-volume inference from a model that sees 2D slices or 3D patches.

2D models run slice by slice (axial, ``arr[:, :, z]``) in fixed-size batches, so one
compilation serves every volume; 3D models run over overlapping sliding windows whose
predictions are blended with a smooth weight that falls towards the window border
(the border voxels of a patch see the least context). Everything here works in the
normalised [-1, 1] space; callers map to HU with ``preprocess.unit_to_ct``.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

import numpy as np

from sct_jax.data.preprocess import crop_or_pad, undo_crop_or_pad

PredictFn = Callable[[np.ndarray], np.ndarray]


def _batched(items: Iterable[np.ndarray], batch_size: int) -> Iterable[tuple[np.ndarray, int]]:
    """Stacks items into ``batch_size`` batches, zero-padding the last; yields (batch, n)."""
    buf: list[np.ndarray] = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield np.stack(buf), batch_size
            buf = []
    if buf:
        n = len(buf)
        buf.extend([np.zeros_like(buf[0])] * (batch_size - n))
        yield np.stack(buf), n


def slice_stack(mr: np.ndarray, z: int, context: int) -> np.ndarray:
    """``(X, Y, 2*context+1)`` axial MR slices around ``z`` (edges replicated)."""
    zs = np.clip(np.arange(z - context, z + context + 1), 0, mr.shape[2] - 1)
    return np.stack([mr[:, :, k] for k in zs], axis=-1)


def predict_volume_2d(predict: PredictFn, mr: np.ndarray, crop: Sequence[int],
                      context: int = 0, batch_size: int = 8) -> np.ndarray:
    """Predicts a volume slice by slice.

    Args:
      predict: ``(B, H, W, C_in)`` -> ``(B, H, W, 1)``, both in [-1, 1].
      mr: ``(X, Y, Z)`` normalised MR.
      crop: ``(H, W)`` the model's input size; slices are centre-cropped/padded to it
        (padding value -1, i.e. air) and the prediction is placed back.
      context: MR neighbours on each side (2.5D input has ``2*context+1`` channels).
      batch_size: slices per call (the last batch is zero-padded: one compilation).

    Returns:
      ``(X, Y, Z)`` prediction in [-1, 1]; the region outside the crop is -1.
    """
    x, y, z_len = mr.shape
    crop = tuple(crop)
    slices = (crop_or_pad(slice_stack(mr, z, context), crop, axes=(0, 1), value=-1.0)
              for z in range(z_len))
    out = np.empty((x, y, z_len), np.float32)
    z = 0
    for batch, n in _batched(slices, batch_size):
        pred = np.asarray(predict(batch.astype(np.float32)))[:n, ..., 0]
        for k in range(n):
            out[:, :, z + k] = undo_crop_or_pad(pred[k], (x, y), axes=(0, 1), value=-1.0)
        z += n
    return out


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window origins covering ``[0, size)``; the last window ends exactly at ``size``."""
    if size <= window:
        return [0]
    stride = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, size - window, stride))
    starts.append(size - window)
    return sorted(set(starts))


def blend_weight(window: Sequence[int]) -> np.ndarray:
    """Separable weight, 1 in the centre falling linearly to a small floor at the border."""
    weight = np.ones(tuple(window), np.float32)
    for axis, n in enumerate(window):
        ramp = 1.0 - np.abs(np.linspace(-1.0, 1.0, n)) * 0.9
        shape = [1] * len(window)
        shape[axis] = n
        weight = weight * ramp.reshape(shape).astype(np.float32)
    return weight


def predict_volume_3d(predict: PredictFn, mr: np.ndarray, patch: Sequence[int],
                      overlap: float = 0.5, batch_size: int = 1) -> np.ndarray:
    """Predicts a volume by overlapping 3D windows, blended.

    Args:
      predict: ``(B, D, H, W, 1)`` -> ``(B, D, H, W, 1)``, both in [-1, 1].
      mr: ``(X, Y, Z)`` normalised MR.
      patch: the window ``(D, H, W)`` (the training patch).
      overlap: fraction of the window shared by neighbours (0.5: stride = half a window).
      batch_size: windows per call (last batch zero-padded: one compilation).

    Returns:
      ``(X, Y, Z)`` prediction in [-1, 1].
    """
    patch = tuple(int(p) for p in patch)
    original = mr.shape
    padded_shape = tuple(max(s, p) for s, p in zip(original, patch))
    vol = crop_or_pad(mr, padded_shape, axes=(0, 1, 2), value=-1.0)
    starts = list(itertools.product(*(window_starts(s, p, overlap)
                                      for s, p in zip(padded_shape, patch))))
    weight = blend_weight(patch)
    acc = np.zeros(padded_shape, np.float32)
    norm = np.zeros(padded_shape, np.float32)

    def windows():
        for s in starts:
            sl = tuple(slice(a, a + p) for a, p in zip(s, patch))
            yield vol[sl][..., None]

    i = 0
    for batch, n in _batched(windows(), batch_size):
        pred = np.asarray(predict(batch.astype(np.float32)))[:n, ..., 0]
        for k in range(n):
            sl = tuple(slice(a, a + p) for a, p in zip(starts[i + k], patch))
            acc[sl] += pred[k] * weight
            norm[sl] += weight
        i += n
    blended = acc / np.maximum(norm, 1e-8)
    return undo_crop_or_pad(blended, original, axes=(0, 1, 2), value=-1.0)
