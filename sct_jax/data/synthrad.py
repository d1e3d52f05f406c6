"""Cases in the SynthRAD layouts: discovery, validation, loading, splits.

Task 1 (MR -> CT; each case a folder holding ``mr``, ``ct`` and ``mask`` volumes as
``.nii.gz``, ``.nii`` or ``.mha``):

- ``<root>/Task1/{brain,pelvis}/<id>/``  (the challenge's release)
- ``<root>/{brain,pelvis}/<id>/``
- ``<root>/<id>/``                        (a bare folder of cases)
- ``<root>/`` itself holding the MR          (a single case)

Task 2 (CBCT -> CT, ``input="cbct"``, :mod:`sct_jax.data.modality`): the same with a
``cbct`` volume instead of ``mr`` and ``Task2`` instead of ``Task1``. A case's input
volume is its ``mr`` attribute whichever it is (``Case.input`` says which); a CBCT is
checked for HU units like the CT.

Other file names (``mr_t2.nii.gz``) are given per role with ``names``.

Ids look like ``1PA001`` (task, B/P region, centre A/B/C, number). A case needs at
least its input; the CT is needed for training and scoring, the mask is made from the
input when absent.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from sct_jax.data import hu, modality
from sct_jax.data.io import VOLUME_SUFFIXES, Volume, load_volume
from sct_jax.data.preprocess import body_mask_from_mr
from sct_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REGIONS = ("brain", "pelvis")
_ROLES = ("mr", "ct", "mask")


@dataclasses.dataclass(frozen=True)
class Case:
    """One case's files.

    Attributes:
      id: case id (the folder name).
      region: ``"brain"``, ``"pelvis"`` or ``""`` (bare layout).
      dir: the case folder.
      mr, ct, mask: volume paths (``ct``/``mask`` ``None`` when absent); ``mr`` is the
        input volume: the MR, or the CBCT when ``input`` is ``"cbct"``.
      input: ``"mr"`` or ``"cbct"``.
    """

    id: str
    region: str
    dir: Path
    mr: Path
    ct: Path | None
    mask: Path | None
    input: str = "mr"


@dataclasses.dataclass
class CaseData:
    """A loaded case: the input (MR, or CBCT in HU) and CT volumes (HU), and the body
    mask ``(X, Y, Z)`` bool."""

    id: str
    mr: Volume
    ct: Volume | None
    mask: np.ndarray
    input: str = "mr"  # what ``mr`` holds: "mr" or "cbct"


def _role_files(names: Mapping[str, str] | None, input: str = "mr") -> dict[str, str]:
    """Role -> file stem, e.g. ``{"mr": "mr_t2", "ct": "ct_rigid", "mask": "mask"}``
    (the input role's default stem is ``cbct`` for CBCT input)."""
    names = dict(names or {})
    unknown = set(names) - set(_ROLES)
    if unknown:
        raise ConfigError(f"file name map: unknown roles {sorted(unknown)} "
                          f"(expected some of {_ROLES})")
    defaults = {"mr": input, "ct": "ct", "mask": "mask"}
    return {role: names.get(role, defaults[role]) for role in _ROLES}


def _find_role(case_dir: Path, stem: str) -> Path | None:
    found = [case_dir / f"{stem}{suffix}" for suffix in VOLUME_SUFFIXES
             if (case_dir / f"{stem}{suffix}").is_file()]
    if len(found) > 1:
        # Picking one silently could train on a stale copy: make the user choose.
        raise DataError(f"{case_dir}: several {stem} volumes "
                        f"({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _case_from_dir(case_dir: Path, region: str, stems: dict[str, str],
                   input: str = "mr") -> Case | None:
    mr = _find_role(case_dir, stems["mr"])
    if mr is None:
        return None
    return Case(id=case_dir.name, region=region, dir=case_dir, mr=mr,
                ct=_find_role(case_dir, stems["ct"]),
                mask=_find_role(case_dir, stems["mask"]), input=input)


def _scan(parent: Path, region: str, stems: dict[str, str],
          dropped: list[str] | None = None, input: str = "mr") -> list[Case]:
    """Cases in the sub-folders of ``parent``; what is not a case goes to ``dropped``."""
    cases = []
    for entry in sorted(p for p in parent.iterdir() if not p.name.startswith(".")):
        if entry.is_symlink() and not entry.exists():  # is_dir() is False for these too
            if dropped is not None:
                dropped.append(f"{entry.name} (broken or looping symlink)")
            continue
        if not entry.is_dir():
            continue
        case = _case_from_dir(entry, region, stems, input)
        if case is not None:
            cases.append(case)
        elif dropped is not None:
            dropped.append(f"{entry.name} (no {stems['mr']} volume)")
    return cases


def discover_cases(root: str | Path, region: str | None = None,
                   names: Mapping[str, str] | None = None,
                   input: str | None = "mr") -> list[Case]:
    """Finds every case under ``root``.

    Args:
      root: data root in one of the accepted layouts, or a single case folder (one
        holding the MR file itself; its name is the id).
      region: keep only this region (``"brain"``/``"pelvis"``); bare layouts have no
        region and are always kept.
      names: file stems per role when they are not ``mr``/``ct``/``mask``, e.g.
        ``{"mr": "mr_t2", "ct": "ct_rigid"}`` (the ``--mr``/``--ct`` options).
      input: ``"mr"`` (Task 1) or ``"cbct"`` (Task 2: ``cbct`` volumes, ``Task2``
        folder); ``None``: whichever of the two ``root`` holds (MR first).

    Returns:
      Cases sorted by id.

    Raises:
      DataError: ``root`` is missing or holds no case, or a case folder holds two
        files for one role (``mr.nii.gz`` and ``mr.mha``).
      ConfigError: ``names`` has a key other than ``mr``, ``ct``, ``mask``.
    """
    root = Path(root)
    if input is None:  # whichever input the data hold, MR first
        for kind in modality.INPUTS:
            try:
                return discover_cases(root, region, names, kind)
            except DataError as err:
                if "no cases found" not in str(err) or kind == modality.INPUTS[-1]:
                    raise
    if input not in modality.INPUTS:
        raise ConfigError(f"input {input!r}: expected one of {', '.join(modality.INPUTS)}")
    stems = _role_files(names, input)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    if region is not None and region not in REGIONS:
        raise DataError(f"{root}: unknown region {region!r} (expected one of {REGIONS})")
    single = _case_from_dir(root, "", stems, input)
    if single is not None:
        return [single]
    cases: list[Case] = []
    dropped: list[str] = []
    for base in (root / f"Task{modality.TASK[input]}", root):
        for r in REGIONS:
            if (base / r).is_dir() and (region is None or region == r):
                found = []
                cases.extend(_scan(base / r, r, stems, found, input))
                dropped.extend(f"{r}/{d}" for d in found)
        if cases:
            break
    if not cases:
        dropped = []
        cases = _scan(root, "", stems, dropped, input)
    if cases and dropped:
        log.warning("%s: skipped %d folder(s) that are not cases: %s", root, len(dropped),
                    ", ".join(dropped))
    ids = {}
    for case in cases:
        ids.setdefault(case.id, []).append(case.region)
    repeated = sorted(i for i, regions in ids.items() if len(regions) > 1)
    if repeated:
        # Scores and predictions are kept per id: two regions' cases would merge.
        raise DataError(f"{root}: case id(s) {', '.join(repeated[:5])} appear in several "
                        "regions; pass the region (--region / config.data.region)")
    if not cases:
        want = f" for region {region!r}" if region else ""
        mr, task = stems["mr"], modality.TASK[input]
        raise DataError(f"{root}: no cases found{want} (expected <root>/Task{task}/<region>/"
                        f"<id>/{mr}.nii.gz, <root>/<region>/<id>/{mr}.nii.gz or "
                        f"<root>/<id>/{mr}.nii.gz)")
    return sorted(cases, key=lambda c: c.id)


def _consistency_problems(case: Case, volumes: dict[str, Volume],
                          affine_atol: float) -> list[str]:
    """Shape, affine and empty-mask problems of the loaded ``volumes`` of ``case``."""
    problems = []
    mr = volumes.get("mr")
    for role in ("ct", "mask"):
        vol = volumes.get(role)
        if mr is None or vol is None:
            continue
        if vol.shape != mr.shape:
            problems.append(f"{getattr(case, role)}: shape {vol.shape} differs from "
                            f"{case.mr.name} {mr.shape}")
        elif not np.allclose(vol.affine, mr.affine, rtol=0.0, atol=affine_atol):
            diff = float(np.abs(vol.affine - mr.affine).max())
            problems.append(f"{getattr(case, role)}: affine differs from {case.mr.name} "
                            f"(max difference {diff:.3g})")
    if "mask" in volumes and not np.any(volumes["mask"].data > 0):
        problems.append(f"{case.mask}: empty mask")
    # A CBCT input is in HU like the CT: the same unit mistakes, the same check.
    in_hu = [("ct", "CT")] + ([("mr", "CBCT")] if case.input == "cbct" else [])
    for role, what in in_hu:
        vol = volumes.get(role)
        if vol is None or problems:
            continue
        mask = volumes["mask"].data > 0 if "mask" in volumes else None
        problem = hu.non_hu_problem(vol.data, mask) if hu.checking() else None
        if problem:
            problems.append(f"{getattr(case, role)}: {what} {problem} (set {hu.ALLOW_ENV}=1 "
                            "if intended)")
    return problems


def validate_case(case: Case, affine_atol: float = 1e-3) -> list[str]:
    """Every problem of one case, each as ``"PATH: problem"`` (empty list: valid).

    Checks: files present and readable, 3D, finite, CT and mask on the MR's grid
    (same shape, affine equal within ``affine_atol`` mm), mask not empty.
    """
    problems: list[str] = []
    volumes: dict[str, Volume] = {}
    for role in _ROLES:
        path = getattr(case, role)
        if path is None:
            if role == "mr":
                problems.append(f"{case.dir}: no {case.input} volume")
            continue
        try:
            volumes[role] = load_volume(path)
        except DataError as e:
            problems.append(str(e))
    return problems + _consistency_problems(case, volumes, affine_atol)


def validate_cases(cases: list[Case], affine_atol: float = 1e-3) -> None:
    """Raises one ``DataError`` listing every bad case (one line, ``; ``-separated).

    The message starts with the counts: ``"3 problem(s) in 2 file(s): PATH: ...; ..."``.
    """
    problems = [p for case in cases for p in validate_case(case, affine_atol)]
    if problems:
        bad = len({p.split(":")[0] for p in problems})
        raise DataError(f"{len(problems)} problem(s) in {bad} file(s): " + "; ".join(problems))


def load_case(case: Case, affine_atol: float = 1e-3) -> CaseData:
    """Loads a case (mask from the file, or made from the MR when there is none).

    Raises:
      DataError: the first problem :func:`validate_case` would report.
    """
    volumes = {"mr": load_volume(case.mr)}
    for role in ("ct", "mask"):
        if getattr(case, role) is not None:
            volumes[role] = load_volume(getattr(case, role))
    problems = _consistency_problems(case, volumes, affine_atol)
    if problems:
        raise DataError(problems[0])
    mr = volumes["mr"]
    mask = volumes["mask"].data > 0 if "mask" in volumes else body_mask_from_mr(mr.data)
    if not mask.any():
        raise DataError(f"{case.mr}: no body found in the {modality.LABEL[case.input]} to "
                        "make a mask from")
    return CaseData(id=case.id, mr=mr, ct=volumes.get("ct"), mask=mask, input=case.input)


def split_cases(cases: list[Case], fractions=(0.8, 0.1, 0.1), seed: int = 0
                ) -> dict[str, list[Case]]:
    """Deterministic train/val/test split by id.

    Args:
      cases: the cases.
      fractions: train, val, test fractions (sum 1).
      seed: permutation seed (fixed: the same seed gives the same split everywhere).

    Returns:
      ``{"train", "val", "test"}`` -> cases sorted by id; with >= 3 cases none is empty.
    """
    try:
        fractions = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as e:
        raise DataError(f"split fractions {fractions!r} must be three numbers") from e
    # Written so that NaN fails too (every comparison with NaN is False).
    if not (len(fractions) == 3 and all(f >= 0 for f in fractions)
            and abs(sum(fractions) - 1.0) <= 1e-6):
        raise DataError(f"split fractions {fractions} must be three non-negative numbers "
                        "summing to 1")
    ordered = sorted(cases, key=lambda c: c.id)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n = len(ordered)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        # Rounding up val and test can eat the whole train set (4 cases at
        # (0.1, 0.45, 0.45)): give one case back, from the larger of the two.
        while fractions[0] > 0 and n - n_val - n_test < 1:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
    n_train = max(n - n_val - n_test, 0)
    parts = np.split(perm, [n_train, n_train + n_val])
    return {name: sorted((ordered[i] for i in idx), key=lambda c: c.id)
            for name, idx in zip(("train", "val", "test"), parts)}


def fold_split(splits: dict[str, list[Case]], folds: int, fold: int, seed: int = 0
               ) -> dict[str, list[Case]]:
    """K-fold cross-validation over the train and val cases of :func:`split_cases`.

    The test cases stay as they are, so the K fold models are scored (and ensembled) on
    the same held-out cases; the others are permuted by ``seed`` and cut into ``folds``
    near-equal folds (sizes differ by at most one): fold ``fold`` validates, the rest
    train. The K validation sets are disjoint and cover every non-test case once.

    Args:
      splits: ``{"train", "val", "test"}`` from :func:`split_cases`.
      folds: K >= 2.
      fold: which fold validates, ``0 <= fold < folds``.
      seed: permutation seed (the split's).

    Returns:
      ``{"train", "val", "test"}`` -> cases sorted by id.
    """
    pool = sorted(splits["train"] + splits["val"], key=lambda c: c.id)
    if not 2 <= folds <= len(pool) or not 0 <= fold < folds:
        raise DataError(f"config.data.folds={folds}: K-fold needs 2 <= data.folds <= "
                        f"{len(pool)} (the non-test cases) and 0 <= data.fold < data.folds "
                        f"(data.fold={fold})")
    perm = np.random.default_rng(seed).permutation(len(pool))
    val = set(np.array_split(perm, folds)[fold].tolist())
    return {"train": [c for i, c in enumerate(pool) if i not in val],
            "val": [c for i, c in enumerate(pool) if i in val],
            "test": list(splits["test"])}
