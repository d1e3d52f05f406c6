"""Smoothness of a displacement field (RegGAN's ``smooothing_loss``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothness(flow: jax.Array) -> jax.Array:
    """Sum over spatial axes of the mean squared forward difference of ``flow``.

    As the reference (Kid-Liet/Reg-GAN ``trainer/utils.py``)::

      mean((f[:, 1:, :] - f[:, :-1, :])**2) + mean((f[:, :, 1:] - f[:, :, :-1])**2)

    each mean over its own difference array (all batch elements, positions and field
    components), so an axis of size ``n`` averages ``n - 1`` differences.

    Args:
      flow: ``(B, *spatial, n_spatial)`` displacement field (any number of channels).

    Returns:
      A scalar (float32 at least).
    """
    flow = flow.astype(jnp.promote_types(flow.dtype, jnp.float32))
    total = jnp.zeros((), flow.dtype)
    for axis in range(1, flow.ndim - 1):
        total = total + jnp.mean(jnp.square(jnp.diff(flow, axis=axis)))
    return total
