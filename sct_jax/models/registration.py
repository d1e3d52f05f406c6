"""RegGAN's registration network and the warp it drives (Kong et al. 2021, "NC+R").

The registration network ``R(fake, real)`` predicts a displacement field, in pixels,
that warps the generator's output onto the (possibly misaligned) target CT, so the L1
term compares aligned images. As the reference ``ResUnet`` (Kid-Liet/Reg-GAN,
``trainer/reg.py`` config ``'A'``), with LeakyReLU(0.2) everywhere outside the residual
blocks::

  x = concat(moving, fixed)
  down_l (l = 1..L):   Conv k3 -> LReLU -> ResnetBlock -> skip_l -> MaxPool 2
  bottleneck:          Conv k1 -> 2C -> LReLU -> n_bottleneck_blocks x ResnetBlock(2C)
                       -> Conv k1 -> C -> LReLU
  up_l (l = L..1):     bilinear resize to skip_l's size -> concat(x, skip_l)
                       -> Conv k3 -> LReLU
  refine:              ResnetBlock -> Conv k1 -> LReLU
  output:              Conv k3 -> n_spatial channels (kernel N(0, 1e-5), bias 0)

The residual blocks are pGAN's (reflect pad, instance norm, no dropout). Kaiming-normal
(fan-in) initialisation as the reference: gain for LeakyReLU(0.2) on the LReLU convs,
for ReLU inside the residual blocks. The nearly-zero output layer makes the initial
field ~0, so training starts from the identity warp.

Everything is dimension generic (2D here; a 3D field has 3 channels).

:func:`warp` samples an image at ``position + flow`` with (bi/tri)linear interpolation
and border padding, as the reference's ``grid_sample(align_corners=True,
padding_mode="border")`` on pixel coordinates.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.layers import Conv, normal_init, remat_block
from sct_jax.models.resnet_generator import ResnetBlock

# Reference config 'A': 7 levels. 256 x 256 inputs leave 2 x 2 at the bottleneck; for
# 320 x 192 use 6 levels (the 7th would leave a width of 1, too small for a reflect pad).
REFERENCE_DOWN_CHANNELS = (32, 64, 64, 64, 64, 64, 64)
REFERENCE_UP_CHANNELS = (64, 64, 64, 64, 64, 64, 32)


def kaiming_normal_init(negative_slope: float = 0.0):
    """``torch.nn.init.kaiming_normal_(mode='fan_in')`` for ``(*k, C_in, C_out)`` kernels.

    Standard deviation ``sqrt(2 / (1 + a**2) / fan_in)`` with ``fan_in = prod(k) *
    C_in``; drawn flat and reshaped (see :func:`sct_jax.models.layers.normal_init`).
    """
    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:-1])
        std = math.sqrt(2.0 / (1.0 + negative_slope ** 2) / fan_in)
        return normal_init(std)(key, shape, dtype)
    return init


_LEAKY_SLOPE = 0.2


def _leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=_LEAKY_SLOPE)


def _max_pool2(x: jax.Array) -> jax.Array:
    """2x max pool on every spatial axis, floor sizes (``MaxPool2d(2)``)."""
    nd = x.ndim - 2
    return nn.max_pool(x, (2,) * nd, strides=(2,) * nd, padding="VALID")


def _resize_linear(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """(Bi/tri)linear resize with half-pixel centres (``align_corners=False``).

    Only ever upsamples here, where ``jax.image.resize``'s antialiasing does nothing and
    its edge handling equals PyTorch's clamped source coordinates.
    """
    return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), method="linear")


def check_registration_input(spatial_shape: Sequence[int], n_levels: int) -> None:
    """Raises :class:`ConfigError` when the bottleneck would be too small.

    Each level halves (floor) the size; the bottleneck's reflect-padded residual blocks
    need at least 2 pixels per axis.
    """
    bottleneck = [s // 2 ** n_levels for s in spatial_shape]
    if min(bottleneck) < 2:
        raise ConfigError(
            f"RegistrationNet with {n_levels} levels reduces input spatial shape "
            f"{tuple(spatial_shape)} to {tuple(bottleneck)} at the bottleneck; it needs "
            f">= 2 per axis: use fewer levels (shorter down_channels / up_channels)")


class RegistrationNet(nn.Module):
    """RegGAN ``ResUnet``: ``(moving, fixed)`` -> displacement field in pixels.

    Attributes:
      down_channels: channels of each encoder level, outermost first.
      up_channels: channels of each decoder conv, innermost first; the same length as
        ``down_channels``.
      n_bottleneck_blocks: residual blocks at the bottleneck (3 in the reference).
      output_init_std: standard deviation of the output kernel (1e-5, the reference's
        ``init_to_identity``).
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters); the field
        is float32 whatever it is (the warp interpolates in float32).
      remat: rematerialise the residual blocks, see
        :data:`~sct_jax.models.layers.REMAT_CHOICES`.
    """

    down_channels: Sequence[int] = REFERENCE_DOWN_CHANNELS
    up_channels: Sequence[int] = REFERENCE_UP_CHANNELS
    n_bottleneck_blocks: int = 3
    output_init_std: float = 1e-5
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"

    @nn.compact
    def __call__(self, moving: jax.Array, fixed: jax.Array) -> jax.Array:
        """Predicts the field that warps ``moving`` onto ``fixed``.

        Args:
          moving: ``(B, *spatial, C_m)``, e.g. the generator's sCT.
          fixed: ``(B, *spatial, C_f)``, e.g. the real CT.

        Returns:
          ``(B, *spatial, n_spatial)``: displacement in pixels along each spatial axis,
          in axis order (``[..., 0]`` along H, ``[..., 1]`` along W); use with
          :func:`warp`.

        Raises:
          ConfigError: channel lists of different lengths, or an input too small for
            the number of levels.
        """
        if len(self.down_channels) != len(self.up_channels):
            raise ConfigError(
                f"RegistrationNet: down_channels {tuple(self.down_channels)} and "
                f"up_channels {tuple(self.up_channels)} must have the same length")
        if moving.shape[:-1] != fixed.shape[:-1]:
            raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} differ in "
                             "batch or spatial shape")
        nd = moving.ndim - 2
        check_registration_input(moving.shape[1:-1], len(self.down_channels))
        common = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        leaky_init = kaiming_normal_init(_LEAKY_SLOPE)
        block_kw = dict(norm="instance", dropout_rate=0.0,
                        kernel_init=kaiming_normal_init(0.0), **common)

        block = remat_block(ResnetBlock, self.remat)
        h = jnp.concatenate([moving, fixed], axis=-1)
        skips = []
        for level, channels in enumerate(self.down_channels):
            h = _leaky(Conv(channels, kernel_size=3, padding=1, kernel_init=leaky_init,
                            name=f"down_conv_{level}", **common)(h))
            h = block(name=f"down_block_{level}", **block_kw)(h)
            skips.append(h)
            h = _max_pool2(h)

        width = h.shape[-1]
        h = _leaky(Conv(2 * width, kernel_size=1, kernel_init=leaky_init,
                        name="bottleneck_in", **common)(h))
        for i in range(self.n_bottleneck_blocks):
            h = block(name=f"bottleneck_block_{i}", **block_kw)(h)
        h = _leaky(Conv(width, kernel_size=1, kernel_init=leaky_init,
                        name="bottleneck_out", **common)(h))

        # up_channels is listed innermost first, as the reference's ``nuf``.
        for i, channels in enumerate(self.up_channels):
            level = len(self.up_channels) - 1 - i
            skip = skips[level]
            h = _resize_linear(h, skip.shape[1:-1])
            h = jnp.concatenate([h, skip], axis=-1)
            h = _leaky(Conv(channels, kernel_size=3, padding=1, kernel_init=leaky_init,
                            name=f"up_conv_{level}", **common)(h))

        h = block(name="refine_block", **block_kw)(h)
        h = _leaky(Conv(h.shape[-1], kernel_size=1, kernel_init=leaky_init,
                        name="refine_conv", **common)(h))
        return Conv(nd, kernel_size=3, padding=1,
                    kernel_init=normal_init(self.output_init_std), name="flow",
                    **common)(h).astype(jnp.float32)


def warp(image: jax.Array, flow: jax.Array) -> jax.Array:
    """Samples ``image`` at ``position + flow``, linear interpolation, border padding.

    ``out[b, p] = image[b, clamp(p + flow[b, p])]`` interpolated (bilinear in 2D,
    trilinear in 3D), where each coordinate is clamped to ``[0, size - 1]`` before
    interpolating: PyTorch's ``grid_sample(align_corners=True, padding_mode="border")``
    on the reference's normalised pixel grid. Differentiable with respect to both
    arguments (the gradient with respect to a clamped coordinate is 0).

    Args:
      image: ``(B, *spatial, C)``, every spatial size at least 2.
      flow: ``(B, *spatial, n_spatial)`` displacement in pixels along each spatial axis
        in order (``[..., 0]`` rows, ``[..., 1]`` columns).

    Returns:
      ``(B, *spatial, C)``, the dtype of ``image``.
    """
    spatial = image.shape[1:-1]
    nd = len(spatial)
    if flow.shape != (*image.shape[:-1], nd):
        raise ValueError(f"flow shape {flow.shape} must be {(*image.shape[:-1], nd)} "
                         f"for image {image.shape}")
    if min(spatial) < 2:
        raise ValueError(f"warp needs every spatial size >= 2, got {image.shape}")
    batch, channels = image.shape[0], image.shape[-1]
    grid = jnp.meshgrid(*[jnp.arange(n, dtype=flow.dtype) for n in spatial],
                        indexing="ij")
    lows, fracs = [], []
    for axis, n in enumerate(spatial):
        coord = jnp.clip(grid[axis] + flow[..., axis], 0, n - 1)
        # Lower corner in [0, n - 2], so a coordinate at n - 1 is the upper corner with
        # weight 1 and every corner index stays inside the image.
        low = jnp.clip(jnp.floor(coord), 0, n - 2)
        lows.append(low.astype(jnp.int32))
        fracs.append((coord - low).astype(image.dtype))

    strides = [math.prod(spatial[a + 1:]) for a in range(nd)]
    flat_image = image.reshape(batch, -1, channels)
    out = jnp.zeros(image.shape, image.dtype)
    # Sum over the 2**nd corners of each cell: gather the corner, weight it.
    for corner in itertools.product((0, 1), repeat=nd):
        index = sum((low + c) * s for low, c, s in zip(lows, corner, strides))
        weight = math.prod(f if c else 1 - f for f, c in zip(fracs, corner))
        values = jnp.take_along_axis(flat_image, index.reshape(batch, -1, 1), axis=1)
        out = out + weight[..., None] * values.reshape(image.shape)
    return out
