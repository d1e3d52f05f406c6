"""The reference ranges of the sCT QA checks: tissue fractions and HU statistics.

The ``tissue_fractions`` and ``hu_statistics`` checks of :mod:`sct_jax.evaluation.qa`
compare an sCT's statistics inside the body (:func:`case_statistics`) with ranges from
the training distribution (a profile from :func:`build_reference_profile`, checked by
:func:`validate_profile` when read back) or with the built-in :data:`BUILTIN_RANGES`.
HU bins: air < -200 <= fat < -30 <= soft <= 250 < bone. ``qa`` re-exports every public
name here.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from sct_jax.errors import DataError

AIR_FAT_HU, FAT_SOFT_HU, SOFT_BONE_HU = -200.0, -30.0, 250.0
TISSUES = ("air", "fat", "soft", "bone")
PROFILE_STATS = tuple(f"{t}_fraction" for t in TISSUES) + ("mean_hu", "median_hu")
PROFILE_KIND = "sct_jax.qa.reference_profile"

# Built-in ranges inside a (dilated, SynthRAD-style) body mask, {"pass": [lo, hi],
# "fail": [lo, hi]}: inside "pass" passes, outside "fail" fails, between warns. Broad on
# purpose: they cover thin and obese patients, the air ring a dilated mask adds, bowel
# gas and sinuses; they catch an sCT without bone, with bone everywhere, or shifted in HU.
# Pelvis: soft tissue ~40-60 %, fat 10-40 %, bone (pelvis, sacrum, femora) 5-15 %.
# Head: brain ~50 %, skull 10-30 %, little fat, air from sinuses and the mask's ring.
BUILTIN_RANGES: dict[str, dict[str, dict[str, list[float]]]] = {
    "pelvis": {
        "air_fraction": {"pass": [0.0, 0.25], "fail": [0.0, 0.40]},
        "fat_fraction": {"pass": [0.05, 0.55], "fail": [0.02, 0.70]},
        "soft_fraction": {"pass": [0.25, 0.75], "fail": [0.15, 0.85]},
        "bone_fraction": {"pass": [0.03, 0.25], "fail": [0.015, 0.35]},
        "mean_hu": {"pass": [-300.0, 50.0], "fail": [-450.0, 150.0]},
        "median_hu": {"pass": [-120.0, 70.0], "fail": [-180.0, 130.0]},
    },
    "brain": {
        "air_fraction": {"pass": [0.0, 0.30], "fail": [0.0, 0.45]},
        "fat_fraction": {"pass": [0.0, 0.25], "fail": [0.0, 0.40]},
        "soft_fraction": {"pass": [0.25, 0.85], "fail": [0.15, 0.92]},
        "bone_fraction": {"pass": [0.06, 0.40], "fail": [0.03, 0.50]},
        "mean_hu": {"pass": [-250.0, 300.0], "fail": [-400.0, 450.0]},
        "median_hu": {"pass": [-50.0, 100.0], "fail": [-120.0, 180.0]},
    },
}


def case_statistics(ct: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """Tissue fractions and HU statistics of a CT (or sCT) inside ``body``.

    Args:
      ct: ``(X, Y, Z)`` HU.
      body: ``(X, Y, Z)`` bool or 0/1 mask with at least one voxel.

    Returns:
      ``{name: value}`` for :data:`PROFILE_STATS` (fractions in [0, 1], HU).
    """
    values = np.asarray(ct, np.float64)[np.asarray(body) > 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise DataError("qa: the body mask selects no finite voxels")
    bins = [values < AIR_FAT_HU, (values >= AIR_FAT_HU) & (values < FAT_SOFT_HU),
            (values >= FAT_SOFT_HU) & (values <= SOFT_BONE_HU), values > SOFT_BONE_HU]
    stats = {f"{t}_fraction": float(b.mean()) for t, b in zip(TISSUES, bins)}
    stats.update(mean_hu=float(values.mean()), median_hu=float(np.median(values)))
    return stats


def build_reference_profile(ct_volumes_with_masks: Iterable, region: str | None = None) -> dict:
    """The "training distribution" of tissue fractions and HU statistics.

    Per statistic: mean, std, min, max over the cases, and ranges for
    :func:`~sct_jax.evaluation.qa.run_qa`: ``pass`` = [min(min, mean - 3 std) - floor,
    max(max, mean + 3 std) + floor] (floor 0.02 for fractions, 15 HU; fractions kept in
    [0, 1]); ``fail`` =
    [lo / 2, 1.5 hi] for fractions (relative: a case with no bone must fail however
    wide the training spread), and the pass range widened by half its width on each
    side for HU statistics.

    Args:
      ct_volumes_with_masks: iterable of ``(ct, mask)`` pairs, each an ``(X, Y, Z)``
        array (HU and body mask) or a :class:`sct_jax.data.io.Volume`.
      region: recorded in the profile (``"pelvis"``/``"brain"``), optional.

    Returns:
      JSON-ready dict ``{kind, version, region, n_cases, stats, ranges}``.
    """
    per_case = []
    for ct, mask in ct_volumes_with_masks:
        ct, mask = (getattr(v, "data", v) for v in (ct, mask))
        if np.shape(ct) != np.shape(mask):
            raise DataError(f"reference profile: ct shape {np.shape(ct)} differs from mask "
                            f"{np.shape(mask)}")
        per_case.append(case_statistics(ct, mask))
    if not per_case:
        raise DataError("reference profile: no training cases given")
    stats, ranges = {}, {}
    for name in PROFILE_STATS:
        v = np.array([case[name] for case in per_case])
        mean, std = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        floor = 0.02 if name.endswith("fraction") else 15.0
        lo = min(float(v.min()), mean - 3 * std) - floor
        hi = max(float(v.max()), mean + 3 * std) + floor
        if name.endswith("fraction"):  # relative margins: no bone at all must fail
            lo, hi = max(lo, 0.0), min(hi, 1.0)
            fail = [lo / 2.0, min(hi * 1.5, 1.0)]
        else:
            fail = [lo - (hi - lo) / 2.0, hi + (hi - lo) / 2.0]
        stats[name] = {"mean": mean, "std": std, "min": float(v.min()), "max": float(v.max())}
        ranges[name] = {"pass": [lo, hi], "fail": fail}
    return {"kind": PROFILE_KIND, "version": 1, "region": region, "n_cases": len(per_case),
            "stats": stats, "ranges": ranges}


def validate_profile(profile: Mapping, source: str = "reference profile") -> dict:
    """Checks a profile dict (e.g. read from JSON) has usable ranges; returns it."""
    if not isinstance(profile, Mapping) or profile.get("kind") != PROFILE_KIND:
        raise DataError(f"{source}: not an sct_jax QA reference profile (kind != {PROFILE_KIND})")
    ranges = profile.get("ranges")
    for name in PROFILE_STATS:
        entry = ranges.get(name) if isinstance(ranges, Mapping) else None
        ok = isinstance(entry, Mapping) and all(
            isinstance(entry.get(k), (list, tuple)) and len(entry[k]) == 2
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in entry[k])
            for k in ("pass", "fail"))
        if not ok:
            raise DataError(f"{source}: ranges.{name} must have 'pass' and 'fail' "
                            "[lo, hi] pairs of numbers")
    return dict(profile)
