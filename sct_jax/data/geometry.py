"""The grid a model was trained on: orientation, spacing and region of its training MRs.

A network learns its anatomy in one voxel order and at one voxel size: the training
cases' orientation (nibabel axis codes of the MR affine, e.g. ``("R", "A", "S")``) and
spacing (mm). :class:`TrainingGeometry` records them (with the region); a run stores it
as ``<workdir>/geometry.json`` when training starts (:mod:`sct_jax.runs`) and
:mod:`sct_jax.inference.geometry` brings every new MR onto that grid. A model that takes
the mean training CT as an input (``config.data.prior``, :mod:`sct_jax.data.prior`)
also needs that template wherever it predicts: it is part of the geometry, stored
beside it as ``prior_ct.npy``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from sct_jax.data import datasets, prior as prior_lib
from sct_jax.data.io import atomic_path, atomic_write_text
from sct_jax.errors import DataError

GEOMETRY_FILE = "geometry.json"


@dataclasses.dataclass(frozen=True)
class TrainingGeometry:
    """What a model assumes about its input grid.

    Attributes:
      axcodes: orientation of the training MRs' voxel axes, e.g. ``("R", "A", "S")``.
      spacing: voxel size in mm along those axes (median over the training cases).
      region: the anatomy trained on (``"pelvis"``, ``"brain"``, ``""`` unknown).
      cases: how many training cases this was read from (0: not recorded).
      prior: the mean training CT template (HU, float32, :func:`prior_lib.fit_template`)
        of a model that takes it as input (``config.data.prior``); ``None`` otherwise.
        Not part of ``to_json`` or of equality (its file holds it).
    """

    axcodes: tuple[str, str, str]
    spacing: tuple[float, float, float]
    region: str = ""
    cases: int = 0
    prior: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        return json.dumps({"axcodes": list(self.axcodes), "spacing_mm": list(self.spacing),
                           "region": self.region, "cases": self.cases}, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingGeometry":
        return cls(tuple(str(c) for c in d["axcodes"]),
                   tuple(float(s) for s in d["spacing_mm"]),
                   str(d.get("region", "")), int(d.get("cases", 0)))


def from_mr_files(paths: Sequence[str | Path], region: str = "") -> TrainingGeometry:
    """The geometry of a set of training MRs (headers only).

    The most common orientation wins (a model trained on mixed orientations has no
    single one; the count of the others is not kept); the spacing is the per-axis
    median over the cases in that orientation.
    """
    if not paths:
        raise DataError("no training cases to read the training geometry from")
    by_codes: dict[tuple, list] = collections.defaultdict(list)
    for path in paths:
        try:
            affine = nib.load(str(path)).affine
        except Exception as err:  # nibabel raises many kinds for a broken header
            raise DataError(f"{path}: unreadable header ({type(err).__name__})") from err
        by_codes[tuple(nib.aff2axcodes(affine))].append(
            np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    codes, spacings = max(by_codes.items(), key=lambda kv: len(kv[1]))
    spacing = tuple(float(round(s, 6)) for s in np.median(np.stack(spacings), axis=0))
    return TrainingGeometry(codes, spacing, region, len(paths))


def from_config(config) -> TrainingGeometry:
    """The geometry of ``config``'s training split (reads the MR headers; with
    ``config.data.prior``, also fits the mean training CT template)."""
    cases = datasets.case_splits(config)["train"]
    geometry = from_mr_files([c.mr for c in cases], region=config.data.region or "")
    if prior_lib.check_prior_config(config):
        geometry = dataclasses.replace(geometry, prior=datasets.prior_template(config, cases))
    return geometry


def save(geometry: TrainingGeometry, directory: str | Path) -> Path:
    """Writes ``geometry.json`` (and ``prior_ct.npy`` when the geometry has a prior)."""
    if geometry.prior is not None:
        with atomic_path(Path(directory) / prior_lib.PRIOR_FILE) as tmp:
            np.save(tmp, np.asarray(geometry.prior, np.float32))
    return atomic_write_text(Path(directory) / GEOMETRY_FILE, geometry.to_json())


def load(directory: str | Path) -> TrainingGeometry | None:
    """The recorded geometry of a run or model directory (with its prior template when
    one is stored), ``None`` when there is none."""
    path = Path(directory) / GEOMETRY_FILE
    if not path.is_file():
        return None
    try:
        geometry = TrainingGeometry.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a training geometry ({err})") from err
    prior_path = Path(directory) / prior_lib.PRIOR_FILE
    if prior_path.is_file():
        try:
            template = np.load(prior_path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{prior_path}: not a prior template ({err})") from err
        if template.ndim != 3 or not np.isfinite(template).all():
            raise DataError(f"{prior_path}: not a prior template (a finite 3D array, "
                            f"got shape {template.shape})")
        geometry = dataclasses.replace(geometry, prior=template.astype(np.float32))
    return geometry


def check_prior(config, geometry: TrainingGeometry | None, where: str | Path) -> None:
    """Refuses a model that takes the prior (``config.data.prior``) without its template.

    Raises:
      DataError: ``where`` (the run or model folder) lacks ``prior_ct.npy``.
    """
    if config is None:  # a caller that only reads the grid (no model config at hand)
        return
    if prior_lib.check_prior_config(config) and (geometry is None or geometry.prior is None):
        raise DataError(f"{Path(where) / prior_lib.PRIOR_FILE}: missing; the model takes the "
                        "mean training CT as input (config.data.prior) and its template is "
                        "recorded when training starts")
