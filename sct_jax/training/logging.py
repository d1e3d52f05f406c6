"""Metric logging: JSON lines + TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from sct_jax.data.io import atomic_path, atomic_write_text


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0}


def first_non_finite(metrics: Mapping[str, float]) -> str | None:
    for k, v in metrics.items():
        if not math.isfinite(v):
            return k
    return None


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

    Args:
      workdir: the run directory.
      tensorboard: also write TensorBoard event files.
    """

    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / "tb"))

    def mark_resume(self, step: int) -> None:
        """Marks a resume from the checkpoint of ``step`` in ``metrics.jsonl``.

        Records of later steps (logged before an interruption, and about to be logged
        again) are dropped first, so the file never holds two records of one step; the
        marker is ``{"step": step, "time": ..., "event": "resume"}`` (no metric keys).
        """
        if not self.enabled:
            return
        path = self.workdir / "metrics.jsonl"
        self._jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if int(record.get("step", 0)) <= step:
                kept.append(json.dumps(record))
        kept.append(json.dumps({"step": int(step), "time": time.time(), "event": "resume"}))
        atomic_write_text(path, "\n".join(kept) + "\n")
        self._jsonl = open(path, "a", buffering=1)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray],
                     ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
        """``images``: name -> ``(H, W)`` float array, scaled to [0, 1] for display.

        Each goes to TensorBoard (when enabled) and to
        ``workdir/images/<name>_step<step>.png`` (``/`` in names becomes ``_``), written
        atomically, with the value range in the PNG's metadata.

        Args:
          step: the training step.
          images: name -> ``(H, W)`` array.
          ranges: name -> ``(lo, hi)`` display window (values outside are clipped), so
            that images of different steps compare; images not named are min-max scaled.
        """
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        folder = self.workdir / "images"
        folder.mkdir(exist_ok=True)
        for k, img in images.items():
            img = np.asarray(img, np.float32)
            window = (ranges or {}).get(k)
            lo, hi = window if window else (float(img.min()), float(img.max()))
            scaled = (np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo
                      else np.zeros_like(img))
            if self._tb is not None:
                self._tb.add_image(k, scaled[None], int(step))
            path = folder / f"{k.replace('/', '_')}_step{int(step)}.png"
            with atomic_path(path) as tmp:
                plt.imsave(tmp, scaled, cmap="gray", vmin=0.0, vmax=1.0, format="png",
                           metadata={"Description": f"{k} at step {step}, "
                                                    f"range [{lo:.6g}, {hi:.6g}]"})

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
