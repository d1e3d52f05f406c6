"""Pieces shared by the method modules (state creation, updates with norms)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial, pixel
from sct_jax.models.calibration import check_calibration_bins
from sct_jax.models.layers import check_upsample
from sct_jax.models.resnet_generator import check_resnet_input

TrainState = train_state.TrainState
# Voxels the body mask grows by for the body-masked L1 (config.loss.body_mask_margin):
# none by default (on the phantom pelvis a margin of 8 cost 6-8 HU MAE, two seeds).
BODY_MASK_MARGIN = 0


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


def reconstruction_l1(config, fake_ct: jax.Array, ct: jax.Array, batch: dict) -> jax.Array:
    """The generator's L1 against the CT: over the whole crop, or over the body mask
    grown by ``config.loss.body_mask_margin`` voxels when ``config.loss.body_mask`` (the
    air far from the body is easy, and averaging it in dilutes the body's share of the
    gradient; outside the grown mask the sCT is set to air at prediction,
    :func:`sct_jax.inference.predict.predict_mr`). A margin (none by default) trains the
    model on the air just outside the body too, for masks at prediction tighter than the
    body; on the phantom pelvis a margin of 8 cost 6-8 HU MAE. With
    ``config.loss.shift_tolerance`` the L1 (masked or not) takes, per sample, the best of
    the target's integer shifts up to that many voxels (a CT registered to its input
    only up to a residual motion).

    Args:
      config: the run's config.
      fake_ct: ``(B, *spatial, 1)`` the generator's output.
      ct: the same shape, the target.
      batch: the training batch; ``batch["mask"]`` ``(B, *spatial, 1)`` is the body mask.
    """
    mask = (grow_mask(batch["mask"], body_mask_margin(config)) if body_masked_loss(config)
            else None)
    if shift_tolerance(config):
        return pixel.shift_tolerant_l1(fake_ct, ct, mask, shift_tolerance(config))
    if mask is not None:
        return pixel.masked_l1(fake_ct, ct, mask)
    return pixel.l1(fake_ct, ct)


def shift_tolerance(config) -> int:
    """``config.loss.shift_tolerance``: the misalignment in voxels the L1 forgives
    (:func:`sct_jax.losses.pixel.shift_tolerant_l1`; absent or 0: none)."""
    return int(config.get("loss", {}).get("shift_tolerance", 0))


def body_masked_loss(config) -> bool:
    """Whether the run trains its L1 inside the body mask only (``config.loss.body_mask``;
    absent in runs made before the option: ``False``)."""
    return bool(config.get("loss", {}).get("body_mask", False))


def body_mask_margin(config) -> int:
    """``config.loss.body_mask_margin``: voxels the body mask grows by on every spatial
    axis of the training batch (default :data:`BODY_MASK_MARGIN`)."""
    return int(config.get("loss", {}).get("body_mask_margin", BODY_MASK_MARGIN))


def grow_mask(mask: jax.Array, margin: int) -> jax.Array:
    """``(B, *spatial, 1)`` mask dilated by a ``(2 margin + 1)`` box on every spatial axis
    (a max filter; the volume's edge counts as outside)."""
    if margin <= 0:
        return mask
    window = (1,) + (2 * margin + 1,) * (mask.ndim - 2) + (1,)
    return jax.lax.reduce_window(mask, jnp.array(-jnp.inf, mask.dtype), jax.lax.max,
                                 window, (1,) * mask.ndim, "SAME")


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
    check_generator_options(config)
    check_l1_config(config)


def check_generator_options(config) -> None:
    """ConfigError for a ``config.model.gen.upsample`` the decoders do not know or a
    ``config.model.gen.calibration_bins`` that is neither 0 nor at least 2."""
    try:
        check_upsample(config.model.gen.get("upsample", "transpose"))
        check_calibration_bins(config.model.gen.get("calibration_bins", 0))
    except ConfigError as err:
        raise ConfigError(f"config.{err}") from err


def check_l1_config(config) -> None:
    """ConfigError for a negative ``config.loss.body_mask_margin`` or
    ``config.loss.shift_tolerance``."""
    if body_mask_margin(config) < 0:
        raise ConfigError(f"config.loss.body_mask_margin={body_mask_margin(config)}: must "
                          "be >= 0 voxels")
    if shift_tolerance(config) < 0:
        raise ConfigError(f"config.loss.shift_tolerance={shift_tolerance(config)}: must "
                          "be >= 0 voxels")


def refuse_body_mask(config, why: str) -> None:
    """ConfigError when ``config.loss.body_mask`` is set for a method that cannot honour
    it (``why`` says which loss would ignore it)."""
    if body_masked_loss(config):
        raise ConfigError(f"config.loss.body_mask=True: {why}; set it to False")
