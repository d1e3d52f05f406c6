"""meta-pGAN (seed 02): pGAN whose L1 term is spatially reweighted by learning-to-reweight.

Each step scores every slice, patch or pixel of the training batch
(``config.meta.granularity``) by how much a virtual SGD step on its L1 would lower the
plain L1 on a *meta-validation* batch drawn from the best-registered cases (top 11% by
MR/CT mutual information), keeps the positive scores and normalises them over the
mini-batch (Ren et al. 2018; seed 02 weights pixels; see :mod:`sct_jax.meta.reweight`).
G then minimises

    adv + l1_weight * sum(w * |fake - ct|) + perceptual_weight * perceptual

in place of pGAN's ``adv + 100 mean|fake - ct| + 100 perceptual``: misaligned regions,
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

``config.meta.granularity`` chooses what one weight covers: ``"pixel"`` (seed 02's
literal form), ``"patch"`` (``config.meta.patch_size`` squared tiles) or ``"slice"``
(Ren et al.'s per-example form); all go through the same lookahead / jvp forms.

Diagnostics (``config.meta.diagnostics``, on by default; jvp form only, NaN with
``"lookahead"``) explain what the weighting does. Per pixel ``u_p = alpha sign(f_p -
y_p) D_p`` with ``D_p = <grad f_p, g_val>``, so ``meta/d_majority_sign_share`` (the
share of the batch's pixels where ``D`` has its majority sign: near 1 means per-pixel
weights act as a residual-sign filter), ``meta/d_output_layer_share`` (``|D_out|_1 /
(|D_out|_1 + |D - D_out|_1)``, ``D_out`` from the output conv's parameters alone; one
more tangent pass), and per tissue of the training CT (``air`` < -200 HU, ``bone`` >
250 HU, ``soft`` between, inside the body mask) ``meta/weight_share_<tissue>`` (its
share of the total weight; compare ``meta/pixel_share_<tissue>``, its share under
uniform weights) and ``meta/zero_fraction_<tissue>`` (its pixels with zero
weight). A bone weight share of 0 is the failure this is for.

Weight maps cannot go through the scalar metrics: the step reports their statistics
(``meta/weight_mean``, ``meta/weight_max``, ``meta/weight_zero_fraction``, and
``meta/weight_max_over_uniform`` = max * number of pixels, 1 for uniform weights) and
those of the raw scores ``u``. The maps themselves are images:
:func:`image_summaries` (weights, L1 error, MR and CT of the first training slice),
written by the loop every ``config.train.image_every`` steps.
"""

from __future__ import annotations

import logging

import grain
import jax
import jax.numpy as jnp

from sct_jax.data import alignment, pipeline, preprocess, prior as prior_lib
from sct_jax.config_utils import require
from sct_jax.errors import ConfigError
from sct_jax.losses import pixel
from sct_jax.meta import reweight
from sct_jax.methods import Method
from sct_jax.methods import _pgan_common as common
from sct_jax.methods.common import TrainState, apply_updates, refuse_body_mask, step_rng
from sct_jax import sharding

log = logging.getLogger(__name__)



def validate_config(config) -> None:
    require(config, "meta.method", "meta.granularity", "meta.patch_size", "meta.alpha",
            "meta.val_fraction", "meta.val_batch_size", "meta.val_exclusive",
            "meta.diagnostics")
    common.validate_pgan_config(config, modes=("slices_with_meta",))
    refuse_body_mask(config, "meta-pGAN's reweighted L1 weights every pixel itself")
    reweight.check_method(config.meta.method, "config.meta.method")
    n_data = sharding.batch_shards(sharding.make_mesh(dict(config.mesh)))
    if config.meta.val_batch_size <= 0 or config.meta.val_batch_size % n_data:
        raise ConfigError(f"config.meta.val_batch_size={config.meta.val_batch_size} must be "
                          f"positive and divisible by the {n_data} devices of the mesh's "
                          "data x fsdp axes")
    reweight.check_granularity(config.meta.granularity,
                               config.meta.patch_size,
                               tuple(config.data.crop), "meta")
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


# Tissue classes of the training CT for the diagnostics, as the SynthRAD metrics.
_AIR_BELOW_HU, _BONE_ABOVE_HU = -200.0, 250.0


def _output_layer_only(tree):
    """``tree`` with every leaf outside the generator's output conv set to zero."""
    return {name: (sub if name == "conv_out" else jax.tree_util.tree_map(jnp.zeros_like, sub))
            for name, sub in tree.items()}


def diagnostics(weights: jax.Array, ct: jax.Array, mask: jax.Array, d_map=None,
                d_out=None) -> dict[str, jax.Array]:
    """What the weights do to each tissue, and how one-signed ``D`` is.

    Args:
      weights: ``(B, H, W, 1)`` pixel weights summing to 1 (or all 0).
      ct: ``(B, H, W, 1)`` training CT in [-1, 1].
      mask: ``(B, H, W, 1)`` body mask (> 0 inside).
      d_map: ``(B, H, W, 1)`` ``D = <grad f, g_val>``, or None (NaN statistics).
      d_out: ``(B, H, W, 1)`` the output conv's part of ``D``, or None.

    Returns:
      Scalars ``meta/weight_share_{air,soft,bone}``, ``meta/pixel_share_{...}`` (the
      tissue's share of the batch's pixels: its weight share under uniform weights),
      ``meta/zero_fraction_{...}``
      (NaN for a tissue absent from the batch), ``meta/d_majority_sign_share`` and
      ``meta/d_output_layer_share``.
    """
    hu = preprocess.unit_to_ct(ct)
    body = mask > 0
    tissues = {"air": body & (hu < _AIR_BELOW_HU), "bone": body & (hu > _BONE_ABOVE_HU)}
    tissues["soft"] = body & ~tissues["air"] & ~tissues["bone"]
    total = jnp.sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = {}
    for name, sel in tissues.items():
        n = jnp.sum(sel)
        out[f"meta/pixel_share_{name}"] = n / weights.size  # its share under uniform weights
        out[f"meta/weight_share_{name}"] = jnp.sum(jnp.where(sel, weights, 0)) / safe_total
        out[f"meta/zero_fraction_{name}"] = jnp.where(
            n > 0, jnp.sum(sel & (weights == 0)) / jnp.maximum(n, 1), jnp.nan)
    nan = jnp.full((), jnp.nan, jnp.float32)
    if d_map is None:
        out["meta/d_majority_sign_share"] = nan
    else:
        pos = jnp.mean((d_map > 0).astype(jnp.float32))
        neg = jnp.mean((d_map < 0).astype(jnp.float32))
        out["meta/d_majority_sign_share"] = jnp.maximum(pos, neg)
    if d_map is None or d_out is None:
        out["meta/d_output_layer_share"] = nan
    else:
        a, b = jnp.sum(jnp.abs(d_out)), jnp.sum(jnp.abs(d_map - d_out))
        out["meta/d_output_layer_share"] = a / jnp.maximum(a + b, 1e-30)
    return out


def _reweight(config, gen_state, batch, rng):
    """Weights, L1 map, fake CT, the pullback, score statistics and diagnostics."""
    train_key, val_key, _ = common.dropout_keys(step_rng(rng, gen_state))
    generate = common.generator_fn(gen_state, batch["mr"], train_key)
    generate_val = common.generator_fn(gen_state, batch["val_mr"], val_key)

    def loss_map_fn(params):
        fake_ct = generate(params)
        return pixel.l1_map(fake_ct, batch["ct"]), fake_ct

    def val_loss_fn(params):
        return pixel.l1(generate_val(params), batch["val_ct"])

    r = reweight.reweight(
        loss_map_fn, val_loss_fn, gen_state.params, alpha=config.meta.alpha,
        method=config.meta.method, has_outputs=True,
        granularity=config.meta.granularity,
        patch_size=config.meta.patch_size)
    weights, (loss_map, fake) = r.weights, r.result
    diag = {}
    if config.meta.diagnostics:
        d_map = d_out = None
        if r.output_tangent is not None:  # jvp form: D is the fake's tangent
            d_map = jax.lax.stop_gradient(r.output_tangent[1])
            d_out = jax.lax.stop_gradient(r.tangent_of(_output_layer_only)[1])
        diag = diagnostics(weights, batch["ct"], batch["mask"], d_map, d_out)
    return weights, loss_map, fake, r.pullback, {**r.stats, **diag}


def image_summaries(config, state: dict, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    """The first training slice's maps, as the step about to run computes them.

    Returns:
      ``(H, W)`` arrays: ``meta/weight_over_uniform`` (the weight times the number of
      pixels in the mini-batch: 1 everywhere for uniform weights, 0 where a pixel is
      dropped), ``meta/l1_error_hu`` (|G(mr) - ct| in HU), ``meta/mr`` (centre
      channel) and ``meta/ct``.
    """
    weights, loss_map, _, _, _ = _reweight(config, state["gen"], batch, rng)
    centre = (batch["mr"].shape[-1] - prior_lib.extra_channels(config)) // 2
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
               **{k if k.startswith("meta/") else f"meta/{k}": v
                  for k, v in u_stats.items() if k != "weight_max"},
               **d_metrics, **g_metrics}
    return {**state, "gen": gen_state, "disc": disc_state}, metrics


# ------------------------------------------------------------- its training data

def meta_validation_ids(config, prepared: list[pipeline.PreparedCase]) -> list[str]:
    """The best-registered training cases: top ``config.meta.val_fraction`` by MR/CT MI.

    Mutual information inside the body mask (:mod:`sct_jax.data.alignment`), computed
    once per dataset build from the prepared (normalised) arrays; at least one case.
    """
    mi = {case.id: alignment.mutual_information(case.mr, case.ct, case.mask)
          for case in prepared}
    return alignment.select_meta_validation(mi, float(config.meta.val_fraction))


def train_dataset(config, prepared: list[pipeline.PreparedCase], local_batch_size: int,
                       shard_index: int, shard_count: int):
    """Training slices zipped with meta-validation slices (data mode ``slices_with_meta``).

    The meta-validation cases are the top ``config.meta.val_fraction`` (seed 02: 11%) of
    the *training* cases by mutual information. With ``config.meta.val_exclusive`` they
    are taken out of the training slices (seed 02 "allocates" them to validation), unless
    that would leave none.

    Returns:
      An ``IterDataset`` of dicts: ``mr (B, H, W, 2c+1)``, ``ct``, ``mask`` ``(B, H, W, 1)``
      as mode ``slices``, plus ``val_mr``, ``val_ct``, ``val_mask`` with
      ``config.meta.val_batch_size / process_count`` shuffled, flipped validation slices.
    """
    val_ids = set(meta_validation_ids(config, prepared))
    val_cases = [c for c in prepared if c.id in val_ids]
    train_cases = [c for c in prepared if c.id not in val_ids]
    if not (config.meta.val_exclusive and train_cases):
        train_cases = list(prepared)
    log.info("meta-validation cases (top %g by MI): %s; %d training "
             "cases", config.meta.val_fraction, sorted(val_ids), len(train_cases))
    val_batch = int(config.meta.val_batch_size)
    if val_batch <= 0 or val_batch % shard_count:
        raise ConfigError(f"config.meta.val_batch_size={val_batch} must be positive and "
                          f"divisible by the {shard_count} processes")
    kwargs = dict(crop=tuple(config.data.crop), seed=config.seed, context=config.data.context,
                  train=True, shard_index=shard_index, shard_count=shard_count)
    train_ds = pipeline.slice_dataset(train_cases, batch_size=local_batch_size, **kwargs)
    # Its own shuffle seed: the two streams must not draw the same permutation.
    kwargs["seed"] = config.seed + 1_000_003
    val_ds = pipeline.slice_dataset(val_cases, batch_size=val_batch // shard_count, **kwargs)

    def merge(pair):
        train, val = pair
        return {**train, **{f"val_{k}": v for k, v in val.items()}}

    return grain.experimental.ZipIterDataset([train_ds, val_ds]).map(merge)


METHOD = Method(
    name="meta_pgan", create_state=create_state, train_step=train_step,
    predict=common.predict, samples=True, check_sampling=common.check_sampling,
    validate_config=validate_config, input_rule=common.input_rule, load_pretrained=common.load_vgg_weights,
    train_dataset=train_dataset, image_summaries=image_summaries, takes_prior=True)
