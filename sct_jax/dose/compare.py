"""One case's plan-and-recompute: a plan optimised on the CT (cached), its beams and
weights recomputed on each sCT, and the dose metrics of each against the CT dose.

Used by ``sct-dose`` and by ``evaluate.py --dose``. Metrics per sCT (all differences
sCT - CT): dose MAE where the CT dose is >= 90 % of Rx (% of Rx), gamma pass rates at
2 %/2 mm and 1 %/1 mm (global, of the CT dose maximum, 10 % low-dose cut-off), target
D98/D2/Dmean and organ D2/Dmean differences (% of Rx).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

from sct_jax.data.io import Volume, save_volume
from sct_jax.dose import dvh, engine, gamma, plots
from sct_jax.errors import DataError

GAMMA_CRITERIA = ((2.0, 2.0), (1.0, 1.0))  # (dose %, DTA mm)
GAMMA_CUTOFF_PERCENT = 10.0


def cached_plan(folder: Path, fingerprint: str) -> engine.DosePlan | None:
    """The plan saved in ``folder`` when it was made from the same inputs and settings."""
    try:
        plan = engine.load_plan(folder)
    except DataError:
        return None
    return plan if plan.info.get("fingerprint") == fingerprint else None


def compare_doses(ct_dose: np.ndarray, sct_dose: np.ndarray, rx: float, target: np.ndarray,
                  organs: Mapping[str, np.ndarray], spacing) -> dict:
    """The dose metrics of one sCT dose against the CT dose (module docstring).

    Args:
      ct_dose, sct_dose: ``(X, Y, Z)`` Gy on one grid.
      rx: prescription in Gy.
      target: ``(X, Y, Z)`` bool; organs: name -> ``(X, Y, Z)`` bool.
      spacing: voxel size in mm per axis.
    """
    result = {"dose_mae_percent_rx": dvh.dose_mae_percent(ct_dose, sct_dose, rx)}
    for dose_percent, dta in GAMMA_CRITERIA:
        key = f"gamma_pass_{dose_percent:g}pct_{dta:g}mm"
        result[key] = gamma.gamma_pass_rate(ct_dose, sct_dose, spacing, dose_percent, dta,
                                            GAMMA_CUTOFF_PERCENT)
    result.update(dvh.dvh_differences(ct_dose, sct_dose, rx, target, organs))
    return result


def run_modality(ct: Volume, scts: Mapping[str, np.ndarray], body: np.ndarray,
                 target: np.ndarray, organs: Mapping[str, np.ndarray], modality: str,
                 rx: float, out: Path, beams: str | None = None, dose_grid_mm: float = 3.0,
                 figures: bool | set[str] = True) -> dict:
    """Plans (or reuses the plan cached in ``out/plan_<modality>``) on the CT and
    recomputes it on each sCT.

    Args:
      ct: the planning CT (HU) with its affine.
      scts: name -> ``(X, Y, Z)`` HU on the CT's grid (names become file stems).
      body, target: ``(X, Y, Z)`` bool.
      organs: name -> ``(X, Y, Z)`` bool.
      modality: ``"photon"`` or ``"proton"``.
      rx: prescription in Gy (the target's mean CT dose).
      out: folder for the plan, the doses (``dose_ct_<modality>.nii.gz``,
        ``dose_<name>_<modality>.nii.gz``, Gy) and the figures.
      beams: photon beam set (default :data:`engine.DEFAULT_BEAM_SET`).
      dose_grid_mm: dose grid voxel size.
      figures: draw the DVH and dose-difference PNGs (``True``: for every sCT; a set:
        for those names only).

    Returns:
      ``{"plan": {...timings, angles}, "scts": {name: metrics + recompute_s}}``.

    Raises:
      RunFailed: pyradplan failed; ImportError-free: call :func:`engine.require_pyradplan`
        first for the install hint.
    """
    beams = beams or engine.DEFAULT_BEAM_SET["photon"]
    settings = dict(modality=modality, rx=rx, beams=beams, dose_grid=dose_grid_mm)
    fingerprint = engine.plan_fingerprint(ct.data, body, target, organs, ct.affine,
                                          **settings)
    folder = out / f"plan_{modality}"
    plan = cached_plan(folder, fingerprint)
    cached = plan is not None
    start = time.perf_counter()
    if plan is None:
        plan = engine.plan_on_ct(ct.data, body, target, organs, ct.affine, modality, rx,
                                 beam_set=beams if modality == "photon" else None,
                                 dose_grid_mm=dose_grid_mm)
        plan.info["fingerprint"] = fingerprint
        plan.save(folder)
    plan_s = time.perf_counter() - start
    save_volume(out / f"dose_ct_{modality}.nii.gz", plan.ct_dose, ct.affine, ct.header)
    structures = {"target": target, **organs}
    per_sct = {}
    for name, sct in scts.items():
        start = time.perf_counter()
        dose = engine.recompute(plan, sct)
        recompute_s = time.perf_counter() - start
        save_volume(out / f"dose_{name}_{modality}.nii.gz", dose, ct.affine, ct.header)
        metrics = compare_doses(plan.ct_dose, dose, rx, target, organs, ct.spacing)
        metrics["recompute_s"] = recompute_s
        per_sct[name] = metrics
        if figures is True or (figures and name in figures):
            title = f"{name} vs CT, {modality}"
            plots.save_dvh_figure(out / f"dvh_{name}_{modality}.png", plan.ct_dose, dose,
                                  structures, rx, title)
            plots.save_dose_difference_figure(out / f"dose_diff_{name}_{modality}.png",
                                              plan.ct_hu, plan.ct_dose, dose, rx, target,
                                              ct.spacing, title)
    summary = {"gantry_angles_deg": list(plan.gantry_angles), "cached": cached,
               "plan_s": plan_s, **{k: v for k, v in plan.info.items()
                                    if k not in ("fingerprint", "recompute_s")}}
    return {"plan": summary, "scts": per_sct}
