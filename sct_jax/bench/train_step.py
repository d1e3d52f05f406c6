"""pix2pix train-step throughput (D and G updates), 2D and 3D, one JSON line per workload.

  sct-bench train_step                                  # every workload, conv_impl=auto
  sct-bench train_step --workload p2p_256_b1 --impl xla
  sct-bench train_step --workload p2p_256_b6 --dtype bfloat16 --remat blocks

(``sct-bench X`` is ``python -m sct_jax.bench.X``; run from the repository root, the
configs are read from ``configs/``.) FLOPs are XLA's count for the step lowered with the
native convolution (``impl=xla``), so GFLOP/s of different lowerings compare on the same
work. Run each workload in its own process (the suites do) for a per-workload peak RSS.
``--dtype``/``--remat`` set ``config.model.dtype``/``config.model.remat``.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import numpy as np

from sct_jax.bench import timing
from sct_jax.config_utils import load_config_file
from sct_jax.methods import pix2pix

# name -> (config, overrides): the reference architectures of the throughput issue.
WORKLOADS = {
    # unet_256 (8 downsamplings, ngf 64) + 70x70 PatchGAN, as PyTorch's pix2pix default.
    "p2p_256_b1": ("pix2pix_pelvis.py", dict(crop=(256, 256), num_downs=8, batch=1)),
    "p2p_256_b6": ("pix2pix_pelvis.py", dict(crop=(256, 256), num_downs=8, batch=6)),
    # the pelvis config: 320 x 192, 6 downsamplings, batch 6.
    "p2p_320x192_b6": ("pix2pix_pelvis.py", dict(batch=6)),
    # the CPU demo model.
    "p2p_small_b4": ("pix2pix_pelvis.py:small", dict()),
    # 3D pelvis patches (seed 03), batch 1.
    "p2p3d_128x128x32_b1": ("pix2pix3d_pelvis.py", dict(batch=1)),
}


def build(name: str, impl: str, dtype: str | None = None, remat: str | None = None):
    path, overrides = WORKLOADS[name]
    config = load_config_file(os.path.join("configs", path))
    config.model.conv_impl = impl
    for key, value in (("dtype", dtype), ("remat", remat)):
        if value is not None:
            if key not in config.model:
                raise SystemExit(f"error: configs/{path}: config.model has no {key!r}")
            config.model[key] = value
    if "crop" in overrides:
        config.data.crop = overrides["crop"]
    if "num_downs" in overrides:
        config.model.gen.num_downs = overrides["num_downs"]
    if "batch" in overrides:
        config.train.batch_size = overrides["batch"]
    size = tuple(config.data.patch if config.data.mode == "patches" else config.data.crop)
    b = config.train.batch_size
    rng = np.random.default_rng(0)
    batch = {"mr": rng.uniform(-1, 1, (b, *size, 1)).astype(np.float32),
             "ct": rng.uniform(-1, 1, (b, *size, 1)).astype(np.float32),
             "mask": np.ones((b, *size, 1), np.float32)}
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    key = jax.random.key_data(jax.random.key(0))
    state = jax.jit(functools.partial(pix2pix.create_state, config, batch_spec=spec))(key)
    step = functools.partial(pix2pix.train_step, config)
    return config, step, (state, batch, key), size


def model_flops(name: str, dtype: str | None = None) -> float:
    """FLOPs of the step with XLA's native convolutions and no remat (the reference)."""
    _, step, args, _ = build(name, "xla", dtype)
    return timing.cost_analysis_flops(jax.jit(step).lower(*args).compile())


def run_workload(name: str, impl: str, steps: int, peak: float, dtype: str | None = None,
                 remat: str | None = None) -> dict:
    config, step, args, size = build(name, impl, dtype, remat)
    timed = timing.time_jitted(step, args, steps=steps, warmup=1)
    flops = (model_flops(name, dtype) if impl != "xla" or remat not in (None, "none")
             else timed["flops"])
    return timing.report(f"pix2pix_train_step/{name}", config.train.batch_size, size, flops,
                         timed["s_per_step_median"], peak, timed["compile_s"],
                         **timing.run_settings(config), impl=impl,
                         lowered_flops=timed["flops"],
                         s_per_step_all=[round(t, 4) for t in timed["s_per_step_all"]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append",
                        help="repeatable; default: all")
    parser.add_argument("--impl", default="auto", help="model.conv_impl (auto, xla, cpu_fast)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--dtype", help="config.model.dtype (default: the config's)")
    parser.add_argument("--remat", help="config.model.remat (default: the config's)")
    args = parser.parse_args(argv)
    peak = timing.matmul_peak_gflops()
    for name in args.workload or sorted(WORKLOADS):
        run_workload(name, args.impl, args.steps, peak, args.dtype, args.remat)


if __name__ == "__main__":
    main()
