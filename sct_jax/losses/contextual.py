"""Contextual loss (Mechrez et al. 2018) and its VGG-19 form for ctx-pGAN.

The contextual loss compares two feature maps as *sets* of feature vectors: each target
feature should have some generated feature that is its clear nearest neighbour,
wherever it sits, so it tolerates the misalignment between MR and CT that a pixel loss
punishes. For generated features ``x_i`` and target features ``y_j`` (positions ``i``,
``j`` of one sample), as the reference TensorFlow code (roimehrez/contextualLoss,
``CX/CSFlow.py``, ``create_using_dotP`` + ``CX_loss``) and its PyTorch port
(S-aiueo32/contextual_loss_pytorch)::

  mu       = mean of y over batch and positions (per channel)
  x, y     = (x - mu) / ||x - mu||,  (y - mu) / ||y - mu||      (per position)
  d_ij     = (1 - <x_i, y_j>) / 2                               (cosine distance)
  d~_ij    = d_ij / (min_k d_ik + 1e-5)                         (min over TARGET k)
  w_ij     = exp((1 - d~_ij) / h),  h = 0.5
  CX_ij    = w_ij / sum_k w_ik                                  (over TARGET k)
  CX       = mean_j max_i CX_ij                                 (max over GENERATED i)
  loss     = -log(CX),  averaged over the batch

In the TF code the distances have generated positions on the spatial axes and target
positions on the channel axis (a 1 x 1 conv of x with y's vectors); its ``min`` and sum
normalisation run over that channel axis (targets), its ``max`` over the spatial axes
(generated), its mean over the channel axis again: the axes above. The PyTorch port uses
``1 - cos`` without the halving (the ratio ``d~`` barely changes) and ``-log(CX +
1e-5)``; we keep the TF definition. Identical inputs give ``d_ii = 0``, ``d~_ii = 0``
and every other ``d~_ij = d_ij / 1e-5`` huge, so ``CX_jj`` is ~1 and the loss ~0.

Memory is ``O(N^2)`` per sample for ``N`` positions: above ``max_positions`` the same
random positions (without replacement, one draw for the whole batch, as the
reference's ``random_pooling``) are kept in both maps; the reference keeps 65^2 = 4225.

The VGG-19 layers are Mechrez's ``conv3_2`` and ``conv4_2``, which in his code include
the ReLU: ``relu3_2`` and ``relu4_2`` here (see :mod:`sct_jax.models.vgg`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from sct_jax.models.vgg import vgg_features

# The reference's max_sampling_1d_size = 65: at most 65 x 65 positions per map.
DEFAULT_MAX_POSITIONS = 65 ** 2
DEFAULT_LAYERS = ("relu3_2", "relu4_2")
DEFAULT_BAND_WIDTH = 0.5
_RELATIVE_EPS = 1e-5


def _flatten_positions(features: jax.Array) -> jax.Array:
    """``(B, *spatial, C)`` -> ``(B, N, C)`` in at least float32."""
    features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    return features.reshape(features.shape[0], -1, features.shape[-1])


def _unit_vectors(v: jax.Array) -> jax.Array:
    """Normalises the last axis to unit length (0 stays 0, with a finite gradient)."""
    sq_norm = jnp.sum(jnp.square(v), axis=-1, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-24))


def sample_positions(x: jax.Array, y: jax.Array, max_positions: int,
                     rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Keeps the same ``max_positions`` random positions of ``x`` and ``y``.

    Args:
      x, y: ``(B, N, C)``.
      max_positions: the most positions to keep; no sampling when ``N`` is not above.
      rng: a PRNG key; required when sampling.

    Returns:
      ``(B, min(N, max_positions), C)`` each.
    """
    n = x.shape[1]
    if n <= max_positions:
        return x, y
    if rng is None:
        raise ValueError(f"contextual loss: {n} positions > max_positions="
                         f"{max_positions} needs an rng key to sample them")
    # A permutation of a 1D range: no rank-2+ sampler to compile (slow on XLA:CPU).
    keep = jax.random.permutation(rng, n)[:max_positions]
    return x[:, keep], y[:, keep]


def contextual_similarity(x: jax.Array, y: jax.Array,
                          band_width: float = DEFAULT_BAND_WIDTH) -> jax.Array:
    """The normalised contextual similarities ``CX_ij`` of every position pair.

    Args:
      x: ``(B, N, C)`` generated features.
      y: ``(B, M, C)`` target features.
      band_width: ``h``.

    Returns:
      ``(B, N, M)``: ``CX[b, i, j]``, each row ``i`` summing to 1 over targets ``j``.
    """
    mu = jnp.mean(y, axis=(0, 1))
    x_unit = _unit_vectors(x - mu)
    y_unit = _unit_vectors(y - mu)
    # Full float32 products: TF32/bf16 matmuls (GPU/TPU defaults) perturb d_ij by ~1e-3,
    # far more than the 1e-5 that d~ divides by.
    cosine = jnp.einsum("bic,bjc->bij", x_unit, y_unit,
                        precision=jax.lax.Precision.HIGHEST)
    # Rounding can push cos slightly above 1; a distance is never negative.
    distance = jnp.maximum((1.0 - cosine) / 2.0, 0.0)
    relative = distance / (jnp.min(distance, axis=2, keepdims=True) + _RELATIVE_EPS)
    # w / sum(w) over targets is a softmax of (1 - d~) / h over the target axis.
    return jax.nn.softmax((1.0 - relative) / band_width, axis=2)


def contextual_loss(x: jax.Array, y: jax.Array, *, band_width: float = DEFAULT_BAND_WIDTH,
                    max_positions: int = DEFAULT_MAX_POSITIONS,
                    rng: jax.Array | None = None) -> jax.Array:
    """Contextual loss ``-log(CX(x, y))`` of two feature maps, averaged over the batch.

    Args:
      x: ``(B, *spatial, C)`` generated features.
      y: ``(B, *spatial, C)`` target features, the same shape.
      band_width: ``h`` (0.5, the reference's ``nn_stretch_sigma``).
      max_positions: above this many positions, that many random positions are kept
        (the same in ``x`` and ``y``).
      rng: PRNG key for the sampling; needed only when it happens.

    Returns:
      A scalar (float32 at least); 0 when ``x`` equals ``y`` (up to rounding).
    """
    if x.shape != y.shape:
        raise ValueError(f"contextual_loss: x shape {x.shape} != y shape {y.shape}")
    x, y = sample_positions(_flatten_positions(x), _flatten_positions(y),
                            max_positions, rng)
    cx = contextual_similarity(x, y, band_width)
    cx_per_sample = jnp.mean(jnp.max(cx, axis=1), axis=1)  # max over i, mean over j
    return jnp.mean(-jnp.log(cx_per_sample))


def contextual_loss_vgg(vgg_params: Mapping[str, Any], fake: jax.Array, real: jax.Array,
                        rng: jax.Array | None = None, *,
                        layers: Sequence[str] = DEFAULT_LAYERS, arch: str = "vgg19",
                        band_width: float = DEFAULT_BAND_WIDTH,
                        max_positions: int = DEFAULT_MAX_POSITIONS,
                        input_norm: str = "imagenet",
                        conv_impl: str = "auto", dtype: Any = None) -> jax.Array:
    """Sum over VGG layers of the contextual loss between fake and real CT features.

    Args:
      vgg_params: frozen VGG parameters for ``arch`` (VGG-19 in Mechrez et al.).
      fake: ``(B, H, W, 1)`` synthetic CT in ``[-1, 1]``.
      real: ``(B, H, W, 1)`` real CT in ``[-1, 1]``.
      rng: PRNG key for position sampling (each layer folds in its index); needed when
        a layer has more than ``max_positions`` positions.
      layers: feature layers (Mechrez's ``conv3_2``, ``conv4_2`` = our ``relu3_2``,
        ``relu4_2``).
      arch, input_norm, conv_impl, dtype: see :func:`sct_jax.models.vgg.vgg_features`.
      band_width, max_positions: see :func:`contextual_loss`.

    Returns:
      A scalar: ``sum_l contextual_loss(VGG_l(fake), VGG_l(real))``.
    """
    if fake.shape != real.shape:
        raise ValueError(f"contextual_loss_vgg: fake {fake.shape} != real {real.shape}")
    both = jnp.concatenate([fake, real.astype(fake.dtype)], axis=0)
    features = vgg_features(vgg_params, both, arch=arch, layers=tuple(layers),
                            input_norm=input_norm, conv_impl=conv_impl, dtype=dtype)
    total = jnp.zeros((), jnp.float32)
    for index, layer in enumerate(layers):
        fake_features, real_features = jnp.split(features[layer], 2, axis=0)
        layer_rng = None if rng is None else jax.random.fold_in(rng, index)
        total = total + contextual_loss(
            fake_features, jax.lax.stop_gradient(real_features), band_width=band_width,
            max_positions=max_positions, rng=layer_rng)
    return total
