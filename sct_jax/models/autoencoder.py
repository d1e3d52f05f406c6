"""KL-regularised autoencoder of the latent diffusion model, 2D or 3D from the input rank.

Reproduces MONAI's ``AutoencoderKL`` (GenerativeModels ``generative.networks.nets`` and
``monai.networks.nets.autoencoderkl``) with ``L = len(channels)`` levels::

  encoder: conv3 -> c_0
           level i: num_res_blocks x ResBlock(-> c_i) [+ Attention if attention_levels[i]]
                    then Downsample (zero pad (0, 1) per spatial axis, conv3 stride 2)
                    on every level but the last
           [non-local: ResBlock, Attention, ResBlock]   if with_encoder_nonlocal_attn
           GroupNorm -> conv3 -> latent_channels
  quant_conv_mu, quant_conv_log_sigma: 1x1 convs; log-variance clamped to [-30, 20];
           sigma = exp(logvar / 2)
  decode:  post_quant_conv 1x1 -> conv3 -> c_{L-1} -> [non-local] -> levels reversed,
           each num_res_blocks x ResBlock [+ Attention] then nearest x2 upsampling + conv3
           on every level but the last -> GroupNorm -> conv3 -> out_channels

ResBlock = GroupNorm-SiLU-conv3-GroupNorm-SiLU-conv3 plus the input (through a 1x1 conv
when the channel count changes). As the reference, there is no SiLU between the final
GroupNorm and the output conv of the encoder and of the decoder, and no output
activation. The attention block is single-head self-attention over all spatial
positions with linear q/k/v and an output projection (MONAI core's
``SpatialAttentionBlock`` with ``include_fc=True``; GenerativeModels defined that
projection but never applied it). Its memory grows with the square of the number of
positions: only enable it at small resolutions.

Spatial sizes shrink by ``2**(L-1)``: ``channels=(64, 128, 128)`` maps a 192^3 volume to
a 48^3 x ``latent_channels`` latent. Parameters are initialised as PyTorch's defaults
(``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for conv/linear weights and biases).

Tiny test size: ``AutoencoderKL(channels=(8, 8, 16), norm_num_groups=4)`` on 16^3.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.layers import Conv, remat_block, upsample_nearest

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def torch_default_init(fan_in: int):
    """PyTorch's default conv/linear initialiser: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    (``kaiming_uniform_(a=sqrt(5))`` for the weights and the same bound for the biases.)
    Drawn flat and reshaped, as :func:`sct_jax.models.layers.normal_init`, because
    XLA:CPU compiles rank-4/5 draws slowly.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        size = math.prod(shape)
        return jax.random.uniform(key, (size,), dtype, -bound, bound).reshape(shape)
    return init


def _conv(features: int, kernel_size: int, in_channels: int, nd: int, *, name: str,
          conv_impl: str, dtype: Any, strides: int = 1, padding: Any = None) -> Conv:
    """A :class:`Conv` with PyTorch's default init; "same" padding unless given."""
    fan_in = in_channels * kernel_size ** nd
    return Conv(features, kernel_size, strides=strides,
                padding=(kernel_size // 2) if padding is None else padding,
                kernel_init=torch_default_init(fan_in), bias_init=torch_default_init(fan_in),
                conv_impl=conv_impl, dtype=dtype, name=name)


def _group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses precision on large un-normalised volumes.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False,
                        dtype=dtype, name=name)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3-GroupNorm-SiLU-conv3 plus a (1x1-projected) skip.

    Attributes:
      out_channels: output channels.
      norm_num_groups: GroupNorm groups (must divide both channel counts).
      norm_eps: GroupNorm epsilon.
      conv_impl: convolution lowering.
      dtype: computation dtype (``None``: from the input).
    """

    out_channels: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, *spatial, C_in)`` -> ``(B, *spatial, out_channels)``."""
        nd = x.ndim - 2
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        h = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, x.shape[-1], nd, name="conv1", **kw)(h)
        h = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.out_channels, nd, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, x.shape[-1], nd, name="nin_shortcut", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual.

    ``x + proj(softmax(q k^T / sqrt(C)) v)``, ``q, k, v`` linear maps of
    ``GroupNorm(x)``. Memory is ``O(B * N^2)`` for ``N`` spatial positions.

    Attributes:
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      dtype: computation dtype.
    """

    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, *spatial, C)`` -> same shape."""
        b, c = x.shape[0], x.shape[-1]
        h = _group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "norm")(x)
        h = h.reshape(b, -1, c)  # (B, N, C)

        def dense(name):
            return nn.Dense(c, kernel_init=torch_default_init(c),
                            bias_init=torch_default_init(c), dtype=self.dtype, name=name)
        # (B, N, heads=1, C) as jax.nn.dot_product_attention expects.
        q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
        attended = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
        return x + dense("proj_attn")(attended).reshape(x.shape)


class _CoderBase(nn.Module):
    """Attributes shared by :class:`Encoder` and :class:`Decoder` (see AutoencoderKL)."""

    channels: Sequence[int] = (64, 128, 128)
    latent_channels: int = 3
    num_res_blocks: Sequence[int] = (2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: Sequence[bool] = (False, False, False)
    with_nonlocal_attn: bool = False
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"

    def _res(self, channels: int, name: str) -> ResBlock:
        return remat_block(ResBlock, self.remat)(channels, self.norm_num_groups, self.norm_eps, self.conv_impl,
                        self.dtype, name=name)

    def _attn(self, name: str) -> AttentionBlock:
        return AttentionBlock(self.norm_num_groups, self.norm_eps, self.dtype, name=name)

    def _nonlocal(self, h: jax.Array, prefix: str) -> jax.Array:
        c = h.shape[-1]
        h = self._res(c, f"{prefix}_res_0")(h)
        h = self._attn(f"{prefix}_attn")(h)
        return self._res(c, f"{prefix}_res_1")(h)

    def _out(self, h: jax.Array, features: int) -> jax.Array:
        # GroupNorm then conv, with no SiLU in between, as the reference.
        h = _group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "norm_out")(h)
        return _conv(features, 3, h.shape[-1], h.ndim - 2, name="conv_out",
                     conv_impl=self.conv_impl, dtype=self.dtype)(h)


class Encoder(_CoderBase):
    """Image ``(B, *spatial, C_in)`` -> ``(B, *spatial / 2**(L-1), latent_channels)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = x.ndim - 2
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        h = _conv(self.channels[0], 3, x.shape[-1], nd, name="conv_in", **kw)(x)
        last = len(self.channels) - 1
        for i, c in enumerate(self.channels):
            for j in range(self.num_res_blocks[i]):
                h = self._res(c, f"down_{i}_res_{j}")(h)
                if self.attention_levels[i]:
                    h = self._attn(f"down_{i}_attn_{j}")(h)
            if i != last:
                # Zero pad (0, 1) on each spatial axis then stride-2 conv3 without padding.
                h = _conv(c, 3, c, nd, strides=2, padding=[(0, 1)] * nd,
                          name=f"down_{i}_downsample", **kw)(h)
        if self.with_nonlocal_attn:
            h = self._nonlocal(h, "mid")
        return self._out(h, self.latent_channels)


class Decoder(_CoderBase):
    """Latent ``(B, *s, latent_channels)`` -> ``(B, *s * 2**(L-1), out_channels)``."""

    out_channels: int = 1

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        nd = z.ndim - 2
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        reversed_channels = list(reversed(self.channels))
        h = _conv(reversed_channels[0], 3, z.shape[-1], nd, name="conv_in", **kw)(z)
        if self.with_nonlocal_attn:
            h = self._nonlocal(h, "mid")
        last = len(self.channels) - 1
        for i, c in enumerate(reversed_channels):
            level = last - i  # the matching encoder level, for parameter names
            for j in range(self.num_res_blocks[level]):
                h = self._res(c, f"up_{level}_res_{j}")(h)
                if self.attention_levels[level]:
                    h = self._attn(f"up_{level}_attn_{j}")(h)
            if i != last:
                h = _conv(c, 3, c, nd, name=f"up_{level}_upsample", **kw)(upsample_nearest(h))
        return self._out(h, self.out_channels)


def sample_latent(mu: jax.Array, sigma: jax.Array, rng: jax.Array) -> jax.Array:
    """Reparameterised draw ``z = mu + sigma * eps``, ``eps ~ N(0, I)`` drawn flat.

    Args:
      mu: ``(B, *s, latent_channels)``.
      sigma: same shape, positive.
      rng: a PRNG key.

    Returns:
      ``z``, shape of ``mu``.
    """
    eps = jax.random.normal(rng, (mu.size,), mu.dtype).reshape(mu.shape)
    return mu + sigma * eps


def kl_loss(mu: jax.Array, sigma: jax.Array) -> jax.Array:
    """KL(N(mu, sigma^2) || N(0, I)) summed over non-batch axes, mean over the batch.

    ``0.5 * sum(mu^2 + sigma^2 - log(sigma^2) - 1)`` per sample, as MONAI's tutorials.

    Args:
      mu: ``(B, ...)``.
      sigma: ``(B, ...)``, positive.

    Returns:
      A float32 scalar.
    """
    mu = mu.astype(jnp.float32)
    sigma = sigma.astype(jnp.float32)
    per_element = mu ** 2 + sigma ** 2 - 2.0 * jnp.log(sigma) - 1.0
    axes = tuple(range(1, mu.ndim))
    return jnp.mean(0.5 * jnp.sum(per_element, axis=axes))


class AutoencoderKL(nn.Module):
    """MONAI's AutoencoderKL (see the module docstring for the layer order).

    Attributes:
      in_channels: image channels (the encoder reads them from the input; kept for
        the config's record and checked).
      out_channels: reconstructed channels.
      channels: channels of each level; every entry divisible by ``norm_num_groups``.
      latent_channels: latent channels.
      num_res_blocks: residual blocks per level (an int or one per level).
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      attention_levels: attention after each ResBlock of these levels.
      with_encoder_nonlocal_attn: ResBlock-Attention-ResBlock at the encoder's bottom.
      with_decoder_nonlocal_attn: the same at the decoder's top.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters); ``mu``,
        ``sigma`` and the reconstruction are float32 whatever it is.
      remat: rematerialise the residual blocks, see
        :data:`~sct_jax.models.layers.REMAT_CHOICES`.
      init_log_variance: initial bias of the log-variance conv (``None``: PyTorch's
        default init, the reference's); e.g. ``-8`` starts the posterior at
        ``sigma = exp(-4)`` so that a short run's latents carry signal from the start.
    """

    in_channels: int = 1
    out_channels: int = 1
    channels: Sequence[int] = (64, 128, 128)
    latent_channels: int = 3
    num_res_blocks: Union[int, Sequence[int]] = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: Sequence[bool] = (False, False, False)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"
    init_log_variance: float | None = None

    @property
    def downsampling_factor(self) -> int:
        """``2**(len(channels) - 1)``: image size / latent size per spatial axis."""
        return 2 ** (len(self.channels) - 1)

    def setup(self):
        channels = tuple(self.channels)
        if any(c % self.norm_num_groups for c in channels):
            raise ConfigError(f"model.channels={channels}: every entry must be divisible "
                              f"by model.norm_num_groups={self.norm_num_groups}")
        if len(self.attention_levels) != len(channels):
            raise ConfigError(f"model.attention_levels={tuple(self.attention_levels)} needs "
                              f"one entry per level of model.channels={channels}")
        res_blocks = ((self.num_res_blocks,) * len(channels)
                      if isinstance(self.num_res_blocks, int) else tuple(self.num_res_blocks))
        if len(res_blocks) != len(channels):
            raise ConfigError(f"model.num_res_blocks={res_blocks} needs one entry per level "
                              f"of model.channels={channels}")
        shared = dict(channels=channels, latent_channels=self.latent_channels,
                      num_res_blocks=res_blocks, norm_num_groups=self.norm_num_groups,
                      norm_eps=self.norm_eps, attention_levels=tuple(self.attention_levels),
                      conv_impl=self.conv_impl, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(with_nonlocal_attn=self.with_encoder_nonlocal_attn, **shared)
        self.decoder = Decoder(with_nonlocal_attn=self.with_decoder_nonlocal_attn,
                               out_channels=self.out_channels, **shared)

        def conv1x1(name, bias_init=None):
            return Conv(self.latent_channels, 1, kernel_init=torch_default_init(
                self.latent_channels), bias_init=bias_init or torch_default_init(
                    self.latent_channels), conv_impl=self.conv_impl, dtype=self.dtype,
                name=name)
        self.quant_conv_mu = conv1x1("quant_conv_mu")
        # A short run cannot wait for the log-variance to fall from ~0: Adam moves its
        # bias by about the learning rate per step, and until it has fallen the latent
        # is as much noise as signal and the decoder learns to blur.
        self.quant_conv_log_sigma = conv1x1(
            "quant_conv_log_sigma", None if self.init_log_variance is None else
            nn.initializers.constant(float(self.init_log_variance)))
        self.post_quant_conv = conv1x1("post_quant_conv")

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim not in (4, 5):
            raise ValueError(f"expected (B, H, W, C) or (B, D, H, W, C), got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ConfigError(f"model.in_channels={self.in_channels} but the input has "
                              f"{x.shape[-1]} channels (shape {x.shape})")
        factor = self.downsampling_factor
        if any(s % factor for s in x.shape[1:-1]):
            raise ConfigError(f"model.channels has {len(self.channels)} levels: every "
                              f"spatial size must be divisible by {factor}, got input "
                              f"shape {x.shape}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's mean and standard deviation.

        Args:
          x: ``(B, *spatial, in_channels)``, spatial sizes divisible by
            :attr:`downsampling_factor`.

        Returns:
          ``(mu, sigma)``, each ``(B, *spatial / factor, latent_channels)``;
          ``sigma = exp(clip(logvar, -30, 20) / 2)``.
        """
        self._check_input(x)
        h = self.encoder(x)
        mu = self.quant_conv_mu(h).astype(jnp.float32)
        log_var = jnp.clip(self.quant_conv_log_sigma(h).astype(jnp.float32),
                           LOGVAR_MIN, LOGVAR_MAX)
        return mu, jnp.exp(log_var / 2)

    def sample(self, mu: jax.Array, sigma: jax.Array, rng: jax.Array) -> jax.Array:
        """Reparameterised latent draw, see :func:`sample_latent`."""
        return sample_latent(mu, sigma, rng)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent ``(B, *s, latent_channels)`` -> image ``(B, *s * factor, out_channels)``."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encodes, draws ``z`` with ``rng`` and decodes.

        Args:
          x: ``(B, *spatial, in_channels)``.
          rng: key for the reparameterised draw.

        Returns:
          ``(reconstruction (B, *spatial, out_channels), mu, sigma)``.
        """
        mu, sigma = self.encode(x)
        return self.decode(self.sample(mu, sigma, rng)), mu, sigma
