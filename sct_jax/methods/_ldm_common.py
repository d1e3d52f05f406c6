"""What the three latent-diffusion stages share: models, upstream runs, latents, sampling.

The brain LDM (seed 03; MONAI GenerativeModels) trains in three chained runs, each an
ordinary method of the generic loop:

1. ``ldm_autoencoder``: a 3D :class:`~sct_jax.models.autoencoder.AutoencoderKL` on CT
   patches (L1 + 2.5D perceptual + KL + LSGAN PatchGAN);
2. ``ldm_diffusion``: a :class:`~sct_jax.models.diffusion_unet.DiffusionUNet` on the
   scaled latents of CT patches, the autoencoder frozen (read from the run of
   ``config.ldm.autoencoder_workdir``); the latent scale factor ``1 / std(z)`` is
   estimated in the first ``config.ldm.scale_batches`` steps and stored in the state;
3. ``ldm_controlnet``: a :class:`~sct_jax.models.controlnet.ControlNet` conditioned on
   the MR, initialised from the UNet of the run of ``config.ldm.diffusion_workdir``;
   UNet, autoencoder and scale factor frozen (all taken from that run's checkpoint).

A later stage names the earlier run in its method's ``upstream`` (``Method.upstream``);
the training loop reads that run through :func:`sct_jax.runs.load_upstream` when the
stage starts and the stage's ``load_pretrained`` copies the frozen parts into its new
state (outside any trace). Relative workdirs are relative to the current directory.
Every stage's checkpoint holds the frozen parts it uses (as plain arrays), so a finished
stage predicts without its upstream runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from sct_jax.diffusion import make_schedule, q_sample, training_target
from sct_jax.diffusion import flow
from sct_jax.diffusion.select import check_sampler, sample_any
from sct_jax.data.preprocess import HU_PER_UNIT
from sct_jax.errors import ConfigError
from sct_jax.models.autoencoder import AutoencoderKL
from sct_jax.models.controlnet import ControlNet, embed_conditioning
from sct_jax.models.diffusion_unet import (MR_ENCODINGS, DiffusionUNet, MRConditionedUNet,
                                           mr_channels_on_latent_grid)
from sct_jax.models.layers import precision_kwargs
from sct_jax.models.patchgan import PatchDiscriminator

# How the diffusion stage sees the MR: "concat" (on the latent grid, the UNet is the
# sCT model) or "none" (unconditional; the ControlNet stage adds the MR).
CONDITIONINGS = ("concat", "none")
# config.ldm.objective: "diffusion" (DDPM noising, ldm.prediction_type, the DDIM / DDPM /
# DPM-Solver++ samplers) or "flow" (rectified flow, sct_jax.diffusion.flow: the straight
# path between the standardised latent and noise, velocity regression, sampled with
# ldm.sampler "euler" or "dpmpp_2m" in ldm.sample_steps).
OBJECTIVES = ("diffusion", "flow")


def objective(config) -> str:
    """``config.ldm.objective`` (runs made before the option: ``"diffusion"``)."""
    return str(config.ldm.get("objective", "diffusion"))


# ----------------------------------------------------------------------------- models

def build_autoencoder(config) -> AutoencoderKL:
    a = config.model.ae
    return AutoencoderKL(in_channels=1, out_channels=1, channels=tuple(a.channels),
                         latent_channels=a.latent_channels, num_res_blocks=a.num_res_blocks,
                         norm_num_groups=a.norm_num_groups,
                         attention_levels=tuple(a.attention_levels),
                         with_encoder_nonlocal_attn=a.nonlocal_attn,
                         with_decoder_nonlocal_attn=a.nonlocal_attn,
                         init_log_variance=a.get("init_log_variance"),
                         conv_impl=config.model.conv_impl, **precision_kwargs(config))


def autoencoder_placeholder(config, ct_spec: jax.ShapeDtypeStruct) -> Any:
    """Zeros shaped like the autoencoder's parameters (a later stage's frozen copy before
    ``load_pretrained`` fills it): shapes only, no initialiser is run."""
    ae = build_autoencoder(config)
    ct = jax.ShapeDtypeStruct((1, *ct_spec.shape[1:]), jnp.float32)
    key = jax.random.key_data(jax.random.key(0))
    shapes = jax.eval_shape(ae.init, key, ct, key)["params"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _unet_kwargs(config) -> dict:
    u = config.model.unet
    heads = u.num_head_channels
    return dict(in_channels=config.model.ae.latent_channels, channels=tuple(u.channels),
                attention_levels=tuple(u.attention_levels), num_res_blocks=u.num_res_blocks,
                num_head_channels=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
                norm_num_groups=u.norm_num_groups, conv_impl=config.model.conv_impl,
                **precision_kwargs(config))


def is_concat(config) -> bool:
    return config.ldm.conditioning == "concat"


def build_unet(config) -> DiffusionUNet | MRConditionedUNet:
    """The diffusion stage's denoiser: a plain UNet, or (``ldm.conditioning == "concat"``)
    one that also takes the MR, ``(x_t, t, mr)``."""
    latent = int(config.model.ae.latent_channels)
    if not is_concat(config):
        return DiffusionUNet(out_channels=latent, **_unet_kwargs(config))
    enc = config.ldm.mr_encoder
    mr_channels = mr_channels_on_latent_grid(config.ldm.mr_encoding, ae_factor(config), 3,
                                             int(enc.out_channels))
    kwargs = {**_unet_kwargs(config), "in_channels": latent + mr_channels}
    return MRConditionedUNet(unet=DiffusionUNet(out_channels=latent, **kwargs),
                             factor=ae_factor(config), mr_encoding=config.ldm.mr_encoding,
                             encoder_channels=tuple(enc.channels),
                             encoder_out_channels=int(enc.out_channels),
                             conv_impl=config.model.conv_impl)


def build_controlnet(config) -> ControlNet:
    return ControlNet(conditioning_embedding_num_channels=tuple(
        config.model.controlnet.conditioning_embedding_num_channels), **_unet_kwargs(config))


def build_discriminator(config) -> PatchDiscriminator:
    d = config.model.disc
    return PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm,
                              conv_impl=config.model.conv_impl,
                              dtype=precision_kwargs(config)["dtype"])


def make_config_schedule(config):
    s = config.ldm.schedule
    return make_schedule(s.kind, s.num_train_timesteps, s.beta_start, s.beta_end)


def ae_factor(config) -> int:
    return 2 ** (len(config.model.ae.channels) - 1)


def latent_shape(config, image_shape) -> tuple[int, ...]:
    """``(B, *spatial, 1)`` image -> ``(B, *spatial / factor, latent_channels)``."""
    f = ae_factor(config)
    return (image_shape[0], *(int(s) // f for s in image_shape[1:-1]),
            int(config.model.ae.latent_channels))


def validate_ldm_config(config, stage: str) -> None:
    """Start-up checks shared by the three stages (raise ``ConfigError``)."""
    if config.data.mode != "patches":
        raise ConfigError(f"config.data.mode={config.data.mode!r}: the LDM trains on 3D "
                          "'patches'")
    patch = tuple(int(p) for p in config.data.patch)
    divisor = ae_factor(config)
    if stage != "autoencoder":
        divisor *= 2 ** (len(config.model.unet.channels) - 1)
    if len(patch) != 3 or any(p % divisor for p in patch):
        raise ConfigError(f"config.data.patch={patch}: every size must be divisible by "
                          f"{divisor} (autoencoder factor x UNet stride)")
    if stage == "controlnet":
        cond_factor = 2 ** (len(config.model.controlnet.conditioning_embedding_num_channels)
                            - 1)
        if cond_factor != ae_factor(config):
            raise ConfigError(
                "config.model.controlnet.conditioning_embedding_num_channels="
                f"{tuple(config.model.controlnet.conditioning_embedding_num_channels)} "
                f"downsamples the MR by {cond_factor}, but the autoencoder's factor is "
                f"{ae_factor(config)}: give it log2(factor) + 1 entries")
    if config.ldm.conditioning not in CONDITIONINGS:
        raise ConfigError(f"config.ldm.conditioning={config.ldm.conditioning!r}: expected one "
                          f"of {CONDITIONINGS}")
    if is_concat(config) and config.ldm.mr_encoding not in MR_ENCODINGS:
        raise ConfigError(f"config.ldm.mr_encoding={config.ldm.mr_encoding!r}: expected one "
                          f"of {MR_ENCODINGS}")
    if stage == "controlnet" and is_concat(config):
        raise ConfigError("config.ldm.conditioning='concat' conditions the diffusion UNet on "
                          "the MR itself: there is no ControlNet stage; evaluate the "
                          "diffusion stage (or use the conditioning 'none' for a ControlNet)")
    crop = tuple(int(p) for p in config.ldm.train_crop or ())
    if stage != "autoencoder" and crop:
        if len(crop) != 3 or any(c % divisor or c > p for c, p in zip(crop, patch)):
            raise ConfigError(f"config.ldm.train_crop={crop}: three sizes, each divisible by "
                              f"{divisor} and at most config.data.patch={patch}")
    if int(config.ldm.sample_steps) < 1:
        raise ConfigError(f"config.ldm.sample_steps={config.ldm.sample_steps}: must be >= 1")
    if objective(config) not in OBJECTIVES:
        raise ConfigError(f"config.ldm.objective={objective(config)!r}: expected one of "
                          f"{OBJECTIVES}")
    if objective(config) == "flow":
        if config.ldm.sampler not in flow.FLOW_SOLVERS:
            raise ConfigError(f"config.ldm.sampler={config.ldm.sampler!r}: the flow objective "
                              f"samples with one of {flow.FLOW_SOLVERS}")
        if config.ldm.get("flow_time_sampling", "uniform") not in flow.TIME_SAMPLING:
            raise ConfigError(f"config.ldm.flow_time_sampling="
                              f"{config.ldm.flow_time_sampling!r}: expected one of "
                              f"{flow.TIME_SAMPLING}")
        if not float(config.ldm.get("flow_shift", 1.0)) > 0:
            raise ConfigError(f"config.ldm.flow_shift={config.ldm.flow_shift}: must be > 0")
    else:
        check_sampler(config.ldm.sampler)


# ---------------------------------------------------------------------------- latents

def flat_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """N(0, I) drawn flat then reshaped (XLA:CPU compiles 4D/5D draws seconds slower)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def encode_ct(config, ae_params, ct: jax.Array, rng: jax.Array) -> jax.Array:
    """Unscaled latents of CT patches with the frozen autoencoder.

    Args:
      config: the stage config (``config.ldm.sample_latents``: draw ``z`` from the
        posterior instead of taking its mean).
      ae_params: the autoencoder's ``params``.
      ct: ``(B, D, H, W, 1)`` in [-1, 1].
      rng: key for the posterior draw.

    Returns:
      ``(B, D/f, H/f, W/f, latent_channels)``, gradient stopped.
    """
    ae = build_autoencoder(config)
    mu, sigma = ae.apply({"params": ae_params}, ct, method=ae.encode)
    z = mu + sigma * flat_normal(rng, mu.shape, mu.dtype) if config.ldm.sample_latents else mu
    return jax.lax.stop_gradient(z)


def decode_latent(config, ae_params, z: jax.Array) -> jax.Array:
    """Unscaled latent ``(B, *s, C_lat)`` -> image ``(B, *s * f, 1)`` clipped to [-1, 1]."""
    ae = build_autoencoder(config)
    return jnp.clip(ae.apply({"params": ae_params}, z, method=ae.decode), -1.0, 1.0)


def merge_moments(stats: dict, z: jax.Array) -> dict:
    """Chan et al.'s parallel update of per-channel ``{count, mean, m2}`` with ``z``.

    Each batch contributes its exact two-pass mean and sum of squared deviations per
    channel, so the running variance ``m2 / count`` does not suffer the cancellation of
    ``E[z^2] - E[z]^2``.

    Args:
      stats: ``count ()``, ``mean (C,)``, ``m2 (C,)`` (see :func:`init_moments`).
      z: latents ``(B, *s, C)``.

    Returns:
      The updated statistics.
    """
    z = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    n_b = jnp.float32(z.shape[0])
    mean_b = jnp.mean(z, axis=0)
    m2_b = jnp.sum(jnp.square(z - mean_b), axis=0)
    n = stats["count"] + n_b
    delta = mean_b - stats["mean"]
    return {"count": n, "mean": stats["mean"] + delta * n_b / n,
            "m2": stats["m2"] + m2_b + jnp.square(delta) * stats["count"] * n_b / n}


def init_moments(channels: int) -> dict:
    """Empty per-channel moments of ``channels`` latent channels."""
    return {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((channels,), jnp.float32),
            "m2": jnp.zeros((channels,), jnp.float32)}


def shift_and_scale(stats: dict) -> tuple[jax.Array, jax.Array]:
    """The latent standardisation ``(mean, 1 / std)`` per channel from the moments."""
    return stats["mean"], jax.lax.rsqrt(stats["m2"] / stats["count"])


def standardise(z: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Autoencoder latent ``(B, *s, C)`` -> the diffusion model's ``(z - shift) * scale``."""
    return (z - shift) * scale


def unstandardise(z: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of :func:`standardise`: a sampled latent back to the autoencoder's."""
    return z / scale + shift


def random_crop(config, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The batch's ``(ct, mr)``, cropped to ``config.ldm.train_crop`` at one random
    offset (a multiple of the autoencoder factor, so the crop's latent grid is the
    volume's), or whole when ``train_crop`` is empty.

    The denoiser is convolutional: it trains on crops (cheaper, more varied) and samples
    the whole window ``config.data.patch``.
    """
    ct, mr = batch["ct"], batch.get("mr")
    crop = tuple(int(c) for c in config.ldm.train_crop or ())
    if not crop:
        return ct, mr
    f = ae_factor(config)
    keys = jax.random.split(rng, 3)
    starts = [jax.random.randint(k, (), 0, (s - c) // f + 1) * f
              for k, s, c in zip(keys, ct.shape[1:4], crop)]
    size = (ct.shape[0], *crop, ct.shape[-1])
    cut = lambda x: jax.lax.dynamic_slice(x, (0, *starts, 0), size[:-1] + x.shape[-1:])
    return cut(ct), (cut(mr) if mr is not None else None)


def diffusion_mse(config, schedule, z0: jax.Array, rng: jax.Array, model_fn):
    """The denoising (or flow-matching) loss at random times.

    Args:
      config: stage config (``ldm.objective``, ``ldm.prediction_type``,
        ``ldm.flow_time_sampling``).
      schedule: the training schedule (unused by the flow objective).
      z0: scaled clean latents ``(B, *s, C)``.
      rng: key for the noise and times.
      model_fn: ``(x_t, t) -> prediction`` of ``z0``'s shape; ``t`` ``(B,)`` integer
        timesteps, or for the flow objective float ``t * 1000`` with ``t`` in [0, 1].

    Returns:
      Mean squared error to the target: of ``config.ldm.prediction_type``, or the flow's
      velocity ``eps - z0`` at ``x_t = (1 - t) z0 + t eps``.
    """
    noise_rng, t_rng = jax.random.split(rng)
    noise = flat_normal(noise_rng, z0.shape, z0.dtype)
    if objective(config) == "flow":
        t = flow.sample_flow_times(t_rng, z0.shape[0],
                                   config.ldm.get("flow_time_sampling", "uniform"))
        prediction = model_fn(flow.flow_interpolate(z0, noise, t),
                              t * flow.DEFAULT_TIME_SCALE)
        target = flow.flow_training_target(z0, noise)
    else:
        t = jax.random.randint(t_rng, (z0.shape[0],), 0, schedule.num_train_timesteps)
        x_t = q_sample(schedule, z0, noise, t)
        target = training_target(schedule, z0, noise, t, config.ldm.prediction_type)
        prediction = model_fn(x_t, t)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


# --------------------------------------------------------------------------- sampling

def default_rng(config, rng: jax.Array | None) -> jax.Array:
    """``rng`` or, when None, a fixed key from ``config.seed`` (reproducible sCT)."""
    if rng is None:
        return jax.random.key_data(jax.random.key(config.seed))
    return rng


def sample_latents(config, denoise_fn, x_shape, rng: jax.Array,
                   num_steps: int | None = None, sampler: str | None = None) -> jax.Array:
    """Runs the scanned sampler from ``N(0, I)`` noise of ``x_shape`` (scaled latents)."""
    noise_rng, step_rng = jax.random.split(rng)
    x_T = flat_normal(noise_rng, x_shape)
    if objective(config) == "flow":
        # The UNet predicts the velocity at t * 1000; the solver wants an x0 predictor.
        return flow.sample_flow(flow.velocity_denoiser(denoise_fn), x_T,
                                num_steps=int(num_steps or config.ldm.sample_steps),
                                solver=sampler or config.ldm.sampler,
                                shift=float(config.ldm.get("flow_shift", 1.0)))
    return sample_any(denoise_fn, make_config_schedule(config), x_T,
                      num_steps=int(num_steps or config.ldm.sample_steps),
                      sampler=sampler or config.ldm.sampler, eta=float(config.ldm.eta),
                      rng=step_rng, prediction_type=config.ldm.prediction_type,
                      clip_sample=False)


def controlnet_denoiser(config, unet_params, controlnet_params, embedded_mr: jax.Array):
    """``(x_t, t) -> UNet(x_t, t, ControlNet residuals)`` with the MR embedded once."""
    unet, controlnet = build_unet(config), build_controlnet(config)
    scale = float(config.ldm.conditioning_scale)

    def denoise(x_t, t):
        down, mid = controlnet.apply({"params": controlnet_params}, x_t, t, embedded_mr,
                                     scale, cond_is_embedded=True)
        return unet.apply({"params": unet_params}, x_t, t, down, mid)

    return denoise


def controlnet_sample(config, ae_params, unet_params, controlnet_params, shift, scale,
                      mr: jax.Array, rng: jax.Array, num_steps: int | None = None,
                      sampler: str | None = None) -> jax.Array:
    """MR ``(B, D, H, W, 1)`` in [-1, 1] -> one sCT sample ``(B, D, H, W, 1)`` in [-1, 1].

    Embeds the MR once, samples a latent with the scanned sampler (ControlNet + frozen
    UNet at every step), undoes the latent standardisation (``shift``, ``scale``: ``(C,)``)
    and decodes. One jittable program.
    """
    embedded = embed_conditioning(build_controlnet(config), controlnet_params, mr)
    denoise = controlnet_denoiser(config, unet_params, controlnet_params, embedded)
    z = sample_latents(config, denoise, latent_shape(config, mr.shape), rng,
                       num_steps=num_steps, sampler=sampler)
    return decode_latent(config, ae_params, unstandardise(z, shift, scale))


def concat_denoiser(config, unet_params, mr: jax.Array):
    """``(x_t, t) -> UNet(concat(x_t, MR on the latent grid), t)`` with the MR encoded
    once (``ldm.conditioning == "concat"``)."""
    model = build_unet(config)
    cond = model.apply({"params": unet_params}, mr, method=model.embed)
    return lambda x_t, t: model.apply({"params": unet_params}, x_t, t, cond,
                                      cond_is_embedded=True)


def concat_sample(config, ae_params, unet_params, shift, scale, mr: jax.Array,
                  rng: jax.Array, num_steps: int | None = None,
                  sampler: str | None = None) -> jax.Array:
    """:func:`controlnet_sample` for the directly conditioned UNet (one jittable program)."""
    z = sample_latents(config, concat_denoiser(config, unet_params, mr),
                       latent_shape(config, mr.shape), rng, num_steps=num_steps,
                       sampler=sampler)
    return decode_latent(config, ae_params, unstandardise(z, shift, scale))
