"""The grid a model was trained on: orientation, spacing and region of its training MRs.

A network learns its anatomy in one voxel order and at one voxel size: the training
cases' orientation (nibabel axis codes of the MR affine, e.g. ``("R", "A", "S")``) and
spacing (mm). :class:`TrainingGeometry` records them (with the region); a run stores it
as ``<workdir>/geometry.json`` when training starts (:mod:`sct_jax.runs`) and
:mod:`sct_jax.inference.geometry` brings every new MR onto that grid.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from sct_jax.data import datasets
from sct_jax.data.io import atomic_write_text
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
    """

    axcodes: tuple[str, str, str]
    spacing: tuple[float, float, float]
    region: str = ""
    cases: int = 0

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
    """The geometry of ``config``'s training split (reads the MR headers)."""
    cases = datasets.case_splits(config)["train"]
    return from_mr_files([c.mr for c in cases], region=config.data.region or "")


def save(geometry: TrainingGeometry, directory: str | Path) -> Path:
    return atomic_write_text(Path(directory) / GEOMETRY_FILE, geometry.to_json())


def load(directory: str | Path) -> TrainingGeometry | None:
    """The recorded geometry of a run or model directory, ``None`` when there is none."""
    path = Path(directory) / GEOMETRY_FILE
    if not path.is_file():
        return None
    try:
        return TrainingGeometry.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a training geometry ({err})") from err
