"""The mean training CT as a model input: an anatomy prior for each case.

A slice model sees one axial slice of MR; it cannot know where in the head or pelvis
that slice lies, and on data that share one anatomy (atlas-registered heads) it loses to
the plain average of the training CTs. ``config.data.prior = "mean_ct"`` gives the model
that average as one more input channel, so it learns what the MR changes about it.

The prior of a case is built from the case's body mask alone (no CT), the same way in
training and in prediction:

1. **template** (:func:`fit_template`): each training CT's body bounding box (air
   outside its body) resampled (linear) to the template shape, the per-axis median of
   the training box shapes, and averaged (HU, float32). Training records it beside the
   run's geometry (:mod:`sct_jax.data.geometry`), so a prediction needs no training data.
2. **placement** (:func:`prior_volume`): the template resampled to the case's body box and
   put on it, air outside the body mask.

This is the evaluation's "mean training CT" baseline
(:mod:`sct_jax.evaluation.baselines`) through one intermediate shape; the box helpers
here are the ones that baseline uses.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from sct_jax.data import preprocess
from sct_jax.errors import ConfigError, DataError

AIR_HU = -1000.0
# config.data.prior values: "" (no prior) or "mean_ct".
PRIORS = ("", "mean_ct")
PRIOR_FILE = "prior_ct.npy"
# Training cases the template averages at most (the evaluation baseline's bound).
MAX_TEMPLATE_CASES = 32


def check_prior_config(config) -> str:
    """``config.data.prior`` checked: ``""`` or ``"mean_ct"`` (absent: ``""``).

    Raises:
      ConfigError: another value, or a prior with a data mode that has no place for it
        (unpaired slices).
    """
    value = str(config.data.get("prior", ""))
    if value not in PRIORS:
        raise ConfigError(f"config.data.prior={value!r}: expected '' (none) or 'mean_ct'")
    if value and config.data.mode == "unpaired_slices":
        raise ConfigError(f"config.data.prior={value!r}: not with unpaired slices "
                          "(config.data.mode); the prior is an input of paired models")
    return value


def extra_channels(config) -> int:
    """Input channels beside the MR slices: 1 with a prior, else 0."""
    return 1 if check_prior_config(config) else 0


def body_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the mask's voxels, one slice per axis.

    Raises:
      DataError: the mask is empty.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise DataError(f"empty body mask of shape {mask.shape}: no bounding box")
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def box_shape(mask: np.ndarray) -> tuple[int, ...]:
    """The shape of :func:`body_box`."""
    return tuple(s.stop - s.start for s in body_box(mask))


def resample_to(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``volume`` resampled (linear) to exactly ``shape``; a copy when equal."""
    volume = np.asarray(volume, np.float32)
    shape = tuple(int(n) for n in shape)
    if volume.shape == shape:
        return volume.copy()
    factors = [n_out / n_in for n_out, n_in in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=1, mode="nearest")
    if out.shape != shape:  # zoom rounds the output size; never off by more than one
        out = preprocess.crop_or_pad(out, shape, axes=tuple(range(out.ndim)), value=AIR_HU)
    return out


def place_in_body(box_values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` float32: ``box_values`` on the mask's bounding box, air outside the
    mask."""
    mask = np.asarray(mask, bool)
    out = np.full(mask.shape, AIR_HU, np.float32)
    out[body_box(mask)] = box_values
    out[~mask] = AIR_HU
    return out


def body_in_box(ct: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The CT (HU) on the mask's bounding box, air outside the body."""
    mask = np.asarray(mask, bool)
    box = body_box(mask)
    return np.where(mask[box], np.asarray(ct, np.float32)[box], np.float32(AIR_HU))


def fit_template(pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                 shape: Sequence[int] | None = None) -> np.ndarray:
    """The mean training CT on a common box.

    Args:
      pairs: ``(ct, mask)`` training CTs in HU and their body masks (a sequence when
        ``shape`` is None: it is read twice).
      shape: the template shape; ``None``: the per-axis median of the body-box shapes.

    Returns:
      float32 HU array of ``shape``.

    Raises:
      DataError: no pair.
    """
    if shape is None:
        pairs = list(pairs)
        if not pairs:
            raise DataError("mean training CT prior: no training case")
        shape = tuple(int(round(v)) for v in
                      np.median([box_shape(mask) for _, mask in pairs], axis=0))
    total, n = np.zeros(tuple(shape), np.float64), 0
    for ct, mask in pairs:
        total += resample_to(body_in_box(ct, mask), shape)
        n += 1
    if n == 0:
        raise DataError("mean training CT prior: no training case")
    return (total / n).astype(np.float32)


def prior_volume(template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` float32 HU: the template on the mask's body box, air elsewhere
    (all air for an empty mask)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.full(mask.shape, AIR_HU, np.float32)
    return place_in_body(resample_to(template, box_shape(mask)), mask)


def prior_unit(template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`prior_volume` in the model's CT units ([-1, 1])."""
    return preprocess.ct_to_unit(prior_volume(template, mask)).astype(np.float32)


def digest(template: np.ndarray) -> str:
    """A short content hash of a template (names its cached per-case priors)."""
    template = np.ascontiguousarray(template, np.float32)
    h = hashlib.sha256(repr(template.shape).encode())
    h.update(template.tobytes())
    return h.hexdigest()[:16]
