"""N seeds of one config: one vmapped train step vs N sequential steps, s per seed-step.

  python benchmarks/vmap_seeds.py                                  # pGAN tiny, N = 4
  python benchmarks/vmap_seeds.py --config configs/pgan_pelvis.py:small --seeds 4

What ``python -m sct_jax.cli.ablate ... --seeds N --vmap`` gains: the vmapped program
steps N states (a leading seed axis) on N batches at once; the sequential baseline calls
the single-seed compiled step once per seed. Both on random batches of the config's
shape (no data pipeline), each timed as the median of ``--steps`` after warm-up. Prints
one JSON line: ``s_per_seed_step_vmapped``, ``s_per_seed_step_sequential``, their ratio,
both compile times, the device, the dtype and remat of the config.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from sct_jax import methods  # noqa: E402
from sct_jax.config_utils import load_config_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of the config's training shape: ``mr`` (2.5D context channels), ``ct``."""
    b = int(config.train.batch_size)
    spatial = tuple(config.data.patch if config.data.mode == "patches" else config.data.crop)
    c_in = 2 * int(config.data.get("context", 0)) + 1
    return {"mr": rng.uniform(-1, 1, (b, *spatial, c_in)).astype(np.float32),
            "ct": rng.uniform(-1, 1, (b, *spatial, 1)).astype(np.float32)}


def measure(config_spec: str, n_seeds: int, steps: int) -> dict:
    config = load_config_file(config_spec)
    method = methods.get_method(config.method)
    rng = np.random.default_rng(0)
    batches = [random_batch(config, rng) for _ in range(n_seeds)]
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in range(n_seeds)])
    create = functools.partial(method.create_state, config, batch_spec=spec)
    step = functools.partial(method.train_step, config)

    states = [jax.jit(create)(k) for k in keys]
    t0 = time.perf_counter()
    single = jax.jit(step).lower(states[0], batches[0], keys[0]).compile()
    compile_single = time.perf_counter() - t0

    def sequential():
        nonlocal states
        out = [single(s, b, k) for s, b, k in zip(states, batches, keys)]
        states = [o[0] for o in out]
        return [o[1] for o in out]

    stacked = jax.jit(jax.vmap(create))(keys)
    stacked_batch = {k: np.stack([b[k] for b in batches]) for k in spec}
    t0 = time.perf_counter()
    vmapped = jax.jit(jax.vmap(step)).lower(stacked, stacked_batch, keys).compile()
    compile_vmapped = time.perf_counter() - t0

    def together():
        nonlocal stacked
        stacked, metrics = vmapped(stacked, stacked_batch, keys)
        return metrics

    seq_s, _ = common._median_seconds(sequential, steps, warmup=1)
    vm_s, _ = common._median_seconds(together, steps, warmup=1)
    device = jax.devices()[0]
    return {"workload": f"vmap_seeds:{config_spec}", "n_seeds": n_seeds,
            "batch_per_seed": int(config.train.batch_size),
            "input_size": list(spec["ct"].shape[1:-1]),
            "s_per_seed_step_vmapped": vm_s / n_seeds,
            "s_per_seed_step_sequential": seq_s / n_seeds,
            "speedup": seq_s / vm_s,
            "compile_s_vmapped": compile_vmapped, "compile_s_single": compile_single,
            "device": device.device_kind, "platform": device.platform,
            "dtype": str(config.model.get("dtype", "float32")),
            "remat": str(config.model.get("remat", "none")),
            "peak_rss_mb": common.peak_rss_mb()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs",
                                                         "pgan_pelvis.py:tiny"))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.config, args.seeds, args.steps)), flush=True)


if __name__ == "__main__":
    main()
