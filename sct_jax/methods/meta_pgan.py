"""meta-pGAN (seed 02): pGAN whose L1 term is spatially reweighted by learning-to-reweight.

Each step scores every pixel of the training batch by how much a virtual SGD step on
that pixel's L1 would lower the plain L1 on a *meta-validation* batch drawn from the
best-registered cases (top 11% by MR/CT mutual information), keeps the positive scores
and normalises them over the mini-batch (Ren et al. 2018, per pixel; see
:mod:`sct_jax.meta.reweight`). G then minimises

    adv + l1_weight * sum(w * |fake - ct|) + perceptual_weight * perceptual

in place of pGAN's ``adv + 100 mean|fake - ct| + 100 perceptual``: misaligned pixels,
whose L1 gradient disagrees with the well-registered cases, get little or no weight.

``config.meta.method`` picks ``"jvp"`` (one forward-mode pass, the default) or
``"lookahead"`` (the literal nested gradient); they give the same weights. The train
forward pass is shared between the weights and the real update (the reweighting's
pullback), and the fake image for D and the adversarial/perceptual terms is that
forward's output. The generator's dropout
uses one key for every evaluation of the train loss map in a step (weights and update
must see the same mask) and another for the validation batch; ``config.meta.alpha`` is
the virtual step size (it only scales the raw scores).

Batch (data mode ``slices_with_meta``): ``mr``, ``ct``, ``mask`` as pGAN plus ``val_mr``
``(V, H, W, 2c+1)``, ``val_ct``, ``val_mask`` ``(V, H, W, 1)`` with
``V = config.meta.val_batch_size`` (32 in seed 02).

Weight maps cannot go through the scalar metrics: the step reports their statistics
(``meta/weight_mean``, ``meta/weight_max``, ``meta/weight_zero_fraction``, and
``meta/weight_max_over_uniform`` = max * number of pixels, 1 for uniform weights) and
those of the raw scores ``u``. The maps themselves are images:
:func:`image_summaries` (weights, L1 error, MR and CT of the first training slice),
written by the loop every ``config.train.image_every`` steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.losses import pixel
from sct_jax.meta import reweight
from sct_jax.methods import _pgan_common as common
from sct_jax.methods.common import TrainState, apply_updates, step_rng
from sct_jax.training import sharding

predict = common.predict
check_sampling = common.check_sampling


def validate_config(config) -> None:
    common.validate_pgan_config(config, modes=("slices_with_meta",))
    reweight.check_method(config.meta.method, "config.meta.method")
    n_data = sharding.batch_shards(sharding.make_mesh(dict(config.mesh)))
    if config.meta.val_batch_size <= 0 or config.meta.val_batch_size % n_data:
        raise ConfigError(f"config.meta.val_batch_size={config.meta.val_batch_size} must be "
                          f"positive and divisible by the {n_data} devices of the mesh's "
                          "data x fsdp axes")
    if not 0.0 < float(config.meta.val_fraction) <= 1.0:
        raise ConfigError(f"config.meta.val_fraction={config.meta.val_fraction}: must be "
                          "in (0, 1]")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """pGAN's ``{"gen", "disc"[, "vgg16"]}`` (the validation entries are data only)."""
    return common.create_gan_state(config, rng, batch_spec)


def weight_statistics(weights: jax.Array) -> dict[str, jax.Array]:
    """Scalar summaries of a ``(B, H, W, 1)`` weight map, for the metrics log."""
    return {"meta/weight_mean": jnp.mean(weights),
            "meta/weight_max": jnp.max(weights),
            "meta/weight_max_over_uniform": jnp.max(weights) * weights.size,
            "meta/weight_zero_fraction": jnp.mean((weights == 0).astype(jnp.float32))}


def _reweight(config, gen_state, batch, rng):
    """Weights, L1 map, fake CT, the pullback and raw-score statistics of one step."""
    train_key, val_key, _ = common.dropout_keys(step_rng(rng, gen_state))
    generate = common.generator_fn(gen_state, batch["mr"], train_key)
    generate_val = common.generator_fn(gen_state, batch["val_mr"], val_key)

    def loss_map_fn(params):
        fake_ct = generate(params)
        return pixel.l1_map(fake_ct, batch["ct"]), fake_ct

    def val_loss_fn(params):
        return pixel.l1(generate_val(params), batch["val_ct"])

    weights, (loss_map, fake), pullback, u_stats = reweight.spatial_weights_and_pullback(
        loss_map_fn, val_loss_fn, gen_state.params, alpha=config.meta.alpha,
        method=config.meta.method, has_outputs=True)
    return weights, loss_map, fake, pullback, u_stats


def image_summaries(config, state: dict, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    """The first training slice's maps, as the step about to run computes them.

    Returns:
      ``(H, W)`` arrays: ``meta/weight_over_uniform`` (the weight times the number of
      pixels in the mini-batch: 1 everywhere for uniform weights, 0 where a pixel is
      dropped), ``meta/l1_error_hu`` (|G(mr) - ct| in HU), ``meta/mr`` (centre
      channel) and ``meta/ct``.
    """
    weights, loss_map, _, _, _ = _reweight(config, state["gen"], batch, rng)
    centre = batch["mr"].shape[-1] // 2
    return {"meta/weight_over_uniform": weights[0, ..., 0] * weights.size,
            "meta/l1_error_hu": loss_map[0, ..., 0] * common.HU_PER_UNIT,
            "meta/mr": batch["mr"][0, ..., centre], "meta/ct": batch["ct"][0, ..., 0]}


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """Meta weights, D update, then G on the reweighted objective.

    Args:
      config: the experiment config.
      state: ``{"gen", "disc"[, "vgg16"]}``.
      batch: ``mr``, ``ct``, ``mask``, ``val_mr``, ``val_ct``, ``val_mask``.
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics.
    """
    gen_state = state["gen"]
    mr, ct = batch["mr"], batch["ct"]
    weights, loss_map, fake, pullback, u_stats = _reweight(
        config, gen_state, batch, rng)
    # The fake of the shared forward; its gradient flows through the pullback below.
    fake = jax.lax.stop_gradient(fake)
    disc_state, d_loss, d_metrics = common.update_discriminator(config, state["disc"], mr,
                                                                ct, fake)
    w = config.loss

    def other_terms_fn(fake_ct):
        adv = common.adversarial_term(config, disc_state, mr, fake_ct)
        perc = common.perceptual_term(config, state, fake_ct, ct)
        return w.adv_weight * adv + w.perceptual_weight * perc, (adv, perc)

    (other, (adv, perc)), dother_dfake = jax.value_and_grad(other_terms_fn, has_aux=True)(fake)
    weighted_l1 = reweight.weighted_l1(weights, loss_map)
    # grad of l1_weight * sum(w * l) + other: one pullback through the shared forward.
    g_grads = pullback((w.l1_weight * weights.astype(loss_map.dtype), dother_dfake))
    gen_state, g_metrics = apply_updates(gen_state, g_grads, "gen")

    plain_l1 = jnp.mean(loss_map)
    metrics = {"loss": other + w.l1_weight * weighted_l1, "d_loss": d_loss, "g_adv": adv,
               "g_perceptual": perc, "g_l1": plain_l1, "g_l1_weighted": weighted_l1,
               "mae_hu": plain_l1 * common.HU_PER_UNIT, **weight_statistics(weights),
               **{f"meta/{k}": v for k, v in u_stats.items() if k != "weight_max"},
               **d_metrics, **g_metrics}
    return {**state, "gen": gen_state, "disc": disc_state}, metrics
