"""Diffusion schedules and samplers as pure functions (the LDM's: see
``sct_jax/methods/_ldm_common.py``)."""

from sct_jax.diffusion.samplers import (ddim_step, ddim_timesteps, ddpm_step, sample,
                                        sample_python_loop)
from sct_jax.diffusion.schedules import (Schedule, make_schedule, predict_x0_and_eps,
                                         q_sample, training_target)

__all__ = ["Schedule", "make_schedule", "q_sample", "training_target",
           "predict_x0_and_eps", "ddim_timesteps", "ddim_step", "ddpm_step", "sample",
           "sample_python_loop"]
