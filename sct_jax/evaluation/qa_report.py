"""QA of a prediction folder: the reference-free fidelity checks on every evaluated case.

:func:`qa_predictions` runs :func:`sct_jax.evaluation.qa.run_qa` on each case that
:func:`sct_jax.inference.predict.predict_split` wrote, with

- the case's MR and body mask;
- a reference profile ("training distribution") built once from the ``ct``/``mask`` of
  the config's *training* split, written to ``<pred_dir>/qa_reference.json``;
- the per-voxel spread of the K samples (``<id>/sct_std.nii.gz``) when ``K > 1``;
- cycle consistency, MR vs G_CT->MR(sCT), when the method has ``predict_ct_to_mr``
  (CycleGAN): the sCT in [-1, 1] (:func:`~sct_jax.data.preprocess.ct_to_unit`) through
  the CT->MR generator slice by slice, as prediction runs the MR->CT one.

It writes ``<pred_dir>/<id>/qa.json`` and ``qa.png`` (atomically) and prints one table,
case x check -> status. ``python evaluate.py --config ... --workdir ... --qa`` calls it.
:func:`save_qa_figure` draws the PNG (the ``python -m sct_jax.cli.qa`` CLI uses it too).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from sct_jax import methods, runs
from sct_jax.data import datasets, preprocess, synthrad
from sct_jax.data.io import atomic_path, atomic_write_text, load_volume
from sct_jax.errors import DataError
from sct_jax.evaluation import qa
from sct_jax.inference import windows as inference
from sct_jax.inference.predict import slice_tile


def save_qa_figure(path: str | os.PathLike, sct: np.ndarray, result: qa.QAResult,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "") -> Path:
    """Axial and coronal sCT views with flagged voxels in red, and the per-slice mean HU.

    The views cut through the most flagged slice (else the body's centre); flagged
    slices are marked on the curve.

    Args:
      path: the PNG to write (atomically).
      sct: ``(X, Y, Z)`` HU.
      result: the :class:`sct_jax.evaluation.qa.QAResult` of the case.
      spacing: voxel size in mm (display aspect).
      title: a first title line (the case); the status and failed checks follow.

    Returns:
      The written path.
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    flagged, body = result.flagged, result.body
    anchor = flagged if flagged.any() else body
    z = int(np.argmax(anchor.sum(axis=(0, 1))))
    y = int(np.argmax(anchor.sum(axis=(0, 2))))
    sct = np.nan_to_num(np.asarray(sct, np.float32), nan=qa.HU_MIN)
    red = np.zeros(flagged.shape + (4,), np.float32)
    red[flagged] = (1.0, 0.0, 0.0, 0.7)
    views = [(f"axial z={z}", lambda a: a[:, :, z].swapaxes(0, 1), spacing[1] / spacing[0]),
             (f"coronal y={y}", lambda a: a[:, y, :].swapaxes(0, 1), spacing[2] / spacing[0])]
    fig = Figure(figsize=(13.0, 4.4), dpi=90)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.0, 1.2]})
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.imshow(cut(sct), cmap="gray", vmin=-1000, vmax=1500, origin="lower", aspect=aspect,
                  interpolation="nearest")
        ax.imshow(cut(red), origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(f"sCT [-1000, 1500] HU, {name}; red: flagged", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    curve = axes[2]
    slices = np.arange(len(result.slice_mean_hu))
    curve.plot(slices, result.slice_mean_hu, "k.-", lw=1, ms=3)
    for s in result.flagged_slices:
        curve.axvspan(s - 0.5, s + 0.5, color="red", alpha=0.3, lw=0)
    curve.set_xlabel("slice z")
    curve.set_ylabel("mean HU inside the body")
    curve.set_title("per-slice mean HU; red: discontinuous slices", fontsize=9)
    report = result.report
    bad = [f"{c['name']} ({c['status']})" for c in report["checks"] if c["status"] != "pass"]
    fig.suptitle(f"{title + ': ' if title else ''}QA {report['status'].upper()}"
                 + (f" - {', '.join(bad)}" if bad else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def training_reference_profile(config) -> dict:
    """The QA reference profile of the CTs and masks of the config's training split.

    Returns:
      The profile of :func:`sct_jax.evaluation.qa.build_reference_profile`, with the
      training case ids under ``"cases"``.

    Raises:
      DataError: no training case, or one without a CT.
    """
    cases = datasets.case_splits(config)["train"]
    if not cases:
        raise DataError(f"{datasets.dataset_root(config)}: the training split has no "
                        "cases to build the QA reference profile from")

    def ct_and_mask():
        for case in cases:
            data = synthrad.load_case(case)
            if data.ct is None:
                raise DataError(f"{case.dir}: a training case without a CT; the QA "
                                "reference profile needs one")
            yield data.ct.data, data.mask

    profile = qa.build_reference_profile(ct_and_mask(), region=config.data.region or None)
    profile["cases"] = [case.id for case in cases]
    return profile


def make_ct_to_mr(config, state) -> Callable[[np.ndarray], np.ndarray]:
    """``(X, Y, Z)`` sCT in HU -> ``(X, Y, Z)`` G_CT->MR(sCT) in [-1, 1], slice by slice.

    Args:
      config: the run's config; its method must have an ``inverse`` (CT -> MR).
      state: the restored train state.
    """
    method = methods.get_method(config.method)
    to_mr = jax.jit(functools.partial(method.inverse, config))
    # context 0: the CT->MR generator reads one CT slice (the CT domain has one channel).
    stride, min_size = method.input_rule(config)
    return lambda sct_hu: inference.predict_volume_2d(
        lambda batch: np.asarray(to_mr(state, batch)),
        np.asarray(preprocess.ct_to_unit(sct_hu), np.float32), tile=slice_tile(config),
        context=0, batch_size=config.eval.batch_size, overlap=config.eval.overlap,
        stride=stride, min_size=min_size)


def qa_case(case_data: synthrad.CaseData, case_dir: str | os.PathLike, reference: Mapping,
            ct_to_mr: Callable | None = None, samples: int = 1) -> qa.QAResult:
    """Runs the checks on one predicted case and writes ``qa.json`` and ``qa.png``.

    Args:
      case_data: the loaded case (MR, body mask).
      case_dir: the case's prediction folder, holding ``sct.nii.gz`` (and
        ``sct_std.nii.gz`` when ``samples > 1``).
      reference: the reference profile.
      ct_to_mr: the CT->MR generator for the cycle check, ``None`` to skip it.
      samples: how many samples ``sct.nii.gz`` is the mean of.

    Returns:
      The :class:`sct_jax.evaluation.qa.QAResult`.
    """
    case_dir = Path(case_dir)
    # Non-finite sCT voxels are a finding of the hu_range check, not a read error.
    sct = load_volume(case_dir / "sct.nii.gz", check_finite=False).data
    sample_std = None
    if samples > 1:
        # predict_split writes the population std (ddof 0); the check reads the
        # sample std (ddof 1) that it computes itself from sample volumes.
        std = load_volume(case_dir / "sct_std.nii.gz").data
        sample_std = std * np.float32(math.sqrt(samples / (samples - 1)))
    result = qa.run_qa(case_data.mr.data, sct, case_data.mask, spacing=case_data.mr.spacing,
                       reference=reference, ct_to_mr=ct_to_mr, sample_std=sample_std,
                       n_samples=samples if samples > 1 else 0, 
                       input_kind=case_data.input)
    result.report["inputs"] = {
        "sct": str(case_dir / "sct.nii.gz"),
        "sct_std": str(case_dir / "sct_std.nii.gz") if samples > 1 else None,
        "samples": samples, "reference": "training split profile (qa_reference.json)",
        "cycle": "G_CT->MR of the run's checkpoint" if ct_to_mr is not None else None}
    atomic_write_text(case_dir / "qa.json", json.dumps(result.report, indent=1) + "\n")
    save_qa_figure(case_dir / "qa.png", sct, result, case_data.mr.spacing, title=case_data.id)
    return result


def qa_predictions(config, workdir: str | os.PathLike, pred_dir: str | os.PathLike,
                   cases: Sequence[synthrad.Case], samples: int = 1,
                   checkpoint: int | str = "best") -> dict[str, dict]:
    """QA of every case of a prediction folder (see the module docstring); prints a table.

    Args:
      config: the run's config.
      workdir: the training run (its checkpoint drives the cycle check).
      pred_dir: the folder :func:`~sct_jax.inference.predict.predict_split` wrote.
      cases: the predicted cases.
      samples: the ``samples`` the folder was predicted with.
      checkpoint: the checkpoint the folder was predicted with (the cycle model).

    Returns:
      ``{case id: QA report}``.
    """
    pred_dir = Path(pred_dir)
    reference = training_reference_profile(config)
    atomic_write_text(pred_dir / "qa_reference.json", json.dumps(reference, indent=1) + "\n")
    ct_to_mr = None
    if methods.get_method(config.method).inverse is not None:
        ct_to_mr = make_ct_to_mr(config, runs.load_state(config, workdir, step=checkpoint)[1])
    reports = {}
    for case in cases:
        result = qa_case(synthrad.load_case(case), pred_dir / case.id, reference,
                         ct_to_mr=ct_to_mr, samples=samples)
        reports[case.id] = result.report
    print("QA status per case and check:")
    print(format_qa_table(reports))
    print(f"QA reports: {pred_dir}/<id>/qa.json, qa.png")
    return reports


def format_qa_table(reports: Mapping[str, Mapping]) -> str:
    """One row per case, one column per check (status), then the overall status."""
    names: list[str] = []
    for report in reports.values():
        names += [c["name"] for c in report["checks"] if c["name"] not in names]
    columns = ["case"] + names + ["overall"]
    rows = [[case_id] + [next((c["status"] for c in report["checks"] if c["name"] == name),
                              "-") for name in names] + [report["status"]]
            for case_id, report in reports.items()]
    widths = [max(len(str(r[i])) for r in [columns] + rows) for i in range(len(columns))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [columns] + rows)
