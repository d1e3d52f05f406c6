"""Checkpoints: one orbax ``CheckpointManager`` with named items.

Items: ``state`` (the method's train-state pytree, restored straight into its
shardings) and ``data`` (the grain iterator position, so a resumed run sees the same
batches as an uninterrupted one). Keeps the last N steps and resumes from the latest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``(state, data iterator)`` under ``workdir/checkpoints``.

    Args:
      workdir: the run's directory.
      keep: how many of the latest checkpoints to keep.
      every: save interval in steps (the final step is always saved by the loop).
    """

    def __init__(self, workdir: str | Path, keep: int = 3, every: int = 1000):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=True)
        self.every = every
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None,
             force: bool = False) -> bool:
        """Saves when ``step`` is a multiple of ``every`` (or ``force``); asynchronous."""
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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


def abstract_like(state: Any) -> Any:
    """``ShapeDtypeStruct`` pytree (with shardings) mirroring a concrete state."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, state)
