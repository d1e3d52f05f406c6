"""pix2pix (Isola et al. 2017) for MR -> CT, 2D slices or 3D patches.

U-Net generator + conditional PatchGAN on ``concat(MR, CT)``; vanilla (BCE) or LSGAN
adversarial loss, ``D = 0.5 (real + fake)``, ``G = adv + l1_weight * L1`` (100 in the
reference); Adam 2e-4, beta1 0.5, constant then linear decay. D is updated before G, and
G's adversarial term sees the *updated* D, as in the reference implementation.

The generator runs forward once per step: ``jax.vjp`` keeps its pullback, D is updated
on the detached fake, and G's gradient is the pullback of dLoss/dfake under the new D.
That is the reference's computation without a second generator forward pass.

Batch: ``mr (B, *S, C_in)``, ``ct (B, *S, 1)`` in [-1, 1], ``mask (B, *S, 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.data import prior as prior_lib
from sct_jax.data.preprocess import HU_PER_UNIT
from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial
from sct_jax.methods import Method
from sct_jax.methods.common import (TrainState, apply_updates, check_generator_options,
                                    check_l1_config, dummy_input, reconstruction_l1,
                                    step_rng)
from sct_jax.models.layers import compute_dtype, precision_kwargs
from sct_jax.models.patchgan import PatchDiscriminator
from sct_jax.models.unet import UNetGenerator, unet_dropout_levels
from sct_jax import optim


def build_models(config) -> tuple[UNetGenerator, PatchDiscriminator]:
    m = config.model
    gen = UNetGenerator(out_channels=1, ngf=m.gen.ngf, num_downs=m.gen.num_downs,
                        norm=m.gen.norm, dropout_rate=m.gen.dropout, conv_impl=m.conv_impl,
                        dtype=compute_dtype(m.get("dtype")),
                        residual=bool(m.gen.get("residual", False)),
                        upsample=m.gen.get("upsample", "transpose"),
                        calibration_bins=int(m.gen.get("calibration_bins", 0)),
                        prior_input=bool(prior_lib.extra_channels(config)))
    disc = PatchDiscriminator(ndf=m.disc.ndf, n_layers=m.disc.n_layers, norm=m.disc.norm,
                              conv_impl=m.conv_impl, dtype=compute_dtype(m.get("dtype")))
    return gen, disc


def spatial_size(config) -> tuple[int, ...]:
    """The training input's spatial size: the 2D crop or the 3D patch."""
    return tuple(config.data.patch if config.data.mode == "patches" else config.data.crop)


def validate_config(config) -> None:
    stride = 2 ** config.model.gen.num_downs
    size = spatial_size(config)
    key = "config.data.patch" if config.data.mode == "patches" else "config.data.crop"
    bad = [s for s in size if s % stride]
    if bad:
        raise ConfigError(f"{key}={tuple(size)} is not divisible by 2**model.gen.num_downs="
                          f"{stride} (the U-Net's total stride)")
    if config.loss.gan not in ("vanilla", "lsgan"):
        raise ConfigError(f"config.loss.gan={config.loss.gan!r}: expected 'vanilla' or 'lsgan'")
    if precision_kwargs(config)["remat"] != "none":
        raise ConfigError(f"config.model.remat={config.model.remat!r}: the pix2pix U-Net has "
                          "no residual blocks to rematerialise; use 'none'")
    check_generator_options(config)
    check_l1_config(config)


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """Initialises ``{"gen", "disc"}`` for batches like ``batch_spec``."""
    gen, disc = build_models(config)
    mr = dummy_input(batch_spec["mr"])
    ct = dummy_input(batch_spec["ct"])
    g_rng, d_rng, drop_rng = jax.random.split(rng, 3)
    gen_params = gen.init({"params": g_rng, "dropout": drop_rng}, mr, train=False)["params"]
    disc_params = disc.init(d_rng, jnp.concatenate([mr, ct], axis=-1))["params"]
    steps = config.train.steps
    return {
        "gen": TrainState.create(apply_fn=gen.apply, params=gen_params,
                                 tx=optim.adam(config.optim, steps)),
        "disc": TrainState.create(apply_fn=disc.apply, params=disc_params,
                                  tx=optim.adam(config.optim, steps)),
    }


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One D update then one G update.

    Args:
      config: the experiment config (bound by the loop).
      state: ``{"gen": TrainState, "disc": TrainState}``.
      batch: ``mr (B, *S, C_in)``, ``ct (B, *S, 1)``.
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics.
    """
    gen_state, disc_state = state["gen"], state["disc"]
    rng = step_rng(rng, gen_state)
    mr, ct = batch["mr"], batch["ct"]
    kind = config.loss.gan

    def generate(params):
        return gen_state.apply_fn({"params": params}, mr, train=True, rngs={"dropout": rng})

    fake, gen_pullback = jax.vjp(generate, gen_state.params)

    def disc_loss_fn(params):
        real_logits = disc_state.apply_fn({"params": params}, jnp.concatenate([mr, ct], -1))
        fake_logits = disc_state.apply_fn({"params": params},
                                          jnp.concatenate([mr, jax.lax.stop_gradient(fake)], -1))
        return adversarial.discriminator_loss(real_logits, fake_logits, kind)

    d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(disc_state.params)
    disc_state, d_metrics = apply_updates(disc_state, d_grads, "disc")

    def gen_loss_fn(fake_ct):
        fake_logits = disc_state.apply_fn({"params": disc_state.params},
                                          jnp.concatenate([mr, fake_ct], -1))
        adv = adversarial.generator_loss(fake_logits, kind)
        l1 = reconstruction_l1(config, fake_ct, ct, batch)
        return adv + config.loss.l1_weight * l1, (adv, l1)

    (g_loss, (g_adv, g_l1)), dloss_dfake = jax.value_and_grad(gen_loss_fn, has_aux=True)(fake)
    (g_grads,) = gen_pullback(dloss_dfake)
    gen_state, g_metrics = apply_updates(gen_state, g_grads, "gen")

    metrics = {"loss": g_loss, "d_loss": d_loss, "g_adv": g_adv, "g_l1": g_l1,
               "mae_hu": g_l1 * HU_PER_UNIT,
               **d_metrics, **g_metrics}
    return {"gen": gen_state, "disc": disc_state}, metrics


def check_sampling(config) -> None:
    """Raises ``ConfigError`` unless the generator has dropout to draw samples with.

    pix2pix samples by Monte-Carlo (test-time) dropout, which sits only in the U-Net's
    capped middle levels (:func:`~sct_jax.models.unet.unet_dropout_levels`): a rate of 0,
    or a U-Net too shallow to have such a level, would give K identical "samples".
    """
    gen = build_models(config)[0]
    if gen.dropout_rate <= 0:
        raise ConfigError(f"config.model.gen.dropout={gen.dropout_rate}: pix2pix samples by "
                          "test-time dropout and this generator has none (train with "
                          "dropout > 0)")
    if not unet_dropout_levels(gen.ngf, gen.num_downs, gen.max_mult):
        raise ConfigError(f"config.model.gen.dropout={gen.dropout_rate} has no effect: a U-Net "
                          f"with config.model.gen.num_downs={gen.num_downs} has no dropout "
                          "level (needs >= 6), so there is nothing to sample")


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``(B, *S, C_in)`` MR in [-1, 1] -> ``(B, *S, 1)`` sCT in [-1, 1].

    Args:
      config: the config (unused: the rate is the generator's ``config.model.gen.dropout``).
      state: ``{"gen": TrainState, ...}``.
      mr: ``(B, *S, C_in)`` normalised MR.
      rng: ``None``: dropout off, the deterministic sCT. A key (raw ``uint32[2]`` or
        typed): one Monte-Carlo dropout sample, dropout on at the trained rate. Nothing
        else changes: ``train`` switches only dropout in the U-Net (instance norm has
        no running statistics, batch norm uses the batch's statistics in both modes).
    """
    del config
    gen_state = state["gen"]
    if rng is None:
        return gen_state.apply_fn({"params": gen_state.params}, mr, train=False)
    return gen_state.apply_fn({"params": gen_state.params}, mr, train=True,
                              rngs={"dropout": rng})


def input_rule(config) -> tuple[int, int]:
    """``(stride, min_size)`` of the 2D U-Net's input: multiples of ``2**num_downs``."""
    stride = 2 ** int(config.model.gen.num_downs)
    return stride, stride


METHOD = Method(
    name="pix2pix", create_state=create_state, train_step=train_step, predict=predict,
    samples=True, check_sampling=check_sampling, validate_config=validate_config,
    input_rule=input_rule, takes_prior=True)
