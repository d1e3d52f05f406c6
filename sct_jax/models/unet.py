"""The pix2pix U-Net generator, 2D or 3D from the input rank.

Reproduces the reference ``UnetGenerator`` / ``UnetSkipConnectionBlock`` recursion
(junyanz/pytorch-CycleGAN-and-pix2pix) as a flat loop over levels ``i = 0..n-1``
(level 0 the outermost, ``n - 1`` the innermost), with ``c_i = ngf * min(2**i, max_mult)``
channels inside level ``i``::

  down_i:  [LeakyReLU(0.2)] -> Conv k4 s2 p1 -> c_i -> [norm]
           (level 0: no activation before and no norm; innermost: no norm)
  up_i:    ReLU -> ConvTranspose k4 s2 p1 -> c_{i-1} -> norm -> [Dropout]
           (level 0: ReLU -> ConvTranspose -> out_channels -> Tanh)
           (``upsample="resize"``: nearest x2 + Conv k3 p1 in place of each ConvTranspose)
  level i > 0 returns concat(LeakyReLU(x_i), up_i) on the channel axis.

The skip carries ``LeakyReLU(x_i)``, not ``x_i``: the reference's ``LeakyReLU(0.2,
inplace=True)`` overwrites the block input before ``torch.cat([x, model(x)])`` reads it.

Dropout sits in the middle levels whose channels are already capped (``c_{i-1} = c_i =
ngf * max_mult``): the reference's ``num_downs - 5`` intermediate ``ngf*8`` blocks.

Tiny sizes for tests and ``tiny`` configs: ``UNetGenerator(ngf=8, num_downs=3)`` on 8^d
or larger inputs (add ``max_mult=1`` to get a dropout level).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.calibration import IntensityCalibration
from sct_jax.models.layers import (Conv, Dropout, conv_bias_before_norm, generator_output,
                                   last_layer_init, make_norm, split_extra_channels,
                                   upsample2x)


def unet_channels(ngf: int, num_downs: int, max_mult: int = 8) -> list[int]:
    """Channels inside each level, outermost first: 64, 128, 256, 512, 512, ..."""
    return [ngf * min(2 ** i, max_mult) for i in range(num_downs)]


def unet_dropout_levels(ngf: int, num_downs: int, max_mult: int = 8) -> list[int]:
    """Levels whose up block ends in dropout: middle levels with capped channels.

    For the reference (``max_mult=8``) these are levels ``4..num_downs-2``, its
    ``num_downs - 5`` intermediate ``ngf*8`` blocks: ``[4, 5, 6]`` for ``unet_256``.
    """
    channels = unet_channels(ngf, num_downs, max_mult)
    cap = ngf * max_mult
    return [i for i in range(1, num_downs - 1) if channels[i - 1] == channels[i] == cap]


def check_unet_input(spatial_shape: tuple[int, ...], num_downs: int) -> None:
    """Raises :class:`ConfigError` unless every spatial size is divisible by 2**num_downs.

    Args:
      spatial_shape: the input's spatial sizes, e.g. ``(H, W)`` or ``(D, H, W)``.
      num_downs: the number of stride-2 downsamplings.
    """
    factor = 2 ** num_downs
    bad = [s for s in spatial_shape if s % factor]
    if bad:
        raise ConfigError(
            f"model.num_downs={num_downs} needs every spatial size divisible by "
            f"2**{num_downs}={factor}; got input spatial shape {tuple(spatial_shape)} "
            f"(crop/pad the input or lower model.num_downs)")


class UNetGenerator(nn.Module):
    """pix2pix U-Net generator (``unet_256`` is ``num_downs=8``, ``unet_128`` is 7).

    Attributes:
      out_channels: output channels (1 for a CT).
      ngf: channels of the outermost level.
      num_downs: stride-2 downsamplings; spatial sizes must be divisible by
        ``2**num_downs`` (320 x 192 allows at most 6).
      max_mult: cap on the channel multiplier (8: at most ``8 * ngf`` = 512 channels).
      norm: ``"instance"``, ``"batch"`` (batch statistics, see
        :class:`~sct_jax.models.layers.BatchStatsNorm`) or ``"none"``.
      dropout_rate: dropout in the capped middle levels (0.5; 0 disables it, the
        reference's ``--no_dropout``). Uses the ``"dropout"`` rng collection.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters); the output
        is float32 whatever it is.
      residual: output the input's centre channel plus the network's ``tanh``
        (:func:`~sct_jax.models.layers.generator_output`; CBCT input).
      upsample: ``"transpose"`` (the reference's ConvTranspose k4 s2 p1) or
        ``"resize"`` (nearest x2 + conv k3 p1, no checkerboard); see
        :func:`~sct_jax.models.layers.upsample2x`.
      calibration_bins: 0, or the pieces of a learned piecewise-linear map of the
        input's values applied before the network (and under the residual);
        :mod:`sct_jax.models.calibration`.
      prior_input: the input's last channel is the mean training CT
        (``config.data.prior``): fed to the network, not calibrated, and the base the
        output corrects unless ``residual`` (:func:`~sct_jax.models.layers.generator_output`).
    """

    out_channels: int = 1
    ngf: int = 64
    num_downs: int = 8
    max_mult: int = 8
    norm: str = "instance"
    dropout_rate: float = 0.5
    conv_impl: str = "auto"
    dtype: Any = None
    residual: bool = False
    upsample: str = "transpose"
    calibration_bins: int = 0
    prior_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Translates ``x``.

        Args:
          x: ``(B, *spatial, C_in)`` with 1-3 spatial axes, each divisible by
            ``2**num_downs``.
          train: enables dropout (needs a ``"dropout"`` rng). Batch norm uses batch
            statistics either way, as the reference does at test time.

        Returns:
          ``(B, *spatial, out_channels)`` in ``[-1, 1]`` (tanh).

        Raises:
          ConfigError: a spatial size is not divisible by ``2**num_downs``.
        """
        if x.ndim not in (3, 4, 5):
            raise ValueError(f"expected (B, *spatial, C) with 1-3 spatial axes, "
                             f"got shape {x.shape}")
        if self.num_downs < 2:
            raise ConfigError(f"model.num_downs={self.num_downs}: needs at least 2 "
                              "(an outermost and an innermost level)")
        check_unet_input(x.shape[1:-1], self.num_downs)
        image, extras = split_extra_channels(x, int(self.prior_input))
        if self.calibration_bins:
            image = IntensityCalibration(self.calibration_bins, name="calibration")(image)
        x = image if extras is None else jnp.concatenate([image, extras.astype(image.dtype)],
                                                         axis=-1)
        channels = unet_channels(self.ngf, self.num_downs, self.max_mult)
        inner = self.num_downs - 1
        dropout_levels = (unet_dropout_levels(self.ngf, self.num_downs, self.max_mult)
                          if self.dropout_rate > 0 else [])
        conv_bias = conv_bias_before_norm(self.norm)
        conv_kw = dict(kernel_size=4, strides=2, padding=1, conv_impl=self.conv_impl,
                       dtype=self.dtype)
        up_kw = dict(kind=self.upsample, kernel_size=4, padding=1, conv_impl=self.conv_impl,
                     dtype=self.dtype)

        # Encoder. skips[i] is what level i > 0 concatenates: LeakyReLU of its input.
        skips: dict[int, jax.Array] = {}
        h = x
        for i in range(self.num_downs):
            if i > 0:
                h = nn.leaky_relu(h, negative_slope=0.2)
                skips[i] = h
            h = Conv(channels[i], use_bias=conv_bias, name=f"down_conv_{i}", **conv_kw)(h)
            if 0 < i < inner:
                h = make_norm(self.norm, name=f"down_norm_{i}")(h)

        # Decoder, innermost level first.
        for i in range(inner, 0, -1):
            h = nn.relu(h)
            h = upsample2x(h, channels[i - 1], use_bias=conv_bias, name=f"up_conv_{i}",
                           **up_kw)
            h = make_norm(self.norm, name=f"up_norm_{i}")(h)
            if i in dropout_levels:
                h = Dropout(self.dropout_rate, name=f"dropout_{i}")(h, deterministic=not train)
            h = jnp.concatenate([skips[i], h], axis=-1)

        # Outermost up block; the reference keeps the default bias on this layer.
        h = nn.relu(h)
        h = upsample2x(h, self.out_channels, use_bias=True, name="up_conv_0",
                       **last_layer_init(self.residual, extras), **up_kw)
        return generator_output(h, image, self.residual, prior=extras)
