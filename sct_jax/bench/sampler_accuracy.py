"""How many steps each sampler needs: error against the exact probability-flow endpoint.

  sct-bench sampler_accuracy [--steps 5,10,15,20,50] [--std 1.0] [--mean 0.0]

(``sct-bench sampler_accuracy`` is ``python -m sct_jax.bench.sampler_accuracy``.) For
Gaussian data ``x0 ~ N(mean, std^2)`` the exact denoiser of any path ``x_t = a x0 + b
eps`` is known in closed form, and so is where the probability-flow ODE takes a noise
sample: ``mean + std (x_t - a mean) / sqrt(a^2 std^2 + b^2)``. One JSON line per
(sampler, steps) with the RMS distance of 4096 samples to that endpoint (``rms_error``)
and per network call (``steps``): DDIM and DPM-Solver++(2M) on the LDM's training
schedule (``configs/ldm_brain.py``: scaled-linear 0.0015..0.0195, 1000 steps), Euler and
DPM-Solver++(2M) on the flow-matching path. No timing: every sampler costs one
network call per step.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.diffusion import make_schedule, sample
from sct_jax.diffusion.dpm_solver import sample_dpmpp
from sct_jax.diffusion.flow import sample_flow
from sct_jax.diffusion.samplers import ddim_timesteps


def _gaussian_x0(a, b, x_t, mean, std):
    return mean + a * std ** 2 / (a ** 2 * std ** 2 + b ** 2) * (x_t - a * mean)


def _endpoint(a, b, x_t, mean, std):
    return mean + std * (np.asarray(x_t, np.float64) - a * mean) / math.sqrt(
        a * a * std * std + b * b)


def _rms(x, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))


def measure(steps: Sequence[int], mean: float, std: float) -> list[dict]:
    """Returns (and prints) one record per (sampler, steps)."""
    schedule = make_schedule("scaled_linear", 1000, 0.0015, 0.0195)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    noise = jax.random.normal(jax.random.key(0), (64 * 64,)).reshape(1, 64, 64, 1)

    def vp_x0(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return _gaussian_x0(jnp.sqrt(ab), jnp.sqrt(1 - ab), x_t, mean, std)

    def vp_eps(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - jnp.sqrt(ab) * vp_x0(x_t, t)) / jnp.sqrt(1 - ab)

    def flow_x0(x_t, t):
        t = t.reshape(-1, 1, 1, 1)
        return _gaussian_x0(1 - t, t, x_t, mean, std)

    def vp_endpoint(t):
        return _endpoint(math.sqrt(abar[t]), math.sqrt(1 - abar[t]), noise, mean, std)

    records = []
    for n in steps:
        runs = {
            # DDIM's "leading" grid starts at t = 980 for 50 steps: its own endpoint.
            ("ldm_schedule", "ddim"): (
                lambda x: sample(vp_eps, schedule, x, num_steps=n),
                vp_endpoint(int(ddim_timesteps(1000, n)[0][0]))),
            ("ldm_schedule", "dpmpp_2m"): (
                lambda x: sample_dpmpp(vp_x0, schedule, x, num_steps=n), vp_endpoint(999)),
            ("flow", "euler"): (
                lambda x: sample_flow(flow_x0, x, num_steps=n, solver="euler"),
                mean + std * np.asarray(noise, np.float64)),
            ("flow", "dpmpp_2m"): (
                lambda x: sample_flow(flow_x0, x, num_steps=n, solver="dpmpp_2m"),
                mean + std * np.asarray(noise, np.float64)),
        }
        for (path, sampler), (fn, exact) in runs.items():
            record = {"benchmark": "sampler_accuracy", "path": path, "sampler": sampler,
                      "steps": n, "data_mean": mean, "data_std": std,
                      "rms_error": round(_rms(jax.jit(fn)(noise), exact), 5),
                      "dtype": "float32", "remat": "none"}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,10,15,20,50",
                        help="comma-separated numbers of steps")
    parser.add_argument("--mean", type=float, default=0.0, help="data mean")
    parser.add_argument("--std", type=float, default=1.0, help="data standard deviation")
    args = parser.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: expected comma-separated integers")
    if not steps or min(steps) < 1 or max(steps) > 1000 or not args.std > 0:
        parser.error("--steps must lie in [1, 1000] and --std must be > 0")
    return measure(steps, args.mean, args.std)


if __name__ == "__main__":
    main()
