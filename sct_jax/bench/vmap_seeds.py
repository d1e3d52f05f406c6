"""N seeds of one config: one vmapped train step vs N sequential steps, s per seed-step.

  sct-bench vmap_seeds                                        # pGAN tiny, N = 4
  sct-bench vmap_seeds --config configs/pgan_pelvis.py:small --seeds 4
  sct-bench vmap_seeds --seeds 2 --steps 2                    # seconds: that it runs

(``sct-bench vmap_seeds`` is ``python -m sct_jax.bench.vmap_seeds``; run from the
repository root, the configs are read from ``configs/``.) What ``sct-ablate ... --seeds
N --vmap`` gains (:func:`sct_jax.training.loop.train_seeds`): the vmapped program steps
N states (a leading seed axis) on N batches at once; the baseline calls the single-run
step (:func:`sct_jax.training.loop.build_step` on one device) once per seed. Both are
compiled as the loop compiles them (state donated), run on random batches of the
config's shape (no data pipeline) and states from ``create_state`` alone (no
``load_pretrained``: placeholder weights cost what loaded ones do), and timed as the
median of ``--steps`` calls after one warm-up call.

One JSON line (:func:`sct_jax.bench.timing.report`): ``s_per_step_median``, ``flops``
and ``compile_s`` are those of the vmapped step (all N seeds, ``batch`` each);
``s_per_seed_step_vmapped``, ``s_per_seed_step_sequential``, their ratio ``speedup``,
``compile_s_single`` and ``flops_single`` (one seed's step). ``peak_rss_mb`` covers
both programs (one process).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from sct_jax import methods, sharding
from sct_jax.bench import timing
from sct_jax.config_utils import load_config_file
from sct_jax.training import loop


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of the config's training shape: ``mr`` ``(B, *spatial, 2 * context + 1)``,
    ``ct`` and ``mask`` ``(B, *spatial, 1)``, as the paired pipelines yield it."""
    b = int(config.train.batch_size)
    spatial = tuple(config.data.patch if config.data.mode == "patches" else config.data.crop)
    c_in = datasets.input_channels(config)
    return {"mr": rng.uniform(-1, 1, (b, *spatial, c_in)).astype(np.float32),
            "ct": rng.uniform(-1, 1, (b, *spatial, 1)).astype(np.float32),
            "mask": np.ones((b, *spatial, 1), np.float32)}


def measure(config_spec: str, n_seeds: int, steps: int, peak: float) -> dict:
    """Times both programs and prints (and returns) the JSON line."""
    config = load_config_file(config_spec)
    method = methods.get_method(config.method)
    method.validate(config)
    rng = np.random.default_rng(0)
    batches = [random_batch(config, rng) for _ in range(n_seeds)]
    spec = sharding.batch_spec(batches[0])
    # The loop's keys: seed s initialises from split(key(s))[0], steps with [1].
    keys = [jax.random.split(jax.random.key_data(jax.random.key(s))) for s in range(n_seeds)]
    init_rngs = np.stack([np.asarray(k[0]) for k in keys])
    step_rngs = np.stack([np.asarray(k[1]) for k in keys])
    create = functools.partial(method.create_state, config, batch_spec=spec)

    # Sequential: the single-run program on one device, called once per seed.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract_state = jax.eval_shape(create, init_rngs[0])
    single, state_shardings, compile_single = loop.build_step(method, config, mesh,
                                                              abstract_state, spec)
    states = [jax.jit(create, out_shardings=state_shardings)(k) for k in init_rngs]
    device_batches = [jax.device_put(b, sharding.batch_sharding(mesh)) for b in batches]
    repl = sharding.replicated(mesh)
    device_rngs = [jax.device_put(k, repl) for k in step_rngs]

    def sequential():
        nonlocal states
        out = [single(s, b, k) for s, b, k in zip(states, device_batches, device_rngs)]
        states = [o[0] for o in out]
        return [o[1] for o in out]

    # Vmapped: as loop.train_seeds compiles it (a leading seed axis, state donated).
    stacked = jax.jit(jax.vmap(create))(init_rngs)
    stacked_batch = jax.device_put({k: np.stack([b[k] for b in batches]) for k in spec})
    stacked_rngs = jax.device_put(step_rngs)
    t0 = time.perf_counter()
    vmapped = jax.jit(jax.vmap(functools.partial(method.train_step, config)),
                      donate_argnums=(0,)).lower(stacked, stacked_batch, stacked_rngs).compile()
    compile_vmapped = time.perf_counter() - t0

    def together():
        nonlocal stacked
        stacked, metrics = vmapped(stacked, stacked_batch, stacked_rngs)
        return metrics

    seq_s, seq_all = timing.median_seconds(sequential, steps, warmup=1)
    vm_s, vm_all = timing.median_seconds(together, steps, warmup=1)
    return timing.report(
        f"vmap_seeds/{config_spec}", int(config.train.batch_size), spec["ct"].shape[1:-1],
        timing.cost_analysis_flops(vmapped), vm_s, peak, compile_vmapped,
        **timing.run_settings(config), n_seeds=n_seeds,
        s_per_seed_step_vmapped=round(vm_s / n_seeds, 6),
        s_per_seed_step_sequential=round(seq_s / n_seeds, 6),
        speedup=round(seq_s / vm_s, 3), compile_s_single=round(compile_single, 3),
        flops_single=timing.cost_analysis_flops(single),
        s_per_step_all_vmapped=[round(t, 4) for t in vm_all],
        s_per_step_all_sequential=[round(t, 4) for t in seq_all])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pgan_pelvis.py:tiny",
                        help="config file[:variants] (from the repository root)")
    parser.add_argument("--seeds", type=int, default=4, help="N, the seeds stepped together")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    args = parser.parse_args(argv)
    measure(args.config, args.seeds, args.steps, timing.matmul_peak_gflops())


if __name__ == "__main__":
    main()
