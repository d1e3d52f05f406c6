"""A training CT moved onto its input's frame (``config.data.register_target``).

A paired CT is registered to its CBCT only up to a residual motion (SynthRAD Task 2's
CTs are deformably registered to the CBCT, not exactly). A voxel-wise loss against such
a target teaches the model to blur every edge by the motion, while the scores (and the
plan) want the sCT in the input's frame. This module estimates a smooth displacement
field that moves the CT onto the input and resamples the CT with it, once per training
case (cached beside the prepared case).

The fixed image is the input mapped to CT units by the case's own intensity lookup (the
mean CT value per bin of input value inside the body, the evaluation's lookup baseline
fitted on the one case), so the similarity is a sum of squared differences in CT units,
insensitive to a scanner's scale and offset. The field lives on a coarse grid of control
points (every :data:`GRID` voxels, trilinearly upsampled), is optimised by Adam on the
SSD inside the body plus a smoothness penalty on the control points, first on images
smoothed by a Gaussian (coarse), then on the images themselves. Meant for residual
motion of up to a few voxels, not for a CT from another day.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from sct_jax.errors import ConfigError

# Control-point spacing (voxels), Adam steps per level and learning rate (voxels), the
# weight of the control points' squared differences, and the Gaussian sigma (voxels)
# of the coarse level.
GRID = 4
STEPS = 150
LEARNING_RATE = 0.05
SMOOTHNESS = 0.1
COARSE_SIGMA = 1.0
LOOKUP_BINS = 64
# Larger volumes are registered subsampled (a real CBCT of 512 x 512 x 100 voxels by 3):
# memory and time then stay those of about 128^3 voxels.
MAX_FIT_VOXELS = 128 ** 3
# Bump when the algorithm changes: cached registered CTs are named after it and the
# settings above (:func:`cache_name`).
VERSION = 1


def cache_name() -> str:
    """``"ct-registered-v1-<hash>.npy"``: the file a prepared case caches its registered CT
    in, named after :data:`VERSION` and the settings, so a changed setting registers
    again rather than reading a CT registered another way."""
    settings = (GRID, STEPS, LEARNING_RATE, SMOOTHNESS, COARSE_SIGMA, LOOKUP_BINS,
                MAX_FIT_VOXELS)
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:10]
    return f"ct-registered-v{VERSION}-{digest}.npy"


def check_register_config(config) -> bool:
    """Whether ``config.data.register_target`` is on; ConfigError where it cannot be:
    MR input (the similarity compares images of the same kind, CBCT and CT) and
    unpaired training (no pair to register)."""
    on = bool(config.data.get("register_target", False))
    if on and config.data.get("input", "mr") != "cbct":
        raise ConfigError("config.data.register_target=True: registers a CT to its CBCT "
                          f"(config.data.input='cbct'), not to {config.data.get('input')!r} "
                          "input; set it to False")
    if on and config.data.mode == "unpaired_slices":
        raise ConfigError("config.data.register_target=True: unpaired training has no "
                          "paired CT to register; set it to False")
    return on


def intensity_mapped(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray,
                     bins: int = LOOKUP_BINS) -> np.ndarray:
    """``fixed`` mapped to ``moving``'s units: each voxel gets the mean of ``moving``
    over the body voxels whose ``fixed`` value falls in its bin (linear between bin
    centres; bins without body voxels take the nearest filled bin).

    Args:
      fixed: ``(X, Y, Z)`` the input in model units.
      moving: ``(X, Y, Z)`` the CT in model units, on the same grid.
      mask: ``(X, Y, Z)`` bool body mask.
    """
    lo, hi = float(fixed[mask].min()), float(fixed[mask].max())
    edges = np.linspace(lo, hi + 1e-6, bins + 1)
    which = np.clip(np.digitize(fixed[mask], edges) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=moving[mask].astype(np.float64), minlength=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    filled = counts > 0
    means = sums[filled] / counts[filled]
    return np.interp(fixed, centres[filled], means).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("grid", "steps"))
def _fit_field(fixed, moving, weight, field, grid: int, steps: int, lr: float,
               smoothness: float):
    shape = fixed.shape
    base = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape],
                                  indexing="ij"))
    total = jnp.maximum(weight.sum(), 1.0)

    def warped(f):
        dense = jax.image.resize(f, (*shape, 3), "linear")
        coords = base + jnp.moveaxis(dense, -1, 0)
        return jax.scipy.ndimage.map_coordinates(moving, list(coords), order=1,
                                                 mode="nearest")

    def loss(f):
        ssd = jnp.sum(weight * (warped(f) - fixed) ** 2) / total
        rough = sum(jnp.mean(jnp.diff(f, axis=a) ** 2) for a in range(3))
        return ssd + smoothness * rough

    opt = optax.adam(lr)

    def step(carry, _):
        f, state = carry
        grads = jax.grad(loss)(f)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(f, updates), state), None

    (field, _), _ = jax.lax.scan(step, (field, opt.init(field)), None, length=steps)
    return field


def register_to_input(input_unit: np.ndarray, ct_unit: np.ndarray, mask: np.ndarray,
                      grid: int = GRID, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """The CT moved onto the input's frame.

    Volumes above :data:`MAX_FIT_VOXELS` are registered on a copy subsampled by the
    smallest integer factor that brings them under it (Gaussian-smoothed first); the
    field is smooth, so it is then applied to the full-resolution CT.

    Args:
      input_unit: ``(X, Y, Z)`` float32 input (CBCT) in model units.
      ct_unit: ``(X, Y, Z)`` float32 CT in model units ([-1, 1]), the same grid.
      mask: ``(X, Y, Z)`` body mask of the input.
      grid: control-point spacing in voxels (of the volume the field is fitted on).
      steps: Adam steps per level (coarse, then fine).

    Returns:
      ``(ct, field)``: the registered CT ``(X, Y, Z)`` float32 in [-1, 1] and the dense
      displacement ``(X, Y, Z, 3)`` in voxels (CT sampled at ``x + field(x)``).
    """
    mask = np.asarray(mask) > 0
    moving = np.asarray(ct_unit, np.float32)
    if not mask.any():
        return moving, np.zeros((*moving.shape, 3), np.float32)
    fixed = intensity_mapped(np.asarray(input_unit, np.float32), moving, mask)
    # The body's outline is the strongest edge: weigh a voxel beyond the mask too.
    weight = ndimage.binary_dilation(mask, iterations=1).astype(np.float32)
    factor = int(np.ceil((moving.size / MAX_FIT_VOXELS) ** (1 / 3)))
    if factor > 1:
        def small(a):
            return np.ascontiguousarray(
                ndimage.gaussian_filter(a, factor / 2)[::factor, ::factor, ::factor])
        fixed, fit_moving, weight = small(fixed), small(moving), small(weight)
    else:
        fit_moving = moving
    coarse = tuple(int(np.ceil(n / grid)) + 1 for n in fit_moving.shape)
    field = jnp.zeros((*coarse, 3), jnp.float32)
    for sigma in (COARSE_SIGMA, 0.0):
        f_img = ndimage.gaussian_filter(fixed, sigma) if sigma else fixed
        m_img = ndimage.gaussian_filter(fit_moving, sigma) if sigma else fit_moving
        field = _fit_field(jnp.asarray(f_img), jnp.asarray(m_img), jnp.asarray(weight),
                              field, grid, steps, LEARNING_RATE, SMOOTHNESS)
    # The control points span the volume at any resolution; displacements scale with it.
    dense = np.asarray(jax.image.resize(field, (*moving.shape, 3), "linear"),
                       np.float32) * factor
    coords = np.indices(moving.shape, dtype=np.float32) + np.moveaxis(dense, -1, 0)
    warped = ndimage.map_coordinates(moving, coords, order=1, mode="nearest",
                                     output=np.float32)
    return np.clip(warped, -1.0, 1.0), dense
