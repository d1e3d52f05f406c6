"""LDM stage 2: the diffusion UNet on scaled latents of CT patches, autoencoder frozen.

  python train.py --config configs/ldm_brain.py:diffusion --workdir runs/ldm_brain_diffusion

(``config.ldm.autoencoder_workdir`` names the stage-1 run.) Each step encodes the CT
patch with the frozen autoencoder (posterior mean, or a draw with
``config.ldm.sample_latents``), scales it, noises it at ``t ~ U{0..T-1}`` and regresses
the target of ``config.ldm.prediction_type`` (epsilon by default) with an MSE.

The latent scale factor ``1 / std(z)`` (Rombach et al.; MONAI's tutorials) is estimated
by the training step itself: the first ``config.ldm.scale_batches`` steps only encode
their batch and merge its moments into a running (Chan/Welford) estimate kept in the
state; from then on the factor is frozen and the UNet trains. Both phases are branches
of one ``lax.cond`` on the step, so the run compiles ONE program, the estimate sees as
many batches as asked without a second pass over the data before training, and the UNet
only ever sees latents under the final scale. The optimizer's schedule starts with the
first UNet update; a resumed run restores the estimate with the checkpoint.

State: ``{"unet": TrainState, "ae": frozen autoencoder params, "scale_factor": (),
"scale_stats": {"count", "mean", "m2"}}`` (plain arrays: checkpointed, never updated by
an optimizer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.methods import _ldm_common as common
from sct_jax.methods.common import TrainState, apply_updates, step_rng
from sct_jax.training import optim


def validate_config(config) -> None:
    common.validate_ldm_config(config, "diffusion")
    if int(config.ldm.scale_batches) < 1:
        raise ConfigError(f"config.ldm.scale_batches={config.ldm.scale_batches}: the scale "
                          "factor needs at least one batch")
    if int(config.ldm.scale_batches) >= int(config.train.steps):
        raise ConfigError(f"config.ldm.scale_batches={config.ldm.scale_batches} leaves no "
                          f"UNet step in config.train.steps={config.train.steps}")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict:
    """UNet parameters, the frozen autoencoder of the stage-1 run, the scale estimate."""
    _, ae_run = common.load_upstream_run(config, "ldm.autoencoder_workdir",
                                         "ldm_autoencoder", ("ae",))
    unet = common.build_unet(config)
    z = jnp.zeros(common.latent_shape(config, (1, *batch_spec["ct"].shape[1:])), jnp.float32)
    params = unet.init(rng, z, jnp.zeros((1,), jnp.int32))["params"]
    return {
        "unet": TrainState.create(apply_fn=unet.apply, params=params,
                                  tx=optim.adam(config.optim, config.train.steps)),
        "ae": jax.tree.map(jnp.asarray, ae_run["ae"].params),
        "scale_factor": jnp.ones((), jnp.float32),
        "scale_stats": common.init_moments(),
    }


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """A scale-estimation step (the first ``scale_batches``) or a UNet update.

    Args:
      config: the experiment config (bound by the loop).
      state: see the module docstring.
      batch: ``ct (B, D, H, W, 1)`` in [-1, 1].
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics (zeros for the UNet's during estimation).
    """
    unet_state = state["unet"]
    rng = step_rng(rng, unet_state)
    encode_rng, loss_rng = jax.random.split(rng)
    z = common.encode_ct(config, state["ae"], batch["ct"], encode_rng)
    schedule = common.make_config_schedule(config)

    def train_unet(operand):
        unet_state, stats, scale = operand

        def loss_fn(params):
            return common.diffusion_mse(
                config, schedule, z * scale, loss_rng,
                lambda x_t, t: unet_state.apply_fn({"params": params}, x_t, t))

        loss, grads = jax.value_and_grad(loss_fn)(unet_state.params)
        unet_state, metrics = apply_updates(unet_state, grads, "unet")
        return unet_state, stats, scale, {"loss": loss, **metrics}

    def estimate_scale(operand):
        unet_state, stats, _ = operand
        stats = common.merge_moments(stats, z)
        scale = jax.lax.rsqrt(stats["m2"] / stats["count"])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(train_unet, operand)[3])
        # The step still counts (it keys the rng and decides the phase); params do not move.
        return unet_state.replace(step=unet_state.step + 1), stats, scale, zeros

    estimating = unet_state.step < int(config.ldm.scale_batches)
    unet_state, stats, scale, metrics = jax.lax.cond(
        estimating, estimate_scale, train_unet,
        (unet_state, state["scale_stats"], state["scale_factor"]))
    metrics = {**metrics, "scale_factor": scale,
               "estimating_scale": estimating.astype(jnp.float32),
               "latent_std": jnp.std(z)}
    return {**state, "unet": unet_state, "scale_stats": stats, "scale_factor": scale}, metrics


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """An *unconditional* CT sample of ``mr``'s shape (the MR is not used).

    A baseline for the ControlNet stage (what the LDM draws without the MR), and a check
    of the UNet and the scale factor.

    Args:
      config: the config.
      state: the stage's state.
      mr: ``(B, D, H, W, 1)``, only its shape is used.
      rng: sampling key (default: fixed from ``config.seed``).

    Returns:
      ``(B, D, H, W, 1)`` in [-1, 1].
    """
    rng = common.default_rng(config, rng)
    params = state["unet"].params
    unet = common.build_unet(config)
    z = common.sample_latents(config, lambda x, t: unet.apply({"params": params}, x, t),
                              common.latent_shape(config, mr.shape), rng)
    return common.decode_latent(config, state["ae"], z / state["scale_factor"])
