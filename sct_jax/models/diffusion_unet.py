"""The latent diffusion UNet (MONAI's ``DiffusionModelUNet``), 2D or 3D from the input rank.

Reproduces ``monai.networks.nets.DiffusionModelUNet`` (MONAI GenerativeModels, used by
seed 03) without cross-attention or class conditioning, channels last::

  temb = Dense(4 c0) -> SiLU -> Dense(4 c0) of the sinusoidal embedding [cos, sin] (dim c0)
  h = conv_in(x)                                        skips = [h]
  level i (c_i):  num_res_blocks[i] x (ResBlock [-> Attention])   each output a skip
                  stride-2 conv3 (not at the last level)          its output a skip
  middle:         ResBlock -> Attention -> ResBlock       (always, as MONAI's AttnMidBlock)
  up level i (reversed c): num_res_blocks[i] + 1 x (concat(h, skips.pop()) -> ResBlock
                  [-> Attention]); nearest x2 + conv3 (not at the last level)
  out:            GroupNorm -> SiLU -> conv3, zero-initialised

  ResBlock(c):    GN -> SiLU -> conv3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> conv3 (zero
                  init), plus the input (1x1 conv when the channels change)

so a freshly initialised UNet outputs exactly 0. The ControlNet
(:mod:`sct_jax.models.controlnet`) adds one residual to every skip and one to the middle
output, as MONAI's ``down_block_additional_residuals`` / ``mid_block_additional_residual``.

Initialisation follows PyTorch's defaults (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for conv
and linear weights and biases, GroupNorm scale 1 and bias 0), the zero-initialised layers
of the reference excepted. Attention: the GenerativeModels ``AttentionBlock`` (what the
seed used) defines an output projection but never applies it; MONAI core applies one.
``attention_out_projection=True`` applies it, zero-initialised so that each attention block
starts as the identity; ``False`` reproduces GenerativeModels.

Tiny sizes for tests: ``DiffusionUNet(channels=(8, 16, 16), norm_num_groups=4,
num_head_channels=8)`` on 8^d or larger inputs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.controlnet import ConditioningEmbedding
from sct_jax.models.diffusion_blocks import (IntOrSeq, UNetSettings, conv_nd, group_norm,
                                             unet_encoder, upsample_nearest)


class UpLevel(nn.Module):
    """One decoder level: ``num_res_blocks`` x (concat a skip -> ResBlock [-> Attention]),
    then nearest x2 + conv3 unless it is the last level.

    Attributes: as :class:`~sct_jax.models.diffusion_blocks.DownLevel`
    (``num_res_blocks`` here is the reference's ``num_res_blocks + 1``),
    ``add_upsample`` in place of ``add_downsample``.
    """

    out_channels: int
    num_res_blocks: int
    with_attention: bool
    num_head_channels: Optional[int]
    add_upsample: bool
    settings: "UNetSettings"

    @nn.compact
    def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array) -> jax.Array:
        """``h`` ``(B, *s, C)`` and the level's ``num_res_blocks`` skips, used last first."""
        s = self.settings
        if len(skips) != self.num_res_blocks:
            raise ValueError(f"up level needs {self.num_res_blocks} skips, got {len(skips)}")
        for j in range(self.num_res_blocks):
            h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
            h = s.res_block(self.out_channels, f"res_{j}")(h, temb)
            if self.with_attention:
                h = s.attention(f"attn_{j}", self.num_head_channels)(h)
        if self.add_upsample:
            if s.resblock_updown:
                h = s.res_block(self.out_channels, "upsample", resample="up")(h, temb)
            else:
                h = conv_nd(upsample_nearest(h), self.out_channels, 3, name="upsample",
                            conv_impl=s.conv_impl, dtype=s.dtype)
        return h


# ------------------------------------------------------------------------------ model

class DiffusionUNet(nn.Module):
    """MONAI's ``DiffusionModelUNet`` (no cross-attention), channels last.

    Attributes:
      in_channels: the latent's channels (checked against the input).
      out_channels: predicted channels (the latent channels: noise or velocity).
      channels: channels of each level, e.g. ``(32, 64, 64)``.
      attention_levels: self-attention after the res blocks of these levels.
      num_res_blocks: res blocks per down level (an int or one per level); up levels
        have one more.
      num_head_channels: channels per attention head (an int or one per level), or None
        for single-head attention; the middle block uses the last level's.
      norm_num_groups: GroupNorm groups (divides every entry of ``channels``).
      norm_eps: GroupNorm epsilon.
      resblock_updown: down/upsample with res blocks instead of (stride-2 / nearest) convs.
      attention_out_projection: see the module docstring.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (parameters stay float32); the prediction is float32
        whatever it is (the scheduler runs in float32).
      remat: rematerialise the res and attention blocks, see
        :data:`~sct_jax.models.layers.REMAT_CHOICES`.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: Sequence[int] = (32, 64, 64)
    attention_levels: Sequence[bool] = (False, False, True)
    num_res_blocks: IntOrSeq = 1
    num_head_channels: Optional[IntOrSeq] = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    attention_out_projection: bool = True
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        """Predicts the noise (or velocity) of ``x`` at ``timesteps``.

        Args:
          x: ``(B, *spatial, C_in)`` with 1-3 spatial axes, each divisible by
            ``2 ** (len(channels) - 1)``.
          timesteps: ``(B,)`` int or float steps (a scalar is broadcast to the batch).
          down_block_additional_residuals: one array per skip, same order and shapes
            (the ControlNet's first output), added to the skips.
          mid_block_additional_residual: added to the middle block's output.

        Returns:
          ``(B, *spatial, out_channels)``.

        Raises:
          ConfigError: inconsistent hyper-parameters or an indivisible spatial size.
        """
        s = UNetSettings.from_model(self)
        s.check_input(x, self.in_channels)
        h, temb, skips = unet_encoder(s, x, timesteps)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"got {len(down_block_additional_residuals)} down block "
                                 f"residuals for {len(skips)} skips")
            skips = [a + r.astype(a.dtype) for a, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)

        levels = len(s.channels)
        for i in range(levels):
            level = levels - 1 - i
            n = s.num_res_blocks[level] + 1
            skips, level_skips = skips[:-n], skips[-n:]
            h = UpLevel(s.channels[level], n, s.attention_levels[level],
                        s.num_head_channels[level], i < levels - 1, s, name=f"up_{i}")(
                            h, level_skips, temb)
        h = nn.silu(group_norm(h, s.norm_num_groups, s.norm_eps, name="out_norm",
                               dtype=s.dtype))
        return conv_nd(h, self.out_channels, 3, name="out_conv", zero_init=True,
                       conv_impl=s.conv_impl, dtype=s.dtype).astype(jnp.float32)


# --------------------------------------------------- direct conditioning on the MR

MR_ENCODINGS = ("space_to_depth", "pool", "encoder")


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """``(B, *s, C)`` -> ``(B, *s / factor, C * factor^d)``: every ``factor^d`` block of
    voxels becomes the channels of one voxel (no information is lost)."""
    b, *spatial, c = x.shape
    if any(s % factor for s in spatial):
        raise ConfigError(f"space_to_depth: spatial shape {tuple(spatial)} is not divisible "
                          f"by {factor}")
    split = [b]
    for s in spatial:
        split += [s // factor, factor]
    x = x.reshape(*split, c)
    d = len(spatial)
    # (B, s0, f, s1, f, ..., C) -> (B, s0, s1, ..., f, f, ..., C)
    order = [0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1]
    return x.transpose(order).reshape(b, *(s // factor for s in spatial), -1)


def mr_channels_on_latent_grid(encoding: str, factor: int, spatial_dims: int,
                               encoder_out_channels: int, mr_channels: int = 1) -> int:
    """Channels the MR contributes to the UNet's input under ``encoding``."""
    if encoding == "space_to_depth":
        return mr_channels * factor ** spatial_dims
    if encoding == "pool":
        return mr_channels
    if encoding == "encoder":
        return encoder_out_channels
    raise ConfigError(f"MR encoding {encoding!r} is unknown; expected one of {MR_ENCODINGS}")


class MRConditionedUNet(nn.Module):
    """A :class:`DiffusionUNet` conditioned directly on the MR, concatenated to the noisy
    latent on the latent grid (the direct-conditioning alternative to a ControlNet).

    The MR ``(B, *s * factor, 1)`` reaches the latent grid ``(B, *s, C_mr)`` by

    - ``"space_to_depth"``: each ``factor^d`` block becomes channels (lossless);
    - ``"pool"``: the block mean (one channel);
    - ``"encoder"``: a jointly trained strided conv encoder (the ControlNet's
      conditioning embedding, ``log2(factor)`` stride-2 stages, ``encoder_channels``).

    ``unet.in_channels`` must be the latent channels plus
    :func:`mr_channels_on_latent_grid`. The MR encoding does not depend on the noisy
    latent or the step: a sampler computes it once with :meth:`embed` and calls the
    model with ``cond_is_embedded=True``.

    Attributes:
      unet: the denoiser.
      factor: the autoencoder's downsampling factor per axis.
      mr_encoding: one of :data:`MR_ENCODINGS`.
      encoder_channels: the encoder's channel stages (``"encoder"`` only).
      encoder_out_channels: the encoder's output channels (``"encoder"`` only).
      conv_impl: convolution lowering of the encoder.
    """

    unet: DiffusionUNet
    factor: int
    mr_encoding: str = "space_to_depth"
    encoder_channels: Sequence[int] = (16, 32)
    encoder_out_channels: int = 8
    conv_impl: str = "auto"

    def setup(self):
        if self.mr_encoding not in MR_ENCODINGS:
            raise ConfigError(f"MR encoding {self.mr_encoding!r} is unknown; expected one "
                              f"of {MR_ENCODINGS}")
        if self.mr_encoding == "encoder":
            if 2 ** (len(self.encoder_channels) - 1) != self.factor:
                raise ConfigError(f"MR encoder channels {tuple(self.encoder_channels)} "
                                  f"downsample by {2 ** (len(self.encoder_channels) - 1)}, "
                                  f"the autoencoder by {self.factor}: give log2(factor) + 1 "
                                  "entries")
            self.mr_encoder = ConditioningEmbedding(
                out_channels=self.encoder_out_channels, channels=tuple(self.encoder_channels),
                conv_impl=self.conv_impl)

    def embed(self, mr: jax.Array) -> jax.Array:
        """``(B, *s * factor, C)`` MR -> ``(B, *s, C_mr)`` on the latent grid."""
        if self.mr_encoding == "space_to_depth":
            return space_to_depth(mr, self.factor)
        if self.mr_encoding == "pool":
            blocks = space_to_depth(mr, self.factor)  # channels ordered (block, C)
            return blocks.reshape(*blocks.shape[:-1], -1, mr.shape[-1]).mean(-2)
        return self.mr_encoder(mr)

    def __call__(self, x: jax.Array, timesteps: jax.Array, mr: jax.Array,
                 cond_is_embedded: bool = False) -> jax.Array:
        """The UNet's prediction for ``concat(x, embed(mr))``.

        Args:
          x: noisy latent ``(B, *s, C_lat)``.
          timesteps: ``(B,)``.
          mr: the MR ``(B, *s * factor, 1)``, or its :meth:`embed` when
            ``cond_is_embedded``.
          cond_is_embedded: see above.

        Returns:
          ``(B, *s, unet.out_channels)``.
        """
        cond = mr if cond_is_embedded else self.embed(mr)
        if cond.shape[1:-1] != x.shape[1:-1]:
            raise ConfigError(f"the MR on the latent grid has spatial shape "
                              f"{cond.shape[1:-1]}, the latent {x.shape[1:-1]}: the MR "
                              f"must be {self.factor} times the latent per axis")
        return self.unet(jnp.concatenate([x, cond.astype(x.dtype)], axis=-1), timesteps)
