"""Evaluate a trained run: predict its evaluation split, score, draw, report.

:func:`evaluate_run` predicts the evaluation cases of a run (the best checkpoint by
default), writes sCT NIfTIs, scores them with the SynthRAD2023 metrics next to a
constant soft-tissue baseline, draws a panel per case, and (``qa=True``) runs the
reference-free QA checks on every case; ``report.html`` gathers it all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sct_jax import metrics, runs
from sct_jax.data import datasets, synthrad
from sct_jax.data.io import atomic_write_text, load_volume
from sct_jax.evaluation import figures, qa_report, report_html, scoring
from sct_jax.inference import predict
from sct_jax.io_guard import refuse_overwrite

# The "no model" reference: every body voxel set to soft tissue (muscle-like HU).
SOFT_TISSUE_HU = 40.0


def baseline_scores(cases: list[synthrad.Case]) -> dict[str, float]:
    """Mean SynthRAD metrics of a constant soft-tissue sCT on ``cases`` (a floor to beat)."""
    rows = []
    for case in cases:
        ct = load_volume(case.ct).data
        mask = synthrad.load_case(case).mask
        const = np.where(mask, SOFT_TISSUE_HU, -1000.0).astype(np.float32)
        rows.append(metrics.synthrad_metrics(ct, const, mask))
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def check_outputs(config, workdir: Path, data_root, out) -> None:
    """Refuses (exit 2, before any prediction) outputs that would land on an input:
    ``<workdir>/predictions/<id>/`` or ``--out`` inside a case folder or onto a file."""
    root = Path(data_root) if data_root else datasets.dataset_root(config)
    if not root.is_dir():
        return  # the phantom is generated later; a missing --data root is reported there
    # Every case of the root (a superset of the split, and no volume is read).
    cases = synthrad.discover_cases(root, region=config.data.region or None)
    inputs = [p for c in cases for p in (c.mr, c.ct, c.mask) if p is not None]
    pred_dir = workdir / "predictions"
    for case in cases:
        for name in ("sct.nii.gz", "sct_std.nii.gz"):
            refuse_overwrite(pred_dir / case.id / name, inputs, root, what="prediction")
    json_path, csv_path = scoring.output_paths(pred_dir, out)
    for path in (json_path, csv_path):
        refuse_overwrite(path, inputs, root, what="--out")


def evaluate_run(config, workdir: str | Path, data_root: str | Path | None = None,
                 out: str | Path | None = None, panels: bool | None = None,
                 samples: int = 1, qa: bool = False, checkpoint: int | str = "best"):
    """Predicts, scores and draws the evaluation cases of a trained run.

    Args:
      config: the run's config.
      workdir: the training run directory.
      data_root: score these cases instead of the config's evaluation split.
      out: JSON summary path (default ``workdir/predictions/metrics.json``).
      panels: draw a PNG per case (default ``config.eval.panels``).
      samples: sCT samples per case for sampling methods (the LDM; the GANs by
        test-time dropout): the mean is scored, the per-voxel standard deviation
        written as ``<id>/sct_std.nii.gz``.
      qa: then run the fidelity checks on every case
        (:func:`sct_jax.evaluation.qa_report.qa_predictions`): ``<id>/qa.json`` and
        ``<id>/qa.png``, and a case x check table.
      checkpoint: ``"best"`` (the lowest validation MAE; the latest when the run was
        never validated), ``"latest"`` or a step number.

    Returns:
      The :class:`scoring.ScoreReport`.
    """
    workdir = Path(workdir)
    check_outputs(config, workdir, data_root, out)
    t0 = time.perf_counter()
    step = runs.resolve_checkpoint(workdir, checkpoint)
    pred_dir, cases = predict.predict_split(config, workdir, data_root=data_root,
                                            samples=samples, checkpoint=step)
    print(f"predicted {len(cases)} case(s) with the step-{step} checkpoint ({checkpoint}) "
          f"in {time.perf_counter() - t0:.1f}s -> {pred_dir}")
    root = Path(data_root) if data_root else datasets.dataset_root(config)
    # Only this call's predictions: a file left by an earlier call is never scored.
    report = scoring.evaluate_folder(pred_dir, root, out=out,
                                     region=config.data.region or None,
                                     case_ids=[c.id for c in cases])
    json_path, _ = scoring.output_paths(pred_dir, out)
    with_ct = [c for c in cases if c.ct is not None]
    base = None
    if with_ct:
        base = baseline_scores(with_ct)
        atomic_write_text(json_path.with_name(json_path.stem + "_baseline.json"),
                          json.dumps({"baseline": f"constant {SOFT_TISSUE_HU:g} HU in the body",
                                      "mean": base}, indent=2))
        print(f"baseline (constant {SOFT_TISSUE_HU:g} HU soft tissue): MAE {base['mae']:.1f} HU, "
              f"PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.4f}")
    panel_png, std_png = {}, {}
    if config.eval.panels if panels is None else panels:
        scores = {c.id: c.metrics for c in report.cases}
        for case in cases:
            data = synthrad.load_case(case)
            sct = load_volume(pred_dir / case.id / "sct.nii.gz").data
            m = scores.get(case.id)
            title = case.id + (f"  MAE {m['mae']:.1f} HU  PSNR {m['psnr']:.2f} dB  "
                               f"SSIM {m['ssim']:.3f}" if m else "")
            figures.save_case_panel(pred_dir / case.id / "panel.png", data.mr.data,
                                    data.ct.data if data.ct is not None else None, sct,
                                    data.mask, spacing=data.mr.spacing, title=title)
            panel_png[case.id] = (pred_dir / case.id / "panel.png").read_bytes()
        print(f"panels: {pred_dir}/<id>/panel.png")
    if samples > 1:
        for case in cases:
            std = load_volume(pred_dir / case.id / "sct_std.nii.gz").data
            std_png[case.id] = report_html.std_map_png(std, synthrad.load_case(case).mask)
    verdicts = None
    if qa:
        qa_reports = qa_report.qa_predictions(config, workdir, pred_dir, cases,
                                              samples=samples, checkpoint=step)
        verdicts = {case_id: r["status"] for case_id, r in qa_reports.items()}
    page = report_html.write(
        report_html.path_for(json_path), report, title=config.name or config.method,
        baseline=base, baseline_label=f"constant {SOFT_TISSUE_HU:g} HU in the body (baseline)",
        qa=verdicts, panels=panel_png, std_maps=std_png,
        notes=(f"{workdir}: step-{step} checkpoint ({checkpoint}); "
               f"{samples} sample(s) per case; data {root}",))
    print(f"report: {page}")
    return report
