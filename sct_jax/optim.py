"""Optimisers and learning-rate schedules shared by the methods."""

from __future__ import annotations

import optax


def constant_then_linear_decay(lr: float, total_steps: int, decay_start: float) -> optax.Schedule:
    """pix2pix/pGAN schedule: ``lr`` for the first ``decay_start`` fraction, then linear to 0.

    Args:
      lr: peak learning rate.
      total_steps: training length in steps.
      decay_start: fraction of ``total_steps`` (in [0, 1]) at which the decay starts
        (the references use ``n_epochs / (n_epochs + n_epochs_decay)``, i.e. 0.5).
    """
    boundary = int(round(total_steps * decay_start))
    decay_steps = max(total_steps - boundary, 1)
    return optax.join_schedules(
        [optax.constant_schedule(lr),
         optax.linear_schedule(lr, 0.0, decay_steps)], [boundary])


def adam(optim_config, total_steps: int) -> optax.GradientTransformation:
    """Adam with the config's betas and the constant-then-linear-decay schedule.

    ``optim_config`` fields: ``lr``, ``b1``, ``b2``, ``decay_start``.
    """
    schedule = constant_then_linear_decay(optim_config.lr, total_steps, optim_config.decay_start)
    return optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2)
