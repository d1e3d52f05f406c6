"""Memory of a train step with and without rematerialisation (``config.model.remat``).

  sct-bench remat_memory                                   # pGAN small step, none vs blocks
  sct-bench remat_memory --config configs/cyclegan_pelvis.py:small \
      --remat none,blocks,dots_saveable
  sct-bench remat_memory --config configs/pgan_pelvis.py:tiny   # seconds: that it runs

(``sct-bench remat_memory`` is ``python -m sct_jax.bench.remat_memory``; run from the
repository root.) For each setting the method's ``train_step`` is compiled ahead of
time on the abstract state (``jax.eval_shape`` of ``create_state``; no step runs, no
weight is materialised) and XLA's ``memory_analysis()`` gives the temp and argument
bytes; ``generator_residual_mb`` is what the generator's forward pass keeps for its
backward (the leaves of ``jax.vjp``'s closure, from ``jax.eval_shape``:
backend-independent; ``null`` for a method without a ``gen`` or ``g_mr2ct`` state).
XLA:CPU folds the recomputation back into the forward pass (its compiled program has no
optimisation barriers left), so on a CPU the temp bytes do not move; accelerators keep
the rematerialisation. The perceptual loss is switched off: the generator and
discriminator are what ``remat`` changes.

One JSON line per setting: ``workload``, ``batch``, ``input_size``, ``temp_mb``,
``argument_mb``, ``output_mb``, ``generator_residual_mb``, ``flops`` (XLA's count of the
compiled step), ``compile_s``, ``peak_rss_mb`` (this process so far), ``dtype``,
``remat``, ``device``, ``load_average_1min``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax import methods, sharding
from sct_jax.bench import timing
from sct_jax.bench.vmap_seeds import random_batch
from sct_jax.config_utils import load_config_file

# State entries holding the sCT generator, by method family (GANs; CycleGAN's MR -> CT).
GENERATOR_KEYS = ("gen", "g_mr2ct")


def generator_residual_bytes(state, spec) -> int | None:
    """Bytes the generator's forward keeps for its backward (L1 loss, ``train=False``)."""
    key = next((k for k in GENERATOR_KEYS if k in state), None)
    if key is None:
        return None
    gen = state[key]

    def g_loss(params):
        fake = gen.apply_fn({"params": params}, jnp.zeros(spec["mr"].shape), train=False)
        return jnp.mean(jnp.abs(fake - jnp.zeros(spec["ct"].shape)))
    residuals = jax.eval_shape(lambda p: jax.vjp(g_loss, p)[1], gen.params)
    return sum(math.prod(r.shape) * r.dtype.itemsize for r in jax.tree.leaves(residuals))


def measure(config_spec: str, remat: str) -> dict:
    """Compiles ``config_spec``'s train step with ``model.remat=remat``; prints its line."""
    config = load_config_file(config_spec)
    config.model.remat = remat
    if "perceptual_weight" in config.loss:
        config.loss.perceptual_weight = 0.0
    method = methods.get_method(config.method)
    method.validate(config)
    spec = sharding.batch_spec(random_batch(config, np.random.default_rng(0)))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = jax.eval_shape(lambda k: method.create_state(config, k, spec), key)
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(method.train_step, config)).lower(
        state, spec, key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    residual = generator_residual_bytes(state, spec)
    line = {"workload": f"remat_memory/{config_spec}", "batch": int(config.train.batch_size),
            "input_size": list(spec["ct"].shape[1:-1]),
            "temp_mb": round(mem.temp_size_in_bytes / 2**20, 2),
            "argument_mb": round(mem.argument_size_in_bytes / 2**20, 2),
            "output_mb": round(mem.output_size_in_bytes / 2**20, 2),
            "generator_residual_mb": None if residual is None else round(residual / 2**20, 2),
            "flops": timing.cost_analysis_flops(compiled), "compile_s": round(compile_s, 3),
            "peak_rss_mb": round(timing.peak_rss_mb(), 1), **timing.run_settings(config),
            "device": timing.device_info(),
            "load_average_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(line), flush=True)
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pgan_pelvis.py:small",
                        help="config file[:variants] (from the repository root)")
    parser.add_argument("--remat", default="none,blocks",
                        help="comma-separated config.model.remat settings")
    args = parser.parse_args(argv)
    for remat in args.remat.split(","):
        measure(args.config, remat)


if __name__ == "__main__":
    main()
