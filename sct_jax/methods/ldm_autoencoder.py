"""LDM stage 1: the 3D KL autoencoder of CT patches (MONAI GenerativeModels' recipe).

  python train.py --config configs/ldm_brain.py:autoencoder --workdir runs/ldm_brain_autoencoder

Objective of the autoencoder (the "generator")::

  l1_weight |x - x_hat| + perceptual_weight P_2.5D(x_hat, x) + kl_weight KL(q(z|x) || N(0, I))
      + adv(step) LSGAN_G(D(x_hat)),       adv(step) = adv_weight if step >= ldm.adv_start else 0

then one update of a 3D PatchGAN ``D`` (LSGAN, unconditional: real CT vs detached
reconstruction) once ``step >= config.ldm.adv_start``. The switch is a ``jnp.where`` on
the weight and a ``lax.cond`` around the D update, so the whole run is ONE compiled
program (before the switch D's update is skipped, not computed).

The 2.5D perceptual term (MONAI's ``is_fake_3d``): ``config.loss.perceptual_slices``
random slices along each of the three axes go through the frozen 2D VGG-16
(``config.loss.perceptual_layer``, weights from ``config.model.vgg16_weights``); the L1 of
their features is averaged over the axes. With ``config.loss.perceptual_weight == 0`` no
VGG is loaded (the ``tiny`` and ``small`` variants: no weights file needed; tests write
random weights in torchvision's format to exercise the term).

State: ``{"ae": TrainState, "disc": TrainState}`` (+ ``"vgg16"``, a never-updated
``TrainState``, when the perceptual weight is positive, as the pGAN methods).
Batch: ``ct (B, D, H, W, 1)`` in [-1, 1] (``mr`` and ``mask`` are ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial, perceptual
from sct_jax.methods import Method
from sct_jax.methods import _ldm_common as common
from sct_jax.methods._pgan_common import (check_vgg_files, frozen_vgg_state,
                                          load_vgg_weights)
from sct_jax.methods.common import TrainState, apply_updates, dummy_input, step_rng
from sct_jax.models.autoencoder import kl_loss
from sct_jax.models.layers import precision_kwargs
from sct_jax import optim


def validate_config(config) -> None:
    common.validate_ldm_config(config, "autoencoder")
    if config.loss.perceptual_weight > 0 and int(config.loss.perceptual_slices) < 1:
        raise ConfigError(f"config.loss.perceptual_slices={config.loss.perceptual_slices}: "
                          "must be >= 1 when the perceptual weight is positive")
    for key in ("l1_weight", "perceptual_weight", "kl_weight", "adv_weight"):
        if float(config.loss[key]) < 0:
            raise ConfigError(f"config.loss.{key}={config.loss[key]}: must be >= 0")
    check_vgg_files(config, ("vgg16",) if float(config.loss.perceptual_weight) > 0 else ())


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """``{"ae", "disc"}`` (+ ``"vgg16"``) for CT patches like ``batch_spec["ct"]``."""
    ae, disc = common.build_autoencoder(config), common.build_discriminator(config)
    ct = dummy_input(batch_spec["ct"])
    ae_rng, z_rng, d_rng = jax.random.split(rng, 3)
    ae_params = ae.init(ae_rng, ct, z_rng)["params"]
    disc_params = disc.init(d_rng, ct)["params"]
    steps = config.train.steps
    state = {
        "ae": TrainState.create(apply_fn=ae.apply, params=ae_params,
                                tx=optim.adam(config.optim, steps)),
        "disc": TrainState.create(apply_fn=disc.apply, params=disc_params,
                                  tx=optim.adam(config.optim_disc, steps)),
    }
    if config.loss.perceptual_weight > 0:
        state["vgg16"] = frozen_vgg_state("vgg16", (config.loss.perceptual_layer,))
    return state


def random_slices(volume: jax.Array, axis: int, index: jax.Array) -> jax.Array:
    """Slices ``index`` of ``volume`` ``(B, D, H, W, C)`` along spatial ``axis`` (1-3),
    as a batch of 2D images ``(B * n, *other two, C)``."""
    taken = jnp.moveaxis(jnp.take(volume, index, axis=axis), axis, 1)
    return taken.reshape(-1, *taken.shape[2:])


def perceptual_25d(vgg_params, fake: jax.Array, real: jax.Array, rng: jax.Array,
                   slices: int, layer: str, conv_impl: str = "auto",
                   dtype=None) -> jax.Array:
    """Mean over the three axes of the VGG perceptual L1 of random 2D slices.

    Args:
      vgg_params: frozen VGG-16 parameters.
      fake: ``(B, D, H, W, 1)`` reconstruction in [-1, 1].
      real: ``(B, D, H, W, 1)`` target in [-1, 1].
      rng: key choosing the slices (the same indices for fake and real).
      slices: slices per axis.
      layer: VGG feature layer.
      conv_impl: convolution lowering.
      dtype: the VGG's compute dtype (``None``: float32).

    Returns:
      A scalar.
    """
    terms = []
    for axis in (1, 2, 3):
        index = jax.random.randint(jax.random.fold_in(rng, axis), (slices,), 0,
                                   fake.shape[axis])
        terms.append(perceptual.perceptual_l1(
            vgg_params, random_slices(fake, axis, index), random_slices(real, axis, index),
            layer=layer, conv_impl=conv_impl, dtype=dtype))
    return sum(terms) / 3.0


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One autoencoder update, then (once adversarial training is on) one D update.

    Args:
      config: the experiment config (bound by the loop).
      state: ``{"ae", "disc"[, "vgg16"]}``.
      batch: ``ct (B, D, H, W, 1)`` in [-1, 1].
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics.
    """
    ae_state, disc_state = state["ae"], state["disc"]
    rng = step_rng(rng, ae_state)
    z_rng, slice_rng = jax.random.split(rng)
    ct = batch["ct"]
    loss_cfg = config.loss
    # A zero adversarial weight never trains D (its update is skipped, not computed).
    adv_on = jnp.logical_and(ae_state.step >= int(config.ldm.adv_start),
                             float(loss_cfg.adv_weight) > 0)
    adv_weight = jnp.where(adv_on, jnp.float32(loss_cfg.adv_weight), 0.0)

    def ae_loss_fn(params):
        recon, mu, sigma = ae_state.apply_fn({"params": params}, ct, z_rng)
        l1 = jnp.mean(jnp.abs(recon - ct))
        kl = kl_loss(mu, sigma)
        if loss_cfg.perceptual_weight > 0:
            perc = perceptual_25d(state["vgg16"].params, recon, ct, slice_rng,
                                  int(loss_cfg.perceptual_slices), loss_cfg.perceptual_layer,
                                  config.model.conv_impl,
                                  precision_kwargs(config)["dtype"])
        else:
            perc = jnp.zeros((), jnp.float32)
        g_adv = adversarial.generator_loss(
            disc_state.apply_fn({"params": disc_state.params}, recon), "lsgan")
        total = (loss_cfg.l1_weight * l1 + loss_cfg.perceptual_weight * perc
                 + loss_cfg.kl_weight * kl + adv_weight * g_adv)
        return total, (recon, l1, kl, perc, g_adv)

    (loss, (recon, l1, kl, perc, g_adv)), grads = jax.value_and_grad(
        ae_loss_fn, has_aux=True)(ae_state.params)
    ae_state, ae_metrics = apply_updates(ae_state, grads, "ae")
    fake = jax.lax.stop_gradient(recon)

    def disc_update(d_state):
        def disc_loss_fn(params):
            real_logits = d_state.apply_fn({"params": params}, ct)
            fake_logits = d_state.apply_fn({"params": params}, fake)
            return adversarial.discriminator_loss(real_logits, fake_logits, "lsgan")
        d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(d_state.params)
        d_state, d_metrics = apply_updates(d_state, d_grads, "disc")
        return d_state, {"d_loss": d_loss, **d_metrics}

    def disc_skip(d_state):
        shapes = jax.eval_shape(disc_update, d_state)[1]
        return d_state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    disc_state, d_metrics = jax.lax.cond(adv_on, disc_update, disc_skip, disc_state)
    metrics = {"loss": loss, "l1": l1, "kl": kl, "perceptual": perc, "g_adv": g_adv,
               "adv_on": adv_on.astype(jnp.float32), "mae_hu": l1 * common.HU_PER_UNIT,
               **d_metrics, **ae_metrics}
    return {**state, "ae": ae_state, "disc": disc_state}, metrics


def reconstruct(config, state: dict, ct: jax.Array) -> jax.Array:
    """``(B, D, H, W, 1)`` CT -> its reconstruction through the posterior mean, in [-1, 1]."""
    params = state["ae"].params
    ae = common.build_autoencoder(config)
    mu, _ = ae.apply({"params": params}, ct, method=ae.encode)
    return common.decode_latent(config, params, mu)


def image_summaries(config, state: dict, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    """The first training patch's centre slice (along its last axis), before the step.

    Returns:
      ``(D, H)`` arrays: ``ae/ct`` and ``ae/reconstruction`` (through the posterior
      mean) in [-1, 1], and ``ae/abs_error_hu``.
    """
    del rng
    ct = batch["ct"][:1]
    recon = reconstruct(config, state, ct)
    centre = ct.shape[-2] // 2
    ct_slice, recon_slice = ct[0, ..., centre, 0], recon[0, ..., centre, 0]
    return {"ae/ct": ct_slice, "ae/reconstruction": recon_slice,
            "ae/abs_error_hu": jnp.abs(recon_slice - ct_slice) * common.HU_PER_UNIT}


def predict(config, state: dict, mr: jax.Array) -> jax.Array:
    """Not an MR -> CT model: raises ``ConfigError`` (see :func:`reconstruct`)."""
    del state, mr
    raise ConfigError(f"config.method={config.method!r} is the autoencoder stage; it does "
                      "not predict sCT: evaluate the ':controlnet' stage of the LDM config")


def not_an_sct_model(config) -> str:
    return (f"config.method={config.method!r} is the autoencoder stage of the latent "
            "diffusion model; it predicts no sCT (train the diffusion stage next)")


METHOD = Method(
    name="ldm_autoencoder", create_state=create_state, train_step=train_step,
    predict=predict, validate_config=validate_config, image_summaries=image_summaries,
    not_an_sct_model=not_an_sct_model, load_pretrained=load_vgg_weights)
