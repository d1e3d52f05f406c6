"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022): target and sampler.

The path is the straight interpolation between data ``x0`` (``t = 0``) and noise
``eps`` (``t = 1``)::

    x_t = (1 - t) x0 + t eps,        t in [0, 1],

and the network is trained to regress the velocity ``dx_t/dt = eps - x0``
(:func:`flow_training_target`, the target of ``"velocity"`` prediction), with ``t``
drawn by :func:`sample_flow_times`. Given a velocity ``v``, the clean prediction is
``x0 = x_t - t v`` (:func:`velocity_to_x0`), so the sampler takes an ``x0`` predictor
like :mod:`sct_jax.diffusion.dpm_solver` and is the same solver on the path
``alpha_t = 1 - t``, ``sigma_t = t``: ``"euler"`` is the plain Euler step of the ODE
(for this path identical to the first-order data-prediction step), ``"dpmpp_2m"`` the
second-order multistep (one network call per step either way).

The network is conditioned on ``t * time_scale`` (default 1000, the range of the
discrete timesteps a diffusion UNet's sinusoidal embedding is built for).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.diffusion.dpm_solver import X0Fn, multistep_sample
from sct_jax.diffusion.schedules import broadcast_to_batch
from sct_jax.errors import ConfigError

FLOW_SOLVERS = ("euler", "dpmpp_2m")
TIME_SAMPLING = ("uniform", "logit_normal")
DEFAULT_TIME_SCALE = 1000.0


def flow_interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x0 + t eps``.

    Args:
      x0: clean data ``(B, *spatial, C)``.
      noise: ``eps``, same shape.
      t: ``(B,)`` (or a scalar) float times in ``[0, 1]``.

    Returns:
      ``x_t``, shape of ``x0``.
    """
    t = broadcast_to_batch(t, x0)
    return (1.0 - t) * x0 + t * noise


def flow_training_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity ``eps - x0`` a flow model regresses at ``flow_interpolate(x0, eps, t)``.

    Args:
      x0: clean data ``(B, *spatial, C)``.
      noise: ``eps``, same shape.

    Returns:
      The target, shape of ``x0`` (independent of ``t``: the path is straight).
    """
    return noise - x0


def sample_flow_times(rng: jax.Array, batch: int, kind: str = "uniform",
                      mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Training times ``t ~ U(0, 1)`` or logit-normal (Esser et al. 2024).

    Args:
      rng: PRNG key.
      batch: ``B``.
      kind: ``"uniform"`` or ``"logit_normal"`` (``sigmoid(N(mean, std^2))``, which
        weights the middle of the path more).
      mean: logit-normal location.
      std: logit-normal scale.

    Returns:
      float32 ``(B,)`` in ``[0, 1]``.
    """
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    raise ConfigError(f"flow time sampling {kind!r} is unknown; expected one of "
                      f"{TIME_SAMPLING}")


def velocity_to_x0(velocity: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """``x0 = x_t - t v`` for a velocity prediction ``v`` at ``(x_t, t)``.

    Args:
      velocity: ``(B, *spatial, C)``.
      x_t: same shape.
      t: ``(B,)`` or a scalar, float times in ``[0, 1]``.

    Returns:
      ``x0_hat``, shape of ``x_t``.
    """
    return x_t - broadcast_to_batch(t, x_t) * velocity


def velocity_denoiser(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
                      time_scale: float = DEFAULT_TIME_SCALE) -> X0Fn:
    """Wraps a velocity network ``(x_t, t * time_scale) -> v`` into an ``x0`` predictor
    ``(x_t, t) -> x0_hat`` for :func:`sample_flow` (``t`` float ``(B,)`` in ``[0, 1]``)."""

    def x0_fn(x_t, t):
        t = jnp.asarray(t, jnp.float32)
        return velocity_to_x0(velocity_fn(x_t, t * time_scale), x_t, t)

    return x0_fn


def flow_times(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """The ``N + 1`` times of the sampler, from ``1`` (noise) down to ``0`` (data).

    Uniform in ``t``, then ``t -> shift t / (1 + (shift - 1) t)`` (Esser et al. 2024:
    ``shift > 1`` spends more steps at high noise).

    Args:
      num_steps: network calls ``N >= 1``.
      shift: time shift, ``> 0``.

    Returns:
      float64 ``(N + 1,)``, strictly descending, ``[1, ..., 0]``.

    Raises:
      ConfigError: ``N < 1`` or ``shift <= 0``.
    """
    if num_steps < 1:
        raise ConfigError(f"flow num_steps={num_steps}: needs at least 1")
    if not shift > 0:
        raise ConfigError(f"flow shift={shift}: must be > 0")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_flow(x0_fn: X0Fn, x_1: jax.Array, *, num_steps: int, solver: str = "dpmpp_2m",
                shift: float = 1.0) -> jax.Array:
    """Integrates the flow ODE from noise ``x_1`` (``t = 1``) to data, in one scan.

    Args:
      x0_fn: ``(x_t, t (B,) float in [0, 1]) -> x0_hat`` (see :func:`velocity_denoiser`).
      x_1: ``N(0, I)`` noise ``(B, *spatial, C)``.
      num_steps: network calls ``N`` (static).
      solver: ``"euler"`` or ``"dpmpp_2m"``.
      shift: see :func:`flow_times`.

    Returns:
      ``x0``, shape and dtype of ``x_1``.
    """
    if solver not in FLOW_SOLVERS:
        raise ConfigError(f"flow solver {solver!r} is unknown; expected one of "
                          f"{FLOW_SOLVERS}")
    t = flow_times(num_steps, shift)
    return multistep_sample(x0_fn, x_1, jnp.asarray(t[:-1], jnp.float32),
                            jnp.asarray(1.0 - t, jnp.float32), jnp.asarray(t, jnp.float32),
                            order=1 if solver == "euler" else 2)
