"""Pieces shared by the method modules (state creation, updates with norms)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial
from sct_jax.models.resnet_generator import check_resnet_input

TrainState = train_state.TrainState


def dummy_input(spec: jax.ShapeDtypeStruct, batch: int = 1) -> jax.Array:
    """Zeros shaped like one batch entry of ``spec`` (for ``module.init``)."""
    return jnp.zeros((batch,) + tuple(spec.shape[1:]), spec.dtype)


def apply_updates(state: TrainState, grads: Any, prefix: str) -> tuple[TrainState, dict]:
    """Applies ``grads`` and reports the gradient, update and parameter norms.

    Args:
      state: one network's train state.
      grads: gradients shaped like ``state.params``.
      prefix: metric name prefix, e.g. ``"gen"``.

    Returns:
      The new state and ``{prefix/grad_norm, prefix/update_norm, prefix/param_norm}``.
    """
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # Norms accumulate in float32 whatever the leaves' dtype.
    def tree_norm(tree):
        return optax.tree.norm(optax.tree.cast(tree, jnp.float32))

    metrics = {f"{prefix}/grad_norm": tree_norm(grads),
               f"{prefix}/update_norm": tree_norm(updates),
               f"{prefix}/param_norm": tree_norm(params)}
    return new_state, metrics


def step_rng(rng: jax.Array, state: TrainState) -> jax.Array:
    """The step's key: ``fold_in(base, step)``, so a resumed run draws the same numbers."""
    return jax.random.fold_in(rng, state.step)


def validate_resnet_gan_config(config, weight_keys: tuple[str, ...]) -> None:
    """Start-up checks of the ResNet-generator GANs (pGAN family, CycleGAN).

    Raises ``ConfigError`` for a crop the generator cannot take, an unknown
    ``config.loss.gan`` or a negative ``config.loss.<key>`` among ``weight_keys``.
    """
    try:
        check_resnet_input(tuple(config.data.crop))
    except ConfigError as err:
        raise ConfigError(f"config.data.crop={tuple(config.data.crop)}: {err}") from err
    if config.loss.gan not in adversarial.GAN_KINDS:
        raise ConfigError(f"config.loss.gan={config.loss.gan!r}: expected one of "
                          f"{adversarial.GAN_KINDS}")
    for key in weight_keys:
        if float(config.loss[key]) < 0:
            raise ConfigError(f"config.loss.{key}={config.loss[key]}: must be >= 0")
