"""Diffusion schedules and samplers as pure functions.

DDIM/DDPM (:mod:`~sct_jax.diffusion.samplers`), DPM-Solver++(2M)
(:mod:`~sct_jax.diffusion.dpm_solver`) and flow matching
(:mod:`~sct_jax.diffusion.flow`); :func:`sample_any` runs the one a config names.
"""

from sct_jax.diffusion.dpm_solver import sample_dpmpp, x0_denoiser
from sct_jax.diffusion.flow import (flow_interpolate, flow_training_target, sample_flow,
                                    velocity_denoiser)
from sct_jax.diffusion.samplers import (ddim_step, ddim_timesteps, ddpm_step, sample,
                                        sample_python_loop)
from sct_jax.diffusion.schedules import (Schedule, make_schedule, predict_x0_and_eps,
                                         q_sample, training_target)
from sct_jax.diffusion.select import SAMPLER_CHOICES, sample_any

__all__ = ["Schedule", "make_schedule", "q_sample", "training_target",
           "predict_x0_and_eps", "ddim_timesteps", "ddim_step", "ddpm_step", "sample",
           "sample_python_loop", "sample_dpmpp", "x0_denoiser", "flow_interpolate",
           "flow_training_target", "sample_flow", "velocity_denoiser", "SAMPLER_CHOICES",
           "sample_any"]
