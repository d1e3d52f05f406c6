"""ControlNet for the latent diffusion UNet (MONAI's ``ControlNet``), 2D or 3D.

A trainable copy of the :class:`~sct_jax.models.diffusion_unet.DiffusionUNet`'s time
embedding, ``conv_in``, down levels and middle block (same submodule names and shapes:
:func:`controlnet_params_from_unet` starts it from the UNet's weights), steered by the
MR through a conditioning embedding added to ``conv_in``'s output::

  cond_embedding(MR):  conv3 -> SiLU (e_0 channels), then for each k < n - 1:
                       conv3 -> SiLU (e_k), stride-2 conv3 -> SiLU (e_{k+1});
                       conv3 to channels[0], zero-initialised
  h = conv_in(x) + cond_embedding(MR) -> down levels -> middle       (as the UNet)
  outputs:             a zero-initialised 1x1 conv on every skip (``controlnet_down_{k}``)
                       and on the middle output (``controlnet_mid``), times
                       ``conditioning_scale``

``e = conditioning_embedding_num_channels`` has ``n`` entries, so the embedding has
``n - 1`` stride-2 stages: **the MR must be ``2^(n-1)`` times the latent's spatial size**
(a 48^3 latent of a 192^3 MR needs ``n = 3``, e.g. ``(16, 32, 96)``; MONAI's default
``(16, 32, 96, 256)`` is for factor 8). Every zero-initialised output means a fresh
ControlNet leaves the UNet's prediction exactly unchanged.

The embedding does not depend on the noisy latent or the step: a sampler computes it
once per MR with :func:`embed_conditioning` and passes it with ``cond_is_embedded=True``
(at 192^3 the embedding costs more FLOPs than the ControlNet and UNet together).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models.diffusion_blocks import IntOrSeq, UNetSettings, conv_nd, unet_encoder

# Submodules the ControlNet shares (names and shapes) with the DiffusionUNet.
_SHARED_PREFIXES = ("time_embed", "conv_in", "down_", "middle")


class ConditioningEmbedding(nn.Module):
    """Encodes the MR at image resolution down to the latent grid.

    Attributes:
      out_channels: the UNet's ``channels[0]``.
      channels: ``e_0, ..., e_{n-1}``; ``n - 1`` stride-2 stages.
      conv_impl: convolution lowering.
      dtype: computation dtype.
    """

    out_channels: int
    channels: Sequence[int] = (16, 32, 96, 256)
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        """``(B, *s, C_cond)`` -> ``(B, *ceil(s / 2^(n-1)), out_channels)``."""
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        h = nn.silu(conv_nd(cond, self.channels[0], 3, name="conv_in", **kw))
        for k in range(len(self.channels) - 1):
            h = nn.silu(conv_nd(h, self.channels[k], 3, name=f"block_{k}_conv", **kw))
            h = nn.silu(conv_nd(h, self.channels[k + 1], 3, strides=2,
                                name=f"block_{k}_down", **kw))
        return conv_nd(h, self.out_channels, 3, name="conv_out", zero_init=True, **kw)


class ControlNet(nn.Module):
    """MONAI's ``ControlNet`` (no cross-attention), channels last.

    Attributes: the UNet's (see :class:`~sct_jax.models.diffusion_unet.DiffusionUNet`;
    give both the same values), plus

      conditioning_embedding_in_channels: the conditioning image's channels (1: the MR).
      conditioning_embedding_num_channels: the embedding's channel stages (see the
        module docstring: ``len - 1`` stride-2 stages).
    """

    in_channels: int = 3
    channels: Sequence[int] = (32, 64, 64)
    attention_levels: Sequence[bool] = (False, False, True)
    num_res_blocks: IntOrSeq = 1
    num_head_channels: Optional[IntOrSeq] = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    attention_out_projection: bool = True
    conditioning_embedding_in_channels: int = 1
    conditioning_embedding_num_channels: Sequence[int] = (16, 32, 96, 256)
    conv_impl: str = "auto"
    dtype: Any = None
    remat: str = "none"

    def conditioning_embedding(self) -> ConditioningEmbedding:
        """The (unbound) conditioning embedding module, for :func:`embed_conditioning`."""
        # parent=None: a module built inside a method would otherwise become a child.
        return ConditioningEmbedding(self.channels[0],
                                     tuple(self.conditioning_embedding_num_channels),
                                     self.conv_impl, self.dtype, parent=None)

    @property
    def downsampling_factor(self) -> int:
        """How many times larger than the latent the conditioning image must be."""
        return 2 ** (len(self.conditioning_embedding_num_channels) - 1)

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, controlnet_cond: jax.Array,
                 conditioning_scale: float | jax.Array = 1.0, *,
                 cond_is_embedded: bool = False) -> tuple[list[jax.Array], jax.Array]:
        """The residuals the UNet adds to its skips and middle output.

        Args:
          x: the noisy latent ``(B, *spatial, C_in)``.
          timesteps: ``(B,)`` int or float steps (a scalar is broadcast to the batch).
          controlnet_cond: the MR ``(B, *(spatial * downsampling_factor), C_cond)``, or,
            with ``cond_is_embedded``, its embedding ``(B, *spatial, channels[0])``.
          conditioning_scale: multiplies every output.
          cond_is_embedded: ``controlnet_cond`` comes from :func:`embed_conditioning`
            (``init`` needs the MR itself, to create the embedding's parameters).

        Returns:
          ``(down_residuals, mid_residual)``: one ``(B, *spatial_k, C_k)`` array per UNet
          skip, in the UNet's order, and ``(B, *spatial_mid, channels[-1])``.

        Raises:
          ConfigError: inconsistent hyper-parameters, or a conditioning input whose size
            is not the latent's times ``downsampling_factor``.
        """
        s = UNetSettings.from_model(self)
        s.check_input(x, self.in_channels)
        if not cond_is_embedded:
            if controlnet_cond.shape[-1] != self.conditioning_embedding_in_channels:
                raise ConfigError(
                    f"model.conditioning_embedding_in_channels="
                    f"{self.conditioning_embedding_in_channels}, but the conditioning image "
                    f"has {controlnet_cond.shape[-1]} channels")
            expected = tuple(n * self.downsampling_factor for n in x.shape[1:-1])
            if tuple(controlnet_cond.shape[1:-1]) != expected:
                raise ConfigError(
                    f"model.conditioning_embedding_num_channels="
                    f"{tuple(self.conditioning_embedding_num_channels)} downsamples by "
                    f"{self.downsampling_factor}: the conditioning image must be "
                    f"{expected} for a latent of {x.shape[1:-1]}, got "
                    f"{controlnet_cond.shape[1:-1]}")
            cond = ConditioningEmbedding(self.channels[0],
                                         tuple(self.conditioning_embedding_num_channels),
                                         self.conv_impl, self.dtype,
                                         name="cond_embedding")(controlnet_cond)
        else:
            cond = controlnet_cond
            if cond.shape[:-1] != x.shape[:-1] or cond.shape[-1] != s.channels[0]:
                raise ValueError(f"embedded conditioning {cond.shape} does not match the "
                                 f"latent {x.shape} with {s.channels[0]} channels")
        h, _, skips = unet_encoder(s, x, timesteps, conv_in_addend=cond)
        kw = dict(zero_init=True, conv_impl=s.conv_impl, dtype=s.dtype)
        down = [conv_nd(skip, skip.shape[-1], 1, name=f"controlnet_down_{k}", **kw)
                for k, skip in enumerate(skips)]
        mid = conv_nd(h, h.shape[-1], 1, name="controlnet_mid", **kw)
        return [d * conditioning_scale for d in down], mid * conditioning_scale


def embed_conditioning(controlnet: ControlNet, controlnet_params: Mapping[str, Any],
                       cond: jax.Array) -> jax.Array:
    """The ControlNet's conditioning embedding of ``cond``, computed once per image.

    Args:
      controlnet: the module.
      controlnet_params: its ``params`` collection (or ``{"params": ...}``).
      cond: the MR ``(B, *(latent_spatial * downsampling_factor), C_cond)``.

    Returns:
      ``(B, *latent_spatial, channels[0])``, to pass as ``controlnet_cond`` with
      ``cond_is_embedded=True``.
    """
    params = controlnet_params.get("params", controlnet_params)
    return controlnet.conditioning_embedding().apply(
        {"params": params["cond_embedding"]}, cond)


def controlnet_params_from_unet(unet_params: Mapping[str, Any],
                                controlnet_params: Mapping[str, Any]) -> dict:
    """ControlNet parameters with the UNet's copied into the shared submodules.

    The time embedding, ``conv_in``, every down level and the middle block are taken from
    the UNet; the conditioning embedding and the zero convolutions are kept. Neither
    input is modified.

    Args:
      unet_params: the DiffusionUNet's ``params`` collection (or ``{"params": ...}``).
      controlnet_params: a ControlNet's, same form.

    Returns:
      A new dict in the form of ``controlnet_params``.

    Raises:
      ConfigError: the two models' shared submodules differ (names or shapes): they were
        built with different hyper-parameters.
    """
    wrapped = "params" in controlnet_params
    unet = unet_params.get("params", unet_params)
    control = controlnet_params.get("params", controlnet_params)
    shared = [k for k in control if k.startswith(_SHARED_PREFIXES)]
    missing = [k for k in shared if k not in unet]
    if missing:
        raise ConfigError(f"model: the UNet has no {missing}: ControlNet and UNet "
                          "hyper-parameters differ")
    out = dict(control)
    for key in shared:
        c_struct = jax.tree.map(lambda a: (a.shape, a.dtype), control[key])
        u_struct = jax.tree.map(lambda a: (a.shape, a.dtype), unet[key])
        if c_struct != u_struct:
            raise ConfigError(f"model: submodule {key!r} differs between the UNet and the "
                              "ControlNet: their hyper-parameters differ")
        out[key] = jax.tree.map(lambda a: a, unet[key])
    return {"params": out} if wrapped else out
