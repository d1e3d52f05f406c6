"""The sampler a config names (``config.ldm.sampler``), behind one call.

``"ddim"`` and ``"ddpm"`` are :func:`sct_jax.diffusion.samplers.sample`;
``"dpmpp_2m"`` is DPM-Solver++(2M) (:mod:`sct_jax.diffusion.dpm_solver`), which
takes the network through its ``x0`` prediction and so works for every
``prediction_type``. The flow-matching sampler (:mod:`sct_jax.diffusion.flow`) needs a
network trained for the flow's velocity and is called directly.
"""

from __future__ import annotations

from typing import Optional

import jax

from sct_jax.diffusion.dpm_solver import sample_dpmpp, x0_denoiser
from sct_jax.diffusion.samplers import SAMPLERS, DenoiseFn, sample
from sct_jax.diffusion.schedules import Schedule
from sct_jax.errors import ConfigError

SAMPLER_CHOICES = (*SAMPLERS, "dpmpp_2m")


def check_sampler(sampler: str) -> str:
    """Returns ``sampler`` or raises :class:`ConfigError` naming the choices."""
    if sampler not in SAMPLER_CHOICES:
        raise ConfigError(f"diffusion sampler {sampler!r} is unknown; expected one of "
                          f"{SAMPLER_CHOICES}")
    return sampler


def sample_any(denoise_fn: DenoiseFn, schedule: Schedule, x_T: jax.Array, *, num_steps: int,
               sampler: str = "ddim", eta: float = 0.0, rng: Optional[jax.Array] = None,
               prediction_type: str = "epsilon", clip_sample: bool = False) -> jax.Array:
    """:func:`sct_jax.diffusion.samplers.sample` with ``sampler="dpmpp_2m"`` added.

    The arguments are those of :func:`~sct_jax.diffusion.samplers.sample`;
    DPM-Solver++ is deterministic (ignores ``eta`` and ``rng``) and has no
    ``clip_sample`` (latents are never clipped).

    Returns:
      ``x_0``, shape and dtype of ``x_T``.
    """
    if check_sampler(sampler) == "dpmpp_2m":
        if clip_sample:
            raise ConfigError("diffusion sampler 'dpmpp_2m' does not clip samples")
        return sample_dpmpp(x0_denoiser(denoise_fn, schedule, prediction_type), schedule,
                            x_T, num_steps=num_steps)
    return sample(denoise_fn, schedule, x_T, num_steps=num_steps, sampler=sampler, eta=eta,
                  rng=rng, prediction_type=prediction_type, clip_sample=clip_sample)
