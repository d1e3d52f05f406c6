"""The generic training loop every method plugs into.

``train(config, workdir)``:
  1. builds the mesh and the per-process data iterator;
  2. creates the method's state directly in its shardings (``jax.eval_shape`` first,
     then ``jax.jit(create_state, out_shardings=...)``), or restores the latest
     checkpoint (state and data-iterator position);
  3. compiles ``train_step`` ahead of time with in/out shardings and donation, logging
     compile time and XLA's memory estimate;
  4. steps, logging JSON lines / TensorBoard / tqdm, checkpointing every N steps, and
     stopping at the first non-finite metric with the step and the last good checkpoint;
  5. every ``config.train.eval_every`` steps predicts and scores the validation split
     (:mod:`sct_jax.training.validation`), saving that step's checkpoint with its
     validation MAE so that the best one is kept; every ``config.train.image_every``
     steps writes a fixed validation slice (MR, CT, sCT, error) and the method's own
     maps as images.

The step is called through the compiled executable, so a second call can never
recompile. Metrics are fetched one step late so that the host never waits on the
device between dispatches (the check still names the step that went wrong).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from sct_jax import methods
from sct_jax.config_utils import check_run_config
from sct_jax.errors import RunFailed, SctError
from sct_jax.models.layers import precision_kwargs
from sct_jax.training import checkpoint, run_dir, sharding, validation
from sct_jax.training.logging import MetricWriter, first_non_finite, to_python

log = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """A loss or norm became NaN/Inf (exit status 1)."""


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    metrics: dict[str, float]
    compile_s: float
    workdir: Path


def save_config(config, workdir: Path) -> None:
    """Stores the resolved config next to the checkpoints (``evaluate.py`` reads it)."""
    from sct_jax.data.io import atomic_write_text
    if jax.process_index() == 0:
        atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))


def save_geometry(training_geometry, workdir: Path) -> None:
    """Records the training MRs' orientation, spacing and region (``geometry.json``):
    prediction brings every new MR onto that grid (:mod:`sct_jax.inference.geometry`)."""
    if jax.process_index() == 0:
        from sct_jax.inference import geometry
        geometry.save(training_geometry, workdir)


def save_batch_spec(spec: dict[str, jax.ShapeDtypeStruct], workdir: Path) -> None:
    """Records the training batch shapes: prediction rebuilds the state from them."""
    from sct_jax.data.io import atomic_write_text
    if jax.process_index() == 0:
        record = {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name}
                  for k, v in spec.items()}
        atomic_write_text(workdir / "batch_spec.json", json.dumps(record, indent=2))


def load_batch_spec(workdir: Path) -> dict[str, jax.ShapeDtypeStruct]:
    path = Path(workdir) / "batch_spec.json"
    if not path.exists():
        raise SctError(f"{path}: missing; is {workdir} a training run directory?")
    record = json.loads(path.read_text())
    return {k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
            for k, v in record.items()}


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
    """The method's ``image_summaries`` jitted to host arrays, or None when it has none.

    A method may define ``image_summaries(config, state, batch, rng) -> {name: (H, W)}``
    (e.g. meta-pGAN's weight maps); the loop calls it every ``config.train.image_every``
    steps (0: never) on the batch about to be trained and the state before the step.
    """
    if not hasattr(method, "image_summaries") or int(config.train.get("image_every", 0)) <= 0:
        return None
    summarize = jax.jit(functools.partial(method.image_summaries, config),
                        out_shardings=sharding.replicated(mesh))
    return lambda state, batch, rng: jax.device_get(summarize(state, batch, rng))


def train(config, workdir: str | Path,
          make_dataset: Callable[[Any, int], Any] | None = None) -> TrainResult:
    """Trains ``config.method`` into ``workdir``, resuming from its latest checkpoint.

    Args:
      config: the experiment's ``ConfigDict``.
      workdir: run directory (checkpoints, metrics, TensorBoard, config.json).
      make_dataset: ``(config, local_batch_size) -> IterDataset``; defaults to the
        config's data pipeline (tests substitute their own).

    Returns:
      A :class:`TrainResult` with the final state and the last logged metrics.

    Raises:
      ConfigError: a config value that cannot work (at start-up, before any compile).
      TrainingDiverged: a non-finite loss or norm.
    """
    sharding.maybe_initialize_distributed()
    workdir = Path(workdir)
    check_run_config(config)
    run_dir.check_workdir(workdir)  # cheap checks first: no data is read for a bad run dir
    run_dir.check_resume_config(config, workdir, run_dir.has_checkpoint(workdir))
    method = methods.get_method(config.method)
    if hasattr(method, "validate_config"):
        method.validate_config(config)
    precision_kwargs(config)  # an unknown model.dtype / model.remat fails here
    mesh = sharding.make_mesh(dict(config.mesh))
    local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
    # The data is checked (and the phantom generated) before anything is written to
    # the workdir, so bad input leaves no half-made run directory behind.
    default_data = make_dataset is None
    if make_dataset is None:
        from sct_jax.training.data import train_dataset as make_dataset
    dataset = make_dataset(config, local_batch)
    training_geometry = None
    if default_data:  # the config's own cases: read their orientation and spacing
        from sct_jax.inference import geometry
        training_geometry = geometry.from_config(config)
    # One writer per run dir; a resume may not change the model or the data (run_dir.py).
    resuming = run_dir.has_checkpoint(workdir)
    lock = (run_dir.open_run_dir(config, workdir, resuming) if jax.process_index() == 0
            else None)
    try:
        result = _train_in(config, workdir, method, mesh, dataset, resuming, training_geometry)
    finally:
        if lock is not None:
            lock.release()
    if resuming:
        save_config(config, workdir)  # only now: a failed resume keeps the run's config
    return result


def _train_in(config, workdir: Path, method, mesh, dataset, resuming: bool,
              training_geometry) -> TrainResult:
    """The body of :func:`train` once the run directory is held."""
    iterator = iter(dataset)
    start_position = iterator.get_state()
    spec = sharding.batch_spec(next(iterator))
    iterator.set_state(start_position)

    rng = jax.random.key_data(jax.random.key(config.seed))
    init_rng, base_rng = jax.random.split(rng)
    create = functools.partial(method.create_state, config, batch_spec=spec)
    abstract_state = jax.eval_shape(create, init_rng)
    # Validation is configured (and refused) before anything is written to the workdir.
    validator = validation.build(config, abstract_state, spec["mr"], training_geometry)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resuming or not (workdir / "config.json").exists():
        save_config(config, workdir)
    if training_geometry is not None:
        save_geometry(training_geometry, workdir)
    save_batch_spec(spec, workdir)
    compiled, state_shardings, compile_s = build_step(method, config, mesh, abstract_state, spec)

    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                   every=config.train.ckpt_every)
    start_step = 0
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                abstract_state, state_shardings)
        start_step, state = ckpt.restore(abstract, iterator)
        if jax.process_index() == 0:
            print(f"resumed from step {start_step} (checkpoint "
                  f"{ckpt.directory / str(start_step)})", flush=True)
    else:
        state = jax.jit(create, out_shardings=state_shardings)(init_rng)
    base_rng = jax.device_put(base_rng, sharding.replicated(mesh))

    writer = MetricWriter(workdir, tensorboard=config.train.tensorboard)
    if start_step:
        writer.mark_resume(start_step)  # drops records past the checkpoint, marks the resume
    write_images = image_summary_fn(method, config, mesh)
    image_every = int(config.train.get("image_every", 0))
    eval_every = int(config.train.get("eval_every", 0))
    total = int(config.train.steps)
    bar = _progress(config, start_step, total)
    last_metrics: dict[str, float] = {}
    pending = None  # (step, device metrics) of the previous step, checked one step late

    def check(step_and_metrics):
        nonlocal last_metrics
        step, device_metrics = step_and_metrics
        values = to_python(device_metrics)
        bad = first_non_finite(values)
        if bad is not None:
            ckpt.wait()
            good = ckpt.latest_step()
            where = (f"last good checkpoint: step {good} in {ckpt.directory}" if good is not None
                     else "no checkpoint was saved yet")
            raise TrainingDiverged(f"non-finite {bad}={values[bad]} at step {step}; {where}")
        last_metrics = values
        if step % config.train.log_every == 0 or step == total:
            writer.write_scalars(step, {**values, "compile_s": compile_s})
            if bar is not None:
                bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss", "mae_hu") if k in values})
        return values

    try:
        for step in range(start_step + 1, total + 1):
            batch = sharding.global_batch(next(iterator), mesh)
            if write_images is not None and (step % image_every == 0 or step == total):
                # Before the step: its state is donated. Every process takes part.
                writer.write_images(step, write_images(state, batch, base_rng))
            state, metrics = compiled(state, batch, base_rng)
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            validated = None
            if validation.is_due(eval_every, step, total) or \
                    (validator is not None and validation.is_due(image_every, step, total)):
                check(pending)  # never validate or draw a diverged state
                pending = None
                validated = _validate(validator, writer, bar, state, step, total,
                                      eval_every, image_every)
            if step % config.train.ckpt_every == 0 or step == total or validated:
                if pending is not None:
                    check(pending)  # never checkpoint a diverged state
                    pending = None
                # A validated step is always saved: it may be the best one to keep.
                ckpt.save(step, state, iterator, force=True,
                          metrics=validation.checkpoint_metrics(validated or {}))
            if bar is not None:
                bar.update(1)
        if pending is not None:
            check(pending)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    return TrainResult(state=state, step=total, metrics=last_metrics, compile_s=compile_s,
                       workdir=workdir)


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
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=config.name or config.method,
                unit="step", dynamic_ncols=True)


def load_state(config, workdir: str | Path, step: int | str = "best") -> tuple[int, Any]:
    """Restores a trained state (for prediction) without a data iterator.

    Args:
      config: the experiment config.
      workdir: the run directory.
      step: which checkpoint: ``"best"`` (the lowest validation MAE; the latest when
        the run was never validated), ``"latest"`` or a step number.

    Returns:
      ``(step, state)`` on the default device(s), replicated.
    """
    method = methods.get_method(config.method)
    spec = load_batch_spec(Path(workdir))
    mesh = sharding.make_mesh(dict(config.mesh))
    rng = jax.random.key_data(jax.random.key(config.seed))
    abstract_state = jax.eval_shape(
        functools.partial(method.create_state, config, batch_spec=spec), rng)
    repl = sharding.replicated(mesh)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                            abstract_state)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        if ckpt.latest_step() is None:
            raise SctError(f"{ckpt.directory}: no checkpoint found; train first with "
                           f"python train.py --config ... --workdir {workdir}")
        which = checkpoint.parse_choice(step)
        if which == "latest" or (which == "best" and ckpt.best_step() is None):
            # No step pinned: restore the latest, falling back past a damaged one.
            return ckpt.restore(abstract)
        return ckpt.restore(abstract, step=ckpt.resolve(which))
    finally:
        ckpt.close()


def resolve_checkpoint(config, workdir: str | Path, which: int | str = "best") -> int:
    """The step ``which`` names in ``workdir``: ``"best"``, ``"latest"`` or a step.

    For entry points that restore more than once (prediction, then the QA's cycle
    model): resolve once, then pass the step to :func:`load_state`.

    Raises:
      ConfigError: ``which`` is not best, latest or a step number.
      SctError: no checkpoint, or none at that step.
    """
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        return ckpt.resolve(which)
    finally:
        ckpt.close()


def read_config_json(workdir: Path) -> dict:
    return json.loads((Path(workdir) / "config.json").read_text())
