"""Evaluate a trained run: predict its evaluation split, score, draw, report.

:func:`evaluate_run` predicts the evaluation cases of a run (the best checkpoint by
default), writes sCT NIfTIs, scores them next to the no-model baselines of
:mod:`sct_jax.evaluation.baselines` (constant soft tissue, intensity lookup and mean
training CT, fitted on the run's training split; the perfect-model floor where the data
have one), says first whether the model beats the best baseline in MAE and in SSIM,
draws a panel per case and, where it has a CT, the bone surface of CT and sCT in 3D
(:mod:`sct_jax.evaluation.bone3d`), and (``qa=True``) runs the reference-free QA checks
on every case; ``metrics.json`` and ``report.html`` gather it all.

``tta=True`` scores test-time augmented predictions (each case also predicted flipped
left-right, flipped back, averaged) and ``ensemble=[RUN, ...]`` the mean of the run and
further runs of the same input and training grid (seeds of a config, say); either
writes ``<id>/sct_std.nii.gz``, the spread across the predictions averaged
(:mod:`sct_jax.inference.ensemble`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence


from sct_jax import runs
from sct_jax.data import datasets, modality, synthrad
from sct_jax.data.io import load_volume
from sct_jax.errors import ConfigError, DataError
from sct_jax.evaluation import (baselines, bone3d, dose_eval, figures, lpips_setup,
                                qa_report, report_html, scoring)
from sct_jax.inference import ensemble as ensemble_lib
from sct_jax.inference import predict
from sct_jax.io_guard import refuse_overwrite

SOFT_TISSUE_HU = baselines.SOFT_TISSUE_HU


def training_split(config) -> tuple[list[synthrad.Case], str]:
    """The config's training cases for the fitted baselines, and a note saying what they
    were fitted on, or why they are left out (no training data here: not faked)."""
    try:
        cases = datasets.case_splits(config)["train"]
    except (DataError, ConfigError, OSError) as e:
        return [], f"lookup and mean-CT baselines left out: no training split ({e})"
    used = baselines.training_cases(cases)
    if not used:
        return [], "lookup and mean-CT baselines left out: no training case has a CT"
    return cases, (f"lookup and mean-CT baselines fitted on {len(used)} training case(s) "
                   f"of {datasets.dataset_root(config)}")


def baseline_scores(config, cases: list[synthrad.Case],
                    train_cases: list[synthrad.Case] | None = None,
                    lpips_net=None) -> dict[str, dict]:
    """Every baseline scored on ``cases`` (each with a CT) like a model's predictions.

    Args:
      config: the run's config (MR percentiles).
      cases: the evaluated cases.
      train_cases: the training split the lookup and the mean CT are fitted on (at most
        :data:`baselines.MAX_TRAINING_CASES`); ``None`` or empty: constant (and floor)
        only.
      lpips_net: score LPIPS too (see :func:`scoring.case_metrics`).

    Returns:
      name -> ``{"label", "mean": {metric: mean over cases}, "cases": {id: metrics}}``
      in :data:`baselines.LABELS` order; ``perfect`` only when every case has one.
    """
    per_case: dict[str, dict[str, dict]] = {}
    for case, data, preds in baselines.case_predictions(config, cases, train_cases):
        for name, sct in preds.items():
            per_case.setdefault(name, {})[case.id] = scoring.case_metrics(
                data.ct.data, sct, data.mask, data.ct.spacing, lpips_net, data.ct.affine)
    out = {}
    for name, label in baselines.labels_for(modality.input_kind(config)).items():
        rows = per_case.get(name, {})
        if len(rows) != len(cases):
            continue
        summary = scoring.summarize(rows.values())
        out[name] = {"label": label, "mean": {m: s["mean"] for m, s in summary.items()},
                     "cases": rows}
    return out


def describe_prediction(samples: int, tta: bool, ensemble: Sequence[str], draws: int) -> str:
    """One line: what each scored sCT is the mean of."""
    parts = ([f"{1 + len(ensemble)} runs"] if ensemble else []) + (
        ["flipped left-right (TTA)"] if tta else []) + (
        [f"{samples} samples"] if samples > 1 else [])
    return (f"each sCT the mean of {draws} predictions ({', '.join(parts)}); their "
            "per-voxel std in <id>/sct_std.nii.gz")


def check_outputs(config, workdir: Path, data_root, out) -> None:
    """Refuses (exit 2, before any prediction) outputs that would land on an input:
    ``<workdir>/predictions/<id>/`` or ``--out`` inside a case folder or onto a file."""
    root = Path(data_root) if data_root else datasets.dataset_root(config)
    if not root.is_dir():
        return  # the phantom is generated later; a missing --data root is reported there
    # Every case of the root (a superset of the split, and no volume is read).
    cases = datasets.discover(config, root)
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
                 samples: int = 1, qa: bool = False, checkpoint: int | str = "best",
                 lpips_weights: str | None = None, dose: bool = False,
                 dose_rx: float = 2.0, tta: bool = False, ensemble: Sequence[str] = ()):
    """Predicts, scores and draws the evaluation cases of a trained run.

    Args:
      config: the run's config.
      workdir: the training run directory.
      data_root: score these cases instead of the config's evaluation split.
      out: JSON summary path (default ``workdir/predictions/metrics.json``).
      panels: draw a PNG per case (default ``config.eval.panels``): ``<id>/panel.png``
        and, for a case with a CT, ``<id>/bone3d.png``.
      samples: sCT samples per case for sampling methods (the LDM; the GANs by
        test-time dropout): the mean is scored, the per-voxel standard deviation
        written as ``<id>/sct_std.nii.gz``.
      qa: then run the fidelity checks on every case
        (:func:`sct_jax.evaluation.qa_report.qa_predictions`): ``<id>/qa.json`` and
        ``<id>/qa.png``, and a case x check table.
      checkpoint: ``"best"`` (the lowest validation MAE; the latest when the run was
        never validated), ``"latest"`` or a step number.
      lpips_weights: VGG-16 ``.npz`` for the LPIPS column (default: the run's perceptual
        weights or ``weights/vgg16.npz`` when present; none: the column says why, see
        :mod:`sct_jax.evaluation.lpips_setup`).
      dose: also score every case by dose (photon and proton plans on the CT,
        recomputed on the model's and the baselines' sCTs; needs the ``[dose]`` extra,
        see :mod:`sct_jax.evaluation.dose_eval`).
      dose_rx: the prescription in Gy.
      tta: test-time augmentation: each case also predicted flipped the ways training
        flipped it, flipped back, averaged; the std across them in
        ``<id>/sct_std.nii.gz``.
      ensemble: further run directories (the same input and training grid, each with
        its own ``config.json`` and the ``checkpoint`` choice): the mean over the runs
        is scored, their spread written as ``<id>/sct_std.nii.gz``.

    Returns:
      The :class:`scoring.ScoreReport`.
    """
    workdir = Path(workdir)
    check_outputs(config, workdir, data_root, out)
    lpips_setup.check_weights(lpips_weights)
    if dose:
        if not dose_rx > 0:
            raise ConfigError(f"--dose_rx: {dose_rx:g} Gy; the prescription must be > 0")
        dose_eval.check_available()
    t0 = time.perf_counter()
    step = runs.resolve_checkpoint(workdir, checkpoint)
    pred_dir, cases = predict.predict_split(config, workdir, data_root=data_root,
                                            samples=samples, checkpoint=step, tta=tta,
                                            ensemble_dirs=ensemble,
                                            ensemble_checkpoint=checkpoint)
    # How many predictions each sCT is the mean of (members x flips x samples): more
    # than one wrote <id>/sct_std.nii.gz.
    draws = ensemble_lib.draw_count([config] + [runs.read_config(d) for d in ensemble],
                                    samples, tta)
    how = describe_prediction(samples, tta, ensemble, draws)
    print(f"predicted {len(cases)} case(s) with the step-{step} checkpoint ({checkpoint}) "
          f"in {time.perf_counter() - t0:.1f}s -> {pred_dir}" + (f"; {how}" if draws > 1
                                                                else ""))
    root = Path(data_root) if data_root else datasets.dataset_root(config)
    json_path, csv_path = scoring.output_paths(pred_dir, out)
    scoring.check_out_paths(pred_dir, root, json_path, csv_path)
    lpips_net, lpips_note = lpips_setup.lpips_for(lpips_weights, config)
    # Only this call's predictions: a file left by an earlier call is never scored.
    report = scoring.score_folder(pred_dir, root, region=config.data.region or None,
                                  case_ids=[c.id for c in cases], lpips_net=lpips_net)
    with_ct = [c for c in cases if c.ct is not None and c.id in
               {s.id for s in report.cases}]
    base, verdict, base_note = {}, None, ""
    if with_ct:
        t1 = time.perf_counter()
        train_cases, base_note = training_split(config)
        base = baseline_scores(config, with_ct, train_cases, lpips_net)
        model = {name: stats["mean"] for name, stats in report.summary().items()}
        verdict = baselines.verdict(model, {n: b["mean"] for n, b in base.items()},
                                    baselines.labels_for(modality.input_kind(config)))
        logging.info("baselines scored in %.1fs", time.perf_counter() - t1)
    extra = {}  # the verdict first: a reader sees it before the numbers
    if verdict is not None:
        extra["verdict"] = verdict
        extra["baselines"] = {n: {k: b[k] for k in ("label", "mean")}
                              for n, b in base.items()}
        if base_note:
            extra["baselines_note"] = base_note
    extra["prediction"] = {"samples": samples, "tta": bool(tta),
                           "ensemble": [str(workdir)] + [str(d) for d in ensemble],
                           "draws": draws}
    extra["lpips_note"] = lpips_note
    dose_result = None
    if dose and with_ct:
        t3 = time.perf_counter()
        dose_result = dose_eval.dose_scores(config, with_ct, train_cases, pred_dir, dose_rx)
        extra["dose"] = dose_eval.json_part(dose_result)
        logging.info("dose scored in %.1fs", time.perf_counter() - t3)
    scoring.write_results(report, json_path, csv_path, extra)
    if verdict is not None:
        print(verdict["line"])
        for warning in verdict["warnings"]:
            print(warning)
    print(scoring.format_table(report))
    for name, b in base.items():
        m = b["mean"]
        print(f"baseline {b['label']}: MAE {m['mae']:.1f} HU, PSNR {m['psnr']:.2f} dB, "
              f"SSIM {m['ssim']:.4f}")
    if base_note:
        print(base_note)
    print(lpips_note)
    if dose_result is not None:
        print("\n".join(dose_eval.summary_lines(dose_result)))
        print(f"dose: {dose_result['target']}, Rx {dose_rx:g} Gy; "
              f"{sum(dose_result['seconds_per_case']):.0f} s for {len(with_ct)} case(s)")
    print(f"wrote {json_path} and {csv_path}")
    panel_png, std_png, bone_png = {}, {}, {}
    if config.eval.panels if panels is None else panels:
        scores = {c.id: c.metrics for c in report.cases}
        bone_seconds = 0.0
        for case in cases:
            data = synthrad.load_case(case)
            sct = load_volume(pred_dir / case.id / "sct.nii.gz").data
            m = scores.get(case.id)
            title = case.id + (f"  MAE {m['mae']:.1f} HU  PSNR {m['psnr']:.2f} dB  "
                               f"SSIM {m['ssim']:.3f}" if m else "")
            figures.save_case_panel(pred_dir / case.id / "panel.png", data.mr.data,
                                    data.ct.data if data.ct is not None else None, sct,
                                    data.mask, spacing=data.mr.spacing, title=title,
                                    input_kind=case.input)
            panel_png[case.id] = (pred_dir / case.id / "panel.png").read_bytes()
            if data.ct is not None:
                t2 = time.perf_counter()
                png = bone3d.save_bone3d(pred_dir / case.id / "bone3d.png", data.ct.data, sct,
                                         data.mask, spacing=data.ct.spacing, title=case.id)
                bone_png[case.id] = png.read_bytes()
                bone_seconds += time.perf_counter() - t2
        print(f"panels: {pred_dir}/<id>/panel.png")
        if bone_png:
            print(f"bone renderings: {pred_dir}/<id>/bone3d.png ({bone_seconds:.1f} s)")
    if draws > 1:
        for case in cases:
            std = load_volume(pred_dir / case.id / "sct_std.nii.gz").data
            std_png[case.id] = report_html.std_map_png(std, synthrad.load_case(case).mask)
    verdicts = None
    if qa:
        qa_reports = qa_report.qa_predictions(config, workdir, pred_dir, cases,
                                              samples=draws, checkpoint=step)
        verdicts = {case_id: r["status"] for case_id, r in qa_reports.items()}
    notes = (f"{workdir}: step-{step} checkpoint ({checkpoint}); "
             f"{samples} sample(s) per case; data {root}",) + ((how,) if draws > 1 else ()) \
        + ((base_note,) if base_note else ()) + (lpips_note,)
    page = report_html.write(
        report_html.path_for(json_path), report, title=config.name or config.method,
        baselines=[(n, b["label"], b["mean"]) for n, b in base.items()], verdict=verdict,
        qa=verdicts, panels=panel_png, std_maps=std_png, bone3d=bone_png, notes=notes,
        dose=dose_result)
    print(f"report: {page}")
    return report
