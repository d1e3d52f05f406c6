"""Pixel-wise reconstruction losses."""

from __future__ import annotations

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
