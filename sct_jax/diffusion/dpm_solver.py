"""DPM-Solver++(2M) (Lu et al. 2022) as one ``jax.lax.scan``, for any Gaussian path.

The sampler integrates the probability-flow ODE of a path ``x_t = alpha_t x0 +
sigma_t eps`` written in the data prediction ``D(x_t, t) ~ E[x0 | x_t]`` and the
half log-SNR ``lambda_t = log(alpha_t / sigma_t)``. With ``h_i = lambda_i -
lambda_{i-1}`` the first-order step (the exponential integrator, DDIM's update)
is::

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_{i-1}
        = (sigma_i / sigma_{i-1}) x_{i-1} + (alpha_i - alpha_{i-1} sigma_i / sigma_{i-1}) D_{i-1}

and the second-order multistep (2M) replaces ``D_{i-1}`` by the extrapolation
``D_{i-1} + (D_{i-1} - D_{i-2}) / (2 r_i)``, ``r_i = h_{i-1} / h_i``, from the previous
step's prediction: one network call per step, as DDIM. The first step (no previous
prediction) and any step to or from an infinite ``lambda`` (``sigma = 0``, the clean
end; ``alpha = 0``, a flow's pure-noise start) are first order.

The solver takes a denoiser that predicts ``x0`` (:func:`x0_denoiser` turns an
epsilon / v / sample network into one), so it is the same for every prediction type
and for the flow-matching path (:mod:`sct_jax.diffusion.flow`). For the discrete
training schedule (:class:`~sct_jax.diffusion.schedules.Schedule`) the network is
called at integer timesteps :func:`dpm_timesteps` (uniform in log-SNR from ``T - 1``
to ``0``), and the last step goes to ``abar = 1``, i.e. returns the prediction at ``t = 0``, as
DDIM's last step does.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sct_jax.diffusion.schedules import Schedule, check_prediction_type, predict_x0_and_eps
from sct_jax.errors import ConfigError

# x0_fn(x_t: (B, *spatial, C), t: (B,)) -> x0 prediction, shape of x_t. ``t`` is what the
# network is conditioned on: int32 timesteps for the discrete schedule, float for a flow.
X0Fn = Callable[[jax.Array, jax.Array], jax.Array]

ORDERS = (1, 2)


def x0_denoiser(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
                prediction_type: str) -> X0Fn:
    """Wraps a network of any prediction type into an ``x0`` predictor.

    Args:
      denoise_fn: ``(x_t (B, *spatial, C), t (B,) int32) -> model output``.
      schedule: the training noise schedule.
      prediction_type: what ``denoise_fn`` predicts (``"epsilon"``, ``"v_prediction"``,
        ``"sample"``).

    Returns:
      ``(x_t, t) -> x0_hat``, shape of ``x_t``.
    """
    check_prediction_type(prediction_type)

    def x0_fn(x_t, t):
        x0, _ = predict_x0_and_eps(schedule, denoise_fn(x_t, t), x_t, t, prediction_type)
        return x0

    return x0_fn


def dpm_timesteps(schedule: Schedule, num_inference_steps: int) -> jax.Array:
    """The integer timesteps the network is called at: uniform in log-SNR.

    ``lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t))`` is spaced uniformly from
    ``lambda_{T-1}`` to ``lambda_0`` (DPM-Solver's "logSNR" grid: equal steps of the
    variable the solver's error depends on), then each point is rounded to the nearest
    timestep. Traceable (the schedule may be a traced pytree).

    Args:
      schedule: the training noise schedule.
      num_inference_steps: ``N``, ``1 <= N <= T``; keep ``N`` well below ``T``, where
        rounding could give a timestep twice (a wasted, harmless step).

    Returns:
      int32 ``(N,)``, descending from ``T - 1`` to ``0`` (``[T - 1]`` for ``N = 1``).

    Raises:
      ConfigError: ``N`` outside ``[1, T]``.
    """
    num_train = schedule.num_train_timesteps
    if not 1 <= num_inference_steps <= num_train:
        raise ConfigError(f"diffusion num_inference_steps={num_inference_steps} must lie "
                          f"in [1, num_train_timesteps={num_train}]")
    abar = schedule.alphas_cumprod
    # A cosine schedule's capped last beta can round abar_{T-1} to 0: keep lambda finite.
    lam = 0.5 * (jnp.log(jnp.maximum(abar, 1e-20)) - jnp.log1p(-abar))
    if num_inference_steps == 1:
        return jnp.full((1,), num_train - 1, jnp.int32)
    targets = jnp.linspace(lam[-1], lam[0], num_inference_steps)
    # lambda decreases with t: interpolate t on the reversed (increasing) lambda.
    t = jnp.interp(targets, lam[::-1], jnp.arange(num_train - 1, -1, -1, dtype=jnp.float32))
    return jnp.round(t).astype(jnp.int32)


def step_coefficients(alphas: jax.Array, sigmas: jax.Array, order: int = 2
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-step coefficients of the update ``x' = c_x x + c_d (D + c_2 (D - D_prev))``.

    Args:
      alphas: ``alpha`` at the ``N + 1`` points of the path, ``(N + 1,)``; the first
        ``N`` are where the network is called, the last is the end.
      sigmas: ``sigma`` at the same points; ``sigma > 0`` on the first ``N``.
      order: 1 (DDIM's exponential-integrator step) or 2 (DPM-Solver++(2M)).

    Returns:
      ``(c_x, c_d, c_2)``, float32 ``(N,)`` each; ``c_2 = 0`` where the step is first
      order.
    """
    if order not in ORDERS:
        raise ConfigError(f"DPM-Solver order {order} is unknown; expected one of {ORDERS}")
    alphas = jnp.asarray(alphas, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    c_x = sigmas[1:] / sigmas[:-1]
    c_d = alphas[1:] - alphas[:-1] * c_x
    n = alphas.shape[0] - 1
    if order == 1 or n < 2:
        return c_x, c_d, jnp.zeros_like(c_x)
    # log(0) = -inf at a flow's start, +inf at the clean end: those steps stay first
    # order, as does a step after a repeated point (h_prev = 0).
    lam = jnp.log(alphas) - jnp.log(sigmas)
    h = lam[1:] - lam[:-1]
    h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, h.dtype), h[:-1]])
    second = jnp.isfinite(h) & jnp.isfinite(h_prev) & (h_prev > 0)
    # 1 / (2 r) with r = h_prev / h; the inner wheres keep inf/nan out of both branches.
    c_2 = jnp.where(second, jnp.where(second, h, 0.0) / (2.0 * jnp.where(second, h_prev, 1.0)),
                    0.0)
    return c_x, c_d, c_2


def multistep_sample(x0_fn: X0Fn, x_start: jax.Array, model_times: jax.Array,
                     alphas: jax.Array, sigmas: jax.Array, order: int = 2) -> jax.Array:
    """Runs DPM-Solver++ (``order`` 1 or 2M) along a path, all steps in one scan.

    Args:
      x0_fn: ``(x_t, t (B,)) -> x0_hat``.
      x_start: the starting point ``(B, *spatial, C)`` at ``(alphas[0], sigmas[0])``.
      model_times: what the network is conditioned on at each of the ``N`` calls,
        ``(N,)`` (int timesteps or float times).
      alphas: ``(N + 1,)``, see :func:`step_coefficients`.
      sigmas: ``(N + 1,)``.
      order: 1 or 2.

    Returns:
      The end point, shape and dtype of ``x_start``.
    """
    c_x, c_d, c_2 = step_coefficients(alphas, sigmas, order)
    model_times = jnp.asarray(model_times)

    def body(carry, step):
        x, d_prev = carry
        t, cx, cd, c2 = step
        d = x0_fn(x, jnp.full((x.shape[0],), t, model_times.dtype)).astype(jnp.float32)
        d_eff = d + c2 * (d - d_prev)
        x_next = cx * x.astype(jnp.float32) + cd * d_eff
        # Keep the carry's dtype fixed (a bf16 model output would otherwise promote it).
        return (x_next.astype(x.dtype), d), None

    init = (x_start, jnp.zeros(x_start.shape, jnp.float32))
    (x_end, _), _ = jax.lax.scan(body, init, (model_times, c_x, c_d, c_2))
    return x_end


def sample_dpmpp(x0_fn: X0Fn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
                 order: int = 2) -> jax.Array:
    """DPM-Solver++ on the discrete training schedule, from noise to ``x0``.

    Args:
      x0_fn: ``(x_t, t (B,) int32) -> x0_hat`` (see :func:`x0_denoiser`).
      schedule: the training noise schedule (``alpha = sqrt(abar)``,
        ``sigma = sqrt(1 - abar)``).
      x_T: the starting noise ``(B, *spatial, C)``, taken to be at ``t = T - 1``.
      num_steps: network calls ``N`` (static).
      order: 2 for DPM-Solver++(2M), 1 for its first-order form (DDIM's update on
        this timestep grid).

    Returns:
      ``x0``, shape and dtype of ``x_T``.
    """
    timesteps = dpm_timesteps(schedule, num_steps)
    abar = jnp.concatenate([schedule.alphas_cumprod[timesteps], jnp.ones((1,), jnp.float32)])
    return multistep_sample(x0_fn, x_T, timesteps, jnp.sqrt(abar), jnp.sqrt(1.0 - abar),
                            order)
