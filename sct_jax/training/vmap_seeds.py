"""N seeds of one config trained as one program: ``jax.vmap`` over a leading seed axis.

An ablation over seeds trains the same program N times with different keys and data
orders. :func:`train_seeds` stacks the N states (``vmap`` of ``create_state`` over the N
init keys), feeds each seed its own data order (one pipeline per seed, as a separate run
would read) and steps all of them with one jitted ``vmap(train_step)``. Each seed still
gets its own run directory, exactly as :func:`sct_jax.training.loop.train` writes it
(config, batch spec, ``metrics.jsonl``, checkpoints with the data-iterator position), so
evaluation, prediction and a later non-vmapped resume treat it as a separate run. A seed
that diverges is recorded as failed and stops writing; the others continue.

Keys: seed ``s`` uses ``split(key(s))`` as the loop does, so seed ``s`` trained here
equals seed ``s`` trained alone (to float tolerance: batched convolutions sum in another
order).

The program runs on one device (the seed axis is the parallelism); multi-process runs
are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from sct_jax import methods
from sct_jax.errors import ConfigError
from sct_jax.models.layers import precision_kwargs
from sct_jax.training import checkpoint, sharding
from sct_jax.training.logging import MetricWriter, first_non_finite
from sct_jax.training.loop import save_batch_spec, save_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SeedResult:
    """One seed's outcome: ``error`` is empty unless it diverged."""
    seed: int
    workdir: Path
    step: int
    metrics: dict[str, float]
    compile_s: float
    error: str = ""


def check_same_but_seed(configs: Sequence[Any]) -> None:
    """Raises :class:`ConfigError` unless the configs differ in ``seed`` only."""
    def without_seed(c):
        d = c.to_dict()
        d.pop("seed")
        return d
    first = without_seed(configs[0])
    for c in configs[1:]:
        if without_seed(c) != first:
            raise ConfigError("--vmap: the seeds' configs must differ in config.seed only")
    seeds = [int(c.seed) for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--vmap: repeated seeds {seeds}")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _restore_all(ckpts, abstract_one, iterators, start: int) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract_one)
    states = [ckpt.restore(abstract, it, step=start)[1] for ckpt, it in zip(ckpts, iterators)]
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *states)


def train_seeds(configs: Sequence[Any], workdirs: Sequence[str | Path],
                make_dataset: Callable[[Any, int], Any] | None = None) -> list[SeedResult]:
    """Trains ``configs`` (one config, N seeds) as one vmapped program.

    Args:
      configs: N configs equal but for ``seed``.
      workdirs: one run directory per config (each written as the loop writes it).
      make_dataset: ``(config, batch_size) -> IterDataset``; default the config's.

    Returns:
      One :class:`SeedResult` per config, in order.

    Raises:
      ConfigError: configs that differ in more than the seed, a multi-process launch,
        or run directories at different checkpoint steps.
    """
    if jax.process_count() > 1:
        raise ConfigError("--vmap: seeds are vmapped on one process; run without --vmap")
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("one workdir per config")
    check_same_but_seed(configs)
    config = configs[0]
    method = methods.get_method(config.method)
    if hasattr(method, "validate_config"):
        method.validate_config(config)
    precision_kwargs(config)
    if make_dataset is None:
        from sct_jax.training.data import train_dataset as make_dataset
    batch_size = int(config.train.batch_size)
    datasets = [make_dataset(c, batch_size) for c in configs]  # each seed's data order
    workdirs = [Path(w) for w in workdirs]
    iterators = [iter(d) for d in datasets]
    start_position = iterators[0].get_state()
    spec = sharding.batch_spec(next(iterators[0]))
    iterators[0].set_state(start_position)
    for c, w in zip(configs, workdirs):
        w.mkdir(parents=True, exist_ok=True)
        save_config(c, w)
        save_batch_spec(spec, w)

    keys = [jax.random.split(jax.random.key_data(jax.random.key(int(c.seed)))) for c in configs]
    init_rngs = np.stack([np.asarray(k[0]) for k in keys])
    base_rngs = jax.device_put(np.stack([np.asarray(k[1]) for k in keys]))
    create = functools.partial(method.create_state, config, batch_spec=spec)
    abstract_one = jax.eval_shape(create, init_rngs[0])

    ckpts = [checkpoint.Checkpointer(w, keep=config.train.keep_checkpoints,
                                     every=config.train.ckpt_every) for w in workdirs]
    latest = [ckpt.latest_step() for ckpt in ckpts]
    if len(set(latest)) > 1:
        for ckpt in ckpts:
            ckpt.close()
        raise ConfigError(f"--vmap: the seeds' run directories are at different steps "
                          f"{latest}; finish them without --vmap or remove them")
    start = latest[0] or 0
    if latest[0] is None:
        state = jax.jit(jax.vmap(create))(init_rngs)
    else:
        state = _restore_all(ckpts, abstract_one, iterators, start)
        log.info("resumed %d seeds from step %d", len(configs), start)

    n = len(configs)
    stacked_spec = {k: jax.ShapeDtypeStruct((n, *v.shape), v.dtype) for k, v in spec.items()}
    step_fn = jax.jit(jax.vmap(functools.partial(method.train_step, config)),
                      donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(jax.eval_shape(lambda s: s, state), stacked_spec,
                             jax.ShapeDtypeStruct(base_rngs.shape, base_rngs.dtype)).compile()
    compile_s = time.perf_counter() - t0

    writers = [MetricWriter(w, tensorboard=c.train.tensorboard)
               for c, w in zip(configs, workdirs)]
    errors = [""] * n
    last = [dict() for _ in range(n)]
    total = int(config.train.steps)
    try:
        for step in range(start + 1, total + 1):
            batches = [next(it) for it in iterators]
            batch = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in spec}
            state, metrics = compiled(state, batch, base_rngs)
            values = jax.device_get(dict(metrics))  # name -> (N,) per seed
            for k in range(n):
                if errors[k]:
                    continue
                mine = {name: float(np.asarray(v)[k]) for name, v in values.items()
                        if np.ndim(v) == 1}
                bad = first_non_finite(mine)
                if bad is not None:
                    good = ckpts[k].latest_step()
                    errors[k] = (f"non-finite {bad}={mine[bad]} at step {step}; " +
                                 (f"last good checkpoint: step {good} in {ckpts[k].directory}"
                                  if good is not None else "no checkpoint was saved yet"))
                    continue
                last[k] = mine
                if step % config.train.log_every == 0 or step == total:
                    writers[k].write_scalars(step, {**mine, "compile_s": compile_s,
                                                    "vmapped_seeds": n})
                if step % config.train.ckpt_every == 0 or step == total:
                    ckpts[k].save(step, jax.tree.map(lambda x: x[k], state), iterators[k],
                                  force=True)
    finally:
        for writer, ckpt in zip(writers, ckpts):
            writer.close()
            ckpt.close()
    return [SeedResult(int(c.seed), w, total, last[k], compile_s, errors[k])
            for k, (c, w) in enumerate(zip(configs, workdirs))]
