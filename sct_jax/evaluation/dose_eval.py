"""``evaluate.py --dose``: each evaluated case's sCT, and every baseline's, scored by dose.

Per case, a photon and a proton plan are optimised on the CT (the default target: a
25 mm sphere at the body's centre of mass, inside the body; default beams, see
:mod:`sct_jax.dose.engine`) and recomputed on the model's sCT and on each baseline's
(constant, intensity lookup, mean training CT, the perfect-model floor where the data have
one), so a dose number can be read against what needs no network. Everything a case
writes goes to ``<predictions>/<id>/dose/`` (plans, doses in Gy, the model's DVH and
dose-difference PNGs); the metrics are those of :mod:`sct_jax.dose.compare`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax.data import synthrad
from sct_jax.data.io import load_volume
from sct_jax.dose import compare, engine
from sct_jax.errors import RunFailed
from sct_jax.evaluation import baselines

TARGET_RADIUS_MM = 25.0
MODALITIES = engine.MODALITIES
# Summary metric -> (label, how to read it out of compare_doses' result).
SUMMARY = {
    "dose_mae_percent_rx": ("dose MAE [% Rx]", lambda m: m["dose_mae_percent_rx"]),
    "gamma_2_2": ("gamma 2%/2mm [%]", lambda m: m["gamma_pass_2pct_2mm"]),
    "gamma_1_1": ("gamma 1%/1mm [%]", lambda m: m["gamma_pass_1pct_1mm"]),
    "target_d98": ("target D98 [% Rx]", lambda m: m["target"]["D98"]["diff_percent_rx"]),
}


def check_available() -> None:
    """Start-up check: ``--dose`` needs the ``[dose]`` extra (a one-line ConfigError)."""
    engine.require_pyradplan()


def dose_scores(config, cases: Sequence[synthrad.Case], train_cases, pred_dir: Path,
                rx: float = 2.0) -> dict:
    """Plans on each case's CT and recomputes on the model's and the baselines' sCTs.

    Args:
      config: the run's config (the baselines' MR normalisation).
      cases: evaluated cases with a CT (their sCT in ``pred_dir/<id>/sct.nii.gz``).
      train_cases: the training split for the fitted baselines (or empty).
      pred_dir: the predictions folder.
      rx: the prescription in Gy (the target's mean CT dose).

    Returns:
      ``{"rx_gy", "target", "cases": {id: {modality: {"plan", "scts": {name: metrics}}}},
      "summary": {modality: {name: {metric: mean over cases}}}, "dvh_png": {id: {modality:
      path}}, "seconds_per_case", "errors"}`` with names ``model`` and the baselines'. A
      modality pyradplan fails on for a case (e.g. protons too shallow for the generic
      machine's lowest energy) is ``{"error": ...}`` there, listed in ``errors`` and left
      out of the summary; the other modalities and cases are still scored.
    """
    per_case, dvh_png, seconds, errors = {}, {}, [], []
    for case, data, preds in baselines.case_predictions(config, cases, train_cases):
        start = time.perf_counter()
        body = np.asarray(data.mask) > 0
        target = engine.default_target(body, data.ct.affine, TARGET_RADIUS_MM)
        scts = {"model": load_volume(pred_dir / case.id / "sct.nii.gz").data, **preds}
        out = pred_dir / case.id / "dose"
        per_case[case.id], dvh_png[case.id] = {}, {}
        for modality in MODALITIES:
            try:
                per_case[case.id][modality] = compare.run_modality(
                    data.ct, scts, body, target, {}, modality, rx, out, figures={"model"})
            except RunFailed as err:  # the other modality and cases are still worth having
                per_case[case.id][modality] = {"error": str(err)}
                errors.append(f"{case.id} {modality}: {err}")
                continue
            dvh_png[case.id][modality] = out / f"dvh_model_{modality}.png"
        seconds.append(time.perf_counter() - start)
    summary = {}
    for modality in MODALITIES:
        done = [c[modality]["scts"] for c in per_case.values() if "scts" in c[modality]]
        names = {n for scts in done for n in scts}
        summary[modality] = {}
        for name in ["model"] + [n for n in baselines.LABELS if n in names]:
            rows = [scts[name] for scts in done if name in scts]
            if not rows or len(rows) != len(done):
                continue
            summary[modality][name] = {
                key: float(np.mean([read(r) for r in rows])) for key, (_, read) in SUMMARY.items()}
    return {"rx_gy": rx, "target": f"sphere of radius {TARGET_RADIUS_MM:g} mm at the body's "
            "centre of mass", "cases": per_case, "summary": summary, "dvh_png": dvh_png,
            "seconds_per_case": seconds, "errors": errors}


def label(name: str) -> str:
    return "model" if name == "model" else baselines.LABELS.get(name, name)


def summary_lines(result: dict) -> list[str]:
    """One printed line per modality and sCT (model first, then the baselines)."""
    lines = []
    for modality, rows in result["summary"].items():
        for name, m in rows.items():
            lines.append(f"dose {modality} {label(name)}: MAE {m['dose_mae_percent_rx']:.2f} % Rx, "
                         f"gamma 2%/2mm {m['gamma_2_2']:.1f} %, 1%/1mm {m['gamma_1_1']:.1f} %, "
                         f"target D98 {m['target_d98']:+.2f} % Rx")
    return lines + [f"dose failed: {e}" for e in result["errors"]]


def json_part(result: dict) -> dict:
    """What metrics.json keeps (paths as text; NaN-safe via scoring.json_ready later)."""
    return {k: (v if k != "dvh_png" else {i: {m: str(p) for m, p in d.items()}
                                           for i, d in v.items()})
            for k, v in result.items()}
