"""Memory of a train step with and without rematerialisation (``config.model.remat``).

  python benchmarks/remat_memory.py                      # pGAN small step, none vs blocks
  python benchmarks/remat_memory.py --config configs/cyclegan_pelvis.py:small \
      --remat none,blocks,dots_saveable

For each setting the method's ``train_step`` is compiled ahead of time (no step runs)
and XLA's ``memory_analysis()`` gives the temp bytes; ``residual_mb`` is what the
generator's forward pass keeps for its backward (the leaves of ``jax.vjp``'s closure,
from ``jax.eval_shape``: backend-independent). XLA:CPU folds the recomputation back into
the forward pass (its compiled program has no optimisation barriers left), so on a CPU
the temp bytes do not move; accelerators keep the rematerialisation.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sct_jax import methods  # noqa: E402
from sct_jax.config_utils import load_config_file  # noqa: E402
from vmap_seeds import random_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config_spec: str, remat: str) -> dict:
    import numpy as np
    config = load_config_file(config_spec)
    config.model.remat = remat
    config.loss.perceptual_weight = 0.0  # no VGG weights file needed; G and D only
    method = methods.get_method(config.method)
    batch = random_batch(config, np.random.default_rng(0))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = jax.eval_shape(functools.partial(method.create_state, config, batch_spec=spec),
                           key)
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(method.train_step, config)).lower(
        state, spec, key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    gen = state["gen"]

    def g_loss(params):
        fake = gen.apply_fn({"params": params}, jnp.zeros(spec["mr"].shape), train=False)
        return jnp.mean(jnp.abs(fake - jnp.zeros(spec["ct"].shape)))
    residuals = jax.eval_shape(lambda p: jax.vjp(g_loss, p)[1], gen.params)
    residual_bytes = sum(math.prod(r.shape) * r.dtype.itemsize
                         for r in jax.tree.leaves(residuals))
    device = jax.devices()[0]
    return {"workload": f"remat:{config_spec}", "remat": remat,
            "dtype": str(config.model.dtype), "batch": int(config.train.batch_size),
            "input_size": list(spec["ct"].shape[1:-1]),
            "temp_mb": mem.temp_size_in_bytes / 2**20,
            "argument_mb": mem.argument_size_in_bytes / 2**20,
            "generator_residual_mb": residual_bytes / 2**20,
            "compile_s": compile_s, "device": device.device_kind,
            "platform": device.platform, "peak_rss_mb": common.peak_rss_mb()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs",
                                                         "pgan_pelvis.py:small"))
    parser.add_argument("--remat", default="none,blocks")
    args = parser.parse_args(argv)
    for remat in args.remat.split(","):
        print(json.dumps(measure(args.config, remat)), flush=True)


if __name__ == "__main__":
    main()
