"""Scoring helpers and the no-model rows every seed table carries.

A *reference* is a :class:`Reference`: a CT in HU ``(X, Y, Z)`` float32, its body mask
``(X, Y, Z)`` bool and its voxel spacing in mm (the geometry metrics, HD95, are in mm).
Phantom cases carry the CT as their MR sees it (``ct_aligned`` / ``mask_aligned``, see
:mod:`sct_jax.data.phantom`): :func:`load_reference` scores against those when present,
so a misaligned training pair does not penalise a correct sCT; other data are scored
against their own ``ct``/``mask``.

Rows carry the evaluation's per-case metrics (:func:`sct_jax.evaluation.scoring.case_metrics`,
the ones ``evaluate.py`` reports), averaged over the test cases.

The baselines themselves (constant soft tissue, intensity lookup, mean training CT, the
perfect-model floor) are :mod:`sct_jax.evaluation.baselines`, the same functions every
``evaluate.py`` report uses; this module turns them into table rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from sct_jax.data import modality, synthrad
from sct_jax.data.io import Volume, load_volume
from sct_jax.evaluation import baselines as evaluation_baselines
from sct_jax.evaluation import scoring
from sct_jax.evaluation.baselines import find_volume, ideal_prediction  # noqa: F401 (re-exported)
from sct_jax.reproduce.dose import DOSE_METRICS, CaseDose

SOFT_TISSUE_HU = evaluation_baselines.SOFT_TISSUE_HU
# Row key -> the case_metrics name it averages (table order is table.COLUMNS').
ROW_METRICS = {"mae": "mae", "psnr": "psnr", "ssim": "ssim", "ms_ssim": "ms_ssim",
               "bone_mae": "mae_bone", "bone_dice": "dice_bone", "bone_hd95": "hd95_bone",
               "air_dice": "dice_air", "air_hd95": "hd95_air", "wepl_distal": "wepl_distal"}
PHANTOM_GENERATOR = "sct_jax.data.phantom"


class Reference(NamedTuple):
    """What a test case's sCT is scored against."""

    ct: np.ndarray  # HU, float32
    mask: np.ndarray  # bool
    spacing: tuple[float, ...]  # mm per axis
    # sCT -> dose columns (a :class:`~sct_jax.reproduce.dose.CaseDose`; ``--dose`` only).
    dose: Callable[[np.ndarray], dict] | None = None


def load_reference(case: synthrad.Case, dose_dir: Path | None = None,
                   rx: float = 2.0) -> tuple[Reference, bool]:
    """``(reference, aligned)``: the case's CT in the MR's frame when the folder has one
    (``ct_aligned`` and ``mask_aligned``; ``aligned`` True), else its ``ct``/``mask``.

    Args:
      case: a test case.
      dose_dir: with ``--dose``, the folder of the case plans (``<dose_dir>/<case id>``):
        the reference then scores every sCT by dose too (:mod:`sct_jax.reproduce.dose`).
      rx: the dose prescription in Gy.
    """
    ct_path = find_volume(case.dir, "ct_aligned")
    mask_path = find_volume(case.dir, "mask_aligned")
    aligned = ct_path is not None and mask_path is not None
    if aligned:
        ct, mask = load_volume(ct_path), load_volume(mask_path).data > 0
    else:
        data = synthrad.load_case(case)
        ct, mask = data.ct, np.asarray(data.mask, bool)
    dose = None
    if dose_dir is not None:
        dose = CaseDose(case.id, Volume(ct.data.astype(np.float32), ct.affine, ct.header),
                        mask, Path(dose_dir) / case.id, rx)
    return Reference(ct.data.astype(np.float32), mask, tuple(ct.spacing), dose), aligned


def data_overrides(data_root: str | None, region: str | None,
                   anatomy_variation: float = 1.0) -> dict:
    """The config overrides that point a seed's configs at a user's dataset
    (``--data ROOT [--region R]``), or for the built-in phantom its anatomy variation
    (``--atlas``: :data:`~sct_jax.config_utils.ATLAS_ANATOMY_VARIATION`); empty for the
    phantom as the configs have it. The phantom's other settings (``data.phantom.*``) stay
    in the configs: unused once ``data.root`` is set."""
    if not data_root:
        return ({} if anatomy_variation == 1.0 else
                {"data.phantom.anatomy_variation": float(anatomy_variation)})
    return {"data.root": str(data_root), **({"data.region": region} if region else {})}


def phantom_manifest(cases) -> dict | None:
    """The phantom generator's manifest next to ``cases`` (``manifest.json`` in their
    region folder, written by ``python -m sct_jax.data.phantom``), or None for other
    data: what the phantom-only checks (which cases are aligned) need."""
    if not cases:
        return None
    path = Path(cases[0].dir).parent / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("generator") == PHANTOM_GENERATOR else None


def score(pairs) -> dict[str, float]:
    """Mean per-case metrics over ``(sct, reference)`` pairs, as row keys.

    Returns:
      The :data:`ROW_METRICS` keys (NaN-aware means; NaN when no case has the tissue),
      and the :data:`~sct_jax.reproduce.dose.DOSE_METRICS` keys when every reference
      scores dose (``--dose``).
    """
    pairs = list(pairs)
    per_case = [scoring.case_metrics(ref.ct, sct, ref.mask, ref.spacing)
                for sct, ref in pairs]
    names = dict(ROW_METRICS)
    if pairs and all(ref.dose is not None for _, ref in pairs):
        for case, (sct, ref) in zip(per_case, pairs):
            case.update(ref.dose(sct))
        names.update({key: key for key in DOSE_METRICS})
    out = {}
    for key, name in names.items():
        values = [c[name] for c in per_case if math.isfinite(c[name])]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def wanted_metrics(references: dict) -> list[str]:
    """The row keys a row scored against ``references`` has: :data:`ROW_METRICS`, and
    the dose columns when the references score dose."""
    dose = bool(references) and all(r.dose is not None for r in references.values())
    return list(ROW_METRICS) + (list(DOSE_METRICS) if dose else [])


def complete_row(row: dict, pred_dir: Path, references: dict) -> tuple[dict, bool]:
    """A cached row made before some of :data:`ROW_METRICS` existed (or without the
    dose columns ``--dose`` now asks for), completed.

    Rescored from the run's predictions (``pred_dir/<id>/sct.nii.gz`` of every test
    case) when they are all there; otherwise the missing metrics are NaN (``n/a`` in
    the table) and the note says so, rather than a KeyError or a silent blank.

    Returns:
      ``(row, rescored)``: ``rescored`` True when the metrics were recomputed (the
      caller rewrites its cache).
    """
    missing = [k for k in wanted_metrics(references) if k not in row]
    if not missing:
        return row, False
    if not any(math.isfinite(row[k]) for k in ROW_METRICS if k in row):
        return {**row, **{k: math.nan for k in missing}}, False  # never scored (diverged)
    paths = {i: Path(pred_dir) / i / "sct.nii.gz" for i in references}
    if references and all(p.is_file() for p in paths.values()):
        pairs = [(load_volume(paths[i]).data, ref) for i, ref in references.items()]
        return {**row, **score(pairs)}, True
    note = f"{', '.join(missing)} n/a (scored before they existed; predictions gone)"
    return {**row, **{k: math.nan for k in missing},
            "note": f"{row['note']}; {note}" if row.get("note") else note}, False


def row(method: str, scores: dict, seed: int | None = None, wall_s: float = math.nan,
        note: str = "") -> dict:
    """A table row (see :mod:`sct_jax.reproduce.table`); the dose columns only when
    ``scores`` has them."""
    return {"method": method, "seed": seed, **{k: float(scores.get(k, math.nan))
                                               for k in ROW_METRICS},
            **{k: float(scores[k]) for k in DOSE_METRICS if k in scores},
            "wall_s": float(wall_s), "note": note}


def constant_row(references, hu: float = SOFT_TISSUE_HU) -> dict:
    """Every body voxel at ``hu`` (air outside): the floor any model must beat."""
    pairs = [(evaluation_baselines.constant_sct(ref.mask, hu), ref) for ref in references]
    return row(f"constant {hu:g} HU", score(pairs), note="body voxels at soft tissue")


def mean_training_ct_row(train_pairs, references) -> dict:
    """The mean training CT on each test case's body box as its sCT (a model that
    ignores the MR; :func:`sct_jax.evaluation.baselines.mean_ct_on_boxes`).

    Args:
      train_pairs: ``(ct, mask)`` of the training cases, read one at a time.
      references: the test :class:`Reference` objects.
    """
    references = list(references)
    boxes = evaluation_baselines.mean_ct_on_boxes(
        train_pairs, [evaluation_baselines.box_shape(ref.mask) for ref in references])
    pairs = [(evaluation_baselines.place_in_body(box, ref.mask), ref)
             for box, ref in zip(boxes, references)]
    return row("mean training CT", score(pairs), note="ignores the MR")


def lookup_row(lookup: evaluation_baselines.IntensityLookup, unit_mrs, references) -> dict:
    """The intensity lookup's sCT of each test MR (normalised, ``unit_mrs``) scored
    against its reference: the simplest model that uses the MR."""
    pairs = [(lookup.predict(unit, ref.mask), ref) for unit, ref in zip(unit_mrs, references)]
    return row("intensity lookup", score(pairs),
               note=f"HU per MR intensity bin ({lookup.hu.size} bins)")


def fitted_rows(config, train_cases, test_cases, references) -> list[dict]:
    """The intensity-lookup and mean-training-CT rows, fitted on ``train_cases`` (the
    first :data:`~sct_jax.evaluation.baselines.MAX_TRAINING_CASES` with a CT, one in
    memory at a time) exactly as ``evaluate.py`` fits them.

    Args:
      config: the experiment's config (MR percentiles).
      train_cases, test_cases: the splits.
      references: case id -> :class:`Reference` of each test case (:func:`load_reference`).
    """
    refs = [references[c.id] for c in test_cases]
    fitted = evaluation_baselines.fit_from_cases(
        config, train_cases, [evaluation_baselines.box_shape(ref.mask) for ref in refs])
    units = (evaluation_baselines.unit_mr(config, synthrad.load_case(c)) for c in test_cases)
    mean_pairs = [(evaluation_baselines.place_in_body(box, ref.mask), ref)
                  for box, ref in zip(fitted.mean_boxes, refs)]
    note = f"fitted on {fitted.n_training} training case(s)"
    label = modality.spec(config).label
    return [lookup_row(fitted.lookup, units, refs) | {"note": f"{note}; uses the {label}"},
            row("mean training CT", score(mean_pairs), note=f"{note}; ignores the {label}")]


def cbct_row(test_cases, references: dict) -> dict:
    """The CBCT itself as the sCT (its HU, air outside the body): what doing nothing
    gives (:func:`sct_jax.evaluation.baselines.cbct_as_sct`)."""
    pairs = []
    for case in test_cases:
        ref = references[case.id]
        cbct = load_volume(case.mr).data
        pairs.append((evaluation_baselines.cbct_as_sct(cbct, ref.mask), ref))
    return row("CBCT itself", score(pairs), note="uncorrected CBCT HU in the body")


def floor_row(test_cases, references: dict, note: str) -> dict:
    """The perfect-model floor: each case's noise-free CT (``ct_ideal``, which only the
    phantom writes) scored as its sCT; with no ``ct_ideal`` the row says why it is empty."""
    ideal = [(ideal_prediction(c), references[c.id]) for c in test_cases]
    if ideal and all(p is not None for p, _ in ideal):
        return row("perfect model (floor)", score(ideal), note=note)
    return row("perfect model (floor)", {},
               note="left out: the data have no noise-free CT (ct_ideal; the phantom's)")
