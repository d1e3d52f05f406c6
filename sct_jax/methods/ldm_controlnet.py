"""LDM stage 3: the ControlNet that steers the frozen latent UNet with the MR.

  python train.py --config configs/ldm_brain.py:controlnet --workdir runs/ldm_brain_controlnet
  python evaluate.py --config configs/ldm_brain.py:controlnet \
      --workdir runs/ldm_brain_controlnet [--samples 8]

(``config.ldm.diffusion_workdir`` names the stage-2 run; its checkpoint provides the
UNet (trained with conditioning ``"none"``), the autoencoder and the latent
standardisation, all frozen here.) Training: the CT
patch's scaled latent is noised as in stage 2 and the UNet, fed the ControlNet's
residuals for the MR patch (image resolution; the conditioning embedding brings it
down to the latent grid), regresses the same target; only the ControlNet learns. It
starts as a copy of the UNet's encoder (:func:`controlnet_params_from_unet`) with
zero-initialised outputs, so step 0 reproduces the unconditional model exactly.

Prediction: the MR is embedded once, a latent is drawn from noise with the scanned
sampler (``config.ldm.sample_steps`` DDIM steps by default, one ``lax.scan``), the latent
standardisation undone, decoded and clipped. Different ``rng`` give different samples;
``evaluate.py --samples K`` writes their mean and per-voxel standard deviation. A volume
larger than ``config.data.patch`` is predicted by overlapping windows sampled
independently (each with its own key) and blended: choose a patch that covers the head.

State: ``{"controlnet": TrainState, "unet": frozen params, "ae": frozen params,
"latent_shift": (C,), "latent_scale": (C,)}`` (the stage-2 latent standardisation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError
from sct_jax.methods import Method, Upstream
from sct_jax.methods import _ldm_common as common
from sct_jax.methods.common import TrainState, apply_updates, dummy_input, step_rng
from sct_jax.models.controlnet import controlnet_params_from_unet
from sct_jax import optim


def validate_config(config) -> None:
    common.validate_ldm_config(config, "controlnet")


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict:
    """The ControlNet and places for the frozen stage-2 parts (UNet, autoencoder, latent
    statistics), zeros here: ``load_pretrained`` copies the stage-2 run's into a new
    state and starts the ControlNet from its UNet."""
    controlnet = common.build_controlnet(config)
    mr = dummy_input(batch_spec["mr"])
    z = jnp.zeros(common.latent_shape(config, mr.shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = controlnet.init(rng, z, t, mr)["params"]
    unet = common.build_unet(config)
    unet_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               jax.eval_shape(unet.init, rng, z, t))["params"]
    channels = int(config.model.ae.latent_channels)
    return {
        "controlnet": TrainState.create(apply_fn=controlnet.apply, params=params,
                                        tx=optim.adam(config.optim, config.train.steps)),
        "unet": unet_params,
        "ae": common.autoencoder_placeholder(config, batch_spec["ct"]),
        "latent_shift": jnp.zeros((channels,), jnp.float32),
        "latent_scale": jnp.ones((channels,), jnp.float32),
    }


def upstream(config) -> dict[str, Upstream]:
    del config
    return {"diffusion": Upstream("ldm.diffusion_workdir", "ldm_diffusion", ("ae", "unet"))}


def load_pretrained(config, state: dict, pretrained: dict) -> dict:
    """The stage-2 run's frozen parts, and the ControlNet started from its UNet.

    Raises:
      ConfigError: the stage-2 UNet is conditioned on the MR itself (``concat``).
    """
    run = pretrained["diffusion"]
    if run.config.ldm.conditioning != "none":
        raise ConfigError(f"config.ldm.diffusion_workdir={config.ldm.diffusion_workdir!r} "
                          f"holds a UNet with conditioning {run.config.ldm.conditioning!r}; "
                          "the ControlNet steers an unconditional one (conditioning 'none')")
    unet_params = jax.tree.map(jnp.asarray, run.state["unet"].params)
    cn_state = state["controlnet"]
    params = controlnet_params_from_unet(unet_params, jax.device_get(cn_state.params))
    return {**state, "controlnet": cn_state.replace(params=params), "unet": unet_params,
            "ae": jax.tree.map(jnp.asarray, run.state["ae"]),
            "latent_shift": jnp.asarray(run.state["latent_shift"], jnp.float32),
            "latent_scale": jnp.asarray(run.state["latent_scale"], jnp.float32)}


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One ControlNet update on the denoising loss of the frozen UNet.

    Args:
      config: the experiment config (bound by the loop).
      state: see the module docstring.
      batch: ``mr``, ``ct`` ``(B, D, H, W, 1)`` in [-1, 1].
      rng: the run's base key (folded with the step inside).

    Returns:
      The new state and scalar metrics.
    """
    cn_state = state["controlnet"]
    rng = step_rng(rng, cn_state)
    crop_rng, encode_rng, loss_rng = jax.random.split(rng, 3)
    ct, mr = common.random_crop(config, batch, crop_rng)
    z = common.standardise(common.encode_ct(config, state["ae"], ct, encode_rng),
                           state["latent_shift"], state["latent_scale"])
    unet = common.build_unet(config)
    schedule = common.make_config_schedule(config)
    cond_scale = float(config.ldm.conditioning_scale)

    def loss_fn(params):
        def model(x_t, t):
            down, mid = cn_state.apply_fn({"params": params}, x_t, t, mr, cond_scale)
            return unet.apply({"params": state["unet"]}, x_t, t, down, mid)
        return common.diffusion_mse(config, schedule, z, loss_rng, model)

    loss, grads = jax.value_and_grad(loss_fn)(cn_state.params)
    cn_state, metrics = apply_updates(cn_state, grads, "controlnet")
    return {**state, "controlnet": cn_state}, {"loss": loss, **metrics}


def predict(config, state: dict, mr: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Samples an sCT for ``mr``.

    Args:
      config: the config (``ldm.sample_steps``, ``ldm.sampler``, ``ldm.eta``).
      state: the stage's state.
      mr: ``(B, D, H, W, 1)`` in [-1, 1], each size divisible by the autoencoder factor
        times the UNet stride.
      rng: sampling key (raw ``uint32[2]`` or typed); default a fixed key from
        ``config.seed``, so repeated calls return the same sample.

    Returns:
      ``(B, D, H, W, 1)`` sCT in [-1, 1].
    """
    return common.controlnet_sample(config, state["ae"], state["unet"],
                                    state["controlnet"].params, state["latent_shift"],
                                    state["latent_scale"], mr,
                                    common.default_rng(config, rng))


METHOD = Method(
    name="ldm_controlnet", create_state=create_state, train_step=train_step,
    predict=predict, samples=True, validate_config=validate_config, upstream=upstream,
    load_pretrained=load_pretrained)
