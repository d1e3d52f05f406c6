"""GAN objectives on discriminator logits: vanilla (BCE) and least squares.

``vanilla`` is pix2pix's ``GANLoss('vanilla')``: binary cross-entropy with logits, the
mean over every logit (every patch of a PatchGAN). ``lsgan`` is pGAN's/CycleGAN's
``GANLoss('lsgan')``: the mean squared error of the raw outputs to 1 (real) or 0 (fake).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sct_jax.errors import ConfigError

GAN_KINDS = ("vanilla", "lsgan")


def gan_loss(logits: jax.Array, target_is_real: bool, kind: str = "vanilla") -> jax.Array:
    """Mean GAN loss of ``logits`` against an all-real or all-fake target.

    Args:
      logits: discriminator outputs, any shape (e.g. ``(B, *patch_grid, 1)``).
      target_is_real: the label every logit is pushed towards (1 real, 0 fake).
      kind: ``"vanilla"`` (BCE with logits) or ``"lsgan"`` (MSE).

    Returns:
      A scalar, float32 (or float64 for float64 logits).

    Raises:
      ConfigError: unknown ``kind``.
    """
    # At least float32: a bf16 mean over many patches loses too many bits.
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    target = jnp.full_like(logits, 1.0 if target_is_real else 0.0)
    if kind == "vanilla":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
    if kind == "lsgan":
        return jnp.mean(jnp.square(logits - target))
    raise ConfigError(f"loss.gan: unknown GAN loss {kind!r}; expected one of {GAN_KINDS}")


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       kind: str = "vanilla") -> jax.Array:
    """pix2pix's D objective ``0.5 * (loss(real, 1) + loss(fake, 0))``.

    Halved as the reference, which slows D relative to G. The caller stops the
    gradient into the generator (``jax.lax.stop_gradient`` on the fake image).

    Args:
      real_logits: D's outputs on real pairs, any shape.
      fake_logits: D's outputs on generated pairs, any shape.
      kind: ``"vanilla"`` or ``"lsgan"``.

    Returns:
      A float32 scalar.
    """
    return 0.5 * (gan_loss(real_logits, True, kind) + gan_loss(fake_logits, False, kind))


def generator_loss(fake_logits: jax.Array, kind: str = "vanilla") -> jax.Array:
    """The adversarial part of G's objective: ``loss(D(fake), real)`` (non-saturating).

    Args:
      fake_logits: D's outputs on generated pairs, any shape.
      kind: ``"vanilla"`` or ``"lsgan"``.

    Returns:
      A float32 scalar.
    """
    return gan_loss(fake_logits, True, kind)
