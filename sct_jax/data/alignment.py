"""MR/CT alignment quality: mutual information and the meta-validation split.

Seed 02 trains its reweighting against a well-registered validation set: "the top 11% of
cases with the highest mutual information between MR and CT". Mutual information (MI)
is estimated from a joint intensity histogram over the voxels inside the body mask:

    MI = sum_ij p_ij log(p_ij / (p_i p_j))        (nats)

with ``bins`` equal-width bins spanning each image's range inside the mask. It needs no
intensity correspondence between the modalities, only a consistent one, which is why it
drops as the MR slides off the CT.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from sct_jax.data import synthrad
from sct_jax.data.io import VOLUME_SUFFIXES, load_volume
from sct_jax.errors import DataError


def joint_histogram(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray | None = None,
                    bins: int = 64) -> np.ndarray:
    """Joint histogram of two images over the voxels inside ``mask``.

    Args:
      mr: ``(X, Y, Z)`` (any shape) image.
      ct: image of the same shape.
      mask: boolean/0-1 array of the same shape, or None for every voxel.
      bins: bins per image, equal width from the image's min to max inside the mask
        (the max falls in the last bin, as in ``np.histogram2d``).

    Returns:
      ``(bins, bins)`` float64 counts, rows indexed by ``mr``.

    Raises:
      DataError: shapes differ, the mask is empty, or an image is not finite.
    """
    mr, ct = np.asarray(mr), np.asarray(ct)
    if mr.shape != ct.shape:
        raise DataError(f"mutual information: mr shape {mr.shape} differs from ct {ct.shape}")
    if int(bins) < 2:
        raise DataError(f"mutual information: bins={bins}, need at least 2")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != mr.shape:
            raise DataError(f"mutual information: mask shape {mask.shape} differs from "
                            f"images {mr.shape}")
        mr, ct = mr[mask > 0], ct[mask > 0]
    values = [np.asarray(v, dtype=np.float64).ravel() for v in (mr, ct)]
    if values[0].size == 0:
        raise DataError("mutual information: the mask selects no voxels")
    indices = []
    for v in values:
        if not np.all(np.isfinite(v)):
            raise DataError("mutual information: non-finite voxel values")
        lo, hi = float(v.min()), float(v.max())
        if hi == lo:  # a constant image: everything in the first bin
            indices.append(np.zeros(v.shape, dtype=np.int64))
            continue
        # Bin edges as np.histogram2d draws them, so integer HU on an edge binned alike.
        edges = np.linspace(lo, hi, int(bins) + 1)
        indices.append(np.minimum(np.searchsorted(edges, v, side="right") - 1, bins - 1))
    flat = indices[0] * bins + indices[1]
    return np.bincount(flat, minlength=bins * bins).reshape(bins, bins).astype(np.float64)


def _entropies(counts: np.ndarray) -> tuple[float, float, float]:
    """Marginal entropies of rows and columns and the joint entropy (nats)."""
    p = counts / counts.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return entropy(p.sum(axis=1)), entropy(p.sum(axis=0)), entropy(p.ravel())


def mutual_information(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray | None = None,
                       bins: int = 64) -> float:
    """Histogram estimate of the mutual information of two images, in nats.

    ``MI = H(mr) + H(ct) - H(mr, ct)``, which equals the ``sum p log(p / (p p))`` form.
    See :func:`joint_histogram` for the arguments and errors.
    """
    h_mr, h_ct, h_joint = _entropies(joint_histogram(mr, ct, mask, bins))
    return max(h_mr + h_ct - h_joint, 0.0)  # clamp the -1e-16 rounding of independent images


def normalized_mutual_information(mr: np.ndarray, ct: np.ndarray,
                                  mask: np.ndarray | None = None, bins: int = 64) -> float:
    """Studholme's normalised MI, ``(H(mr) + H(ct)) / H(mr, ct)``, in [1, 2].

    Less sensitive than MI to how much of the field of view the overlap covers. A
    constant pair (zero joint entropy) gives 2.
    """
    h_mr, h_ct, h_joint = _entropies(joint_histogram(mr, ct, mask, bins))
    return 2.0 if h_joint == 0.0 else (h_mr + h_ct) / h_joint


def load_case_arrays(case_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mr, ct, mask)`` arrays of a SynthRAD-layout case folder (all three required;
    files found as :func:`sct_jax.data.synthrad.discover_cases` finds them)."""
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise DataError(f"{case_dir}: case folder not found")
    cases = synthrad.discover_cases(case_dir)
    if len(cases) != 1 or cases[0].dir != case_dir:
        raise DataError(f"{case_dir}: no mr volume (mr.nii.gz, mr.mha, ...)")
    case = cases[0]
    for role in ("ct", "mask"):
        if getattr(case, role) is None:
            raise DataError(f"{case_dir}: no {role} volume ({role}.nii.gz, {role}.mha, ...)")
    mr, ct, mask = (load_volume(getattr(case, role)).data for role in ("mr", "ct", "mask"))
    return mr, ct, mask


def _as_arrays(case_id: str, case) -> tuple:
    if isinstance(case, (str, os.PathLike)):
        return load_case_arrays(case)
    if isinstance(case, Mapping):
        return case["mr"], case["ct"], case.get("mask")
    if isinstance(case, (tuple, list)) and len(case) in (2, 3):
        return tuple(case) + (None,) * (3 - len(case))
    raise DataError(f"case {case_id}: expected a folder, a dict with mr/ct/mask or a "
                    f"(mr, ct[, mask]) tuple, got {type(case).__name__}")


def rank_cases_by_mi(cases, bins: int = 64) -> dict[str, float]:
    """Mutual information of every case, best registered first.

    Args:
      cases: one of: a region folder (``.../Task1/pelvis``: every sub-folder with an MR
        is a case); an iterable of case folders (the folder name is the id); or a mapping
        from id to a case folder, a dict with ``mr``, ``ct`` and optional ``mask``
        arrays, or an ``(mr, ct[, mask])`` tuple.
      bins: histogram bins per image.

    Returns:
      ``{id: MI in nats}`` ordered by decreasing MI (ties by id).

    Raises:
      DataError: no cases, or a case that cannot be read.
    """
    if isinstance(cases, (str, os.PathLike)):
        root = Path(cases)
        if not root.is_dir():
            raise DataError(f"{root}: folder not found")
        cases = sorted(p for p in root.iterdir()
                       if p.is_dir() and any((p / f"mr{s}").is_file() for s in VOLUME_SUFFIXES))
        if not cases:
            raise DataError(f"{root}: no case folders with an mr volume")
    if not isinstance(cases, Mapping):
        cases = {Path(p).name: p for p in cases} if isinstance(cases, Iterable) else cases
    if not isinstance(cases, Mapping) or not cases:
        raise DataError("rank_cases_by_mi: no cases given")
    scores = {}
    for case_id, case in cases.items():
        mr, ct, mask = _as_arrays(str(case_id), case)
        try:
            scores[str(case_id)] = mutual_information(mr, ct, mask, bins)
        except DataError as e:
            raise DataError(f"case {case_id}: {e}") from e
    return dict(sorted(scores.items(), key=lambda item: (-item[1], item[0])))


def select_meta_validation(mi_by_id: Mapping[str, float], fraction: float = 0.11) -> list[str]:
    """The best-registered cases: the top ``fraction`` by MI (seed 02: 11%).

    The count is ``round(fraction * n)`` (halves up), at least 1. Ties are broken by id
    so the split is reproducible.

    Args:
      mi_by_id: ``{id: MI}``, e.g. from :func:`rank_cases_by_mi`.
      fraction: share of cases to select, in (0, 1].

    Returns:
      The selected ids, highest MI first.

    Raises:
      DataError: no cases, a non-finite MI, or a fraction outside (0, 1].
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise DataError(f"meta-validation fraction {fraction}: must be in (0, 1]")
    if not mi_by_id:
        raise DataError("meta-validation: no cases to select from")
    bad = [k for k, v in mi_by_id.items() if not math.isfinite(float(v))]
    if bad:
        raise DataError(f"meta-validation: non-finite mutual information for {bad[0]}")
    count = max(1, int(math.floor(fraction * len(mi_by_id) + 0.5)))
    ranked = sorted(mi_by_id.items(), key=lambda item: (-float(item[1]), str(item[0])))
    return [str(k) for k, _ in ranked[:count]]
