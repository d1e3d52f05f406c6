"""DDIM and DDPM sampling as pure step functions and one scanned loop.

Inference timesteps (:func:`ddim_timesteps`) use diffusers' ``"leading"`` spacing with
``steps_offset = 0`` and ``set_alpha_to_one = True``, for both samplers:

    ratio = T // N,    t_i = i * ratio  (i = N-1, ..., 0),    t_prev = t_i - ratio,

and ``abar_prev = 1`` (the "final alpha cumprod") when ``t_prev < 0``, i.e. on the last
step, which therefore returns the predicted ``x0`` itself. With ``T = 1000, N = 50`` the
steps are ``980, 960, ..., 20, 0``. Each step goes from ``t_i`` to the *strided*
previous timestep ``t_i - ratio``; MONAI's DDPM scheduler with ``N < T`` steps to
``t - 1`` instead (an off-by-one/stride bug), which is not reproduced here.

The DDPM step with ``N < T`` steps uses the posterior of the strided chain
(``alpha = abar_t / abar_prev``), which reduces to Ho et al.'s posterior for ``N = T``.

:func:`sample` runs every step inside one ``jax.lax.scan``: the denoiser is traced
once, whatever the number of steps, and the whole loop is jittable and batch-shardable.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.diffusion.schedules import (Schedule, broadcast_to_batch,
                                         check_prediction_type, predict_x0_and_eps)
from sct_jax.errors import ConfigError

SAMPLERS = ("ddim", "ddpm")

# denoise_fn(x_t: (B, *spatial, C), t: (B,) int32) -> model output, shape of x_t.
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The inference timesteps and the timestep each one steps to ("leading" spacing).

    Args:
      num_train_timesteps: ``T``.
      num_inference_steps: ``N``, ``1 <= N <= T``.

    Returns:
      ``(timesteps, prev_timesteps)``, int32 arrays ``(N,)``: ``timesteps`` descending
      ``(N-1) r, ..., r, 0`` with ``r = T // N``, and ``prev_timesteps = timesteps - r``
      (the last is negative: the step to ``abar = 1``).

    Raises:
      ConfigError: ``N`` outside ``[1, T]``.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ConfigError(f"diffusion num_inference_steps={num_inference_steps} must lie "
                          f"in [1, num_train_timesteps={num_train_timesteps}]")
    ratio = num_train_timesteps // num_inference_steps
    timesteps = (np.arange(num_inference_steps, dtype=np.int64) * ratio)[::-1]
    return timesteps.astype(np.int32), (timesteps - ratio).astype(np.int32)


def alphas_cumprod_at(schedule: Schedule, t: jax.Array) -> jax.Array:
    """``abar_t``, with ``abar = 1`` for ``t < 0`` (before the first noising step).

    Args:
      schedule: the noise schedule.
      t: integer timesteps, any shape, in ``[-T, T)``.

    Returns:
      float32, shape of ``t``.
    """
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def _prepare_x0_and_eps(schedule, model_output, t, x_t, prediction_type, clip_sample):
    x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t, prediction_type)
    if clip_sample:
        # As diffusers with use_clipped_model_output=False: clip x0, keep eps as predicted.
        x0 = jnp.clip(x0, -1.0, 1.0)
    return x0, eps


def ddim_step(schedule: Schedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array,
              x_t: jax.Array, eta: float = 0.0, noise: Optional[jax.Array] = None,
              prediction_type: str = "epsilon", clip_sample: bool = False) -> jax.Array:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12).

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``;
    ``eta = 0`` is deterministic, ``eta = 1`` has DDPM's variance.

    Args:
      schedule: the noise schedule.
      model_output: the network output at ``(x_t, t)``, shape of ``x_t``.
      t: current timestep, a scalar or ``(B,)`` int, in ``[0, T)``.
      t_prev: the timestep to step to, same shape; negative means ``abar_prev = 1``.
      x_t: ``(B, *spatial, C)``.
      eta: stochasticity; needs ``noise`` when non-zero.
      noise: ``z ~ N(0, I)``, shape of ``x_t`` (unused when ``eta == 0``).
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]`` (off for latents).

    Returns:
      ``x_{t_prev}``, shape of ``x_t``.
    """
    x0, eps = _prepare_x0_and_eps(schedule, model_output, t, x_t, prediction_type,
                                  clip_sample)
    abar_t = broadcast_to_batch(alphas_cumprod_at(schedule, t), x_t)
    abar_prev = broadcast_to_batch(alphas_cumprod_at(schedule, t_prev), x_t)
    x_prev = jnp.sqrt(abar_prev) * x0
    if isinstance(eta, (int, float)) and eta == 0:
        return x_prev + jnp.sqrt(1.0 - abar_prev) * eps
    if noise is None:
        raise ValueError("ddim_step with eta != 0 needs noise")
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    sigma = eta * jnp.sqrt(variance)
    # max(., 0) guards against rounding pushing the radicand below zero at eta = 1.
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
    return x_prev + direction + sigma * noise


def ddpm_step(schedule: Schedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array,
              x_t: jax.Array, noise: Optional[jax.Array] = None,
              prediction_type: str = "epsilon", clip_sample: bool = False) -> jax.Array:
    """One ancestral DDPM step: a draw from ``q(x_{t_prev} | x_t, x0_hat)``.

    For the (possibly strided) chain ``t -> t_prev`` with ``alpha = abar_t / abar_prev``
    and ``beta = 1 - alpha``::

      mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t
      var  = (1 - abar_prev) / (1 - abar_t) beta        ("fixed_small"; 0 on the last step)

    Args:
      schedule: the noise schedule.
      model_output: the network output at ``(x_t, t)``, shape of ``x_t``.
      t: current timestep, a scalar or ``(B,)`` int, in ``[0, T)``.
      t_prev: the timestep to step to; negative means ``abar_prev = 1``.
      x_t: ``(B, *spatial, C)``.
      noise: ``z ~ N(0, I)``, shape of ``x_t``; ``None`` returns the posterior mean.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]``.

    Returns:
      ``x_{t_prev}``, shape of ``x_t``.
    """
    x0, _ = _prepare_x0_and_eps(schedule, model_output, t, x_t, prediction_type,
                                clip_sample)
    abar_t = broadcast_to_batch(alphas_cumprod_at(schedule, t), x_t)
    abar_prev = broadcast_to_batch(alphas_cumprod_at(schedule, t_prev), x_t)
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    mean = (jnp.sqrt(abar_prev) * beta / (1.0 - abar_t) * x0
            + jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t) * x_t)
    if noise is None:
        return mean
    variance = jnp.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta, 0.0)
    return mean + jnp.sqrt(variance) * noise


def _flat_normal(key: jax.Array, like: jax.Array) -> jax.Array:
    """N(0, I) of ``like``'s shape, drawn flat (XLA:CPU compiles 4D/5D draws slowly)."""
    return jax.random.normal(key, (like.size,), like.dtype).reshape(like.shape)


def _make_step_body(denoise_fn: DenoiseFn, schedule: Schedule, *, sampler: str, eta: float,
                    rng: Optional[jax.Array], prediction_type: str, clip_sample: bool):
    """The loop body ``(x_t, (i, t, t_prev)) -> x_prev`` shared by both loops."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"diffusion sampler {sampler!r} is unknown; expected one of "
                          f"{SAMPLERS}")
    check_prediction_type(prediction_type)
    needs_noise = sampler == "ddpm" or eta != 0
    if needs_noise and rng is None:
        raise ValueError(f"sampler {sampler!r} with eta={eta} draws noise: pass rng")

    def body(x_t: jax.Array, step: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, t, t_prev = step
        t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
        model_output = denoise_fn(x_t, t_batch)
        noise = _flat_normal(jax.random.fold_in(rng, i), x_t) if needs_noise else None
        if sampler == "ddim":
            x_prev = ddim_step(schedule, model_output, t, t_prev, x_t, eta=eta, noise=noise,
                               prediction_type=prediction_type, clip_sample=clip_sample)
        else:
            x_prev = ddpm_step(schedule, model_output, t, t_prev, x_t, noise=noise,
                               prediction_type=prediction_type, clip_sample=clip_sample)
        # Keep the carry's dtype fixed (a bf16 model output would otherwise promote it).
        return x_prev.astype(x_t.dtype)

    return body


def _step_arrays(schedule: Schedule, num_steps: int):
    timesteps, prev_timesteps = ddim_timesteps(schedule.num_train_timesteps, num_steps)
    return (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(timesteps),
            jnp.asarray(prev_timesteps))


def sample(denoise_fn: DenoiseFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
           sampler: str = "ddim", eta: float = 0.0, rng: Optional[jax.Array] = None,
           prediction_type: str = "epsilon", clip_sample: bool = False) -> jax.Array:
    """Runs the whole reverse process in one ``jax.lax.scan`` (jittable, shardable).

    Args:
      denoise_fn: ``(x_t (B, *spatial, C), t (B,) int32) -> model output`` of the same
        shape as ``x_t``; closes over the network's parameters and conditioning.
      schedule: the training noise schedule.
      x_T: the starting noise ``(B, *spatial, C)``.
      num_steps: number of inference steps ``N`` (static; see :func:`ddim_timesteps`).
      sampler: ``"ddim"`` or ``"ddpm"``.
      eta: DDIM stochasticity (a static Python float; 0 is deterministic).
      rng: key for the per-step noise (step ``i`` uses ``fold_in(rng, i)``); needed by
        ``"ddpm"`` and by ``"ddim"`` with ``eta != 0``.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]`` at every step.

    Returns:
      ``x_0``, shape and dtype of ``x_T``.
    """
    body = _make_step_body(denoise_fn, schedule, sampler=sampler, eta=eta, rng=rng,
                           prediction_type=prediction_type, clip_sample=clip_sample)
    x0, _ = jax.lax.scan(lambda x, step: (body(x, step), None), x_T,
                         _step_arrays(schedule, num_steps))
    return x0


def sample_python_loop(denoise_fn: DenoiseFn, schedule: Schedule, x_T: jax.Array, *,
                       num_steps: int, sampler: str = "ddim", eta: float = 0.0,
                       rng: Optional[jax.Array] = None, prediction_type: str = "epsilon",
                       clip_sample: bool = False) -> jax.Array:
    """:func:`sample` with a plain Python loop over the same step (a reference for tests
    and for debugging a single step; traces the denoiser once per step under jit)."""
    body = _make_step_body(denoise_fn, schedule, sampler=sampler, eta=eta, rng=rng,
                           prediction_type=prediction_type, clip_sample=clip_sample)
    indices, timesteps, prev_timesteps = _step_arrays(schedule, num_steps)
    x = x_T
    for i in range(num_steps):
        x = body(x, (indices[i], timesteps[i], prev_timesteps[i]))
    return x
