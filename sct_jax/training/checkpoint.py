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

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sct_jax.errors import ConfigError, SctError

# The metric that ranks checkpoints (lower is better).
BEST_METRIC = "val_mae"
CHOICES = ("best", "latest")


class Checkpointer:
    """Saves and restores ``(state, data iterator)`` under ``workdir/checkpoints``.

    Args:
      workdir: the run's directory.
      keep: how many of the latest checkpoints to keep (plus the best by validation MAE,
        when that one is older).
      every: save interval in steps (the final step is always saved by the loop).
    """

    def __init__(self, workdir: str | Path, keep: int = 3, every: int = 1000):
        self.directory = Path(workdir).absolute() / "checkpoints"
        policies = ocp.checkpoint_managers
        # best_fn makes orbax write the metrics; the policy keeps the latest N and the
        # one validated checkpoint with the lowest MAE (checkpoints without metrics
        # compete only for "latest").
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, create=True, enable_async_checkpointing=True,
            best_fn=_best_metric, best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                               keep_checkpoints_without_metrics=False)]))
        self.every = every
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
        """
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                                 metrics=dict(metrics) if metrics else None)

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores ``step`` (default: the latest) into ``abstract_state``'s shardings.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set.
          data_iterator: grain iterator whose position is restored in place.
          step: which step; ``None`` for the latest.

        Returns:
          ``(step, state)``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return step, restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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


def abstract_like(state: Any) -> Any:
    """``ShapeDtypeStruct`` pytree (with shardings) mirroring a concrete state."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, state)
