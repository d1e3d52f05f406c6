"""Whole-volume inference from a model that sees 2D slices or 3D patches.

2D models run slice by slice (axial, ``arr[:, :, z]``) over the whole field of view:
each slice is covered by overlapping windows (the tile, by default the training crop;
or the whole slice padded to the network's stride) whose predictions are blended, so no
voxel is ever cut away or filled with a constant. 3D models run over overlapping
sliding windows of the training patch, blended the same way. The blend weight falls
towards the window border (the border voxels of a window see the least context) but
stays positive. Batches have a fixed size, so one compilation serves a volume.
Everything here works in the normalised [-1, 1] space; callers map to HU with
``preprocess.unit_to_ct``. An input ``(X, Y, Z, C)`` holds the MR in channel 0 and
per-voxel extra inputs after it (the mean-CT prior, :mod:`sct_jax.data.prior`): a slice
model sees the MR's neighbouring slices and the extras' own slice, a patch model all
channels of the patch.
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
    """``(X, Y, 2*context+1 [+E])`` axial MR slices around ``z`` (edges replicated),
    then slice ``z`` of the ``E`` extra channels of an ``(X, Y, Z, 1 + E)`` input."""
    extras = None
    if mr.ndim == 4:
        mr, extras = mr[..., 0], mr[..., 1:]
    zs = np.clip(np.arange(z - context, z + context + 1), 0, mr.shape[2] - 1)
    stack = np.stack([mr[:, :, k] for k in zs], axis=-1)
    if extras is None or not extras.shape[-1]:
        return stack
    return np.concatenate([stack, np.asarray(extras[:, :, z])], axis=-1)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-int(n) // int(multiple)) * int(multiple)


def slice_window(slice_shape: Sequence[int], tile: Sequence[int], stride: int,
                 min_size: int = 1) -> tuple[int, int]:
    """The 2D window a model sees for slices of ``slice_shape``.

    A tile entry > 0 fixes the window along that axis (the default tile is the
    training crop, so the network sees inputs of its training size); 0 means the
    whole slice, padded up to the network's stride (fully convolutional).

    Args:
      slice_shape: ``(H, W)`` of one slice.
      tile: ``(h, w)``; each a multiple of ``stride``, or 0 for the whole axis.
      stride: the network's total stride (inputs must be multiples of it).
      min_size: the network's smallest input along an axis.

    Returns:
      ``(h, w)`` window.
    """
    window = []
    for n, t in zip(slice_shape, tile):
        t = int(t)
        window.append(t if t > 0 else round_up(max(int(n), int(min_size)), stride))
    return tuple(window)


def predict_volume_2d(predict: PredictFn, mr: np.ndarray, tile: Sequence[int],
                      context: int = 0, batch_size: int = 8, overlap: float = 0.25,
                      stride: int = 1, min_size: int = 1) -> np.ndarray:
    """Predicts a volume slice by slice over the whole field of view.

    Each axial slice is padded with air (-1) to at least the window, covered by
    overlapping windows and the window predictions blended with :func:`blend_weight`
    (centre-weighted, positive everywhere), so every voxel of the slice gets a network
    prediction: nothing is cut away or filled with a constant. A slice no larger than
    the window is one window, i.e. the whole slice.

    Args:
      predict: ``(B, h, w, C_in)`` -> ``(B, h, w, 1)``, both in [-1, 1].
      mr: ``(X, Y, Z)`` normalised MR, or ``(X, Y, Z, 1 + E)`` with extra inputs.
      tile: ``(h, w)`` window (see :func:`slice_window`; 0 along an axis: the whole
        slice padded to ``stride``).
      context: MR neighbours on each side (2.5D input has ``2*context+1`` channels).
      batch_size: windows per call (the last batch is zero-padded: one compilation).
      overlap: fraction of a window shared by neighbours along an axis.
      stride: the network's total stride.
      min_size: the network's smallest input along an axis.

    Returns:
      ``(X, Y, Z)`` prediction in [-1, 1].
    """
    x, y, z_len = mr.shape[:3]
    window = slice_window((x, y), tile, stride, min_size)
    padded = (max(x, window[0]), max(y, window[1]))
    starts = list(itertools.product(window_starts(padded[0], window[0], overlap),
                                    window_starts(padded[1], window[1], overlap)))
    jobs = [(z, s) for z in range(z_len) for s in starts]
    weight = blend_weight(window)
    acc = np.zeros(padded + (z_len,), np.float32)
    norm = np.zeros(padded + (z_len,), np.float32)
    stacks: dict[int, np.ndarray] = {}

    def windows():
        for z, (a, b) in jobs:
            if z not in stacks:  # one padded slice stack at a time
                stacks.clear()
                stacks[z] = crop_or_pad(slice_stack(mr, z, context), padded, axes=(0, 1),
                                        value=-1.0)
            yield stacks[z][a:a + window[0], b:b + window[1]]

    i = 0
    for batch, n in _batched(windows(), batch_size):
        pred = np.asarray(predict(batch.astype(np.float32)))[:n, ..., 0]
        for k in range(n):
            z, (a, b) = jobs[i + k]
            acc[a:a + window[0], b:b + window[1], z] += pred[k] * weight
            norm[a:a + window[0], b:b + window[1], z] += weight
        i += n
    blended = acc / np.maximum(norm, 1e-8)
    return undo_crop_or_pad(blended, (x, y), axes=(0, 1), value=-1.0)


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
      predict: ``(B, D, H, W, C)`` -> ``(B, D, H, W, 1)``, both in [-1, 1].
      mr: ``(X, Y, Z)`` normalised MR (``C`` = 1), or ``(X, Y, Z, C)`` with extra inputs.
      patch: the window ``(D, H, W)`` (the training patch).
      overlap: fraction of the window shared by neighbours (0.5: stride = half a window).
      batch_size: windows per call (last batch zero-padded: one compilation).

    Returns:
      ``(X, Y, Z)`` prediction in [-1, 1].
    """
    patch = tuple(int(p) for p in patch)
    if mr.ndim == 3:
        mr = mr[..., None]
    original = mr.shape[:3]
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
            yield vol[sl]

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
