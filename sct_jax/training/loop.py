"""The one training loop every method plugs into, for one run or N vmapped seeds.

``train(config, workdir)``:
  1. checks everything that can be checked before a byte is written: the run settings,
     the method's config (:meth:`sct_jax.methods.Method.validate`), the mesh and batch,
     the workdir and a resume's config, the data (the phantom is generated here), the
     validation split, the upstream runs a stage starts from;
  2. takes the run directory (:func:`sct_jax.runs.open_for_training`: one writer per
     run) and records the config, the batch shapes and the training geometry;
  3. creates the method's state directly in its shardings (``jax.eval_shape`` first,
     then ``jax.jit(create_state, out_shardings=...)``) and merges pretrained weights
     outside the trace (``Method.load_pretrained``), or restores the latest checkpoint
     (state and data-iterator position);
  4. compiles ``train_step`` ahead of time with in/out shardings and donation, logging
     compile time and XLA's memory estimate;
  5. steps, logging JSON lines / TensorBoard / tqdm, checkpointing every N steps,
     validating every ``config.train.eval_every`` steps (:mod:`.validation`; the
     checkpoint keeps its validation MAE so that the best is kept), writing image
     summaries, and stopping at the first non-finite metric with the step and the last
     good checkpoint named.

``train_seeds(configs, workdirs)`` runs the same loop over N configs that differ only
in ``seed``: one program, ``jax.vmap`` of ``create_state`` and ``train_step`` over a
leading seed axis of the state and the keys, each seed with its own data order (its own
pipeline, as a separate run would read) and its own run directory written exactly as
``train`` writes one (lock, config, geometry, batch spec, metrics, validation, best and
latest checkpoints with the data position), so evaluation, prediction and a later
non-vmapped resume treat each as a separate run. A seed that diverges is recorded as
failed and stops writing; the others go on. Seed ``s`` uses ``split(key(s))`` as
``train`` does, so it equals seed ``s`` trained alone (to float tolerance: batched
convolutions sum in another order). The vmapped program runs on one device (the seed
axis is the parallelism).

The step is called through the compiled executable, so a second call can never
recompile. Metrics are fetched one step late so that the host never waits on the
device between dispatches (the check still names the step that went wrong).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sct_jax import methods, runs, sharding
from sct_jax.config_utils import check_run_config
from sct_jax.data import datasets
from sct_jax.data import geometry as geometry_lib
from sct_jax.errors import ConfigError, RunFailed
from sct_jax.inference import predict as predict_lib
from sct_jax.runs.checkpoint import Checkpointer
from sct_jax.training import validation
from sct_jax.training.logging import MetricWriter, first_non_finite, to_python

log = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """A loss or norm became NaN/Inf (exit status 1)."""


@dataclasses.dataclass
class TrainResult:
    """One run's outcome; ``error`` is empty unless it diverged (vmapped seeds only:
    a single run raises :class:`TrainingDiverged` instead)."""
    state: Any
    step: int
    metrics: dict[str, float]
    compile_s: float
    workdir: Path
    seed: int = 0
    error: str = ""


# A vmapped seed's outcome is the same record.
SeedResult = TrainResult


@dataclasses.dataclass
class _Run:
    """One run directory the program writes: its config, data and writers."""
    config: Any
    workdir: Path
    iterator: Any = None
    lock: Any = None
    ckpt: Checkpointer | None = None
    writer: MetricWriter | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    state: Any = None
    error: str = ""


def check_same_but_seed(configs: Sequence[Any]) -> None:
    """Raises :class:`ConfigError` unless the configs differ in ``seed`` only."""
    def without_seed(c):
        d = c.to_dict()
        d.pop("seed")
        return d
    first = without_seed(configs[0])
    if any(without_seed(c) != first for c in configs[1:]):
        raise ConfigError("--vmap: the seeds' configs must differ in config.seed only")
    seeds = [int(c.seed) for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--vmap: repeated seeds {seeds}")


def build_step(method, config, mesh, abstract_state, spec):
    """Jits ``method.train_step`` with shardings and donation and compiles it AOT.

    Returns:
      ``(compiled, state_shardings, compile_seconds)``.
    """
    repl = sharding.replicated(mesh)
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in spec}
    jitted = jax.jit(functools.partial(method.train_step, config),
                     in_shardings=(state_shardings, batch_shardings, repl),
                     out_shardings=(state_shardings, repl),
                     donate_argnums=(0,))
    abs_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             abstract_state, state_shardings)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                 for k, v in spec.items()}
    abs_rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=repl)
    return (*_compile(jitted, abs_state, abs_batch, abs_rng, state_shardings),)


def _compile(jitted, abs_state, abs_batch, abs_rng, state_shardings):
    t0 = time.perf_counter()
    compiled = jitted.lower(abs_state, abs_batch, abs_rng).compile()
    compile_s = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            log.info("train_step compiled in %.1fs; temp %.1f MB, args %.1f MB", compile_s,
                     mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)
    except (AttributeError, NotImplementedError):
        pass
    return compiled, state_shardings, compile_s


def image_summary_fn(method, config, mesh) -> Callable[..., dict] | None:
    """The method's ``image_summaries`` jitted to host arrays, or None when it has none
    or ``config.train.image_every`` is 0 (called on the batch about to be trained and
    the state before the step)."""
    if method.image_summaries is None or int(config.train.image_every) <= 0:
        return None
    summarize = jax.jit(functools.partial(method.image_summaries, config),
                        out_shardings=sharding.replicated(mesh))
    return lambda state, batch, rng: jax.device_get(summarize(state, batch, rng))


def train_dataset(config, local_batch_size: int):
    """The config's per-process training data: the method's own sampler when it has one
    (``Method.train_dataset``), else the data mode's (:mod:`sct_jax.data.datasets`)."""
    method = methods.get_method(config.method)
    return datasets.train_dataset(config, local_batch_size, method_dataset=method.train_dataset)


def train(config, workdir: str | Path,
          make_dataset: Callable[[Any, int], Any] | None = None) -> TrainResult:
    """Trains ``config.method`` into ``workdir``, resuming from its latest checkpoint.

    Args:
      config: the experiment's ``ConfigDict``.
      workdir: run directory (checkpoints, metrics, TensorBoard, config.json).
      make_dataset: ``(config, local_batch_size) -> IterDataset``; defaults to the
        config's data (tests substitute their own; then no training geometry is read).

    Returns:
      A :class:`TrainResult` with the final state and the last logged metrics.

    Raises:
      ConfigError: a config value that cannot work (at start-up, before any compile).
      TrainingDiverged: a non-finite loss or norm.
    """
    (result,) = _train([config], [Path(workdir)], make_dataset, vmapped=False)
    if result.error:
        raise TrainingDiverged(result.error)
    return result


def train_seeds(configs: Sequence[Any], workdirs: Sequence[str | Path],
                make_dataset: Callable[[Any, int], Any] | None = None) -> list[TrainResult]:
    """Trains ``configs`` (one config, N seeds) as one vmapped program.

    Returns:
      One :class:`TrainResult` per config, in order (``error`` set for a diverged seed).

    Raises:
      ConfigError: configs that differ in more than the seed, a multi-process launch,
        or run directories at different checkpoint steps.
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("one workdir per config")
    if jax.process_count() > 1:
        raise ConfigError("--vmap: seeds are vmapped on one process; run without --vmap")
    check_same_but_seed(configs)
    return _train(list(configs), [Path(w) for w in workdirs], make_dataset, vmapped=True)


def _train(configs, workdirs, make_dataset, vmapped: bool) -> list[TrainResult]:
    sharding.maybe_initialize_distributed()
    config = configs[0]
    for c, w in zip(configs, workdirs):  # cheap checks first: no data read for a bad run dir
        check_run_config(c)
        runs.check_workdir(w)
        runs.check_resume_config(c, w, runs.has_checkpoint(w))
    method = methods.get_method(config.method)
    method.validate(config)
    predict_lib.check_settings(config)
    if vmapped:
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(dict(config.mesh))
    local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
    starts = {runs.latest_step(w) for w in workdirs}
    if len(starts) > 1:
        raise ConfigError(f"--vmap: the seeds' run directories are at different steps "
                          f"{sorted(s or 0 for s in starts)}; finish them without --vmap "
                          "or remove them")
    resuming = starts != {None}
    # The data is checked (and the phantom generated), the validation cases loaded and
    # the upstream runs read before anything is written to a workdir, so bad input
    # leaves no half-made run directory behind.
    default_data = make_dataset is None
    make_dataset = make_dataset or train_dataset
    seats = [_Run(c, w, iter(make_dataset(c, local_batch))) for c, w in zip(configs, workdirs)]
    geometry = geometry_lib.from_config(config) if default_data else None
    validator = validation.build(config, geometry)
    pretrained = {} if resuming else {name: runs.load_upstream(config, up)
                                      for name, up in method.upstream(config).items()}
    try:
        for seat in seats:  # one writer per run dir; a resume may not change the run
            seat.lock = runs.open_for_training(seat.config, seat.workdir)
        return _train_in(method, seats, mesh, geometry, validator, pretrained, resuming,
                         vmapped)
    finally:
        for seat in seats:
            if seat.lock is not None:
                seat.lock.release()


def _train_in(method, seats: list[_Run], mesh, geometry, validator, pretrained: dict,
              resuming: bool, vmapped: bool) -> list[TrainResult]:
    """The body of :func:`_train` once the run directories are held."""
    config = seats[0].config
    start_position = seats[0].iterator.get_state()
    spec = sharding.batch_spec(next(seats[0].iterator))
    seats[0].iterator.set_state(start_position)
    keys = [jax.random.split(jax.random.key_data(jax.random.key(int(s.config.seed))))
            for s in seats]
    init_rngs = np.stack([np.asarray(k[0]) for k in keys])
    base_rngs = np.stack([np.asarray(k[1]) for k in keys])
    create = functools.partial(method.create_state, config, batch_spec=spec)
    abstract_state = jax.eval_shape(create, init_rngs[0])  # fails before anything is written
    for seat in seats:
        if not resuming or not (seat.workdir / runs.CONFIG_FILE).exists():
            runs.write_config(seat.config, seat.workdir)
        if geometry is not None:
            runs.write_geometry(geometry, seat.workdir)
        runs.write_batch_spec(spec, seat.workdir)
    repl = sharding.replicated(mesh)
    state_shardings = None if vmapped else sharding.state_shardings(abstract_state, mesh)
    if not vmapped:
        compiled, state_shardings, compile_s = build_step(method, config, mesh,
                                                          abstract_state, spec)
    for seat in seats:
        seat.ckpt = Checkpointer(seat.workdir, keep=config.train.keep_checkpoints,
                                 every=config.train.ckpt_every)
    start_step = seats[0].ckpt.latest_step() or 0
    if start_step:
        # The step actually restored: a damaged latest checkpoint falls back to an
        # earlier one, and the steps after it must be trained (and saved) again.
        state, start_step = _restore(seats, abstract_state, state_shardings, repl,
                                     start_step, vmapped)
    else:
        state = _create(method, config, create, init_rngs, state_shardings, pretrained, vmapped)
    if vmapped:
        # Lowered on the stacked state itself: its optimiser closures are the ones the
        # compiled program's pytree must match.
        step_fn = jax.jit(jax.vmap(functools.partial(method.train_step, config)),
                          donate_argnums=(0,))
        stack = lambda s: jax.ShapeDtypeStruct((len(seats), *s.shape), s.dtype)  # noqa: E731
        compiled, _, compile_s = _compile(
            step_fn, jax.eval_shape(lambda s: s, state), jax.tree.map(stack, spec),
            stack(jax.ShapeDtypeStruct((2,), np.uint32)), None)
        rng = jax.device_put(base_rngs)
    else:
        rng = jax.device_put(base_rngs[0], repl)

    for seat in seats:
        seat.writer = MetricWriter(seat.workdir, tensorboard=config.train.tensorboard)
        if start_step:
            seat.writer.mark_resume(start_step)  # drops records past the checkpoint
    try:
        _steps(method, seats, mesh, compiled, state, rng, start_step, compile_s,
               validator, vmapped)
    finally:
        for seat in seats:
            seat.writer.close()
            seat.ckpt.close()
    if resuming:
        for seat in seats:
            if not seat.error:  # only now: a failed resume keeps the run's config
                runs.write_config(seat.config, seat.workdir)
    return [TrainResult(state=seat.state, step=int(config.train.steps),
                        metrics=seat.metrics, compile_s=compile_s, workdir=seat.workdir,
                        seed=int(seat.config.seed), error=seat.error) for seat in seats]


def _create(method, config, create, init_rngs, state_shardings, pretrained, vmapped):
    """A new state (stacked over seeds when ``vmapped``), pretrained parts merged."""
    if vmapped:
        state = jax.jit(jax.vmap(create))(init_rngs)
    else:
        state = jax.jit(create, out_shardings=state_shardings)(init_rngs[0])
    if method.load_pretrained is None:
        return state
    # Outside any trace: files and upstream runs are read as concrete arrays. Each leaf
    # is then copied into a buffer of its own: the state is donated to the step, and a
    # merged state may share arrays with an upstream run (kept in a cache) or repeat one
    # (a ControlNet starts as a copy of its UNet's encoder).
    if not vmapped:
        state = method.load_pretrained(config, state, pretrained)
        return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_shardings)(
            state)
    merged = [method.load_pretrained(config, _seed_slice(state, k), pretrained)
              for k in range(len(init_rngs))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *merged)


def _restore(seats, abstract_state, state_shardings, repl, step: int, vmapped: bool):
    """Every seat's checkpoint (and its data position), stacked if vmapped.

    Returns:
      ``(state, restored step)``: vmapped seats restore exactly ``step``; a single run
      its latest readable checkpoint (``step``, or an earlier one when ``step`` is
      damaged).
    """
    if vmapped:  # each seed's checkpoint is an ordinary single-run state
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                                abstract_state)
    else:
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                   sharding=sh),
                                abstract_state, state_shardings)
    states = []
    for seat in seats:
        restored_step, state = seat.ckpt.restore(abstract, seat.iterator,
                                                 step=step if vmapped else None)
        states.append(state)
        if jax.process_index() == 0:
            print(f"resumed from step {restored_step} (checkpoint "
                  f"{seat.ckpt.directory / str(restored_step)})", flush=True)
    if not vmapped:
        return states[0], restored_step
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states), step


def _seed_slice(state, k: int):
    return jax.tree.map(lambda x: x[k], state)


def _steps(method, seats, mesh, compiled, state, rng, start_step: int, compile_s: float,
           validator, vmapped: bool) -> None:
    """Steps from ``start_step + 1`` to ``config.train.steps``; fills ``seat.metrics``,
    ``seat.state`` (the final one) and ``seat.error`` (a diverged seed)."""
    config = seats[0].config
    total = int(config.train.steps)
    write_images = image_summary_fn(method, config, mesh)
    image_every, eval_every = int(config.train.image_every), int(config.train.eval_every)
    bar = _progress(config, start_step, total)
    pending = None  # (step, device metrics) of the previous step, checked one step late
    per_seed = (lambda tree, k: _seed_slice(tree, k)) if vmapped else (lambda tree, k: tree)

    def check(step_and_metrics):
        step, device_metrics = step_and_metrics
        host = jax.device_get(dict(device_metrics))
        for k, seat in enumerate(seats):
            if seat.error:
                continue
            values = to_python(per_seed(host, k))
            bad = first_non_finite(values)
            if bad is not None:
                seat.ckpt.wait()
                good = seat.ckpt.latest_step()
                seat.error = (f"non-finite {bad}={values[bad]} at step {step}; " +
                              (f"last good checkpoint: step {good} in {seat.ckpt.directory}"
                               if good is not None else "no checkpoint was saved yet"))
                continue
            seat.metrics = values
            if step % config.train.log_every == 0 or step == total:
                extra = {"vmapped_seeds": len(seats)} if vmapped else {}
                seat.writer.write_scalars(step, {**values, "compile_s": compile_s, **extra})
        if not vmapped and seats[0].error:
            raise TrainingDiverged(seats[0].error)
        if bar is not None and seats[0].metrics:
            bar.set_postfix({k: f"{seats[0].metrics[k]:.3g}" for k in ("loss", "mae_hu")
                             if k in seats[0].metrics})

    try:
        for step in range(start_step + 1, total + 1):
            batch = _next_batch(seats, mesh, vmapped)
            if write_images is not None and (step % image_every == 0 or step == total):
                # Before the step: its state is donated. Every process takes part.
                for k, seat in enumerate(seats):
                    if not seat.error:
                        seat.writer.write_images(step, write_images(
                            per_seed(state, k), per_seed(batch, k), per_seed(rng, k)))
            state, metrics = compiled(state, batch, rng)
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            validate = validation.is_due(eval_every, step, total) or \
                (validator is not None and validation.is_due(image_every, step, total))
            save = step % config.train.ckpt_every == 0 or step == total or validate
            if validate or save:
                check(pending)  # never validate, draw or checkpoint a diverged state
                pending = None
            for k, seat in enumerate(seats):
                if seat.error:
                    continue
                validated = None
                if validate:
                    validated = _validate(validator, seat.writer, bar, per_seed(state, k),
                                          step, total, eval_every, image_every)
                if save:
                    # A validated step is always saved: it may be the best one to keep.
                    seat.ckpt.save(step, per_seed(state, k), seat.iterator, force=True,
                                   metrics=validation.checkpoint_metrics(validated or {}))
            if bar is not None:
                bar.update(1)
        if pending is not None:
            check(pending)
    finally:
        if bar is not None:
            bar.close()
    for k, seat in enumerate(seats):
        seat.state = per_seed(state, k)


def _next_batch(seats, mesh, vmapped: bool):
    if not vmapped:
        return sharding.global_batch(next(seats[0].iterator), mesh)
    batches = [next(seat.iterator) for seat in seats]
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def _validate(validator, writer, bar, state, step: int, total: int, eval_every: int,
              image_every: int) -> dict[str, float] | None:
    """The validation pass and/or validation images of ``step``; returns the metrics."""
    values, sct = None, None
    if validation.is_due(eval_every, step, total):
        values, sct = validator.evaluate(state)
        writer.write_scalars(step, values)
        echo = bar.write if bar is not None else functools.partial(print, flush=True)
        if jax.process_index() == 0:
            validation.announce(step, values, len(validator.cases), echo=echo)
    if validation.is_due(image_every, step, total):
        images, ranges = validator.images(state, sct)
        writer.write_images(step, images, ranges)
    return values


def _progress(config, start: int, total: int):
    if not config.train.progress or jax.process_index() != 0 or start >= total:
        return None
    return tqdm(total=total, initial=start, desc=config.name or config.method,
                unit="step", dynamic_ncols=True)
