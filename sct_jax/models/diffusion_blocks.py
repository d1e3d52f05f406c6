"""Building blocks of the latent diffusion UNet and its ControlNet, 2D or 3D.

See :mod:`sct_jax.models.diffusion_unet` for the architecture (MONAI's
``DiffusionModelUNet``), the PyTorch-default initialisation and the attention output
projection. Here: the primitives (PyTorch-initialised conv, dense and GroupNorm,
resampling, the sinusoidal time embedding), the time embedding, res and attention
blocks, the down levels and middle block, their validated hyper-parameters
(:class:`UNetSettings`), and :func:`unet_encoder`, the part that the
:class:`~sct_jax.models.diffusion_unet.DiffusionUNet` and the
:class:`~sct_jax.models.controlnet.ControlNet` share with the same submodule names, so
that the ControlNet can start from the UNet's weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.layers import Conv, check_remat, remat_block, upsample_nearest

IntOrSeq = Union[int, Sequence[int]]


# ------------------------------------------------------------------------ primitives

def torch_default_init(fan_in: int):
    """PyTorch's default ``ConvNd``/``Linear`` initialiser for weights and biases.

    ``kaiming_uniform_(a=sqrt(5))`` on the weight and the matching bias rule both give
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. Drawn flat and reshaped: XLA:CPU compiles the
    sampler for a rank-5 shape seconds slower than for a 1D one.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
        return flat.reshape(shape)
    return init


def conv_nd(x: jax.Array, features: int, kernel_size: int, *, name: str, strides: int = 1,
            zero_init: bool = False, conv_impl: str = "auto", dtype: Any = None) -> jax.Array:
    """A ``kernel_size`` conv with ``kernel_size // 2`` zero padding and a bias.

    Must be called inside a compact method: the :class:`~sct_jax.models.layers.Conv`
    it creates becomes a submodule ``name`` of the caller.

    Args:
      x: ``(B, *spatial, C_in)``.
      features: ``C_out``.
      kernel_size: odd kernel size on every axis.
      name: the submodule name.
      strides: 1, or 2 for a downsampling conv (``ceil(size / 2)`` outputs).
      zero_init: zero kernel and bias (the reference's ``zero_module``).
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype.

    Returns:
      ``(B, *spatial_out, features)``.
    """
    fan_in = kernel_size ** (x.ndim - 2) * x.shape[-1]
    init = nn.initializers.zeros if zero_init else torch_default_init(fan_in)
    return Conv(features, kernel_size, strides=strides, padding=kernel_size // 2,
                kernel_init=init, bias_init=init, conv_impl=conv_impl, dtype=dtype,
                name=name)(x)


def dense(x: jax.Array, features: int, *, name: str, zero_init: bool = False,
          dtype: Any = None) -> jax.Array:
    """``torch.nn.Linear`` on the last axis (PyTorch's init); call inside a compact method."""
    init = nn.initializers.zeros if zero_init else torch_default_init(x.shape[-1])
    return nn.Dense(features, kernel_init=init, bias_init=init, dtype=dtype, name=name)(x)


def group_norm(x: jax.Array, num_groups: int, eps: float, *, name: str,
               dtype: Any = None) -> jax.Array:
    """``torch.nn.GroupNorm(affine=True)`` over the spatial axes and channel groups."""
    # Two-pass variance: E[x^2] - E[x]^2 loses digits on activations with a large mean.
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False,
                        dtype=dtype, name=name)(x)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x average pooling with stride 2 (even sizes): ``(B, *s, C)`` -> ``(B, *s/2, C)``."""
    b, *spatial, c = x.shape
    split = [b]
    for s in spatial:
        split += [s // 2, 2]
    return x.reshape(*split, c).mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]``, ``f_i = max_period^(-i / (dim // 2))``.

    As MONAI's ``get_timestep_embedding`` (cosines first; a zero column appended for an
    odd ``dim``).

    Args:
      timesteps: ``(B,)`` int or float diffusion steps.
      dim: embedding size.
      max_period: sets the lowest frequency.

    Returns:
      ``(B, dim)`` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ---------------------------------------------------------------------------- blocks

class TimeEmbedding(nn.Module):
    """Dense(4 c0) -> SiLU -> Dense(4 c0) of the sinusoidal embedding of size ``c0``.

    Attributes:
      base_channels: ``c0`` (the UNet's first level channels).
      dtype: computation dtype.
    """

    base_channels: int
    dtype: Any = None

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> jax.Array:
        """``(B,)`` steps -> ``(B, 4 * base_channels)``."""
        emb = timestep_embedding(timesteps, self.base_channels)
        emb = dense(emb, 4 * self.base_channels, name="linear_1", dtype=self.dtype)
        return dense(nn.silu(emb), 4 * self.base_channels, name="linear_2", dtype=self.dtype)


class ResBlock(nn.Module):
    """Residual block with the time embedding added between its two convolutions.

    Attributes:
      out_channels: output channels.
      norm_num_groups: GroupNorm groups (must divide the input and output channels).
      norm_eps: GroupNorm epsilon.
      resample: ``"none"``, ``"down"`` (2x average pooling of both paths after the first
        norm, ``resblock_updown``) or ``"up"`` (nearest x2 there).
      conv_impl: convolution lowering.
      dtype: computation dtype.
    """

    out_channels: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resample: str = "none"
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """``x`` ``(B, *s, C_in)``, ``temb`` ``(B, T)`` -> ``(B, *s', out_channels)``."""
        conv_kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        h = nn.silu(group_norm(x, self.norm_num_groups, self.norm_eps, name="norm1",
                               dtype=self.dtype))
        if self.resample == "down":
            x, h = avg_pool2(x), avg_pool2(h)
        elif self.resample == "up":
            x, h = upsample_nearest(x), upsample_nearest(h)
        h = conv_nd(h, self.out_channels, 3, name="conv1", **conv_kw)
        t = dense(nn.silu(temb), self.out_channels, name="time_emb_proj", dtype=self.dtype)
        h = h + t.reshape(t.shape[0], *([1] * (h.ndim - 2)), self.out_channels).astype(h.dtype)
        h = nn.silu(group_norm(h, self.norm_num_groups, self.norm_eps, name="norm2",
                               dtype=self.dtype))
        h = conv_nd(h, self.out_channels, 3, name="conv2", zero_init=True, **conv_kw)
        if x.shape[-1] != self.out_channels:
            x = conv_nd(x, self.out_channels, 1, name="skip", **conv_kw)
        return x + h


class AttentionBlock(nn.Module):
    """GroupNorm then multi-head self-attention over all spatial positions, plus the input.

    Heads: ``C // num_head_channels``, or one head when ``num_head_channels`` is None;
    scores scaled by ``1 / sqrt(C / heads)``.

    Attributes:
      num_head_channels: channels per head (must divide ``C``), or None for one head.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      out_projection: apply a zero-initialised Dense after the heads (see the module doc).
      dtype: computation dtype.
    """

    num_head_channels: Optional[int] = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    out_projection: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, *s, C)`` -> same shape."""
        b, *spatial, c = x.shape
        heads = c // self.num_head_channels if self.num_head_channels else 1
        h = group_norm(x, self.norm_num_groups, self.norm_eps, name="norm", dtype=self.dtype)
        h = h.reshape(b, math.prod(spatial), c)
        q, k, v = (dense(h, c, name=f"to_{n}", dtype=self.dtype).reshape(b, -1, heads, c // heads)
                   for n in "qkv")
        # Default scale 1/sqrt(head_dim) = 1/sqrt(C / heads), the reference's.
        o = jax.nn.dot_product_attention(q, k, v).reshape(b, -1, c)
        if self.out_projection:
            o = dense(o, c, name="out_proj", zero_init=True, dtype=self.dtype)
        return x + o.reshape(x.shape).astype(x.dtype)


class DownLevel(nn.Module):
    """One encoder level: res blocks (each followed by attention if asked), then a
    stride-2 downsampling unless it is the last level.

    Attributes:
      out_channels: the level's channels.
      num_res_blocks: res blocks in the level.
      with_attention: an attention block after each res block.
      num_head_channels: channels per attention head (None: one head).
      add_downsample: end with a stride-2 conv3 (or a ``"down"`` res block).
      settings: the shared :class:`UNetSettings`.
    """

    out_channels: int
    num_res_blocks: int
    with_attention: bool
    num_head_channels: Optional[int]
    add_downsample: bool
    settings: "UNetSettings"

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """``h`` ``(B, *s, C)`` -> (``(B, *s', out_channels)``, the level's skips)."""
        s = self.settings
        skips = []
        for j in range(self.num_res_blocks):
            h = s.res_block(self.out_channels, f"res_{j}")(h, temb)
            if self.with_attention:
                h = s.attention(f"attn_{j}", self.num_head_channels)(h)
            skips.append(h)
        if self.add_downsample:
            if s.resblock_updown:
                h = s.res_block(self.out_channels, "downsample", resample="down")(h, temb)
            else:
                h = conv_nd(h, self.out_channels, 3, strides=2, name="downsample",
                            conv_impl=s.conv_impl, dtype=s.dtype)
            skips.append(h)
        return h, skips


class MiddleBlock(nn.Module):
    """ResBlock -> Attention -> ResBlock at the lowest resolution.

    Attributes:
      num_head_channels: channels per attention head (None: one head).
      settings: the shared :class:`UNetSettings`.
    """

    num_head_channels: Optional[int]
    settings: "UNetSettings"

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array) -> jax.Array:
        """``(B, *s, C)`` -> same shape."""
        s, c = self.settings, h.shape[-1]
        h = s.res_block(c, "res_1")(h, temb)
        h = s.attention("attn", self.num_head_channels)(h)
        return s.res_block(c, "res_2")(h, temb)


# ------------------------------------------------------------ shared hyper-parameters

def _per_level(value: IntOrSeq | None, levels: int, what: str) -> tuple:
    if value is None or isinstance(value, int):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ConfigError(f"model.{what}={value}: needs one entry per level ({levels})")
    return value


@dataclasses.dataclass(frozen=True)
class UNetSettings:
    """Validated hyper-parameters shared by the UNet's and the ControlNet's blocks.

    Build it with :meth:`from_model` from a
    :class:`~sct_jax.models.diffusion_unet.DiffusionUNet` or a
    :class:`~sct_jax.models.controlnet.ControlNet` (same attribute names); it makes the
    res/attention blocks with the shared settings. Per-level tuples have one entry per
    level of ``channels``.
    """

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: tuple[int, ...]
    num_head_channels: tuple[Optional[int], ...]
    norm_num_groups: int
    norm_eps: float
    resblock_updown: bool
    attention_out_projection: bool
    conv_impl: str
    dtype: Any
    remat: str = "none"

    @classmethod
    def from_model(cls, model: nn.Module) -> "UNetSettings":
        """Reads and checks ``model``'s hyper-parameters.

        Raises:
          ConfigError: inconsistent channels, groups, levels or heads.
        """
        channels = tuple(int(c) for c in model.channels)
        levels = len(channels)
        if levels < 1:
            raise ConfigError("model.channels: needs at least one level")
        if any(c % model.norm_num_groups for c in channels):
            raise ConfigError(f"model.channels={channels}: every entry must be a multiple of "
                              f"model.norm_num_groups={model.norm_num_groups}")
        attention_levels = tuple(bool(a) for a in model.attention_levels)
        if len(attention_levels) != levels:
            raise ConfigError(f"model.attention_levels={attention_levels}: needs one "
                              f"entry per level of model.channels={channels}")
        num_head_channels = _per_level(model.num_head_channels, levels, "num_head_channels")
        # The middle block uses the last level's heads, with or without level attention.
        for c, n, used in zip(channels, num_head_channels, attention_levels[:-1] + (True,)):
            if used and n is not None and (n <= 0 or c % n):
                raise ConfigError(f"model.num_head_channels={n} must divide the {c} channels "
                                  "of an attention level")
        return cls(channels, attention_levels,
                   _per_level(model.num_res_blocks, levels, "num_res_blocks"),
                   num_head_channels, model.norm_num_groups, model.norm_eps,
                   model.resblock_updown, model.attention_out_projection, model.conv_impl,
                   model.dtype, check_remat(getattr(model, "remat", "none")))

    def res_block(self, out_channels: int, name: str, resample: str = "none") -> ResBlock:
        return remat_block(ResBlock, self.remat)(out_channels, self.norm_num_groups, self.norm_eps, resample,
                        self.conv_impl, self.dtype, name=name)

    def attention(self, name: str, num_head_channels: Optional[int]) -> AttentionBlock:
        return remat_block(AttentionBlock, self.remat)(num_head_channels, self.norm_num_groups, self.norm_eps,
                              self.attention_out_projection, self.dtype, name=name)

    def check_input(self, x: jax.Array, in_channels: int) -> None:
        """Raises ConfigError unless ``x`` has ``in_channels`` channels and every spatial
        size is divisible by 2^(levels - 1)."""
        if x.ndim not in (3, 4, 5):
            raise ValueError(f"expected (B, *spatial, C) with 1-3 spatial axes, got {x.shape}")
        if x.shape[-1] != in_channels:
            raise ConfigError(f"model.in_channels={in_channels}, but the latent has "
                              f"{x.shape[-1]} channels (shape {x.shape})")
        factor = 2 ** (len(self.channels) - 1)
        if any(s % factor for s in x.shape[1:-1]):
            raise ConfigError(f"model.channels has {len(self.channels)} levels: the latent "
                              f"spatial shape {x.shape[1:-1]} must be divisible by {factor}")


def unet_encoder(settings: UNetSettings, x: jax.Array, timesteps: jax.Array,
                 conv_in_addend: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """Time embedding, ``conv_in``, the down levels and the middle block.

    Called inside the compact method of a
    :class:`~sct_jax.models.diffusion_unet.DiffusionUNet` or a ControlNet: the
    submodules ``time_embed``, ``conv_in``, ``down_{i}`` and ``middle`` it creates get the
    same names and shapes in both, so the ControlNet can start from the UNet's weights.

    Args:
      settings: the caller's :class:`UNetSettings`.
      x: ``(B, *spatial, C_in)``.
      timesteps: ``(B,)`` (or a scalar, broadcast to the batch).
      conv_in_addend: added to ``conv_in``'s output (the ControlNet's conditioning),
        ``(B, *spatial, channels[0])``.

    Returns:
      ``(middle output, time embedding (B, 4 c0), skips)``; the skips are ``conv_in``'s
      output, then every res/attention and downsampling output of the down levels.
    """
    s = settings
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
    temb = TimeEmbedding(s.channels[0], s.dtype, name="time_embed")(timesteps)
    h = conv_nd(x, s.channels[0], 3, name="conv_in", conv_impl=s.conv_impl, dtype=s.dtype)
    if conv_in_addend is not None:
        h = h + conv_in_addend.astype(h.dtype)
    skips = [h]
    last = len(s.channels) - 1
    for i, c in enumerate(s.channels):
        h, level_skips = DownLevel(c, s.num_res_blocks[i], s.attention_levels[i],
                                   s.num_head_channels[i], i < last, s,
                                   name=f"down_{i}")(h, temb)
        skips += level_skips
    h = MiddleBlock(s.num_head_channels[-1], s, name="middle")(h, temb)
    return h, temb, skips
