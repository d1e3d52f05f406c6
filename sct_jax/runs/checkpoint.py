"""Checkpoints: one orbax ``CheckpointManager`` with named items.

Items: ``state`` (the method's train-state pytree, restored straight into its
shardings) and ``data`` (the grain iterator position, so a resumed run sees the same
batches as an uninterrupted one). Keeps the last N steps and resumes from the latest.

A checkpoint saved with validation metrics (``{"val_mae": ...}``, see
:mod:`sct_jax.training.validation`) competes for "best": orbax keeps the one with the
lowest validation MAE beside the latest N, and :meth:`Checkpointer.resolve` turns
``"best"``, ``"latest"`` or a step number into the step to restore (evaluation and
prediction default to ``"best"``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sct_jax.errors import ConfigError, DataError, RunFailed, SctError

# The metric that ranks checkpoints (lower is better).
BEST_METRIC = "val_mae"
CHOICES = ("best", "latest")

log = logging.getLogger(__name__)


class _DropDiskFullEcho(logging.Filter):
    """Orbax logs a full disk in its writer thread with a traceback (absl ERROR); the
    entry point reports it in one line, so that echo is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and _DISK_FULL_TEXT.search(
            record.getMessage() + str(record.exc_info[1] if record.exc_info else "")))


class _DropReadOnlyNotices(logging.Filter):
    """Orbax warns on every read-only manager that it is read-only; a reader is meant to
    be one, so the notice would only be noise on an entry point's stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (record.levelno == logging.WARNING and
                    ("read_only=True" in text or "directory is read only" in text))


class Checkpointer:
    """Saves and restores ``(state, data iterator)`` under ``workdir/checkpoints``.

    Args:
      workdir: the run's directory.
      keep: how many of the latest checkpoints to keep (plus the best by validation MAE,
        when that one is older).
      every: save interval in steps (the final step is always saved by the loop).
      read_only: a reader's view (prediction, evaluation, export, a later stage): nothing
        is created, saved, moved or deleted in the run.
    """

    def __init__(self, workdir: str | Path, keep: int = 3, every: int = 1000,
                 read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Before the options: orbax warns about read-only options when they are made.
        absl_logger = logging.getLogger("absl")
        for kind in (_DropDiskFullEcho, _DropReadOnlyNotices):
            if not any(isinstance(f, kind) for f in absl_logger.filters):
                absl_logger.addFilter(kind())
        policies = ocp.checkpoint_managers
        # best_fn makes orbax write the metrics; the policy keeps the latest N and the
        # one validated checkpoint with the lowest MAE (checkpoints without metrics
        # compete only for "latest").
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only,
            best_fn=_best_metric, best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                               keep_checkpoints_without_metrics=False)]))
        self.every = every
        self.read_only = read_only
        self.failed = False
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The validated step with the lowest validation MAE; None when none was validated."""
        scored = [(m[BEST_METRIC], s) for s in self.manager.all_steps()
                  if (m := self.manager.metrics(s)) and BEST_METRIC in m]
        return min(scored)[1] if scored else None

    def resolve(self, which: int | str = "best") -> int:
        """The step to restore for ``which``.

        Args:
          which: ``"best"`` (lowest validation MAE; the latest when no checkpoint was
            validated), ``"latest"``, or a step number (int or digits).

        Raises:
          SctError: no checkpoint, or no checkpoint at that step (the message lists the
            steps there are).
        """
        steps = sorted(self.manager.all_steps())
        if not steps:
            raise SctError(f"{self.directory}: no checkpoint found")
        which = parse_choice(which)
        if which == "best":
            best = self.best_step()
            return best if best is not None else steps[-1]
        if which == "latest":
            return steps[-1]
        if which not in steps:
            raise SctError(f"{self.directory}: no checkpoint at step {which} (there are "
                           f"{', '.join(map(str, steps))})")
        return which

    def save(self, step: int, state: Any, data_iterator: Any | None = None,
             force: bool = False, metrics: dict[str, float] | None = None) -> bool:
        """Saves when ``step`` is a multiple of ``every`` (or ``force``); asynchronous.

        ``metrics`` (validation, e.g. ``{"val_mae": 84.5}``) are stored with the
        checkpoint and rank it for :meth:`best_step`.

        Raises:
          RunFailed: the disk is full (this save, or the previous asynchronous one):
            one line; the previous checkpoint is intact (orbax commits a step by a
            final rename), so the same command resumes once space is freed.
        """
        if not force and step % self.every:
            return False
        with self._faults(step):
            if step in self.manager.all_steps():
                return False
            items = {"state": ocp.args.StandardSave(state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                                     metrics=dict(metrics) if metrics else None)

    @contextlib.contextmanager
    def _faults(self, step: int | None):
        try:
            yield
        except Exception as e:  # noqa: BLE001 (orbax wraps I/O errors in several types)
            if not _disk_full(e):
                raise
            self.failed = True
            good = [s for s in self.manager.all_steps() if s != step]
            kept = f"step {max(good)} is intact" if good else "no earlier checkpoint"
            what = f"step {step}" if step is not None else "a checkpoint"
            raise RunFailed(f"{self.directory}: no space left on device while saving {what}; "
                            f"{kept}: free space and rerun the same command to resume") from e

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores ``step`` (default: the latest readable one) into the shardings.

        A damaged latest checkpoint (unreadable files, cut short by a crash or a full
        disk) is skipped and the previous one restored, with a warning naming both
        steps; a writer (training) also moves it to
        ``<workdir>/checkpoints_damaged/<step>`` so that the step can be saved again, a
        reader leaves the run as it is.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set.
          data_iterator: grain iterator whose position is restored in place.
          step: which step; ``None`` for the latest.

        Returns:
          ``(step, state)``.

        Raises:
          FileNotFoundError: no checkpoint at all.
          DataError: every checkpoint is damaged (or the requested ``step`` is).
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        damaged: list[tuple[int, str]] = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 (tensorstore/orbax/json errors alike)
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                damaged.append((candidate, f"{type(e).__name__}: {reason}"))
                continue
            if damaged:
                names = ", ".join(str(s) for s, _ in damaged)
                if self.read_only:
                    log.warning("%s: checkpoint step %s is damaged (%s); falling back to "
                                "step %d", self.directory, names, damaged[0][1], candidate)
                else:
                    self._set_aside([s for s, _ in damaged])
                    log.warning("%s: checkpoint step %s is damaged (%s); moved to %s; "
                                "falling back to step %d", self.directory, names,
                                damaged[0][1], self.damaged_directory, candidate)
            return candidate, restored["state"]
        raise DataError(f"{self.directory}: checkpoint step(s) "
                        f"{', '.join(str(s) for s, _ in damaged)} unreadable "
                        f"({damaged[0][1]})")

    @property
    def damaged_directory(self) -> Path:
        return self.directory.parent / "checkpoints_damaged"

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of the manager's folder (nothing is deleted), so the
        resumed run can save those step numbers again."""
        self.damaged_directory.mkdir(exist_ok=True)
        for s in steps:
            target = self.damaged_directory / str(s)
            if target.exists():
                target = self.damaged_directory / f"{s}-{int(time.time())}"
            os.replace(self.directory / str(s), target)
        self.manager.reload()

    def wait(self) -> None:
        with self._faults(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.read_only:
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        if self.failed:  # the fault was reported; its background errors would repeat it
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        try:
            with self._faults(None):
                self.manager.wait_until_finished()
        finally:
            with contextlib.suppress(Exception) if self.failed else contextlib.nullcontext():
                self.manager.close()


_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[Errno 28\]")


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a full disk or exceeded quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _best_metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


def parse_choice(which: int | str) -> int | str:
    """``"best"``, ``"latest"`` or a step (``int`` or digits) -> ``"best"|"latest"|int``.

    Raises:
      ConfigError: anything else (``--checkpoint`` of evaluate.py goes through here).
    """
    if isinstance(which, str) and which.strip().lower() in CHOICES:
        return which.strip().lower()
    try:
        step = int(str(which).strip())
    except ValueError:
        step = -1
    if step < 0 or isinstance(which, float):
        raise ConfigError(f"--checkpoint {which!r}: expected best, latest or a step number")
    return step

