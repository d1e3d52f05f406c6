"""CycleGAN (Zhu et al. 2017) for unpaired MR <-> CT translation on 2D slices.

Two ResNet generators (``g_mr2ct``: MR -> CT, the reference's ``G_A``; ``g_ct2mr``: CT ->
MR, ``G_B``), two unconditional 70 x 70 PatchGANs with instance norm (``d_ct`` scores CT
images, the reference's ``D_A``; ``d_mr`` scores MR images, ``D_B``), LSGAN objectives,
and two image pools of past fakes (ref: junyanz/pytorch-CycleGAN-and-pix2pix,
``cycle_gan_model.py`` and ``util/image_pool.py``)::

  G = GAN(D_ct(G_mr2ct(mr))) + GAN(D_mr(G_ct2mr(ct)))
      + lambda_mr |G_ct2mr(G_mr2ct(mr)) - mr| + lambda_ct |G_mr2ct(G_ct2mr(ct)) - ct|
      + lambda_idt (lambda_ct |G_mr2ct(ct) - ct| + lambda_mr |G_ct2mr(mr) - mr|)
  D_ct = 0.5 (GAN(D_ct(ct), real) + GAN(D_ct(pool_ct(fake_ct)), fake)), D_mr likewise

with ``lambda_mr = lambda_ct = 10``, ``lambda_idt = 0.5`` and L1 as a mean.

Update order follows the reference's ``optimize_parameters``: both generators first, in
one update (one gradient over both parameter sets, the Ds held fixed), then both Ds on
the *pooled* fakes of this step's forward pass (made by the generators before their
update, as in the reference, whose ``fake_B`` is computed once in ``forward()``). This is
the opposite of pix2pix's D-then-G order here; it matters only for what D sees.

Training batches come from the unpaired sampler (``config.data.mode =
'unpaired_slices'``): ``mr``, ``mr_mask`` from one case and ``ct``, ``ct_mask`` from
another, each ``(B, H, W, 1)`` in [-1, 1]; the masks are unused (the reference has none).
Evaluation is the paired SynthRAD one, through :func:`predict` (``G_mr2ct``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from sct_jax.data.preprocess import HU_PER_UNIT
from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial, pixel
from sct_jax.methods import Method
from sct_jax.methods.common import (TrainState, apply_updates, dummy_input, step_rng,
                                    validate_resnet_gan_config)
from sct_jax.models.layers import precision_kwargs
from sct_jax.models.patchgan import PatchDiscriminator
from sct_jax.models.resnet_generator import (N_DOWNSAMPLINGS, ResnetGenerator,
                                              check_dropout_sampling)
from sct_jax import optim

GENERATORS = ("g_mr2ct", "g_ct2mr")
DISCRIMINATORS = ("d_ct", "d_mr")


# ------------------------------------------------------------------------- image pool

@struct.dataclass
class ImagePool:
    """A buffer of past generated images (Shrivastava et al. 2017), as a pytree.

    It lives in the train state, so it is sharded, donated and checkpointed with the
    networks, and updated inside the jitted step.

    Attributes:
      images: ``(pool_size, H, W, C)``; rows ``>= count`` are unused (zeros).
      count: ``()`` int32, how many rows are filled (grows to ``pool_size``, then stays).
    """

    images: jax.Array
    count: jax.Array

    @property
    def size(self) -> int:
        return self.images.shape[0]


def init_pool(pool_size: int, image_shape: tuple[int, ...], dtype=jnp.float32) -> ImagePool:
    """An empty pool of ``pool_size`` images shaped ``image_shape`` (``(H, W, C)``)."""
    return ImagePool(images=jnp.zeros((int(pool_size),) + tuple(image_shape), dtype),
                     count=jnp.zeros((), jnp.int32))


def pool_decisions(rng: jax.Array, batch_size: int, pool_size: int
                   ) -> tuple[jax.Array, jax.Array]:
    """The reference's random draws for one query, one per batch element.

    Args:
      rng: a key.
      batch_size: images in the query.
      pool_size: the pool's capacity (``> 0``).

    Returns:
      ``swap (B,) bool``: ``uniform(0, 1) > 0.5``, i.e. return a stored image (used only
      once the pool is full); ``slot (B,) int32`` uniform in ``[0, pool_size)``: which one.
      Both are drawn flat (1D), which this CPU's XLA compiles quickly.
    """
    swap_key, slot_key = jax.random.split(rng)
    swap = jax.random.uniform(swap_key, (batch_size,)) > 0.5
    slot = jax.random.randint(slot_key, (batch_size,), 0, max(int(pool_size), 1), jnp.int32)
    return swap, slot


def query_pool_with(pool: ImagePool, images: jax.Array, swap: jax.Array, slot: jax.Array
                    ) -> tuple[ImagePool, jax.Array]:
    """``ImagePool.query`` of the reference with given random decisions.

    Per image, in batch order (a later image sees the pool as left by the earlier ones,
    exactly as the reference's Python loop): while the pool is not full, store the image
    in the next free row and return it; once full, if ``swap`` return the stored image at
    ``slot`` and put the new one in its place, else return the new image.

    Args:
      pool: the pool.
      images: ``(B, H, W, C)`` new images (the caller stops their gradient).
      swap: ``(B,)`` bool, see :func:`pool_decisions`.
      slot: ``(B,)`` int32 in ``[0, pool.size)``.

    Returns:
      ``(new_pool, returned)`` with ``returned`` shaped like ``images``. A zero-size pool
      returns ``images`` and itself unchanged (the reference's ``pool_size=0``).
    """
    if pool.size == 0:
        return pool, images

    def one(carry, inputs):
        buffer, count = carry
        image, swap_i, slot_i = inputs
        not_full = count < pool.size
        row = jnp.where(not_full, count, slot_i)
        stored = jax.lax.dynamic_index_in_dim(buffer, row, axis=0, keepdims=False)
        # Filling: write the image, return it. Full and swap: return the stored image,
        # write the new one over it. Full, no swap: return the image, write nothing
        # (writing the stored image back to its row is a no-op).
        returned = jnp.where(not_full | ~swap_i, image, stored)
        written = jnp.where(not_full | swap_i, image, stored)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, written.astype(buffer.dtype),
                                                     row, axis=0)
        return (buffer, count + not_full.astype(count.dtype)), returned

    # A scan over the (small) batch: the sequential semantics, with no Python control
    # flow on traced values.
    (buffer, count), returned = jax.lax.scan(one, (pool.images, pool.count),
                                             (images, swap, slot))
    return ImagePool(images=buffer, count=count), returned


def query_pool(pool: ImagePool, images: jax.Array, rng: jax.Array
               ) -> tuple[ImagePool, jax.Array]:
    """:func:`query_pool_with` on fresh draws from ``rng`` (see :func:`pool_decisions`)."""
    if pool.size == 0:
        return pool, images
    swap, slot = pool_decisions(rng, images.shape[0], pool.size)
    return query_pool_with(pool, images, swap, slot)


# ----------------------------------------------------------------- models and config

def build_generator(config, out_channels: int) -> ResnetGenerator:
    g = config.model.gen
    return ResnetGenerator(out_channels=out_channels, ngf=g.ngf, n_blocks=g.n_blocks,
                           norm=g.norm, dropout_rate=g.dropout,
                           conv_impl=config.model.conv_impl,
                           residual=bool(g.get("residual", False)),
                           upsample=g.get("upsample", "transpose"),
                           calibration_bins=int(g.get("calibration_bins", 0)),
                           **precision_kwargs(config))


def build_discriminator(config) -> PatchDiscriminator:
    d = config.model.disc
    return PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm,
                              conv_impl=config.model.conv_impl,
                              dtype=precision_kwargs(config)["dtype"])


def validate_config(config) -> None:
    """Start-up checks; raises :class:`ConfigError` naming the config key."""
    if config.data.mode != "unpaired_slices":
        raise ConfigError(f"config.data.mode={config.data.mode!r}: cyclegan trains on "
                          "'unpaired_slices' (MR and CT from different cases)")
    if int(config.data.context) != 0:
        # Cycle and identity losses compare an MR with a generated MR of 1 channel.
        raise ConfigError(f"config.data.context={config.data.context}: cyclegan needs 0 "
                          "(single-slice MR, the same channel count as the CT)")
    validate_resnet_gan_config(config, ("cycle_mr_weight", "cycle_ct_weight", "identity_weight"))
    pool = config.model.pool_size
    if int(pool) != pool or pool < 0:
        raise ConfigError(f"config.model.pool_size={pool}: must be an integer >= 0")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict:
    """``{"g_mr2ct", "g_ct2mr", "d_ct", "d_mr": TrainState, "pool_ct", "pool_mr": ImagePool}``.

    Args:
      config: the experiment config.
      rng: initialisation key.
      batch_spec: shapes of a training batch: ``mr``, ``ct`` ``(B, H, W, 1)``.
    """
    mr = dummy_input(batch_spec["mr"])
    ct = dummy_input(batch_spec["ct"])
    keys = jax.random.split(rng, 5)
    steps = config.train.steps
    g_mr2ct = build_generator(config, out_channels=ct.shape[-1])
    g_ct2mr = build_generator(config, out_channels=mr.shape[-1])
    disc = build_discriminator(config)

    def gen_state(module, x, key):
        params = module.init({"params": key, "dropout": keys[4]}, x, train=False)["params"]
        return TrainState.create(apply_fn=module.apply, params=params,
                                 tx=optim.adam(config.optim, steps))

    def disc_state(x, key):
        return TrainState.create(apply_fn=disc.apply, params=disc.init(key, x)["params"],
                                 tx=optim.adam(config.optim, steps))

    pool_size = int(config.model.pool_size)
    return {
        "g_mr2ct": gen_state(g_mr2ct, mr, keys[0]),
        "g_ct2mr": gen_state(g_ct2mr, ct, keys[1]),
        "d_ct": disc_state(ct, keys[2]),
        "d_mr": disc_state(mr, keys[3]),
        "pool_ct": init_pool(pool_size, ct.shape[1:], ct.dtype),
        "pool_mr": init_pool(pool_size, mr.shape[1:], mr.dtype),
    }


# ------------------------------------------------------------------------------ step

def _generator_loss(config, state: dict, params: dict, mr: jax.Array, ct: jax.Array,
                    rng: jax.Array):
    """The reference's ``backward_G``: total loss, the two fakes, the loss terms."""
    loss = config.loss
    lam_mr, lam_ct, lam_idt = loss.cycle_mr_weight, loss.cycle_ct_weight, loss.identity_weight
    keys = jax.random.split(rng, 4)

    def g_mr2ct(x, key):
        return state["g_mr2ct"].apply_fn({"params": params["g_mr2ct"]}, x, train=True,
                                         rngs={"dropout": key})

    def g_ct2mr(x, key):
        return state["g_ct2mr"].apply_fn({"params": params["g_ct2mr"]}, x, train=True,
                                         rngs={"dropout": key})

    n = mr.shape[0]
    if lam_idt > 0:
        # Identity inputs batched with the translation inputs: one larger call per
        # generator instead of two (instance norm is per sample, so it is the same).
        out = g_mr2ct(jnp.concatenate([mr, ct]), keys[0])
        fake_ct, idt_ct = out[:n], out[n:]
        out = g_ct2mr(jnp.concatenate([ct, mr]), keys[1])
        fake_mr, idt_mr = out[:n], out[n:]
    else:
        fake_ct, fake_mr = g_mr2ct(mr, keys[0]), g_ct2mr(ct, keys[1])
    rec_mr = g_ct2mr(fake_ct, keys[2])
    rec_ct = g_mr2ct(fake_mr, keys[3])

    def d_logits(name, x):
        return state[name].apply_fn({"params": state[name].params}, x)

    terms = {
        "g_adv_ct": adversarial.generator_loss(d_logits("d_ct", fake_ct), loss.gan),
        "g_adv_mr": adversarial.generator_loss(d_logits("d_mr", fake_mr), loss.gan),
        "cycle_mr": pixel.l1(rec_mr, mr),
        "cycle_ct": pixel.l1(rec_ct, ct),
    }
    total = (terms["g_adv_ct"] + terms["g_adv_mr"]
             + lam_mr * terms["cycle_mr"] + lam_ct * terms["cycle_ct"])
    if lam_idt > 0:
        terms["idt_ct"] = pixel.l1(idt_ct, ct)
        terms["idt_mr"] = pixel.l1(idt_mr, mr)
        # As the reference: each identity term is scaled by its domain's cycle weight.
        total = total + lam_idt * (lam_ct * terms["idt_ct"] + lam_mr * terms["idt_mr"])
    return total, (fake_ct, fake_mr, terms)


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One generator update (both Gs) then one discriminator update (both Ds).

    Args:
      config: the experiment config (bound by the loop).
      state: see :func:`create_state`.
      batch: ``mr (B, H, W, 1)`` and ``ct (B, H, W, 1)`` from different cases, in [-1, 1].
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state (networks and pools) and scalar metrics.
    """
    rng = step_rng(rng, state["g_mr2ct"])
    gen_rng, pool_ct_rng, pool_mr_rng = jax.random.split(rng, 3)
    mr, ct = batch["mr"], batch["ct"]

    gen_params = {name: state[name].params for name in GENERATORS}
    (g_loss, (fake_ct, fake_mr, terms)), g_grads = jax.value_and_grad(
        lambda p: _generator_loss(config, state, p, mr, ct, gen_rng), has_aux=True)(gen_params)
    new_state = dict(state)
    metrics = {"loss": g_loss, **terms}
    for name in GENERATORS:
        new_state[name], norms = apply_updates(state[name], g_grads[name], name)
        metrics.update(norms)

    # D sees fakes from the pools (the reference's fake_B_pool / fake_A_pool).
    pool_ct, pooled_ct = query_pool(state["pool_ct"], jax.lax.stop_gradient(fake_ct),
                                    pool_ct_rng)
    pool_mr, pooled_mr = query_pool(state["pool_mr"], jax.lax.stop_gradient(fake_mr),
                                    pool_mr_rng)
    new_state["pool_ct"], new_state["pool_mr"] = pool_ct, pool_mr

    def disc_loss(params):
        def one(name, real, fake):
            apply = state[name].apply_fn
            return adversarial.discriminator_loss(apply({"params": params[name]}, real),
                                                  apply({"params": params[name]}, fake),
                                                  config.loss.gan)
        losses = {"d_ct_loss": one("d_ct", ct, pooled_ct),
                  "d_mr_loss": one("d_mr", mr, pooled_mr)}
        # The two Ds share no parameters: the gradient of the sum is each D's own.
        return losses["d_ct_loss"] + losses["d_mr_loss"], losses

    disc_params = {name: state[name].params for name in DISCRIMINATORS}
    (d_loss, d_terms), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(disc_params)
    for name in DISCRIMINATORS:
        new_state[name], norms = apply_updates(state[name], d_grads[name], name)
        metrics.update(norms)

    metrics.update(d_terms)
    metrics["d_loss"] = d_loss
    metrics["cycle_ct_mae_hu"] = terms["cycle_ct"] * HU_PER_UNIT
    metrics["pool_ct_count"] = pool_ct.count.astype(jnp.float32)
    return new_state, metrics


# ------------------------------------------------------------------------- inference

def check_sampling(config) -> None:
    """Raises ``ConfigError`` unless ``G_mr2ct`` has dropout to sample with (the
    reference's default ``--no_dropout`` has none)."""
    check_dropout_sampling(float(config.model.gen.dropout), int(config.model.gen.n_blocks))


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``(B, H, W, 1)`` MR in [-1, 1] -> ``(B, H, W, 1)`` sCT in [-1, 1] (``G_mr2ct``).

    Args:
      config: the config (unused).
      state: the CycleGAN state.
      mr: ``(B, H, W, 1)`` normalised MR slices.
      rng: ``None``: dropout off, the deterministic sCT. A key: one Monte-Carlo dropout
        sample (only generators trained with ``config.model.gen.dropout > 0`` have any;
        ``train`` switches nothing else, see :mod:`sct_jax.models.resnet_generator`).
    """
    del config
    gen = state["g_mr2ct"]
    if rng is None:
        return gen.apply_fn({"params": gen.params}, mr, train=False)
    return gen.apply_fn({"params": gen.params}, mr, train=True, rngs={"dropout": rng})


def predict_ct_to_mr(config, state: dict, ct: jax.Array) -> jax.Array:
    """``(B, H, W, 1)`` CT in [-1, 1] -> ``(B, H, W, 1)`` synthetic MR (``G_ct2mr``).

    For cycle-consistency checks: ``predict_ct_to_mr(predict(mr))`` should return ``mr``.
    """
    del config
    gen = state["g_ct2mr"]
    return gen.apply_fn({"params": gen.params}, ct, train=False)


def input_rule(config) -> tuple[int, int]:
    """``(stride, min_size)`` of the ResNet generators' input (multiples of 4, >= 8)."""
    del config
    stride = 2 ** N_DOWNSAMPLINGS
    return stride, 2 * stride


METHOD = Method(
    name="cyclegan", create_state=create_state, train_step=train_step, predict=predict,
    samples=True, check_sampling=check_sampling, validate_config=validate_config,
    input_rule=input_rule, inverse=predict_ct_to_mr)
