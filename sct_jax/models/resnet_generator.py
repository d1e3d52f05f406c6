"""The pGAN / CycleGAN ResNet generator, 2D or 3D from the input rank.

Reproduces the reference ``ResnetGenerator`` (icon-lab/pGAN-cGAN, the same network as
junyanz/pytorch-CycleGAN-and-pix2pix ``resnet_9blocks``)::

  ReflectPad 3 -> Conv k7 -> ngf -> norm -> ReLU
  2x: Conv k3 s2 p1 -> 2 * channels -> norm -> ReLU                  (64 -> 128 -> 256)
  n_blocks x ResnetBlock at ngf * 4:
      x + [ReflectPad 1 -> Conv k3 -> norm -> ReLU -> Dropout
           -> ReflectPad 1 -> Conv k3 -> norm]
  2x: ConvTranspose k3 s2 p1 output_padding 1 -> channels / 2 -> norm -> ReLU
      (``upsample="resize"``: nearest x2 + Conv k3 p1 in place of the ConvTranspose)
  ReflectPad 3 -> Conv k7 -> out_channels (bias) -> Tanh

Convs before a norm get a bias unless the norm is a batch norm (the reference's
``use_bias = norm_layer == InstanceNorm2d``); the last conv always has one. Weights are
N(0, 0.02), biases 0 (the reference's ``init_type='normal'``).

For pGAN the input is 2.5D: three neighbouring MR slices as channels -> one CT slice.
CycleGAN uses the same network with ``dropout_rate=0`` (its ``--no_dropout``).

Tiny sizes for tests and ``tiny`` configs: ``ResnetGenerator(ngf=4, n_blocks=2)`` on
inputs whose spatial sizes are multiples of 4 and at least 8.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.calibration import IntensityCalibration
from sct_jax.models.layers import (Conv, Dropout, conv_bias_before_norm, generator_output,
                                   last_layer_init, make_norm, reflect_pad, remat_block,
                                   split_extra_channels, upsample2x)

# Two stride-2 downsamplings: spatial sizes must be multiples of 4 to come back intact.
N_DOWNSAMPLINGS = 2


def check_resnet_input(spatial_shape: tuple[int, ...]) -> None:
    """Raises :class:`ConfigError` unless the generator maps this shape onto itself.

    The two stride-2 convs and transposed convs give back the input size only for sizes
    divisible by 4; the reflect pads need at least 4 pixels at full resolution and 2 at
    the residual level (``ReflectionPad`` cannot pad more than ``size - 1``).

    Args:
      spatial_shape: the input's spatial sizes, e.g. ``(H, W)``.
    """
    factor = 2 ** N_DOWNSAMPLINGS
    bad = [s for s in spatial_shape if s % factor or s < 2 * factor]
    if bad:
        raise ConfigError(
            f"ResnetGenerator needs every spatial size to be a multiple of {factor} and "
            f"at least {2 * factor}; got input spatial shape {tuple(spatial_shape)} "
            "(crop/pad the input)")


def check_dropout_sampling(dropout_rate: float, n_blocks: int) -> None:
    """Raises :class:`ConfigError` unless the generator has dropout layers to sample with.

    Monte-Carlo (test-time) dropout needs at least one: the dropout sits inside the
    residual blocks, so a rate of 0 or no block gives K identical "samples".

    Args:
      dropout_rate: the generator's ``dropout_rate`` (``config.model.gen.dropout``).
      n_blocks: its residual blocks (``config.model.gen.n_blocks``).
    """
    if dropout_rate <= 0:
        raise ConfigError(f"config.model.gen.dropout={dropout_rate}: the ResNet generator has "
                          "no dropout to sample with (train with dropout > 0)")
    if n_blocks < 1:
        raise ConfigError(f"config.model.gen.n_blocks={n_blocks}: the ResNet generator's "
                          "dropout sits in its residual blocks; with none there is nothing "
                          "to sample")


class ResnetBlock(nn.Module):
    """``x + [pad, conv3, norm, ReLU, dropout, pad, conv3, norm](x)``, reflect padding.

    Shared with the RegGAN registration network (which uses it without dropout).

    Attributes:
      norm: ``"instance"``, ``"batch"`` or ``"none"``.
      dropout_rate: dropout between the two convs (0 disables it).
      kernel_init: initialiser of both conv kernels ``(3, ..., C, C)``.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters).
    """

    norm: str = "instance"
    dropout_rate: float = 0.0
    kernel_init: Any = None
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block: ``(B, *spatial, C)`` -> same shape.

        Args:
          x: ``(B, *spatial, C)``, every spatial size at least 2.
          train: enables dropout (needs a ``"dropout"`` rng); positional under
            :func:`~sct_jax.models.layers.remat_block` (a static argument).
        """
        channels = x.shape[-1]
        conv_kw = dict(kernel_size=3, use_bias=conv_bias_before_norm(self.norm),
                       conv_impl=self.conv_impl, dtype=self.dtype)
        if self.kernel_init is not None:
            conv_kw["kernel_init"] = self.kernel_init
        h = Conv(channels, name="conv_0", **conv_kw)(reflect_pad(x, 1))
        h = nn.relu(make_norm(self.norm, name="norm_0")(h))
        if self.dropout_rate > 0:
            h = Dropout(self.dropout_rate, name="dropout")(h, deterministic=not train)
        h = Conv(channels, name="conv_1", **conv_kw)(reflect_pad(h, 1))
        h = make_norm(self.norm, name="norm_1")(h)
        return x + h


class ResnetGenerator(nn.Module):
    """pGAN / CycleGAN ResNet generator (``resnet_9blocks`` with the defaults).

    Attributes:
      out_channels: output channels (1 for a CT).
      ngf: channels of the first conv; the residual blocks run at ``4 * ngf``.
      n_blocks: residual blocks (9 in pGAN).
      norm: ``"instance"`` (pGAN, no affine, eps 1e-5), ``"batch"`` or ``"none"``.
      dropout_rate: dropout inside each residual block (0.5 in pGAN, 0 in CycleGAN).
        Uses the ``"dropout"`` rng collection.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters); the output
        is float32 whatever it is.
      remat: rematerialise the residual blocks, see
        :data:`~sct_jax.models.layers.REMAT_CHOICES`.
      residual: output the input's centre channel plus the network's ``tanh``
        (:func:`~sct_jax.models.layers.generator_output`; CBCT input).
      upsample: ``"transpose"`` (the reference's ConvTranspose k3 s2 p1 op1) or
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
    n_blocks: int = 9
    norm: str = "instance"
    dropout_rate: float = 0.5
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"
    residual: bool = False
    upsample: str = "transpose"
    calibration_bins: int = 0
    prior_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Translates ``x``.

        Args:
          x: ``(B, *spatial, C_in)`` with 1-3 spatial axes, each a multiple of 4 and at
            least 8; for pGAN ``(B, H, W, 3)``, three neighbouring MR slices.
          train: enables dropout (needs a ``"dropout"`` rng).

        Returns:
          ``(B, *spatial, out_channels)`` in ``[-1, 1]`` (tanh).

        Raises:
          ConfigError: a spatial size is not a multiple of 4 or is below 8.
        """
        if x.ndim not in (3, 4, 5):
            raise ValueError(f"expected (B, *spatial, C) with 1-3 spatial axes, "
                             f"got shape {x.shape}")
        check_resnet_input(x.shape[1:-1])
        image, extras = split_extra_channels(x, int(self.prior_input))
        if self.calibration_bins:
            image = IntensityCalibration(self.calibration_bins, name="calibration")(image)
        x = image if extras is None else jnp.concatenate([image, extras.astype(image.dtype)],
                                                         axis=-1)
        conv_bias = conv_bias_before_norm(self.norm)
        common = dict(conv_impl=self.conv_impl, dtype=self.dtype)

        h = Conv(self.ngf, kernel_size=7, use_bias=conv_bias, name="conv_in",
                 **common)(reflect_pad(x, 3))
        h = nn.relu(make_norm(self.norm, name="norm_in")(h))

        channels = self.ngf
        for i in range(N_DOWNSAMPLINGS):
            channels *= 2
            h = Conv(channels, kernel_size=3, strides=2, padding=1, use_bias=conv_bias,
                     name=f"down_conv_{i}", **common)(h)
            h = nn.relu(make_norm(self.norm, name=f"down_norm_{i}")(h))

        block = remat_block(ResnetBlock, self.remat, static_argnums=(2,))
        for i in range(self.n_blocks):
            h = block(norm=self.norm, dropout_rate=self.dropout_rate,
                      name=f"block_{i}", **common)(h, train)

        for i in range(N_DOWNSAMPLINGS):
            channels //= 2
            h = upsample2x(h, channels, kind=self.upsample, kernel_size=3, padding=1,
                           output_padding=1, use_bias=conv_bias, name=f"up_conv_{i}",
                           **common)
            h = nn.relu(make_norm(self.norm, name=f"up_norm_{i}")(h))

        h = Conv(self.out_channels, kernel_size=7, use_bias=True, name="conv_out",
                 **last_layer_init(self.residual, extras), **common)(reflect_pad(h, 3))
        return generator_output(h, image, self.residual, prior=extras)
