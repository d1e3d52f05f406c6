"""Scores a folder of synthetic CTs against SynthRAD-layout reference cases.

A prediction folder holds one volume per case, named by the case id in any of these
ways (``.nii.gz``, ``.nii``, ``.mha`` or ``.mhd``)::

    PRED/<id>/sct.nii.gz     PRED/<id>.nii.gz     PRED/<id>_sct.nii.gz

Each is scored against ``ct`` and ``mask`` of the case with that id under the data
root (found with :func:`sct_jax.data.synthrad.discover_cases`) with
:func:`case_metrics` (SynthRAD2023's metrics and ours, SynthRAD2025's PSNR and
MS-SSIM, Dice and HD95 in mm of bone and air, LPIPS when VGG-16 weights are given, the
WEPL difference of :mod:`sct_jax.dose.wepl`, the slice steps and high frequencies
beyond the CT's of :mod:`sct_jax.metrics.texture`), voxel by voxel on the CT's grid: a prediction
stored in another voxel order (the same world image, axes permuted or reversed) is
reoriented by its affine, one on another grid is refused (:func:`on_reference_grid`).
Everything is computed before anything is written, so a bad prediction (unreadable,
another grid, no reference case) stops the run with a one-line
:class:`~sct_jax.errors.DataError` naming the file and leaves no partial results. The results are a per-case CSV and a JSON summary (per
metric mean, std, n, plus the per-case rows), both written atomically.

References without a prediction are not scored (the summary counts and lists them),
nor are predictions of cases that have no reference CT (listed as ``no_reference_ct``).
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from nibabel import orientations
from tqdm import tqdm

from sct_jax.data import synthrad
from sct_jax.data.hu import check_hu
from sct_jax.data.io import (VOLUME_SUFFIXES, Volume, atomic_write_text, load_volume,
                            volume_suffix)
from sct_jax.dose.wepl import wepl_differences
from sct_jax.errors import ConfigError, DataError
from sct_jax.metrics import METRIC_NAMES, synthrad_metrics
from sct_jax.metrics.geometry import GEOMETRY_NAMES, geometry_metrics
from sct_jax.metrics.lpips import LpipsNet, lpips_volume
from sct_jax.metrics.synthrad2025 import METRIC_NAMES_2025, ms_ssim, psnr_2025
from sct_jax.metrics.texture import TEXTURE_NAMES, texture_metrics
from sct_jax.io_guard import refuse_overwrite

# The per-case metrics of every scored case, in table order (scoring, baselines, report):
# SynthRAD2023's and ours, SynthRAD2025's PSNR and MS-SSIM (its MAE is 2023's), then
# the geometry of bone and air (Dice, HD95 in mm; bone Dice is already among the first),
# then LPIPS on axial slices (NaN when no VGG-16 weights were given: never a random net's),
# then the proton-range proxy: mean |WEPL(sCT) - WEPL(CT)| in mm over 4 axial beams to
# the centre and the distal edge of a 25 mm sphere at the body's centre of mass.
# Last, the sCT's texture beyond the CT's (:mod:`sct_jax.metrics.texture`): steps
# between axial slices and in-plane high frequencies, in HU.
SCORED_METRICS = METRIC_NAMES + METRIC_NAMES_2025 + tuple(
    n for n in GEOMETRY_NAMES if n not in METRIC_NAMES) + ("lpips", "wepl_center",
                                                           "wepl_distal") + TEXTURE_NAMES


def case_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray,
                 spacing, lpips_net: LpipsNet | None = None,
                 affine: np.ndarray | None = None) -> dict[str, float]:
    """The :data:`SCORED_METRICS` of one case (arrays on one grid, ``spacing`` in mm
    per axis), as scoring, the baselines and the report show them.

    Args:
      ct, sct: ``(X, Y, Z)`` HU.
      mask: ``(X, Y, Z)`` body mask.
      spacing: voxel size in mm per axis.
      lpips_net: the LPIPS network (:func:`sct_jax.metrics.lpips.load_lpips`); ``None``:
        ``lpips`` is NaN.
      affine: ``(4, 4)`` voxel -> RAS+ mm of the grid, for the WEPL beams' directions
        (:mod:`sct_jax.dose.wepl`); ``None``: ``diag(spacing)`` (beams along the array
        axes).

    Raises:
      DataError: shape mismatch, empty mask, a volume too thin for SSIM, a bad spacing.
    """
    result = synthrad_metrics(ct, sct, mask)
    result["psnr_2025"] = psnr_2025(ct, sct, mask)
    result["ms_ssim"] = ms_ssim(ct, sct, mask)
    result.update(geometry_metrics(ct, sct, mask, spacing))
    result["lpips"] = (math.nan if lpips_net is None
                       else lpips_volume(lpips_net, ct, sct, mask))
    if affine is None:
        affine = np.diag([*map(float, spacing), 1.0])
    wepl = wepl_differences(ct, sct, mask > 0, affine)
    result["wepl_center"] = wepl["mean_abs_diff_center"]
    result["wepl_distal"] = wepl["mean_abs_diff_distal"]
    result.update(texture_metrics(ct, sct, mask))
    return {name: result[name] for name in SCORED_METRICS}

# Metric -> (table header, number format); report_html.py shows the same.
TABLE_COLUMNS = {
    "mae": ("MAE", "{:.2f}"), "psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"),
    "me": ("ME", "{:.2f}"), "mae_air": ("MAE air", "{:.1f}"),
    "mae_soft": ("MAE soft", "{:.1f}"), "mae_bone": ("MAE bone", "{:.1f}"),
    "dice_bone": ("Dice bone", "{:.4f}"),
    "psnr_2025": ("PSNR25", "{:.2f}"), "ms_ssim": ("MS-SSIM", "{:.4f}"),
    "dice_air": ("Dice air", "{:.4f}"), "hd95_bone": ("HD95 bone", "{:.2f}"),
    "hd95_air": ("HD95 air", "{:.2f}"), "lpips": ("LPIPS", "{:.4f}"),
    "wepl_center": ("dWEPL c", "{:.2f}"), "wepl_distal": ("dWEPL d", "{:.2f}"),
    "slice_step_excess": ("z-step +", "{:.1f}"), "high_freq_excess": ("HF +", "{:.1f}"),
}
# How far (mm) a voxel centre of a prediction (or mask) may lie from the reference CT's
# voxel of the same index for the two to be one grid: float32 header rounding, far below
# any voxel size.
GRID_TOLERANCE_MM = 0.01


@dataclasses.dataclass(frozen=True)
class CaseScore:
    """The metrics of one scored case (values as in :data:`SCORED_METRICS`)."""

    id: str
    region: str
    prediction: Path
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ScoreReport:
    """The result of scoring a prediction folder.

    Attributes:
      cases: one :class:`CaseScore` per prediction, sorted by id.
      unscored: ids of reference cases (with a CT) that have no prediction.
      skipped: ids of predictions whose case belongs to a region filtered out.
      pred_dir, data_root, region: what was scored.
      no_reference: ids of predictions whose case has no CT (not scored).
    """

    cases: tuple[CaseScore, ...]
    unscored: tuple[str, ...]
    skipped: tuple[str, ...]
    pred_dir: Path
    data_root: Path
    region: str | None
    no_reference: tuple[str, ...] = ()

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Per metric ``{"mean", "std", "n"}`` over the cases.

        NaN values (a tissue class absent from a case) are left out and not counted
        in ``n``; ``std`` is the population standard deviation (numpy's default).
        """
        return summarize([c.metrics for c in self.cases])


def summarize(rows: Iterable[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """Per metric of :data:`SCORED_METRICS` ``{"mean", "std", "n"}`` over ``rows`` (NaN
    left out, see :meth:`ScoreReport.summary`)."""
    rows = list(rows)
    out = {}
    for name in SCORED_METRICS:
        values = np.array([r[name] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            out[name] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        with np.errstate(invalid="ignore"):  # inf PSNR: std is NaN, mean inf
            out[name] = {"mean": float(values.mean()), "std": float(values.std()),
                         "n": int(values.size)}
    return out


def find_predictions(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """Maps case id -> prediction volume in ``pred_dir``.

    Accepts ``<id>/sct.<ext>``, ``<id>.<ext>`` and ``<id>_sct.<ext>``; other files
    (the metrics themselves, logs, hidden temporary files) are ignored, and so is a
    std map sct-predict wrote beside a prediction (``<name>_std.<ext>`` next to
    ``<name>.<ext>``: ``--samples``, ``--tta``, an ensemble).

    Raises:
      DataError: the folder is missing, holds no prediction, or holds two predictions
        for one id.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    found: dict[str, Path] = {}

    def add(case_id: str, path: Path) -> None:
        if case_id in found:
            raise DataError(f"{path}: a second prediction for case {case_id} "
                            f"(also {found[case_id]})")
        found[case_id] = path

    entries = [e for e in sorted(pred_dir.iterdir()) if not e.name.startswith(".")]
    stems = {e.name[: -len(volume_suffix(e))] for e in entries
             if not e.is_dir() and volume_suffix(e)}
    for entry in entries:
        if entry.is_dir():
            for suffix in VOLUME_SUFFIXES:
                if (entry / f"sct{suffix}").is_file():
                    add(entry.name, entry / f"sct{suffix}")
        elif (suffix := volume_suffix(entry)):
            stem = entry.name[: -len(suffix)]
            if stem.endswith("_std") and stem[: -len("_std")] in stems:
                continue  # the per-voxel std of the prediction beside it
            add(stem[: -len("_sct")] if stem.endswith("_sct") else stem, entry)
    if not found:
        raise DataError(f"{pred_dir}: no predictions found (expected <id>/sct.nii.gz, "
                        "<id>.nii.gz or <id>_sct.nii.gz)")
    return found


def score_case(case: synthrad.Case, prediction: str | os.PathLike,
               lpips_net: LpipsNet | None = None) -> dict[str, float]:
    """Loads one prediction and its reference and computes all metrics.

    Only the CT and the mask are read (not the MR): scoring needs nothing else.

    Args:
      case: the reference case; ``case.ct`` must exist. Without a mask the whole
        volume is scored (as the challenge code does with no mask).
      prediction: the sCT volume in HU on the CT's grid (stored in any voxel order:
        see :func:`on_reference_grid`).
      lpips_net: see :func:`case_metrics`.

    Returns:
      :func:`case_metrics` of the case.

    Raises:
      DataError: unreadable volume, no reference CT, or a prediction or mask not on
        the CT's grid (the message names the file and both grids).
    """
    prediction = Path(prediction)
    if case.ct is None:
        raise DataError(f"{prediction}: reference case {case.id} has no CT ({case.dir})")
    ct = load_volume(case.ct)
    sct = on_reference_grid(load_volume(prediction), ct, prediction, case.ct)
    if case.mask is None:
        logging.warning("%s: case %s has no mask; scoring every voxel", case.dir, case.id)
        mask = np.ones(ct.shape, dtype=bool)
    else:
        mask = on_reference_grid(load_volume(case.mask), ct, case.mask, case.ct) > 0
        if not mask.any():
            raise DataError(f"{case.mask}: empty mask (no voxel > 0)")
    check_hu(ct.data, case.ct, mask, what="reference CT")
    check_hu(sct, prediction, what="sCT", scale_only=True)
    try:
        return case_metrics(ct.data, sct, mask, ct.spacing, lpips_net, ct.affine)
    except DataError as e:  # e.g. a volume too thin for SSIM: say which case
        raise DataError(f"{prediction}: {e} (reference CT {case.ct})") from e


def grid_distance_mm(affine: np.ndarray, reference: np.ndarray, shape) -> float:
    """The largest distance (mm) between the voxel centres of one index on two grids.

    Args:
      affine, reference: ``(4, 4)`` voxel -> world mm of the two grids.
      shape: ``(X, Y, Z)``, the voxel indices compared.

    Returns:
      The maximum over the grid of ``|affine @ v - reference @ v|``: the difference is
      affine in ``v``, so its maximum lies at one of the 8 corners.
    """
    corners = np.array(np.meshgrid(*[(0, int(n) - 1) for n in shape], indexing="ij"))
    corners = np.concatenate([corners.reshape(3, -1), np.ones((1, 8))])
    difference = (np.asarray(affine, np.float64) - np.asarray(reference, np.float64)) @ corners
    return float(np.max(np.linalg.norm(difference[:3], axis=0)))


def on_reference_grid(volume: Volume, reference: Volume, path, reference_path) -> np.ndarray:
    """``volume``'s voxels on the grid of ``reference`` (the case's CT), or refused.

    The metrics compare arrays voxel by voxel, so the two must be one grid. A volume
    stored in another voxel order (axes permuted or reversed: the same world image,
    e.g. written LPS instead of RAS) is reoriented by its affine, losslessly (nibabel's
    orientation tools, as :mod:`sct_jax.inference.geometry` does). Any other difference
    (shape, voxel size, origin, direction beyond :data:`GRID_TOLERANCE_MM`) is refused:
    resampling would change what is scored.

    Args:
      volume: the prediction (or mask).
      reference: the reference CT.
      path, reference_path: their files, named in the message.

    Returns:
      The ``reference.shape`` array.

    Raises:
      DataError: the grids differ beyond a reorientation; the message names ``path``.
    """
    transform = orientations.ornt_transform(orientations.io_orientation(volume.affine),
                                            orientations.io_orientation(reference.affine))
    data = orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.shape)
    reoriented = f" (reoriented to {data.shape})" if data.shape != volume.shape else ""
    if data.shape != reference.shape:
        raise DataError(f"{path}: shape {volume.shape}{reoriented} differs from the reference "
                        f"CT {reference.shape} ({reference_path}); resample onto its grid")
    distance = grid_distance_mm(affine, reference.affine, reference.shape)
    if distance > GRID_TOLERANCE_MM:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        raise DataError(
            f"{path}: not on the grid of the reference CT {reference_path}: voxel centres up "
            f"to {distance:.3g} mm apart (voxel size {_mm(spacing)} vs {_mm(reference.spacing)}"
            f" mm, origin {_mm(affine[:3, 3])} vs {_mm(reference.affine[:3, 3])}); resample "
            "onto its grid")
    if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # not the identity
        logging.info("%s: stored in another voxel order than %s; reoriented (lossless)",
                     path, reference_path)
    return np.ascontiguousarray(data)


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def score_folder(pred_dir: str | os.PathLike, data_root: str | os.PathLike,
                 region: str | None = None, *, progress: bool = True,
                 case_ids: Iterable[str] | None = None,
                 lpips_net: LpipsNet | None = None) -> ScoreReport:
    """Scores every prediction in ``pred_dir`` against its case under ``data_root``.

    Args:
      pred_dir: folder of predictions (see :func:`find_predictions`).
      data_root: SynthRAD-layout data root (see :mod:`sct_jax.data.synthrad`).
      region: score only cases of this region (``"brain"``, ``"pelvis"``);
        predictions of other regions are skipped and listed. Cases of a bare
        layout have no region and are always kept.
      progress: show a progress bar (only on a terminal).
      case_ids: score only these cases' predictions (the ones a caller has just
        written); other files in ``pred_dir`` are ignored. ``None``: every prediction.
      lpips_net: score LPIPS with it (``None``: the column is NaN).

    Returns:
      The :class:`ScoreReport`; nothing is written.

    Raises:
      DataError: missing folders, a prediction without a reference case, any bad
        volume. Raised before any result exists, so no partial output can follow.
      ConfigError: an unknown region.
    """
    pred_dir, data_root = Path(pred_dir), Path(data_root)
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found")
    predictions = find_predictions(pred_dir)
    if case_ids is not None:
        wanted = set(case_ids)
        predictions = {i: p for i, p in predictions.items() if i in wanted}
    # Either task's cases: the references are the CTs (and masks) of either.
    all_cases = {case.id: case for case in synthrad.discover_cases(data_root, input=None)}
    unknown = sorted(set(predictions) - set(all_cases))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(f"{predictions[unknown[0]]}: no reference case {unknown[0]} under "
                        f"{data_root}{more}")
    if region is not None and region not in synthrad.REGIONS:
        raise ConfigError(f"--region {region!r}: unknown region (expected one of "
                          f"{', '.join(synthrad.REGIONS)})")
    # Cases of a bare layout (<root>/<id>/) have no region and match any filter.
    cases = {i: c for i, c in all_cases.items()
             if region is None or c.region in (region, "")}
    if not cases:
        regions = sorted({c.region for c in all_cases.values()})
        raise DataError(f"{data_root}: no cases of region {region!r} (found: "
                        f"{', '.join(regions)})")
    in_region = set(predictions) & set(cases)
    no_reference = tuple(sorted(i for i in in_region if cases[i].ct is None))
    to_score = sorted(in_region - set(no_reference))
    skipped = tuple(sorted(set(predictions) - set(cases)))
    if not to_score and not no_reference:
        raise DataError(f"{pred_dir}: no prediction for a {region} case "
                        f"({len(skipped)} of other regions)")
    scores = []
    for case_id in tqdm(to_score, desc="scoring", unit="case",
                        disable=None if progress else True):
        case = cases[case_id]
        scores.append(CaseScore(case_id, case.region, predictions[case_id],
                                score_case(case, predictions[case_id], lpips_net)))
    unscored = tuple(sorted(i for i, c in cases.items()
                            if i not in predictions and c.ct is not None
                            and (case_ids is None or i in wanted)))
    return ScoreReport(tuple(scores), unscored, skipped, pred_dir, data_root, region,
                       no_reference)


def _json_value(value):
    """Strict JSON: NaN -> null, +-inf -> "inf"/"-inf" (a perfect PSNR is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def json_ready(value):
    """``value`` (nested dicts/lists of floats) with every float strict-JSON ready."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return _json_value(value)


def report_json(report: ScoreReport, extra: dict | None = None) -> str:
    """The summary JSON: per-metric mean/std/n, counts and the per-case rows.

    ``extra``: more top-level entries (the evaluation's ``verdict`` and ``baselines``),
    written first so that a reader sees the verdict before the numbers.
    """
    doc = {
        **json_ready(dict(extra or {})),
        "pred_dir": str(report.pred_dir),
        "data_root": str(report.data_root),
        "region": report.region,
        "n_scored": len(report.cases),
        "n_unscored": len(report.unscored),
        "unscored": list(report.unscored),
        "skipped_other_region": list(report.skipped),
        "no_reference_ct": list(report.no_reference),
        "metrics": {name: {k: _json_value(v) for k, v in stats.items()}
                    for name, stats in report.summary().items()},
        "cases": [{"id": c.id, "region": c.region, "prediction": str(c.prediction),
                   **{k: _json_value(v) for k, v in c.metrics.items()}}
                  for c in report.cases],
    }
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def report_csv(report: ScoreReport) -> str:
    """One row per case: ``id, region, <metrics...>`` (full precision; nan, inf)."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("id", "region") + SCORED_METRICS)
    for c in report.cases:
        writer.writerow([c.id, c.region] + [repr(c.metrics[n]) for n in SCORED_METRICS])
    return buffer.getvalue()


def format_table(report: ScoreReport) -> str:
    """A plain-text table: one line per case, then ``mean`` and ``std`` lines and a
    line that counts the scored and unscored cases."""
    def fmt(name: str, value: float) -> str:
        return TABLE_COLUMNS[name][1].format(value)

    header = ["id", "region"] + [TABLE_COLUMNS[n][0] for n in SCORED_METRICS]
    rows = [[c.id, c.region] + [fmt(n, c.metrics[n]) for n in SCORED_METRICS]
            for c in report.cases]
    summary = report.summary()
    stats = [[stat, ""] + [fmt(n, summary[n][stat]) for n in SCORED_METRICS]
             for stat in ("mean", "std")]
    widths = [max(len(r[i]) for r in [header] + rows + stats) for i in range(len(header))]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    n_refs = len(report.cases) + len(report.unscored)
    counts = f"scored {len(report.cases)} of {n_refs} reference cases"
    if report.unscored:
        counts += f" ({len(report.unscored)} without a prediction)"
    if report.skipped:
        counts += f"; skipped {len(report.skipped)} predictions of other regions"
    if report.no_reference:
        counts += (f"; predicted but not scored (no reference CT): "
                   f"{', '.join(report.no_reference)}")
    return "\n".join([line(header), rule] + [line(r) for r in rows] + [rule]
                     + [line(r) for r in stats] + [counts])


def output_paths(pred_dir: str | os.PathLike,
                 out: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(json_path, csv_path)``: ``out`` (default ``pred_dir/metrics.json``) and the
    CSV next to it with the same stem (``metrics.csv`` by default)."""
    json_path = Path(out) if out else Path(pred_dir) / "metrics.json"
    if json_path.suffix.lower() == ".csv":
        raise ConfigError(f"--out {json_path}: names the JSON summary; the CSV is "
                          "written next to it")
    return json_path, json_path.with_suffix(".csv")


def check_out_paths(pred_dir, data_root, json_path: Path, csv_path: Path) -> None:
    """Refuses (``DataError``) a JSON or CSV path onto a prediction or a reference file.

    Called before anything is read at length: an ``--out`` onto a reference CT (or a
    prediction) would replace it with JSON.
    """
    if Path(data_root).is_dir():
        inputs = list(find_predictions(pred_dir).values())
        for path in (json_path, csv_path):
            refuse_overwrite(path, inputs, data_root, what="--out")


def write_results(report: ScoreReport, json_path: Path, csv_path: Path,
                  extra: dict | None = None) -> None:
    """Writes the CSV, then the JSON (last: it marks completion), both atomically; both
    texts are built before either file is written."""
    json_text, csv_text = report_json(report, extra), report_csv(report)
    atomic_write_text(csv_path, csv_text)
    atomic_write_text(json_path, json_text)


def evaluate_folder(pred_dir: str | os.PathLike, data_root: str | os.PathLike,
                    out: str | os.PathLike | None = None, region: str | None = None,
                    echo: Callable[[str], None] = print,
                    case_ids: Iterable[str] | None = None,
                    lpips_net: LpipsNet | None = None,
                    extra: dict | None = None) -> ScoreReport:
    """Scores a prediction folder, writes the CSV and JSON, and echoes the table.

    Args:
      pred_dir: folder of predictions (see :func:`find_predictions`).
      data_root: SynthRAD-layout data root.
      out: path of the JSON summary; default ``pred_dir/metrics.json``. The CSV goes
        next to it with the same stem.
      region: score only this region.
      echo: where the table goes (``print`` for the CLI).
      case_ids: score only these cases (see :func:`score_folder`).
      lpips_net: see :func:`score_folder`.
      extra: more top-level entries of the JSON (e.g. why LPIPS is empty).

    Returns:
      The :class:`ScoreReport`.

    Raises:
      DataError, ConfigError: one-line messages naming the file; nothing is written.
    """
    json_path, csv_path = output_paths(pred_dir, out)
    check_out_paths(pred_dir, data_root, json_path, csv_path)
    report = score_folder(pred_dir, data_root, region, case_ids=case_ids,
                          lpips_net=lpips_net)
    write_results(report, json_path, csv_path, extra)
    echo(format_table(report))
    echo(f"wrote {json_path} and {csv_path}")
    return report
