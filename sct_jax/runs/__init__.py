"""The one reader and writer of a run directory.

A run directory (``--workdir``) holds what one training wrote:

- ``config.json``: the resolved config (:func:`read_config`, :func:`write_config`);
- ``batch_spec.json``: the training batch shapes, from which a state is rebuilt
  (:func:`read_batch_spec`);
- ``geometry.json``: the training MRs' orientation, spacing and region
  (:func:`read_geometry`), and ``prior_ct.npy``, the mean training CT template of a
  model that takes it as input (``config.data.prior``);
- ``checkpoints/<step>``: orbax checkpoints of the state and the data-iterator position
  (:class:`sct_jax.runs.checkpoint.Checkpointer`), the latest N and the best by
  validation MAE;
- ``run.lock`` while a trainer holds it (:mod:`sct_jax.runs.lock`);
- ``metrics.jsonl``, ``tb/``, ``images/`` written by the training loop.

Training opens a run for writing with :func:`open_for_training` (the lock, the resume
check). Everything else — prediction, evaluation, QA, export, a later LDM stage that
needs an earlier one — reads through :func:`read_config`, :func:`load_state` and
:func:`load_run`, which never write into the run: a damaged latest checkpoint is
skipped with a warning, not moved (only training repairs a run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from sct_jax import methods, sharding
from sct_jax.data import geometry as geometry_lib
from sct_jax.data.io import atomic_write_text
from sct_jax.errors import ConfigError, DataError, SctError
from sct_jax.runs import checkpoint, lock
from sct_jax.runs.checkpoint import Checkpointer, parse_choice
from sct_jax.runs.lock import (RunDirBusy, RunLock, check_resume_config, check_workdir,
                              open_run_dir)

__all__ = ["CONFIG_FILE", "BATCH_SPEC_FILE", "Checkpointer", "LoadedRun", "RunDirBusy",
           "RunLock", "check_resume_config", "check_workdir", "config_for", "flat_config", "has_checkpoint",
           "latest_step", "load_run", "load_state", "open_for_training", "parse_choice",
           "read_batch_spec", "read_config", "read_geometry", "resolve_checkpoint",
           "write_batch_spec", "write_config", "write_geometry", "checkpoint"]

CONFIG_FILE = "config.json"
BATCH_SPEC_FILE = "batch_spec.json"
# Settings that may differ between training and evaluation without changing the model.
EVAL_FREE_PREFIXES = ("eval.", "train.", "mesh.")


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """A config as ``{"a.b": value}`` after a JSON round trip (tuples become lists), so
    a stored and a live config compare key by key."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    else:
        config = json.loads(json.dumps(config, default=str))
    return traverse_util.flatten_dict(config, sep=".") if config else {}


# ---------------------------------------------------------------------- the files

def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run stored in ``workdir/config.json``.

    Raises:
      DataError: no such file (not a run directory) or not a config; names the file.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; is {workdir} a training run directory?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as err:
        raise DataError(f"{path}: not a config ({err})") from err


def write_config(config, workdir: str | os.PathLike) -> None:
    """Stores the resolved config next to the checkpoints (process 0 only)."""
    if jax.process_index() == 0:
        atomic_write_text(Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2))


def write_batch_spec(spec: dict[str, jax.ShapeDtypeStruct], workdir: str | os.PathLike) -> None:
    """Records the training batch shapes: a reader rebuilds the state from them."""
    if jax.process_index() == 0:
        record = {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name}
                  for k, v in spec.items()}
        atomic_write_text(Path(workdir) / BATCH_SPEC_FILE, json.dumps(record, indent=2))


def read_batch_spec(workdir: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch shapes ``{name: ShapeDtypeStruct}`` of a run (or model folder)."""
    path = Path(workdir) / BATCH_SPEC_FILE
    if not path.exists():
        raise SctError(f"{path}: missing; is {workdir} a training run directory?")
    try:
        record = json.loads(path.read_text())
        return {k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
                for k, v in record.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a batch spec ({err})") from err


def write_geometry(geometry: geometry_lib.TrainingGeometry, workdir: str | os.PathLike) -> None:
    """Records the training MRs' orientation, spacing and region (process 0 only)."""
    if jax.process_index() == 0:
        geometry_lib.save(geometry, workdir)


def read_geometry(config, workdir: str | os.PathLike) -> geometry_lib.TrainingGeometry:
    """The run's recorded training geometry; for runs older than the record, the training
    split's (read now from the config's data, nothing written).

    Raises:
      DataError: a model that takes the mean-CT prior whose run lacks its template.
    """
    geometry = geometry_lib.load(workdir) or geometry_lib.from_config(config)
    geometry_lib.check_prior(config, geometry, workdir)
    return geometry


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished checkpoint step (no orbax needed)."""
    return latest_step(workdir) is not None


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The highest finished checkpoint step, from the folder names (orbax commits a step
    by renaming its folder to the step number); ``None`` when there is none."""
    folder = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps) if steps else None


# ---------------------------------------------------------------------- writing

def open_for_training(config, workdir: str | os.PathLike) -> RunLock | None:
    """Checks the workdir and a resume's config, creates the folder, takes the lock.

    Returns:
      The held lock on process 0 (release it when training ends); ``None`` elsewhere.

    Raises:
      ConfigError: a workdir that is a file or not writable; a resume that changes the
        model or the data.
      RunDirBusy: another live process trains into ``workdir``.
    """
    workdir = Path(workdir)
    if jax.process_index() != 0:
        return None
    return open_run_dir(config, workdir, has_checkpoint(workdir))


# ---------------------------------------------------------------------- reading

def config_for(workdir: str | os.PathLike, config=None) -> ml_collections.ConfigDict:
    """The config to evaluate or predict ``workdir`` with.

    ``None``: the run's own ``config.json``. A given config must match it on every key
    that shapes the model or its data (``eval.*``, ``train.*`` and ``mesh.*`` may
    differ); otherwise one :class:`ConfigError` line names the differing keys.
    """
    workdir = Path(workdir)
    if config is None:
        return read_config(workdir)
    if not (workdir / CONFIG_FILE).is_file():
        return config  # no run here: loading the checkpoint reports it
    stored, given = flat_config(read_config(workdir)), flat_config(config)
    # A key added after the run was made reads as the value the run had without it.
    stored = {**{k: v for k, v in lock.ABSENT_MEANS.items() if k in given}, **stored}
    differing = sorted(k for k in set(stored) | set(given)
                       if not k.startswith(EVAL_FREE_PREFIXES)
                       and stored.get(k, "<absent>") != given.get(k, "<absent>"))
    if differing:
        shown = ", ".join(f"{k} (run: {stored.get(k, '<absent>')!r}, given: "
                          f"{given.get(k, '<absent>')!r})" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ConfigError(f"{workdir / CONFIG_FILE}: --config does not match the run: "
                          f"{shown}{more}; leave --config out to use the run's own config")
    return config


def abstract_state(config, batch_spec: dict, shardings=None) -> Any:
    """The method's state as ``ShapeDtypeStruct``s (``shardings``: a pytree or one
    sharding for every leaf; default replicated on the config's mesh)."""
    method = methods.get_method(config.method)
    rng = jax.random.key_data(jax.random.key(config.seed))
    shapes = jax.eval_shape(functools.partial(method.create_state, config,
                                              batch_spec=batch_spec), rng)
    if shardings is None:
        shardings = sharding.replicated(sharding.make_mesh(dict(config.mesh)))
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                           sharding=shardings), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def resolve_checkpoint(workdir: str | os.PathLike, which: int | str = "best") -> int:
    """The step ``which`` names in ``workdir``: ``"best"``, ``"latest"`` or a step.

    Raises:
      ConfigError: ``which`` is not best, latest or a step number.
      SctError: no checkpoint, or none at that step.
    """
    which = parse_choice(which)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.resolve(which)
    finally:
        ckpt.close()


def load_state(config, workdir: str | os.PathLike, step: int | str = "best") -> tuple[int, Any]:
    """Restores a trained state (for prediction) without a data iterator; read-only.

    Args:
      config: the run's config (:func:`config_for`).
      workdir: the run directory.
      step: ``"best"`` (the lowest validation MAE; the latest when the run was never
        validated), ``"latest"`` or a step number.

    Returns:
      ``(step, state)``, replicated on the config's mesh. With no step pinned (latest,
      or best of a never-validated run) a damaged latest checkpoint is skipped with a
      warning and the previous one restored; nothing in the run is moved or written.
    """
    which = parse_choice(step)
    abstract = abstract_state(config, read_batch_spec(workdir))
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise SctError(f"{ckpt.directory}: no checkpoint found; train first with "
                           f"sct-train --config ... --workdir {workdir}")
        if which == "latest" or (which == "best" and ckpt.best_step() is None):
            return ckpt.restore(abstract)
        return ckpt.restore(abstract, step=ckpt.resolve(which))
    finally:
        ckpt.close()


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished run read back: its config, the restored state and the step."""
    config: ml_collections.ConfigDict
    state: Any
    step: int
    workdir: Path


@functools.lru_cache(maxsize=4)
def _load_run_cached(workdir: str, step: int) -> LoadedRun:
    config = read_config(workdir)
    restored_step, state = load_state(config, workdir, step=step)
    return LoadedRun(config, state, int(restored_step), Path(workdir))


def load_run(workdir: str | os.PathLike, step: int | str = "latest") -> LoadedRun:
    """Reads a whole run (config and state) — e.g. an earlier LDM stage; read-only.

    Memoised per (directory, step), so a stage that needs the same run twice reads it
    once.

    Raises:
      DataError / SctError: no run, or no checkpoint there (one line naming the path).
    """
    workdir = Path(workdir).expanduser().absolute()
    read_config(workdir)  # a missing run is reported before any checkpoint lookup
    return _load_run_cached(str(workdir), resolve_checkpoint(workdir, step))


def load_upstream(config, upstream: methods.Upstream) -> LoadedRun:
    """Reads the earlier run a stage starts from (``config.<upstream.config_key>``).

    Raises:
      ConfigError: no run or no checkpoint there, a run of another method, or one whose
        shared networks (``upstream.shared_models``) differ from this config's.
    """
    value = config
    for part in upstream.config_key.split("."):
        value = value[part]
    where = f"config.{upstream.config_key}={str(value)!r}"
    workdir = Path(str(value)).expanduser().absolute()
    if not str(value) or not (workdir / CONFIG_FILE).is_file():
        raise ConfigError(f"{where}: no training run there ({workdir / CONFIG_FILE} is "
                          f"missing); train {upstream.method} first")
    if latest_step(workdir) is None:
        raise ConfigError(f"{where}: no checkpoint in {workdir / 'checkpoints'}; "
                          f"train {upstream.method} first")
    run_config = read_config(workdir)
    if run_config.method != upstream.method:
        raise ConfigError(f"{where} is a {run_config.method!r} run, expected "
                          f"{upstream.method!r}")
    for name in upstream.shared_models:
        if flat_config(config.model[name]) != flat_config(run_config.model[name]):
            raise ConfigError(f"config.model.{name} differs from the one of the run in "
                              f"{where}: use the same size variant")
    return load_run(workdir, "latest")
