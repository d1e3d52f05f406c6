"""``sct-predict --report run.json``: what made each sCT, for the record of a plan.

A physicist who finds an sCT months later must be able to say which software, device
and model made it, from which MR, and what was done to the MR's grid on the way. The
report holds:

- ``software``: versions of sct_jax, jax, jaxlib and Python; the device it ran on;
- ``model``: path, kind (run or export), method, training step and a content hash
  (:func:`sct_jax.export.model.identity`); ``members``: the same for every model the
  sCT is the mean of (one, or an ensemble's; ``model`` is the first);
- ``command``: the flags (``model``: the ``-m`` paths; ``tta``; ``draws``: how many
  predictions each sCT is the mean of);
- ``inputs``: one record per MR: shape, spacing, orientation codes, whether it was
  reoriented, resampled (and onto which grid), oblique (and by how many degrees),
  the seconds it took and the files written; inputs left alone by ``--continue``
  are listed with ``"skipped"``.

It is written atomically when the command ends.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import jax
import jaxlib
import nibabel as nib

from sct_jax import __version__
from sct_jax.data.io import Volume, atomic_write_text
from sct_jax.inference.geometry import ModelGrid
from sct_jax.inference.inputs import Job

# 2: ``members`` added, ``command.model`` a list (-m repeats for an ensemble).
FORMAT = "sct_jax.predict_report/2"


def now() -> str:
    """UTC time to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def software() -> dict:
    """Versions and the device the network runs on."""
    device = jax.devices()[0]
    return {"sct_jax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "device": f"{device.platform}: {device.device_kind}",
            "device_count": jax.device_count()}


def input_record(job: Job, mr: Volume, grid: ModelGrid) -> dict:
    """One input's geometry and what prediction does to it (times and outputs are
    filled in when it has been predicted)."""
    return {
        "input": str(job.source),
        "shape": [int(n) for n in mr.shape],
        "spacing_mm": [round(float(s), 6) for s in mr.spacing],
        "orientation": "".join(nib.aff2axcodes(mr.affine)),
        "reoriented": bool(grid.reoriented),
        "resampled": bool(grid.resampled),
        "model_grid": [int(n) for n in grid.model_shape],
        "oblique": bool(grid.oblique),
        "oblique_degrees": round(float(grid.oblique_degrees), 3),
        "seconds": None,
        "outputs": [],
    }


def skipped_record(job: Job) -> dict:
    """An input ``--continue`` left alone: its sCT existed."""
    return {"input": str(job.source), "outputs": [str(job.output)],
            "skipped": "output exists (--continue)"}


def write(path: str | os.PathLike, *, command: dict, models: list[dict],
          inputs: list[dict], started: str) -> Path:
    """Writes the report atomically (see the module docstring for its fields).

    Args:
      path: the ``--report`` file.
      command: the flags.
      models: :func:`sct_jax.export.model.identity` of every model, in ``-m`` order.
      inputs: one record per input.
      started: :func:`now` when the command started.
    """
    document = {"format": FORMAT, "started": started, "finished": now(),
                "software": software(), "model": models[0], "members": models,
                "command": command, "inputs": inputs}
    return atomic_write_text(path, json.dumps(document, indent=2) + "\n")
