"""Pixel-wise reconstruction losses."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp


def l1_map(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-voxel absolute error ``|pred - target|``.

    The loss map the spatial reweighting (``sct_jax.meta``) weights pixel by pixel.

    Args:
      pred: ``(B, *spatial, C)`` (any shape).
      target: the same shape as ``pred``.

    Returns:
      ``|pred - target|``, the shape of ``pred``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"l1_map: pred shape {pred.shape} != target shape {target.shape}")
    return jnp.abs(pred - target)


def l1(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """L1 loss: the mean absolute error, or a weighted sum of absolute errors.

    Args:
      pred: ``(B, *spatial, C)`` (any shape).
      target: the same shape as ``pred``.
      weights: ``None`` for the plain mean; otherwise weights broadcastable to
        ``pred`` and the result is ``sum(weights * |pred - target|)``, a sum and not a
        mean, because learning-to-reweight weights are already normalised to sum to 1
        over the mini-batch (uniform weights ``1 / pred.size`` give back the mean).

    Returns:
      A scalar, float32 (or float64 for float64 inputs).
    """
    errors = l1_map(pred, target)
    # Accumulate in at least float32 (bf16 sums over a volume lose too many bits).
    errors = errors.astype(jnp.promote_types(errors.dtype, jnp.float32))
    if weights is None:
        return jnp.mean(errors)
    return jnp.sum(jnp.asarray(weights, errors.dtype) * errors)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute error over the voxels where ``mask`` is set (a body-masked L1).

    Args:
      pred: ``(B, *spatial, C)``.
      target: the same shape as ``pred``.
      mask: ``(B, *spatial, 1)`` or ``pred``'s shape, 1 inside the body and 0 outside.

    Returns:
      ``sum(mask * |pred - target|) / sum(mask)`` over every channel, a scalar; 0 for a
      batch without a masked voxel (nothing to fit, rather than a NaN gradient).
    """
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), pred.shape)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    return l1(pred, target, weights=mask / count)


def shift_tolerant_l1(pred: jax.Array, target: jax.Array, mask: jax.Array | None,
                      max_shift: int) -> jax.Array:
    """An L1 that forgives a residual misalignment of up to ``max_shift`` voxels.

    For each sample, the (masked) mean absolute error against the target moved by every
    integer offset in ``[-max_shift, max_shift]`` on every spatial axis, the smallest of
    them kept; the mean over the batch. A target a voxel away from its input (a CT
    registered to a CBCT, close but not exact) otherwise teaches the model to blur every
    edge by the spread of the misalignment; with the minimum the model keeps the edges
    where its input has them and is scored against the target where it fits best.

    Args:
      pred: ``(B, *spatial, C)``.
      target: the same shape.
      mask: ``None`` (every voxel) or ``(B, *spatial, 1)``, 1 inside the body; it moves
        with the target (it is the target's body).
      max_shift: voxels, ``>= 0``; 0 is the plain per-sample (masked) L1.

    Returns:
      A scalar, float32: mean over samples of the minimum over offsets. The edge voxels
      a shift brings in repeat the target's border (edge padding).
    """
    if pred.shape != target.shape:
        raise ValueError(f"shift_tolerant_l1: pred shape {pred.shape} != target shape "
                         f"{target.shape}")
    nd = pred.ndim - 2
    s = int(max_shift)
    mask = jnp.ones(pred.shape[:-1] + (1,), jnp.float32) if mask is None else mask
    pad = [(0, 0)] + [(s, s)] * nd + [(0, 0)]
    target_p = jnp.pad(target.astype(jnp.float32), pad, mode="edge")
    mask_p = jnp.pad(jnp.asarray(mask, jnp.float32), pad, mode="edge")
    pred = pred.astype(jnp.float32)
    spatial = pred.shape[1:-1]
    axes = tuple(range(1, pred.ndim))
    losses = []
    for offset in itertools.product(range(-s, s + 1), repeat=nd):
        window = (slice(None),) + tuple(slice(s + o, s + o + n)
                                        for o, n in zip(offset, spatial)) + (slice(None),)
        m = jnp.broadcast_to(mask_p[window], pred.shape)
        err = jnp.sum(m * jnp.abs(pred - target_p[window]), axis=axes)
        losses.append(err / jnp.maximum(jnp.sum(m, axis=axes), 1.0))
    return jnp.mean(jnp.min(jnp.stack(losses), axis=0))
