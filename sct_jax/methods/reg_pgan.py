"""REG-pGAN: pGAN with RegGAN's registration network (Kong et al. 2021, "NC+R").

A registration network ``R(fake, ct)`` predicts a displacement field (pixels) that warps
the generator's output onto the possibly misaligned CT, so the pixel loss compares
aligned images. G and R are trained jointly, in one step, on the reference's objective

    20 L1(warp(fake, flow), ct) + 1 adv + 10 smoothness(flow)

(``loss.l1_weight``, ``loss.adv_weight``, ``loss.smooth_weight``), Adam lr 1e-4, beta1
0.5; ``loss.perceptual_weight`` (0 by default, not part of RegGAN) would compare the
*warped* fake with the CT. The adversarial term sees the unwarped fake, as in RegGAN.
R's gradient reaches G through R's input too (the reference does not detach it).
Differences from RegGAN kept for a like-for-like comparison with the other pGAN methods:
pGAN's conditional PatchGAN, D updated before G, no fake-image replay buffer.

State: ``{"gen", "disc", "reg"[, "vgg16"]}``. R's output layer starts at N(0, 1e-5), so
training starts from the identity warp (``flow_abs_mean`` ~ 0 at step 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.losses import pixel
from sct_jax.losses.smoothness import smoothness
from sct_jax.methods import Method
from sct_jax.methods import _pgan_common as common
from sct_jax.methods.common import (TrainState, apply_updates, dummy_input, refuse_body_mask,
                                    step_rng)
from sct_jax.models.layers import precision_kwargs
from sct_jax.models.registration import RegistrationNet, check_registration_input, warp
from sct_jax import optim



def build_registration(config) -> RegistrationNet:
    r = config.model.reg
    return RegistrationNet(down_channels=tuple(r.down_channels),
                           up_channels=tuple(r.up_channels),
                           n_bottleneck_blocks=r.n_bottleneck_blocks,
                           conv_impl=config.model.conv_impl, **precision_kwargs(config))


def validate_config(config) -> None:
    common.validate_pgan_config(config)
    refuse_body_mask(config, "REG-pGAN's L1 compares the registered sCT with the CT, "
                             "whose body mask the registration moves")
    r = config.model.reg
    if len(r.down_channels) != len(r.up_channels):
        raise ConfigError(f"config.model.reg: down_channels {tuple(r.down_channels)} and "
                          f"up_channels {tuple(r.up_channels)} differ in length")
    try:
        check_registration_input(tuple(config.data.crop), len(r.down_channels))
    except ConfigError as err:
        raise ConfigError(f"config.model.reg.down_channels / config.data.crop: {err}") from err
    if float(config.loss.smooth_weight) < 0:
        raise ConfigError(f"config.loss.smooth_weight={config.loss.smooth_weight}: "
                          "must be >= 0")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """pGAN's state plus ``"reg"``, the registration network."""
    gan_rng, reg_rng = jax.random.split(rng)
    state = common.create_gan_state(config, gan_rng, batch_spec)
    ct = dummy_input(batch_spec["ct"])
    reg = build_registration(config)
    reg_params = reg.init(reg_rng, ct, ct)["params"]
    state["reg"] = TrainState.create(apply_fn=reg.apply, params=reg_params,
                                     tx=optim.adam(config.optim, config.train.steps))
    return state


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """D update, then one joint G + R update on the registered L1 objective.

    Args:
      config: the experiment config.
      state: ``{"gen", "disc", "reg"[, "vgg16"]}``.
      batch: ``mr (B, H, W, C_in)``, ``ct (B, H, W, 1)``.
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics (``flow_abs_mean``/``flow_abs_max`` in pixels).
    """
    gen_state, reg_state = state["gen"], state["reg"]
    mr, ct = batch["mr"], batch["ct"]
    train_key, _, _ = common.dropout_keys(step_rng(rng, gen_state))
    fake, gen_pullback = jax.vjp(common.generator_fn(gen_state, mr, train_key),
                                 gen_state.params)
    disc_state, d_loss, d_metrics = common.update_discriminator(config, state["disc"], mr,
                                                                ct, fake)
    w = config.loss

    def joint_loss_fn(fake_ct, reg_params):
        flow = reg_state.apply_fn({"params": reg_params}, fake_ct, ct)
        registered = warp(fake_ct, flow)
        adv = common.adversarial_term(config, disc_state, mr, fake_ct)
        l1 = pixel.l1(registered, ct)
        smooth = smoothness(flow)
        perc = common.perceptual_term(config, state, registered, ct)
        total = (w.adv_weight * adv + w.l1_weight * l1 + w.smooth_weight * smooth
                 + w.perceptual_weight * perc)
        abs_flow = jnp.abs(flow)
        terms = {"g_adv": adv, "g_l1_registered": l1, "g_smooth": smooth,
                 "g_perceptual": perc, "g_l1": pixel.l1(fake_ct, ct),
                 "flow_abs_mean": jnp.mean(abs_flow), "flow_abs_max": jnp.max(abs_flow)}
        return total, terms

    (g_loss, terms), (dloss_dfake, reg_grads) = jax.value_and_grad(
        joint_loss_fn, argnums=(0, 1), has_aux=True)(fake, reg_state.params)
    (g_grads,) = gen_pullback(dloss_dfake)
    gen_state, g_metrics = apply_updates(gen_state, g_grads, "gen")
    reg_state, r_metrics = apply_updates(reg_state, reg_grads, "reg")
    metrics = {"loss": g_loss, "d_loss": d_loss, **terms,
               "mae_hu": terms["g_l1"] * common.HU_PER_UNIT,
               **d_metrics, **g_metrics, **r_metrics}
    return {**state, "gen": gen_state, "disc": disc_state, "reg": reg_state}, metrics


def image_summaries(config, state: dict, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    """R's view of the first training slice, before the step about to run.

    Returns:
      ``(H, W)`` arrays: ``reg/flow_magnitude_px`` (displacement length in pixels),
      ``reg/flow_rows_px`` and ``reg/flow_cols_px`` (its two components), and in
      [-1, 1]: ``reg/fake`` (G's output, dropout off), ``reg/registered`` (it warped
      by R onto the CT) and ``reg/ct``.
    """
    del rng
    ct = batch["ct"][:1]
    fake = common.predict(config, state, batch["mr"][:1])
    reg_state = state["reg"]
    flow = reg_state.apply_fn({"params": reg_state.params}, fake, ct)
    registered = warp(fake, flow)
    return {"reg/flow_magnitude_px": jnp.linalg.norm(flow[0], axis=-1),
            "reg/flow_rows_px": flow[0, ..., 0], "reg/flow_cols_px": flow[0, ..., 1],
            "reg/fake": fake[0, ..., 0], "reg/registered": registered[0, ..., 0],
            "reg/ct": ct[0, ..., 0]}


METHOD = Method(
    name="reg_pgan", create_state=create_state, train_step=train_step, predict=common.predict,
    samples=True, check_sampling=common.check_sampling, validate_config=validate_config,
    input_rule=common.input_rule, load_pretrained=common.load_vgg_weights,
    takes_prior=True, image_summaries=image_summaries)
