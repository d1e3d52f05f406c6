"""Noise schedules and the closed-form forward process of a diffusion model.

Everything here is a pure function of a :class:`Schedule` pytree (no Python state), so
it can be passed through ``jax.jit``/``lax.scan`` and sharded like any other array.

Notation (Ho et al. 2020): ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``
(``alphas_cumprod``), timesteps ``t = 0 .. T-1``, and the forward process

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,     eps ~ N(0, I).

A network predicts one of three things (``prediction_type``):

- ``"epsilon"``: the noise ``eps``;
- ``"v_prediction"``: ``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (Salimans & Ho
  2022), as diffusers / MONAI;
- ``"sample"``: the clean ``x0``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sct_jax.errors import ConfigError

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Nichol & Dhariwal (2021): offset s of the cosine schedule and the cap on beta_t that
# keeps the last steps from being singular (abar_T would be exactly 0).
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


@struct.dataclass
class Schedule:
    """A discrete noise schedule, a pytree of float32 arrays of shape ``(T,)``.

    Attributes:
      betas: ``beta_t``, the per-step noise variances.
      alphas: ``1 - beta_t``.
      alphas_cumprod: ``abar_t = prod_{s<=t} alpha_s``, decreasing from ``~1`` to ``~0``.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        """``T``, static (the arrays' length)."""
        return self.betas.shape[0]


def _cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)``, float64."""
    steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    abar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], COSINE_MAX_BETA)


def make_schedule(kind: str = "scaled_linear", num_train_timesteps: int = 1000,
                  beta_start: float = 0.0015, beta_end: float = 0.0195) -> Schedule:
    """Builds a noise schedule (computed in float64, stored as float32).

    Args:
      kind: ``"scaled_linear"`` (``linspace(sqrt(beta_start), sqrt(beta_end), T)**2``, the
        latent-diffusion schedule of diffusers and MONAI), ``"linear"``
        (``linspace(beta_start, beta_end, T)``) or ``"cosine"`` (Nichol & Dhariwal with
        ``s = 0.008`` and betas capped at 0.999; ignores ``beta_start``/``beta_end``).
      num_train_timesteps: ``T``.
      beta_start: ``beta_0`` of the linear kinds.
      beta_end: ``beta_{T-1}`` of the linear kinds.

    Returns:
      The :class:`Schedule`.

    Raises:
      ConfigError: an unknown ``kind``, ``T < 1`` or betas outside ``(0, 1)``.
    """
    if num_train_timesteps < 1:
        raise ConfigError(f"diffusion num_train_timesteps={num_train_timesteps}: "
                          "needs at least 1")
    if kind == "scaled_linear":
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end),
                            num_train_timesteps, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif kind == "cosine":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ConfigError(f"diffusion schedule {kind!r} is unknown; expected one of "
                          f"{SCHEDULE_KINDS}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ConfigError(f"diffusion schedule {kind!r} with beta_start={beta_start}, "
                          f"beta_end={beta_end}: betas must lie in (0, 1)")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    return Schedule(betas=jnp.asarray(betas, jnp.float32),
                    alphas=jnp.asarray(alphas, jnp.float32),
                    alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def check_prediction_type(prediction_type: str) -> str:
    """Returns ``prediction_type`` or raises :class:`ConfigError`."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"diffusion prediction_type {prediction_type!r} is unknown; "
                          f"expected one of {PREDICTION_TYPES}")
    return prediction_type


def broadcast_to_batch(values: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes per-sample ``values`` ``(B,)`` (or a scalar) to broadcast against ``like``.

    Args:
      values: ``()`` or ``(B,)``.
      like: ``(B, *rest)``.

    Returns:
      ``()`` or ``(B, 1, ..., 1)`` with ``like.ndim`` axes, in ``like``'s dtype.
    """
    values = jnp.asarray(values, like.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _sqrt_abar(schedule: Schedule, t: jax.Array, like: jax.Array):
    """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` shaped to broadcast against ``like``."""
    abar = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return (broadcast_to_batch(jnp.sqrt(abar), like),
            broadcast_to_batch(jnp.sqrt(1.0 - abar), like))


def q_sample(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Draws ``x_t ~ q(x_t | x0)`` given the noise.

    Args:
      schedule: the noise schedule.
      x0: clean data ``(B, *spatial, C)``.
      noise: ``eps``, same shape as ``x0``.
      t: integer timesteps ``(B,)`` (or a scalar) in ``[0, T)``.

    Returns:
      ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, shape of ``x0``.
    """
    sqrt_ab, sqrt_one_minus_ab = _sqrt_abar(schedule, t, x0)
    return sqrt_ab * x0 + sqrt_one_minus_ab * noise


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str = "epsilon") -> jax.Array:
    """What the network is trained to output at ``x_t = q_sample(schedule, x0, noise, t)``.

    Args:
      schedule: the noise schedule.
      x0: clean data ``(B, *spatial, C)``.
      noise: ``eps``, same shape.
      t: integer timesteps ``(B,)`` or a scalar.
      prediction_type: ``"epsilon"`` (``eps``), ``"v_prediction"``
        (``sqrt(abar_t) eps - sqrt(1 - abar_t) x0``) or ``"sample"`` (``x0``).

    Returns:
      The target, shape of ``x0``.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    sqrt_ab, sqrt_one_minus_ab = _sqrt_abar(schedule, t, x0)
    return sqrt_ab * noise - sqrt_one_minus_ab * x0


def predict_x0_and_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array,
                       t: jax.Array, prediction_type: str = "epsilon"
                       ) -> tuple[jax.Array, jax.Array]:
    """Converts a network output of any prediction type into ``(x0_hat, eps_hat)``.

    Inverts ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` together with the definition
    of the prediction; exact (up to rounding) when the output is exact.

    Args:
      schedule: the noise schedule.
      model_output: the network output, shape of ``x_t``.
      x_t: the noisy input ``(B, *spatial, C)``.
      t: integer timesteps ``(B,)`` or a scalar, in ``[0, T)``.
      prediction_type: see :func:`training_target`.

    Returns:
      ``(x0_hat, eps_hat)``, each the shape of ``x_t``.
    """
    check_prediction_type(prediction_type)
    sqrt_ab, sqrt_one_minus_ab = _sqrt_abar(schedule, t, x_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_one_minus_ab * eps) / sqrt_ab
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - sqrt_ab * x0) / sqrt_one_minus_ab
    else:
        # With a = sqrt(abar), b = sqrt(1 - abar), a^2 + b^2 = 1: x0 = a x_t - b v and
        # eps = b x_t + a v, which stays well conditioned at both ends of the schedule.
        x0 = sqrt_ab * x_t - sqrt_one_minus_ab * model_output
        eps = sqrt_one_minus_ab * x_t + sqrt_ab * model_output
    return x0, eps
