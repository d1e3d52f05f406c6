"""A trained model as prediction needs it: config, parameters, training geometry.

:func:`load_model` opens either a training run directory (``config.json``, checkpoints)
or an exported model directory (see :func:`export_model`), so ``sct-predict -m`` takes
both and needs no config file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from sct_jax.errors import DataError
from sct_jax.inference import geometry as geometry_lib

MODEL_JSON = "model.json"


@dataclasses.dataclass
class LoadedModel:
    """What :func:`sct_jax.inference.predict.predict_draws` needs.

    Attributes:
      config: the resolved config the model was trained with.
      state: the method's state pytree (parameters; optimizer state not used).
      geometry: the training orientation, spacing and region.
      step: the training step of the parameters.
      path: where it was loaded from.
      kind: ``"run"`` or ``"export"``.
    """

    config: ml_collections.ConfigDict
    state: Any
    geometry: geometry_lib.TrainingGeometry
    step: int
    path: Path
    kind: str


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run stored in ``workdir/config.json``."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; is {workdir} a training run directory?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as err:
        raise DataError(f"{path}: not a config ({err})") from err


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Opens a run directory or an exported model directory.

    Raises:
      DataError: the path is neither, or its files are damaged; the message names it.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model not found (expected a training run directory or "
                        "an exported model directory)")
    if (path / MODEL_JSON).is_file():
        from sct_jax.export import model_files
        return model_files.load_exported(path)
    from sct_jax.training import loop
    config = read_run_config(path)
    step, state = loop.load_state(config, path)
    return LoadedModel(config, state, geometry_lib.run_geometry(config, path), int(step),
                       path, "run")

