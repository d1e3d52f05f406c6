"""LDM stage 2: the diffusion UNet on standardised latents of CT, autoencoder frozen.

  python train.py --config configs/ldm_brain.py:diffusion,small --workdir runs/ldm_brain_diffusion_small
  python evaluate.py --config configs/ldm_brain.py:diffusion,small \
      --workdir runs/ldm_brain_diffusion_small --samples 4        # conditioning "concat"

(``config.ldm.autoencoder_workdir`` names the stage-1 run.) Each step crops the CT (and
MR) to ``config.ldm.train_crop`` when it is set, encodes the CT with the frozen
autoencoder (posterior mean, or a draw with ``config.ldm.sample_latents``), standardises
it, noises it at ``t ~ U{0..T-1}`` and regresses the target of
``config.ldm.prediction_type`` (``v_prediction`` by default) with an MSE.

Conditioning (``config.ldm.conditioning``):

- ``"concat"``: the UNet sees the MR on the latent grid concatenated to the noisy latent
  (:class:`~sct_jax.models.diffusion_unet.MRConditionedUNet`, ``config.ldm.mr_encoding``
  space-to-depth, pooled or a jointly trained encoder); this stage is then the sCT
  model and :func:`predict` samples an sCT for the MR;
- ``"none"``: unconditional (the ControlNet stage adds the MR); :func:`predict` draws an
  unconditional CT of the MR's shape.

Latent standardisation: ``z_std = (z - shift) * scale`` per latent channel, with
``shift`` the mean and ``scale`` ``1 / std`` over the training data (Rombach et al.
scale by ``1 / std``; the shift matters when the latents are far from zero-mean). The
training step estimates them itself: the first ``config.ldm.scale_batches`` steps only
encode their batch and merge its moments into a running (Chan/Welford) estimate kept in
the state; from then on they are frozen and the UNet trains. Both phases are branches
of one ``lax.cond`` on the step, so the run compiles ONE program and the UNet only ever
sees latents under the final statistics, which the checkpoint stores and every sampler
applies in reverse before decoding. A resumed run restores them with the checkpoint.

State: ``{"unet": TrainState, "ae": frozen autoencoder params, "latent_shift": (C,),
"latent_scale": (C,), "latent_stats": {"count", "mean", "m2"}}`` (plain arrays:
checkpointed, never updated by an optimizer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.methods import Method, Upstream
from sct_jax.methods import _ldm_common as common
from sct_jax.methods.common import TrainState, apply_updates, dummy_input, step_rng
from sct_jax import optim


def validate_config(config) -> None:
    common.validate_ldm_config(config, "diffusion")
    if int(config.ldm.scale_batches) < 1:
        raise ConfigError(f"config.ldm.scale_batches={config.ldm.scale_batches}: the scale "
                          "factor needs at least one batch")
    if int(config.ldm.scale_batches) >= int(config.train.steps):
        raise ConfigError(f"config.ldm.scale_batches={config.ldm.scale_batches} leaves no "
                          f"UNet step in config.train.steps={config.train.steps}")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict:
    """UNet parameters, a place for the frozen autoencoder, the latent statistics.

    The autoencoder's parameters are zeros of the right shapes here; ``load_pretrained``
    copies those of the stage-1 run into a new state (a resumed or restored state holds
    them already).
    """
    unet = common.build_unet(config)
    z = jnp.zeros(common.latent_shape(config, (1, *batch_spec["ct"].shape[1:])), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if common.is_concat(config):
        params = unet.init(rng, z, t, dummy_input(batch_spec["mr"]))["params"]
    else:
        params = unet.init(rng, z, t)["params"]
    channels = int(config.model.ae.latent_channels)
    return {
        "unet": TrainState.create(apply_fn=unet.apply, params=params,
                                  tx=optim.adam(config.optim, config.train.steps)),
        "ae": common.autoencoder_placeholder(config, batch_spec["ct"]),
        "latent_shift": jnp.zeros((channels,), jnp.float32),
        "latent_scale": jnp.ones((channels,), jnp.float32),
        "latent_stats": common.init_moments(channels),
    }


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """A statistics-estimation step (the first ``scale_batches``) or a UNet update.

    Args:
      config: the experiment config (bound by the loop).
      state: see the module docstring.
      batch: ``ct`` (and ``mr`` for ``"concat"``) ``(B, D, H, W, 1)`` in [-1, 1].
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics (zeros for the UNet's during estimation).
    """
    unet_state = state["unet"]
    rng = step_rng(rng, unet_state)
    crop_rng, encode_rng, loss_rng = jax.random.split(rng, 3)
    ct, mr = common.random_crop(config, batch, crop_rng)
    z = common.encode_ct(config, state["ae"], ct, encode_rng)
    schedule = common.make_config_schedule(config)
    concat = common.is_concat(config)

    def train_unet(operand):
        unet_state, stats, shift, scale = operand

        def loss_fn(params):
            def model(x_t, t):
                if concat:
                    return unet_state.apply_fn({"params": params}, x_t, t, mr)
                return unet_state.apply_fn({"params": params}, x_t, t)
            return common.diffusion_mse(config, schedule, common.standardise(z, shift, scale),
                                        loss_rng, model)

        loss, grads = jax.value_and_grad(loss_fn)(unet_state.params)
        unet_state, metrics = apply_updates(unet_state, grads, "unet")
        return unet_state, stats, shift, scale, {"loss": loss, **metrics}

    def estimate_statistics(operand):
        unet_state, stats, _, _ = operand
        stats = common.merge_moments(stats, z)
        shift, scale = common.shift_and_scale(stats)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(train_unet, operand)[4])
        # The step still counts (it keys the rng and decides the phase); params do not move.
        return unet_state.replace(step=unet_state.step + 1), stats, shift, scale, zeros

    estimating = unet_state.step < int(config.ldm.scale_batches)
    unet_state, stats, shift, scale, metrics = jax.lax.cond(
        estimating, estimate_statistics, train_unet,
        (unet_state, state["latent_stats"], state["latent_shift"], state["latent_scale"]))
    metrics = {**metrics, "latent_scale_mean": jnp.mean(scale),
               "latent_shift_mean": jnp.mean(shift),
               "estimating_statistics": estimating.astype(jnp.float32),
               "latent_std": jnp.std(z)}
    return {**state, "unet": unet_state, "latent_stats": stats, "latent_shift": shift,
            "latent_scale": scale}, metrics


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """An sCT sample for ``mr`` (``"concat"``) or an unconditional CT of its shape.

    The unconditional draw (conditioning ``"none"``: the MR is not used) is a baseline for
    the ControlNet stage and a check of the UNet and the latent statistics.

    Args:
      config: the config (``ldm.sample_steps``, ``ldm.sampler``, ``ldm.eta``).
      state: the stage's state.
      mr: ``(B, D, H, W, 1)`` in [-1, 1], each size divisible by the autoencoder factor
        times the UNet stride.
      rng: sampling key (default: fixed from ``config.seed``).

    Returns:
      ``(B, D, H, W, 1)`` in [-1, 1].
    """
    rng = common.default_rng(config, rng)
    params = state["unet"].params
    shift, scale = state["latent_shift"], state["latent_scale"]
    if common.is_concat(config):
        return common.concat_sample(config, state["ae"], params, shift, scale, mr, rng)
    unet = common.build_unet(config)
    z = common.sample_latents(config, lambda x, t: unet.apply({"params": params}, x, t),
                              common.latent_shape(config, mr.shape), rng)
    return common.decode_latent(config, state["ae"], common.unstandardise(z, shift, scale))


def upstream(config) -> dict[str, Upstream]:
    del config
    return {"autoencoder": Upstream("ldm.autoencoder_workdir", "ldm_autoencoder", ("ae",))}


def load_pretrained(config, state: dict, pretrained: dict) -> dict:
    """Copies the stage-1 run's autoencoder parameters into a new state."""
    del config
    return {**state, "ae": jax.tree.map(jnp.asarray, pretrained["autoencoder"].state["ae"].params)}


METHOD = Method(
    name="ldm_diffusion", create_state=create_state, train_step=train_step, predict=predict,
    samples=True, validate_config=validate_config, upstream=upstream,
    load_pretrained=load_pretrained)
