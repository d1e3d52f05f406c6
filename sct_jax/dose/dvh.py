"""Dose-volume metrics of a CT dose and an sCT dose: DVH, D98/D2/Dmean, dose MAE.

Conventions (SynthRAD2023/2025's dose scoring):

- ``D_x`` (``x`` in % of the structure's volume) is the dose that the hottest ``x`` %
  of the structure receives at least: numpy's linear-interpolated percentile
  ``100 - x`` of the doses of its voxels (each voxel one equal volume). D98 is the
  near-minimum of a target, D2 its near-maximum, Dmean the mean.
- Differences are sCT - CT in % of the prescription ``rx`` (positive: the sCT plan
  would report more dose than the CT plan).
- The dose MAE is the mean |sCT dose - CT dose| over the voxels where the CT dose is
  at least 90 % of ``rx`` (the high-dose region the plan was made for), in % of ``rx``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sct_jax.errors import DataError

HIGH_DOSE_FRACTION = 0.9  # the dose MAE region: CT dose >= 90 % of the prescription


def _doses_in(dose: np.ndarray, mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask) > 0
    if mask.shape != np.shape(dose):
        raise DataError(f"{what}: mask {mask.shape} and dose {np.shape(dose)} differ in shape")
    values = np.asarray(dose, np.float64)[mask]
    if values.size == 0:
        raise DataError(f"{what}: empty mask")
    return values


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, bin_gy: float = 0.01,
                   max_gy: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The cumulative dose-volume histogram of a structure.

    Args:
      dose: ``(X, Y, Z)`` dose (Gy).
      mask: ``(X, Y, Z)`` structure mask (non-zero inside).
      bin_gy: dose step (Gy).
      max_gy: the last dose level (default: the structure's maximum dose).

    Returns:
      ``(levels, volume)``: ``(B,)`` dose levels (Gy) from 0 and ``(B,)`` % of the
      structure's voxels that receive at least each level (100 at 0 Gy).
    """
    values = _doses_in(dose, mask, "DVH")
    top = float(values.max() if max_gy is None else max_gy)
    levels = np.arange(0.0, top + bin_gy, bin_gy)
    ordered = np.sort(values)
    # Voxels with dose >= level: those at or after the first index where it is reached.
    at_least = values.size - np.searchsorted(ordered, levels, side="left")
    return levels, 100.0 * at_least / values.size


def dose_at_volume(dose: np.ndarray, mask: np.ndarray, volume_percent: float) -> float:
    """``D_x``: the dose (Gy) that the hottest ``volume_percent`` % of the structure
    receives at least (linear-interpolated percentile ``100 - volume_percent``)."""
    if not 0.0 <= volume_percent <= 100.0:
        raise DataError(f"D_x: volume {volume_percent} % must lie in [0, 100]")
    return float(np.percentile(_doses_in(dose, mask, f"D{volume_percent:g}"),
                               100.0 - volume_percent))


def structure_metrics(dose: np.ndarray, mask: np.ndarray) -> dict:
    """``{"D98", "D2", "Dmean"}`` of a structure, Gy."""
    values = _doses_in(dose, mask, "DVH metrics")
    d98, d2 = np.percentile(values, [2.0, 98.0])
    return {"D98": float(d98), "D2": float(d2), "Dmean": float(values.mean())}


def high_dose_region(ct_dose: np.ndarray, rx: float) -> np.ndarray:
    """``(X, Y, Z)`` bool: where the CT dose reaches 90 % of ``rx``."""
    return np.asarray(ct_dose) >= HIGH_DOSE_FRACTION * rx


def dose_mae_percent(ct_dose: np.ndarray, sct_dose: np.ndarray, rx: float) -> float:
    """Mean |sCT dose - CT dose| where the CT dose >= 90 % of ``rx``, in % of ``rx``.

    Raises:
      DataError: the doses differ in shape, ``rx <= 0``, or no voxel reaches 90 % of
        ``rx`` (the plan was not normalised to it).
    """
    if rx <= 0:
        raise DataError(f"dose MAE: prescription {rx:g} Gy must be > 0")
    if np.shape(ct_dose) != np.shape(sct_dose):
        raise DataError(f"dose MAE: CT dose {np.shape(ct_dose)} and sCT dose "
                        f"{np.shape(sct_dose)} differ in shape")
    region = high_dose_region(ct_dose, rx)
    if not region.any():
        raise DataError(f"dose MAE: no voxel of the CT dose reaches {HIGH_DOSE_FRACTION:.0%} "
                        f"of the prescription {rx:g} Gy")
    diff = np.abs(np.asarray(sct_dose, np.float64)[region]
                  - np.asarray(ct_dose, np.float64)[region])
    return float(100.0 * diff.mean() / rx)


def dvh_differences(ct_dose: np.ndarray, sct_dose: np.ndarray, rx: float,
                    target: np.ndarray, organs: Mapping[str, np.ndarray] = ()) -> dict:
    """Target D98/D2/Dmean and organ D2/Dmean of both doses, and their differences.

    Args:
      ct_dose, sct_dose: ``(X, Y, Z)`` doses (Gy) on one grid.
      rx: the prescription (Gy).
      target: ``(X, Y, Z)`` target mask.
      organs: organ name -> ``(X, Y, Z)`` mask.

    Returns:
      ``{"target": {metric: {"ct", "sct" (Gy), "diff_percent_rx"}}, "organs": {name:
      {...}}}`` with metrics D98, D2, Dmean for the target and D2, Dmean for organs;
      ``diff_percent_rx`` = 100 (sCT - CT) / rx.
    """
    def compare(mask, keys):
        ct, sct = structure_metrics(ct_dose, mask), structure_metrics(sct_dose, mask)
        return {k: {"ct": ct[k], "sct": sct[k], "diff_percent_rx": 100.0 * (sct[k] - ct[k]) / rx}
                for k in keys}

    organs = dict(organs)
    return {"target": compare(target, ("D98", "D2", "Dmean")),
            "organs": {name: compare(mask, ("D2", "Dmean")) for name, mask in organs.items()}}
