"""A self-contained model directory: what a run exports and what ``-m MODEL_DIR`` reads.

``sct-export-model --workdir W -o MODEL_DIR`` (and the end of ``sct-train``) writes::

  MODEL_DIR/model.json          what a person (or a planning system) reads first
  MODEL_DIR/params.msgpack      the trained parameters (flax msgpack; no optimizer state)
  MODEL_DIR/config.json         the resolved training config
  MODEL_DIR/batch_spec.json     the training batch shapes (rebuilds the state's structure)
  MODEL_DIR/geometry.json       training orientation, spacing and region
  MODEL_DIR/prior_ct.npy        the mean training CT template (models with data.prior)
  MODEL_DIR/predict_window.jaxexport   the network as a serialized JAX function

``model.json`` holds the method, the normalisation (MR: per-case percentiles inside the
body mask to [-1, 1]; CT: [-1, 1] <-> [HU_MIN, HU_MAX]), the training geometry, the
inference windows, the package version and a SHA-256 content hash of the other files
(checked on load). ``predict_window.jaxexport`` (``jax.export``; parameters embedded)
maps a batch of normalised MR windows ``(B, *window, C)`` to normalised sCT windows
``(B, *window, 1)`` for any batch size ``B`` (a symbolic dimension; see
:func:`serialize_predict`), so a planning system can run the network with JAX alone;
the pre- and post-processing around it is what ``model.json`` describes. The directory
is written atomically (built beside the target, then renamed into place).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization
from jax import export

from sct_jax import __version__, methods, runs
from sct_jax.data import geometry as geometry_lib
from sct_jax.data import datasets, modality, preprocess, prior as prior_lib
from sct_jax.errors import ConfigError, DataError
from sct_jax.inference import geometry as inference_geometry
from sct_jax.inference import windows
from sct_jax.inference.predict import slice_tile

MODEL_JSON = "model.json"
FORMAT = "sct_jax.model/1"
PARAMS = "params.msgpack"
SERIALIZED = "predict_window.jaxexport"
HASHED = ("batch_spec.json", "config.json", geometry_lib.GEOMETRY_FILE, PARAMS)
log = logging.getLogger(__name__)


def _strip_optimizer(tree):
    """The state dict without optimizer state (not needed to predict)."""
    if isinstance(tree, dict):
        return {k: _strip_optimizer(v) for k, v in tree.items() if k != "opt_state"}
    return tree


def _merge(target, loaded):
    if isinstance(target, dict) and isinstance(loaded, dict):
        return {k: _merge(v, loaded[k]) if k in loaded else v for k, v in target.items()}
    return loaded


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


def load_model(path: str | os.PathLike, checkpoint: int | str = "best") -> LoadedModel:
    """Opens a training run directory or an exported model directory (read-only): the
    one reader ``sct-predict -m``, QA and export use.

    Raises:
      DataError: the path is neither, or its files are damaged; the message names it.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model not found (expected a training run directory or "
                        "an exported model directory)")
    if (path / MODEL_JSON).is_file():
        return load_exported(path)
    config = runs.read_config(path)
    step, state = runs.load_state(config, path, step=checkpoint)
    return LoadedModel(config, state, runs.read_geometry(config, path), int(step), path, "run")


def input_paths(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """What an output of a command reading the model at ``path`` must not touch.

    Returns:
      ``(files, folders)``: the model's own files (none may be replaced), and the
      folders nothing may be written into: an exported model directory as a whole (it
      is replaced as a whole on re-export and hashed), a run's ``checkpoints``. Both
      are empty when ``path`` is not a folder (``load_model`` then names it).
    """
    path = Path(path)
    if not path.is_dir():
        return [], []
    files = [p for p in path.iterdir() if p.is_file()]
    if (path / MODEL_JSON).is_file():
        return files, [path]
    return files, [path / "checkpoints"]


def read_geometry(path: str | os.PathLike) -> geometry_lib.TrainingGeometry:
    """The training geometry of a run or exported model directory, without loading its
    parameters (so inputs can be checked against it before the model loads).

    Raises:
      DataError: the path is neither kind of model directory; names it.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model not found (expected a training run directory or "
                        "an exported model directory)")
    if (path / MODEL_JSON).is_file():
        read_description(path)
        geometry = geometry_lib.load(path)
        if geometry is None:
            raise DataError(f"{path}: incomplete model directory (missing "
                            f"{geometry_lib.GEOMETRY_FILE})")
        return geometry
    return runs.read_geometry(runs.read_config(path), path)


def identity(model: LoadedModel) -> dict:
    """Which model made an sCT: path, kind, method, training step and a content hash.

    An exported model: the SHA-256 of its files recorded in ``model.json`` (checked on
    load). A run directory: SHA-256 of ``config.json`` and the checkpoint step (its
    parameters are many files; config and step name them within the run).
    """
    if model.kind == "export":
        digest = read_description(model.path)["content_sha256"]
        hashed = "model.json content_sha256 (model files)"
    else:
        raw = (model.path / runs.CONFIG_FILE).read_bytes()
        digest = hashlib.sha256(raw + f"\0step={model.step}".encode()).hexdigest()
        hashed = "sha256(config.json + step)"
    return {"path": str(model.path.resolve()), "kind": model.kind,
            "method": model.config.method, "name": model.config.get("name", ""),
            "step": int(model.step), "content_sha256": digest, "hash_of": hashed}


def content_hash(directory: Path, description: dict) -> str:
    """SHA-256 over the model files and ``model.json`` (less this hash itself), so that
    an edit of any of them — the method name included — is noticed on load."""
    digest = hashlib.sha256()
    for name in HASHED:
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    prior = directory / prior_lib.PRIOR_FILE
    if prior.is_file():  # only models that take the mean-CT prior have one
        digest.update(prior.name.encode() + b"\0" + prior.read_bytes())
    described = {k: v for k, v in description.items() if k != "content_sha256"}
    digest.update(MODEL_JSON.encode() + b"\0" + json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def inference_window(config) -> tuple[tuple[int, ...], int]:
    """``(window, channels)`` the network is run on: the 2D tile or the 3D patch."""
    if config.data.mode == "patches":
        return tuple(int(p) for p in config.data.patch), datasets.input_channels(config)
    tile = slice_tile(config)
    if 0 in tile:  # whole slices have no fixed window: export the training crop
        tile = tuple(int(c) for c in config.data.crop)
    return tile, datasets.input_channels(config)


def serialize_predict(config, state, batch_spec: dict) -> tuple[bytes, dict]:
    """The network's deterministic forward pass as ``jax.export`` bytes, and a
    description of its input.

    The parameters are embedded as constants. The batch dimension is symbolic
    (``jax.export.symbolic_shape``): the function takes any number of windows per call;
    the window and the channels are fixed.

    A convolution lowering may choose its algorithm from concrete shapes (``cpu_fast``
    picks im2col by the number of output positions, batch included), which a symbolic
    batch cannot answer. Such a model is exported with XLA's own convolutions
    (``conv_impl="xla"``: the same numbers within float rounding) and ``model.json``
    says so; a method that needs a concrete batch even then is exported at the fixed
    batch ``config.eval.batch_size``, as ``model.json``'s ``batch`` records.

    Args:
      config: the run's config.
      state: the method's state (parameters used).
      batch_spec: the training batch shapes (rebuilds the state for another lowering).

    Returns:
      ``(serialized bytes, description)``.
    """
    window, channels = inference_window(config)
    (symbolic_batch,) = export.symbolic_shape("b")
    conv_impl = config.model.get("conv_impl") if "model" in config else None
    attempts = [(symbolic_batch, config, None)]
    if conv_impl not in (None, "xla"):
        attempts.append((symbolic_batch, _with_conv_impl(config, "xla"),
                         f"the configured conv_impl={conv_impl!r} chooses its lowering from "
                         "the batch size, which is symbolic here"))
    attempts.append((int(config.eval.batch_size), config,
                     "the method needs a concrete batch: exported at config.eval.batch_size"))
    for batch, export_config, note in attempts:
        export_state = state if export_config is config else _rebuilt_state(
            export_config, state, batch_spec)
        spec = jax.ShapeDtypeStruct((batch, *window, channels), np.float32)
        try:
            exported = _export_predict(export_config, export_state, spec)
            break
        except (jax.errors.ConcretizationTypeError, jax.errors.InconclusiveDimensionOperation):
            if batch is not symbolic_batch:
                raise
    shape = ", ".join(map(str, window))
    any_batch = batch is symbolic_batch
    size = "B" if any_batch else str(batch)
    info = {"file": SERIALIZED, "batch": "any" if any_batch else batch,
            "input": f"({size}, {shape}, {channels}) float32 normalised MR windows"
                     + (", any batch size B" if any_batch else ""),
            "output": f"({size}, {shape}, 1) float32 normalised sCT in [-1, 1]",
            "windows_per_call": int(config.eval.batch_size),
            "conv_impl": export_config.model.get("conv_impl") if conv_impl else None,
            "platforms": list(exported.platforms)}
    if note:
        info["note"] = note
        (log.info if any_batch else log.warning)("serialized function: %s", note)
    return bytes(exported.serialize()), info


def _export_predict(config, state, spec: jax.ShapeDtypeStruct) -> export.Exported:
    method = methods.get_method(config.method)
    params = jax.device_get(state)
    return export.export(jax.jit(functools.partial(method.predict, config, params)))(spec)


def _with_conv_impl(config, conv_impl: str):
    """A copy of ``config`` with ``model.conv_impl`` replaced."""
    changed = config.copy_and_resolve_references()
    with changed.unlocked():
        changed.model.conv_impl = conv_impl
    return changed


def _rebuilt_state(config, state, batch_spec: dict):
    """``state``'s values in the structure (and modules) ``config`` builds: a method's
    ``apply_fn`` carries the convolution lowering it was created with."""
    method = methods.get_method(config.method)
    rng = jax.random.key_data(jax.random.key(config.seed))
    target = jax.eval_shape(functools.partial(method.create_state, config,
                                              batch_spec=batch_spec), rng)
    return serialization.from_state_dict(target, serialization.to_state_dict(state))


def export_model(workdir: str | os.PathLike, out_dir: str | os.PathLike,
                 model: LoadedModel | None = None, serialized: bool = True) -> Path:
    """Writes the model directory of the run in ``workdir`` (its best checkpoint).

    Raises:
      DataError: no run in ``workdir``, or ``out_dir`` exists and is not a model
        directory (an earlier export is replaced; anything else is refused).
    """
    workdir, out_dir = Path(workdir), Path(out_dir)
    if out_dir.exists() and not (out_dir / MODEL_JSON).is_file() and (
            not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an exported model; refusing to "
                        "overwrite")
    if out_dir.resolve() == workdir.resolve():
        raise DataError(f"{out_dir}: is the run directory; give another output")
    checkpoints = (workdir / "checkpoints").resolve()
    if out_dir.resolve() == checkpoints or checkpoints in out_dir.resolve().parents:
        raise DataError(f"{out_dir}: inside the run's checkpoints; give another output")
    if model is None:
        config = runs.read_config(workdir)
        reason = methods.get_method(config.method).not_an_sct_model(config)
        if reason:
            raise ConfigError(f"{workdir}: {reason}; nothing to export")
        model = load_model(workdir)
    if model.kind != "run":
        raise DataError(f"{workdir}: already an exported model")
    config = model.config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state_dict = _strip_optimizer(serialization.to_state_dict(jax.device_get(model.state)))
        (tmp / PARAMS).write_bytes(serialization.msgpack_serialize(state_dict))
        (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
        runs.write_batch_spec(runs.read_batch_spec(workdir), tmp)
        geometry_lib.save(model.geometry, tmp)  # with the prior template, if any
        window, channels = inference_window(config)
        description = {
            "format": FORMAT,
            "method": config.method, "name": config.name, "step": model.step,
            "sct_jax_version": __version__,
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "source_run": str(workdir.resolve()),
            "normalisation": {
                "input": modality.spec(config).kind,
                "mr": "per case: clip to the percentiles "
                      f"{list(config.data.mr_percentiles)} of the MR inside the body mask "
                      "(Otsu mask from the MR when none is given), map linearly to [-1, 1]"
                      if modality.spec(config).kind == "mr" else
                      f"not used: the input is a {modality.spec(config).describe()}",
                "ct": f"[-1, 1] <-> [{preprocess.HU_MIN:g}, {preprocess.HU_MAX:g}] HU "
                      "(linear)"},
            "training_geometry": json.loads(model.geometry.to_json()),
            "inference": {
                "mode": config.data.mode,
                "window": list(window), "channels": channels,
                "context_slices": int(config.data.context),
                "prior": (f"the last input channel is the mean training CT ({prior_lib.PRIOR_FILE}: "
                          "HU, resampled to the body box of the mask and placed on it, air "
                          "outside; mapped to [-1, 1] like the CT)"
                          if prior_lib.check_prior_config(config) else "none"),
                "overlap": float(config.eval.overlap),
                "how": ("MR reoriented to the training axis codes and resampled to the "
                        "training spacing when it differs by more than "
                        f"{inference_geometry.SPACING_TOLERANCE:.0%}; "
                        + ("axial slices padded with -1 to the window, overlapping "
                           "windows blended" if config.data.mode != "patches" else
                           "overlapping 3D windows blended")
                        + "; sCT mapped back onto the MR's grid")},
            "limits": "predicts only the anatomy, MR contrast and field strength it was "
                      f"trained on (region: {model.geometry.region or 'unknown'}); check "
                      "every sCT before planning",
        }
        if serialized:
            data, info = serialize_predict(config, model.state, runs.read_batch_spec(workdir))
            (tmp / SERIALIZED).write_bytes(data)
            description["serialized_function"] = info
        description["content_sha256"] = content_hash(tmp, description)
        (tmp / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_description(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MODEL_JSON
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable model description ({err})") from err
    if description.get("format") != FORMAT:
        raise DataError(f"{path}: not an sct_jax model (format {description.get('format')!r})")
    return description


def load_exported(model_dir: str | os.PathLike) -> LoadedModel:
    """Opens an exported model directory (no config file or checkpoint needed).

    Raises:
      DataError: missing files, or files changed since the export (content hash).
    """
    model_dir = Path(model_dir)
    description = read_description(model_dir)
    missing = [n for n in HASHED if not (model_dir / n).is_file()]
    if missing:
        raise DataError(f"{model_dir}: incomplete model directory (missing "
                        f"{', '.join(missing)})")
    if content_hash(model_dir, description) != description.get("content_sha256"):
        raise DataError(f"{model_dir}: files changed since export (content hash differs)")
    config = ml_collections.ConfigDict(json.loads((model_dir / "config.json").read_text()))
    method = methods.get_method(config.method)
    spec = runs.read_batch_spec(model_dir)
    rng = jax.random.key_data(jax.random.key(config.seed))
    abstract = jax.eval_shape(functools.partial(method.create_state, config, batch_spec=spec),
                              rng)
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    loaded = serialization.msgpack_restore((model_dir / PARAMS).read_bytes())
    state = serialization.from_state_dict(
        target, _merge(serialization.to_state_dict(target), loaded))
    geometry = geometry_lib.load(model_dir)
    geometry_lib.check_prior(config, geometry, model_dir)
    return LoadedModel(config, state, geometry, int(description.get("step", 0)), model_dir,
                       "export")


def serialized_volume_predictor(model_dir: str | os.PathLike, batch_size: int | None = None):
    """``(X, Y, Z)`` normalised MR -> prediction in [-1, 1], running the serialized
    function of ``model_dir`` (no method code involved) with the windows of
    ``model.json``.

    Args:
      model_dir: an exported model directory.
      batch_size: windows per call (default: ``windows_per_call`` of ``model.json``);
        any size for a function exported with a symbolic batch (``"batch": "any"``).

    Raises:
      DataError: a ``batch_size`` other than the one a fixed-batch function takes.
    """

    model_dir = Path(model_dir)
    description = read_description(model_dir)
    inference = description["inference"]
    info = description["serialized_function"]
    fixed = info["batch"] if isinstance(info["batch"], int) else None
    if fixed is not None and batch_size not in (None, fixed):
        raise DataError(f"{model_dir / SERIALIZED}: exported for batches of {fixed} windows, "
                        f"not {batch_size}")
    batch_size = int(batch_size or fixed or info["windows_per_call"])
    exported = export.deserialize(bytearray((model_dir / SERIALIZED).read_bytes()))

    def call(batch):
        return np.asarray(exported.call(np.asarray(batch, np.float32)))

    window = tuple(inference["window"])
    if inference["mode"] == "patches":
        return functools.partial(windows.predict_volume_3d, call, patch=window,
                                 overlap=inference["overlap"], batch_size=batch_size)
    return functools.partial(windows.predict_volume_2d, call, tile=window,
                             context=inference["context_slices"], batch_size=batch_size,
                             overlap=inference["overlap"])
