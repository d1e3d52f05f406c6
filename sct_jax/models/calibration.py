"""A learned intensity calibration of a generator's input (``config.model.gen.calibration_bins``).

A CBCT's HU are a scanner-specific, noisy version of the CT's: the intensity lookup
baseline (a map from CBCT HU bins to the mean CT HU of each bin, fitted on the training
pairs) already removes most of that error. A U-Net cannot learn such a map voxel by
voxel: its outermost level sees the input only through a stride-2 convolution, so every
full-resolution output voxel is a smooth function of a 2 x 2 neighbourhood. The
calibration is that map inside the model: a piecewise-linear function of each input
voxel's value with ``bins + 1`` equally spaced knots over the model's ``[-1, 1]``
units, its knot values parameters trained with the generator (initialised to the
identity, so an untrained calibrated model is the uncalibrated one). The network then
sees the calibrated image, and a residual generator corrects it
(:func:`sct_jax.models.layers.generator_output`).

The knots are a parameter of the checkpoint like any other, so prediction, TTA,
ensembles and export use the calibration with no extra file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError


def check_calibration_bins(bins: int) -> int:
    """``bins`` if it is 0 (off) or at least 2, else ConfigError."""
    if int(bins) != bins or bins < 0 or bins == 1:
        raise ConfigError(f"model.gen.calibration_bins={bins!r}: expected 0 (off) or an "
                          "integer >= 2")
    return int(bins)


def piecewise_linear(x: jax.Array, values: jax.Array) -> jax.Array:
    """The piecewise-linear function with knot values ``values`` at ``linspace(-1, 1, n)``.

    Args:
      x: any shape; values outside ``[-1, 1]`` take the end knots' values.
      values: ``(n,)``, ``n >= 2``.

    Returns:
      float32, the shape of ``x``.
    """
    values = jnp.asarray(values, jnp.float32)  # a host array (an exported model's) too
    segments = values.shape[0] - 1
    t = (jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * (0.5 * segments)
    index = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, segments - 1)
    frac = t - index
    return values[index] * (1.0 - frac) + values[index + 1] * frac


class IntensityCalibration(nn.Module):
    """``x -> f(x)`` voxel by voxel, ``f`` piecewise linear with learned knot values.

    Attributes:
      bins: the number of linear pieces (``bins + 1`` knots over ``[-1, 1]``).
    """

    bins: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Calibrates ``x``: ``(B, *spatial, C)`` -> float32, same shape (every channel
        through the same function: neighbouring slices of one image)."""
        bins = check_calibration_bins(self.bins)
        values = self.param("knots", lambda _, n: jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32),
                            bins + 1)
        return piecewise_linear(x, values)
