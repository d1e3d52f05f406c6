"""VGG perceptual loss (pGAN): L1 between VGG-16 ``relu2_2`` features.

pGAN's reference extracts VGG-16 ``features[:9]`` (up to ``relu2_2``, before the second
max pool) of the fake and real CT, each replicated to 3 channels, and takes the L1 of
sample 0 only (``self.vgg(...)[0]``). Here the mean runs over the whole batch, so every
sample contributes. The VGG parameters are frozen: they come in as an argument (from
:func:`sct_jax.models.vgg.load_vgg_params`) and are never updated.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sct_jax.models.vgg import vgg_features


def perceptual_l1(vgg_params: Mapping[str, Any], fake: jax.Array, real: jax.Array,
                  arch: str = "vgg16", layer: str = "relu2_2",
                  input_norm: str = "imagenet", conv_impl: str = "auto",
                  dtype: Any = None) -> jax.Array:
    """Mean absolute difference of VGG features of ``fake`` and ``real``.

    Args:
      vgg_params: frozen VGG parameters for ``arch``.
      fake: ``(B, H, W, 1)`` synthetic CT in ``[-1, 1]``.
      real: ``(B, H, W, 1)`` real CT in ``[-1, 1]``.
      arch: ``"vgg16"`` (pGAN) or ``"vgg19"``.
      layer: the feature layer, see :func:`sct_jax.models.vgg.vgg_layer_names`.
      input_norm: ``"imagenet"`` or ``"none"`` (pGAN's reference), see
        :func:`sct_jax.models.vgg.preprocess`.
      conv_impl: convolution lowering.
      dtype: the VGG's compute dtype (``None``: float32); features compared in float32.

    Returns:
      A scalar: the mean over batch, positions and channels (float32 at least).
    """
    if fake.shape != real.shape:
        raise ValueError(f"perceptual_l1: fake shape {fake.shape} != real {real.shape}")
    # One VGG pass over both halves: one program, twice the batch.
    both = jnp.concatenate([fake, real.astype(fake.dtype)], axis=0)
    features = vgg_features(vgg_params, both, arch=arch, layers=(layer,),
                            input_norm=input_norm, conv_impl=conv_impl,
                            dtype=dtype)[layer]
    features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    fake_features, real_features = jnp.split(features, 2, axis=0)
    # The real image's features are a target, not something to differentiate.
    return jnp.mean(jnp.abs(fake_features - jax.lax.stop_gradient(real_features)))
