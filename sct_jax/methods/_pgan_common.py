"""What pGAN and its three seed-02 variants share: models, state, D update, losses, configs.

pGAN (Dar et al. 2019, ref: icon-lab/pGAN-cGAN) on 2.5D pelvis slices: a ResNet
generator maps three neighbouring MR slices ``(B, H, W, 3)`` to one CT slice
``(B, H, W, 1)``; a conditional PatchGAN (instance norm) scores ``concat(MR, CT)``;
LSGAN objectives; ``G = adv + 100 L1 + 100 L1(VGG-16 relu2_2)``. The perceptual term runs
over the whole batch (the reference takes sample 0 only).

Every method here updates D first and then G against the *updated* D, with a single
generator forward pass kept as a ``jax.vjp`` pullback (as :mod:`sct_jax.methods.pix2pix`).
``ctx_pgan``, ``reg_pgan`` and ``meta_pgan`` change only G's objective, so differences in
an ablation come from the loss alone.

Frozen feature networks (VGG-16 for the perceptual term, VGG-19 for the contextual
one) live in the state as ``TrainState``s whose optimizer is ``optax.set_to_zero()``:
the loop shards, donates and checkpoints them like any network, and a missing weights
file fails in ``create_state`` with the loader's message naming the file.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sct_jax.data import prior as prior_lib
from sct_jax.data.preprocess import HU_PER_UNIT
from sct_jax.errors import ConfigError, DataError
from sct_jax.losses import adversarial, perceptual
from sct_jax.methods.common import (TrainState, apply_updates, dummy_input,
                                    reconstruction_l1, validate_resnet_gan_config)
from sct_jax.models.patchgan import PatchDiscriminator
from sct_jax.models import vgg
from sct_jax.models.layers import precision_kwargs
from sct_jax.models.resnet_generator import (N_DOWNSAMPLINGS, ResnetGenerator,
                                              check_dropout_sampling)
from sct_jax import optim



# ----------------------------------------------------------------------------- models

def build_generator(config) -> ResnetGenerator:
    g = config.model.gen
    return ResnetGenerator(out_channels=1, ngf=g.ngf, n_blocks=g.n_blocks, norm=g.norm,
                           dropout_rate=g.dropout, conv_impl=config.model.conv_impl,
                           residual=bool(g.get("residual", False)),
                           upsample=g.get("upsample", "transpose"),
                           calibration_bins=int(g.get("calibration_bins", 0)),
                           prior_input=bool(prior_lib.extra_channels(config)),
                           **precision_kwargs(config))


def build_discriminator(config) -> PatchDiscriminator:
    d = config.model.disc
    return PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm,
                              conv_impl=config.model.conv_impl,
                              dtype=precision_kwargs(config)["dtype"])


def validate_pgan_config(config, modes: tuple[str, ...] = ("slices",)) -> None:
    """Start-up checks shared by the four methods (raise ``ConfigError``)."""
    if config.data.mode not in modes:
        raise ConfigError(f"config.data.mode={config.data.mode!r}: {config.method} trains on "
                          f"{' or '.join(modes)}")
    validate_resnet_gan_config(config, ("adv_weight", "l1_weight", "perceptual_weight"))
    check_vgg_files(config, ("vgg16",) if float(config.loss.perceptual_weight) > 0 else ())


def frozen_vgg_state(arch: str, layers) -> TrainState:
    """A never-updated ``TrainState`` for VGG weights up to the deepest of ``layers``,
    zeros until :func:`load_vgg_weights` reads the file (outside the traced init).

    Convs past the deepest requested layer are never evaluated: keeping them would only
    grow every checkpoint (VGG-19 to conv4_2 is 5.5M of its 20M weights).
    """
    names = vgg.vgg_layer_names(arch)
    deepest = max(layers, key=names.index)
    model = vgg.VGGFeatures(arch=arch, layers=tuple(layers))
    return TrainState.create(apply_fn=model.apply, params=vgg.placeholder_params(arch, deepest),
                             tx=optax.set_to_zero())


# The frozen feature networks a state may hold: state key -> (arch, config.model key).
VGG_ENTRIES = {"vgg16": ("vgg16", "vgg16_weights"), "vgg19": ("vgg19", "vgg19_weights")}


def check_vgg_files(config, needed: tuple[str, ...]) -> None:
    """Start-up check: each of ``needed`` (``"vgg16"``, ``"vgg19"``) has its file.

    Raises:
      DataError: naming the config key and the file (and how to make it).
    """
    for key in needed:
        arch, config_key = VGG_ENTRIES[key]
        try:
            vgg.check_weights_file(config.model[config_key], arch)
        except DataError as err:
            raise DataError(f"config.model.{config_key}: {err}") from err


def load_vgg_weights(config, state: dict, pretrained: dict) -> dict:
    """``Method.load_pretrained`` of the methods with a perceptual or contextual term:
    reads the VGG weights files into the state's frozen VGG entries.

    Raises:
      DataError: a file missing or unreadable; the message names the config key.
    """
    del pretrained
    state = dict(state)
    for key, (arch, config_key) in VGG_ENTRIES.items():
        if key not in state:
            continue
        try:
            params = vgg.load_vgg_params(config.model[config_key], arch)
        except DataError as err:
            raise DataError(f"config.model.{config_key}: {err}") from err
        kept = {name: params[name] for name in state[key].params}
        state[key] = state[key].replace(params=kept)
    return state


def create_gan_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """``{"gen", "disc"}`` (+ ``"vgg16"`` when the perceptual weight is positive)."""
    gen, disc = build_generator(config), build_discriminator(config)
    mr = dummy_input(batch_spec["mr"])
    ct = dummy_input(batch_spec["ct"])
    g_rng, d_rng, drop_rng = jax.random.split(rng, 3)
    gen_params = gen.init({"params": g_rng, "dropout": drop_rng}, mr, train=False)["params"]
    disc_params = disc.init(d_rng, jnp.concatenate([mr, ct], axis=-1))["params"]
    steps = config.train.steps
    state = {
        "gen": TrainState.create(apply_fn=gen.apply, params=gen_params,
                                 tx=optim.adam(config.optim, steps)),
        "disc": TrainState.create(apply_fn=disc.apply, params=disc_params,
                                  tx=optim.adam(config.optim, steps)),
    }
    if config.loss.perceptual_weight > 0:
        state["vgg16"] = frozen_vgg_state("vgg16", (config.loss.perceptual_layer,))
    return state


# ---------------------------------------------------------------------------- pieces

def dropout_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Independent keys of one step: train dropout, validation dropout, loss sampling."""
    return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)


def generator_fn(gen_state: TrainState, mr: jax.Array, key: jax.Array) -> Callable:
    """``params -> (B, H, W, 1)`` sCT in train mode with a fixed dropout key."""
    def generate(params):
        return gen_state.apply_fn({"params": params}, mr, train=True, rngs={"dropout": key})
    return generate


def update_discriminator(config, disc_state: TrainState, mr: jax.Array, ct: jax.Array,
                         fake: jax.Array) -> tuple[TrainState, jax.Array, dict]:
    """One D step on real ``concat(mr, ct)`` against the detached fake.

    Returns:
      ``(new disc state, D loss, norm metrics)``.
    """
    kind = config.loss.gan

    def disc_loss_fn(params):
        real_logits = disc_state.apply_fn({"params": params}, jnp.concatenate([mr, ct], -1))
        fake_logits = disc_state.apply_fn(
            {"params": params}, jnp.concatenate([mr, jax.lax.stop_gradient(fake)], -1))
        return adversarial.discriminator_loss(real_logits, fake_logits, kind)

    d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(disc_state.params)
    disc_state, metrics = apply_updates(disc_state, d_grads, "disc")
    return disc_state, d_loss, metrics


def adversarial_term(config, disc_state: TrainState, mr: jax.Array,
                     fake: jax.Array) -> jax.Array:
    """G's adversarial loss under (the updated) D: ``loss(D(mr, fake), real)``."""
    logits = disc_state.apply_fn({"params": disc_state.params},
                                 jnp.concatenate([mr, fake], -1))
    return adversarial.generator_loss(logits, config.loss.gan)


def perceptual_term(config, state: dict, fake: jax.Array, ct: jax.Array) -> jax.Array:
    """VGG-16 perceptual L1 over the whole batch; 0 when its weight is 0 (no VGG)."""
    if config.loss.perceptual_weight <= 0:
        return jnp.zeros((), jnp.float32)
    return perceptual.perceptual_l1(state["vgg16"].params, fake, ct, arch="vgg16",
                                    layer=config.loss.perceptual_layer,
                                    input_norm=config.loss.perceptual_input_norm,
                                    conv_impl=config.model.conv_impl,
                                    dtype=precision_kwargs(config)["dtype"])


def gan_step(config, state: dict, batch: dict, rng: jax.Array,
             extra_terms: Callable | None = None) -> tuple[dict, dict]:
    """pGAN's step: D update, then G on ``adv + l1 L1 + perc VGG + extra``.

    Args:
      config: the experiment config.
      state: ``{"gen", "disc", ["vgg16", ...]}``.
      batch: ``mr (B, H, W, C_in)``, ``ct (B, H, W, 1)``.
      rng: the step's key (already folded with the step).
      extra_terms: optional ``(fake, key) -> (weighted scalar, metrics)`` added to G's
        objective (the contextual loss of ctx-pGAN).

    Returns:
      The new state and scalar metrics.
    """
    gen_state = state["gen"]
    mr, ct = batch["mr"], batch["ct"]
    train_key, _, loss_key = dropout_keys(rng)
    fake, gen_pullback = jax.vjp(generator_fn(gen_state, mr, train_key), gen_state.params)
    disc_state, d_loss, d_metrics = update_discriminator(config, state["disc"], mr, ct, fake)
    w = config.loss

    def gen_loss_fn(fake_ct):
        adv = adversarial_term(config, disc_state, mr, fake_ct)
        l1 = reconstruction_l1(config, fake_ct, ct, batch)
        perc = perceptual_term(config, state, fake_ct, ct)
        total = w.adv_weight * adv + w.l1_weight * l1 + w.perceptual_weight * perc
        terms = {"g_adv": adv, "g_l1": l1, "g_perceptual": perc}
        if extra_terms is not None:
            extra, extra_metrics = extra_terms(fake_ct, loss_key)
            total = total + extra
            terms.update(extra_metrics)
        return total, terms

    (g_loss, terms), dloss_dfake = jax.value_and_grad(gen_loss_fn, has_aux=True)(fake)
    (g_grads,) = gen_pullback(dloss_dfake)
    gen_state, g_metrics = apply_updates(gen_state, g_grads, "gen")
    new_state = {**state, "gen": gen_state, "disc": disc_state}
    metrics = {"loss": g_loss, "d_loss": d_loss, **terms,
               "mae_hu": terms["g_l1"] * HU_PER_UNIT, **d_metrics, **g_metrics}
    return new_state, metrics


def input_rule(config) -> tuple[int, int]:
    """``(stride, min_size)`` of the ResNet generator's input (multiples of 4, >= 8)."""
    del config
    stride = 2 ** N_DOWNSAMPLINGS
    return stride, 2 * stride


def check_sampling(config) -> None:
    """Raises ``ConfigError`` unless the generator has dropout to sample with (see
    :func:`~sct_jax.models.resnet_generator.check_dropout_sampling`)."""
    check_dropout_sampling(float(config.model.gen.dropout), int(config.model.gen.n_blocks))


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``(B, H, W, 2c+1)`` MR in [-1, 1] -> ``(B, H, W, 1)`` sCT in [-1, 1].

    Args:
      config: the config (unused: the rate is the generator's ``config.model.gen.dropout``).
      state: ``{"gen": TrainState, ...}``.
      mr: ``(B, H, W, 2c+1)`` normalised MR slices.
      rng: ``None``: dropout off, the deterministic sCT. A key (raw ``uint32[2]`` or
        typed): one Monte-Carlo dropout sample, dropout on at the trained rate. Nothing
        else changes: ``train`` switches only dropout in the ResNet generator (instance
        norm has no running statistics, batch norm uses the batch's in both modes).
    """
    del config
    gen_state = state["gen"]
    if rng is None:
        return gen_state.apply_fn({"params": gen_state.params}, mr, train=False)
    return gen_state.apply_fn({"params": gen_state.params}, mr, train=True,
                              rngs={"dropout": rng})
