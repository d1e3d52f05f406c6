"""Fidelity checks of a synthetic CT that need no reference CT.

A planning sCT has no CT to be scored against, so these checks ask whether it is a
plausible CT *of this MR*. Each check returns ``{name, status, value, threshold,
reason}`` with ``status`` one of ``pass``/``warn``/``fail``; the overall status is the
worst. Command line: ``python -m sct_jax.cli.qa --mr MR --sct SCT [--mask M] --report R.json``.

Checks (HU bins: air < -200 <= fat < -30 <= soft <= 250 < bone):

- ``hu_range``: non-finite voxels anywhere, or body voxels outside the plausible CT
  range :data:`PLAUSIBLE_HU` (air's noise reaches below -1024 HU in an unclipped CT).
- ``tissue_fractions``: air/fat/soft/bone fractions inside the body against the
  training distribution (a profile from :func:`build_reference_profile`, or the
  built-in ranges :data:`BUILTIN_RANGES`). Bone removed or an HU offset fails here.
- ``hu_statistics``: mean and median HU inside the body, same ranges.
- ``bone_outside_body``: sCT > 250 HU further than :data:`BONE_MARGIN_MM` outside the
  body, per body voxel (an MR outline can miss dark skull or cortex under thin skin).
- ``body_outline``: Dice of the body (mask, else an MR-derived outline) with the
  sCT's body (> -400 HU, largest component, holes filled per slice).
- ``slice_continuity``: a 2D model's slice artefacts. For each slice, the smaller mean
  absolute difference to its two neighbours over the difference between those
  neighbours (``D(z, z+-1) / (D(z-1, z+1) + 5 HU)``): about 0.5 for smooth anatomy, 1
  for pure noise, >2 for a slice that differs from both its neighbours.
- ``alignment``: the translation of the sCT against the MR that best lines up their
  edges (FFT cross-correlation of gradient magnitudes, parabolic sub-voxel peak). A
  model's output is on the MR grid, so anything beyond a few mm is a pipeline bug
  (crop/pad offset, flipped or shifted axes).
- ``cycle_consistency`` (given ``ct_to_mr``): Pearson r and NMI of MR vs G_CT->MR(sCT).
- ``sample_spread`` (given >= 2 samples, or their std map): per-voxel std in the body.
- ``cbct_field_of_view`` (CBCT input, ``input_kind="cbct"``): the share of the body
  outside the CBCT's field of view (body voxels the CBCT shows as air: truncation).
  Always ``pass``: a CBCT's field of view is smaller than the body by design; the value
  says how much of the sCT there is the model's extrapolation, for a person to weigh.

The thresholds are heuristics, documented where they are defined; a ``warn`` asks a
person to look, a ``fail`` says the sCT should not be used as it is.

Blind spot: a left-right flipped sCT of a (near-)symmetric anatomy passes every check
(the outline, the tissue statistics and the edges line up with the MR's mirror image as
well as with the MR). Check the orientation of the pipeline once against a reference
CT; these checks cannot see it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from sct_jax.data.alignment import normalized_mutual_information
from sct_jax.data.preprocess import HU_MAX, HU_MIN
from sct_jax.errors import ConfigError, DataError
from sct_jax.metrics import dice
# Re-exported (callers use ``qa.<name>``): the reference profile and its tissue bins.
from sct_jax.evaluation.qa_profile import (  # noqa: F401
    AIR_FAT_HU, BUILTIN_RANGES, FAT_SOFT_HU, PROFILE_KIND, PROFILE_STATS, SOFT_BONE_HU,
    TISSUES, build_reference_profile, case_statistics, validate_profile)

STATUSES = ("pass", "warn", "fail")
BODY_HU = -400.0  # tissue vs air for the sCT body outline

# Upper-bound thresholds {name: (warn above, fail above)}.
OUT_OF_RANGE_FRACTION = (1e-4, 1e-3)  # a few voxels at the clip limits are rounding
# Plausible CT numbers: air is -1000 +- noise (an unclipped CT holds voxels a little
# below -1024); 3071 is the top of a 12-bit CT. Beyond these: not a CT.
PLAUSIBLE_HU = (-1200.0, 3071.0)
BONE_MARGIN_MM = 5.0  # bone this close to the body outline counts as inside
BONE_OUTSIDE_FRACTION = (1e-3, 5e-3)  # of the body volume
SLICE_SCORE = (1.3, 1.8)  # noise-only slices score ~1, a zeroed slice > 2
SHIFT_MM = (3.0, 6.0)  # ~1 voxel of estimation error is normal
SPREAD_MEAN_STD_HU = (50.0, 100.0)
SPREAD_FLAG_HU = 150.0  # voxels drawn red in the figure
# Lower-bound thresholds {name: (warn below, fail below)}.
OUTLINE_DICE = (0.85, 0.75)
CYCLE_PEARSON = (0.8, 0.6)
_SLICE_FLOOR_HU = 5.0  # keeps a constant region from dividing by ~0
_MIN_SLICE_AREA = 0.05  # slices with less body than this fraction of the largest are skipped


@dataclasses.dataclass
class QAResult:
    """The outcome of :func:`run_qa`.

    Attributes:
      report: JSON-ready dict: ``status``, ``checks`` (list of check dicts), ``reference``.
      flagged: ``(X, Y, Z)`` bool, voxels to draw red (bone outside the body, outline
        disagreement when that check is not a pass, flagged slices, high spread).
      body: ``(X, Y, Z)`` bool, the body mask the checks used.
      slice_mean_hu: ``(Z,)`` mean sCT HU inside the body per slice (NaN without body).
      flagged_slices: slice indices whose continuity score is above the warn threshold.
    """

    report: dict
    flagged: np.ndarray
    body: np.ndarray
    slice_mean_hu: np.ndarray
    flagged_slices: list[int]

    @property
    def status(self) -> str:
        return self.report["status"]


def worst(statuses: Iterable[str]) -> str:
    """The worst of ``statuses`` (``pass`` for none)."""
    return max(statuses, key=STATUSES.index, default="pass")


def _check(name, status, value, threshold, reason) -> dict:
    return {"name": name, "status": status, "value": value, "threshold": threshold,
            "reason": reason}


def _above(value: float, limits: tuple[float, float]) -> str:
    return "fail" if value > limits[1] else "warn" if value > limits[0] else "pass"


def _below(value: float, limits: tuple[float, float]) -> str:
    return "fail" if value < limits[1] else "warn" if value < limits[0] else "pass"


def _in_range(value: float, ranges: Mapping[str, Sequence[float]]) -> str:
    (plo, phi), (flo, fhi) = ranges["pass"], ranges["fail"]
    return "pass" if plo <= value <= phi else "warn" if flo <= value <= fhi else "fail"


def body_outline(volume: np.ndarray, kind: str = "mr") -> np.ndarray:
    """The body outline of a model input: an MR's (:func:`mr_body_outline`) or a CBCT's
    (above -500 HU after smoothing: HU need no relative threshold; largest component,
    holes filled per axial slice).

    Args:
      volume: ``(X, Y, Z)`` MR (scanner units) or CBCT (HU).
      kind: ``"mr"`` or ``"cbct"``.
    """
    if kind == "cbct":
        smooth = ndimage.gaussian_filter(np.asarray(volume, np.float32), 1.0)
        return _largest_filled(smooth > -500.0)
    return mr_body_outline(volume)


def mr_body_outline(mr: np.ndarray) -> np.ndarray:
    """The body outline of an MR: above 10 % of the 99th percentile after smoothing.

    Largest component, holes filled per axial slice, not dilated. A fixed fraction of a
    high percentile follows the body edge more reliably than Otsu, which on fat-bright
    T1 sometimes splits fat from muscle.

    Args:
      mr: ``(X, Y, Z)`` MR in scanner units.

    Returns:
      ``(X, Y, Z)`` bool.
    """
    smooth = ndimage.gaussian_filter(np.asarray(mr, np.float32), 1.0)
    return _largest_filled(smooth > 0.1 * float(np.percentile(smooth, 99.0)))


def sct_body_outline(sct: np.ndarray) -> np.ndarray:
    """The sCT's body: > -400 HU, large components, holes (gas, lungs) filled per slice.

    Components of at least 10 % of the largest are kept, so that a corrupted slice that
    cuts the body in two is reported by the slice check, not as half a body missing.
    """
    return _largest_filled(np.asarray(sct) > BODY_HU, keep_fraction=0.1)


def _largest_filled(foreground: np.ndarray, keep_fraction: float = 1.0) -> np.ndarray:
    labels, n = ndimage.label(foreground)
    if n == 0:
        return np.zeros(foreground.shape, bool)
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, n + 1))
    keep = np.concatenate([[False], sizes >= keep_fraction * sizes.max()])
    body = keep[labels]
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def _dilate_in_plane(mask: np.ndarray, steps: int) -> np.ndarray:
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(mask, structure, iterations=steps)


def check_hu_range(sct, body) -> dict:
    """(a) Non-finite voxels anywhere, or body voxels outside :data:`PLAUSIBLE_HU`."""
    finite = np.isfinite(sct)
    non_finite = int(sct.size - np.count_nonzero(finite))
    inside = sct[body & finite]
    lo, hi = PLAUSIBLE_HU
    outside = int(np.count_nonzero((inside < lo) | (inside > hi)))
    fraction = outside / max(int(body.sum()), 1)
    status = "fail" if non_finite else _above(fraction, OUT_OF_RANGE_FRACTION)
    reason = (f"{non_finite} non-finite voxels" if non_finite else
              f"{fraction:.2%} of body voxels outside [{lo:.0f}, {hi:.0f}] HU")
    return _check("hu_range", status, {"non_finite": non_finite, "outside_fraction": fraction},
                  {"warn_above": OUT_OF_RANGE_FRACTION[0],
                   "fail_above": OUT_OF_RANGE_FRACTION[1]}, reason)


def _range_check(name: str, stats: Mapping[str, float], ranges: Mapping, keys, source) -> dict:
    statuses = {k: _in_range(stats[k], ranges[k]) for k in keys}
    status = worst(statuses.values())
    off = []
    for k, s in statuses.items():
        if s != "pass":
            lo, hi = ranges[k]["pass" if s == "warn" else "fail"]
            off.append(f"{k}={stats[k]:.3g} outside [{lo:.3g}, {hi:.3g}]")
    reason = "; ".join(off) if off else f"all within the {source} ranges"
    return _check(name, status, {k: stats[k] for k in keys},
                  {k: dict(ranges[k]) for k in keys}, reason)


def check_bone_outside_body(sct, body, spacing=(1.0, 1.0, 1.0)) -> tuple[dict, np.ndarray]:
    """(c) sCT bone (> 250 HU) more than :data:`BONE_MARGIN_MM` outside the body;
    returns the check and those voxels. The margin absorbs an MR outline that stops
    short of dark cortical bone (skull under thin scalp)."""
    steps = [max(int(math.ceil(BONE_MARGIN_MM / float(s))), 0) for s in spacing[:3]]
    near = body
    for axis, n in enumerate(steps):
        if n:
            structure = np.zeros((3, 3, 3), bool)
            structure[1, 1, 1] = True
            index = [1, 1, 1]
            for offset in (0, 2):
                index[axis] = offset
                structure[tuple(index)] = True
            near = ndimage.binary_dilation(near, structure, iterations=n)
    bone_out = np.nan_to_num(sct, nan=0.0) > SOFT_BONE_HU
    bone_out &= ~near
    fraction = float(bone_out.sum()) / max(int(body.sum()), 1)
    return _check("bone_outside_body", _above(fraction, BONE_OUTSIDE_FRACTION),
                  {"voxels": int(bone_out.sum()), "fraction_of_body": fraction},
                  {"warn_above": BONE_OUTSIDE_FRACTION[0],
                   "fail_above": BONE_OUTSIDE_FRACTION[1]},
                  f"{int(bone_out.sum())} bone voxels (> {SOFT_BONE_HU:.0f} HU) outside the "
                  f"body, {fraction:.2%} of the body volume"), bone_out


def slice_continuity_scores(sct: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Per-slice discontinuity score (see the module docstring); ``(Z,)``, NaN if unscored.

    Interior slice z: ``min(D(z, z-1), D(z, z+1)) / (D(z-1, z+1) + 5 HU)`` with ``D`` the
    mean absolute HU difference over slice z's body. End slices: ``D(z, z') / (2 D(z',
    z'') + 5 HU)`` with z', z'' the next two slices inwards. Slices with less body than 5 % of
    the largest body slice, and volumes under 3 slices, are not scored.
    """
    nz = sct.shape[2]
    scores = np.full(nz, np.nan)
    area = body.sum(axis=(0, 1))
    if nz < 3 or area.max() == 0:
        return scores

    def diff(z1, z2, region):
        return float(np.abs(sct[:, :, z1] - sct[:, :, z2])[region].mean())

    for z in range(nz):
        region = body[:, :, z]
        if area[z] < _MIN_SLICE_AREA * area.max():
            continue
        if 0 < z < nz - 1:
            jump = min(diff(z, z - 1, region), diff(z, z + 1, region))
            scores[z] = jump / (diff(z - 1, z + 1, region) + _SLICE_FLOOR_HU)
        else:
            step = 1 if z == 0 else -1
            # One neighbour only: its one-slice difference, doubled, stands in for the
            # two-slice difference of the interior score so both read on one scale.
            scores[z] = diff(z, z + step, region) / (
                2.0 * diff(z + step, z + 2 * step, region) + _SLICE_FLOOR_HU)
    return scores


def check_body_outline(body, sct, body_name: str) -> tuple[dict, np.ndarray]:
    """(d) Dice of ``body`` with the sCT's body; returns the check and their XOR.

    ``body`` is never empty (:func:`run_qa` refuses an empty body), so the Dice is
    defined (:func:`sct_jax.metrics.dice` is NaN only for two empty masks).
    """
    sct_body = sct_body_outline(sct)
    overlap = dice(body, sct_body)
    return _check("body_outline", _below(overlap, OUTLINE_DICE), {"dice": overlap},
                  {"warn_below": OUTLINE_DICE[0], "fail_below": OUTLINE_DICE[1]},
                  f"Dice {overlap:.3f} between the {body_name} and the sCT body "
                  f"(> {BODY_HU:.0f} HU)"), body ^ sct_body


def check_slice_continuity(sct, body) -> tuple[dict, np.ndarray, list[int]]:
    """(e) Slice artefacts; returns the check, per-slice mean HU ``(Z,)``, flagged slices."""
    area = body.sum(axis=(0, 1))
    sums = np.where(body, sct, 0.0).sum(axis=(0, 1))
    mean_hu = np.where(area > 0, sums / np.maximum(area, 1), np.nan)
    jumps = np.abs(np.diff(mean_hu[area >= _MIN_SLICE_AREA * max(area.max(), 1)]))
    jump_ratio = (float(jumps.max() / max(np.median(jumps), 1.0)) if jumps.size else 0.0)
    scores = slice_continuity_scores(sct, body)
    if np.all(np.isnan(scores)):
        return _check("slice_continuity", "warn", {"max_score": None},
                      {"warn_above": SLICE_SCORE[0], "fail_above": SLICE_SCORE[1]},
                      "too few slices with body to score"), mean_hu, []
    worst_z = int(np.nanargmax(scores))
    max_score = float(scores[worst_z])
    flagged = [int(z) for z in np.nonzero(np.nan_to_num(scores) > SLICE_SCORE[0])[0]]
    status = _above(max_score, SLICE_SCORE)
    reason = (f"slice {worst_z} differs from both neighbours ({max_score:.2f} x their "
              f"own difference); flagged slices {flagged}" if flagged else
              f"max score {max_score:.2f} at slice {worst_z}")
    value = {"max_score": max_score, "worst_slice": worst_z, "flagged_slices": flagged,
             "max_mean_hu_jump": float(jumps.max()) if jumps.size else 0.0,
             "mean_hu_jump_over_median": jump_ratio}
    return _check("slice_continuity", status, value,
                  {"warn_above": SLICE_SCORE[0], "fail_above": SLICE_SCORE[1]},
                  reason), mean_hu, flagged


def _edge_map(image: np.ndarray, spacing, step) -> np.ndarray:
    sigma = [max(1.5 / s, 0.7) for s in spacing]  # ~1.5 mm: above the noise, below anatomy
    grad = ndimage.gaussian_gradient_magnitude(image.astype(np.float32), sigma)
    grad = grad[::step[0], ::step[1], ::step[2]]
    scale = float(np.percentile(grad, 99.0))
    grad = np.minimum(grad / scale, 1.0) if scale > 0 else grad  # no edge dominates
    return grad - grad.mean()


def estimate_shift(mr: np.ndarray, sct: np.ndarray, body: np.ndarray, spacing,
                   max_shift_mm: float = 20.0) -> tuple[np.ndarray, float, float]:
    """Translation of the sCT against the MR that best lines up their edges.

    Gradient magnitudes (clipped at their 99th percentile so that both the body outline
    and bone edges count) are cross-correlated by FFT over the body's bounding box,
    on a grid of about 2 mm; the peak is refined by a parabola per axis.

    Args:
      mr, sct: ``(X, Y, Z)`` images on the same grid.
      body: ``(X, Y, Z)`` bool, where to look (its bounding box plus the search margin).
      spacing: voxel size in mm, 3 floats.
      max_shift_mm: the search range on each axis.

    Returns:
      ``(shift_mm (3,), ncc_at_zero, ncc_at_peak)``: ``sct(x) ~ mr(x - shift)``.
    """
    spacing = np.asarray(spacing, float)
    step = np.maximum(1, np.floor(2.0 / spacing)).astype(int)
    grid_mm = spacing * step
    idx = np.nonzero(body)
    if idx[0].size == 0:
        return np.zeros(3), 0.0, 0.0
    box = tuple(slice(max(int(i.min()) - int(math.ceil(max_shift_mm / s)), 0),
                      int(i.max()) + int(math.ceil(max_shift_mm / s)) + 1)
                for i, s in zip(idx, spacing))
    a = _edge_map(np.asarray(mr)[box], spacing, step)
    b = _edge_map(np.clip(np.nan_to_num(sct[box], nan=HU_MIN), -1000.0, 1500.0), spacing, step)
    reach = [min(int(math.ceil(max_shift_mm / g)), n // 2) for g, n in zip(grid_mm, a.shape)]
    padded = [n + r for n, r in zip(a.shape, reach)]  # zero padding: no wrap-around
    spectra = [np.fft.rfftn(x, padded, axes=(0, 1, 2)) for x in (a, b)]
    corr = np.fft.irfftn(spectra[0] * np.conj(spectra[1]), padded, axes=(0, 1, 2))
    # corr[L] = sum_x a(x + L) b(x): peaks at L = -shift. Keep lags within +-reach.
    lags = [np.r_[0:r + 1, n - r:n] for r, n in zip(reach, padded)]
    window = corr[np.ix_(*lags)]
    peak = np.unravel_index(int(np.argmax(window)), window.shape)
    shift = np.zeros(3)
    for axis in range(3):
        lag = int(lags[axis][peak[axis]])
        lag = lag - padded[axis] if lag > reach[axis] else lag
        shift[axis] = -(lag + _parabola_offset(corr, peak, lags, axis))
    norm = float(np.sqrt((a * a).sum() * (b * b).sum())) or 1.0
    return shift * grid_mm, float(corr[0, 0, 0] / norm), float(window[peak] / norm)


def _parabola_offset(corr, peak, lags, axis) -> float:
    """Sub-voxel offset of the correlation peak along ``axis`` (0 at the window's edge)."""
    i = peak[axis]
    if i in (0, len(lags[axis]) - 1) and lags[axis][i] != 0:
        return 0.0
    n = corr.shape[axis]
    at = [int(lags[k][peak[k]]) for k in range(3)]
    values = []
    for d in (-1, 0, 1):
        pos = list(at)
        pos[axis] = (at[axis] + d) % n
        values.append(float(corr[tuple(pos)]))
    denom = values[0] - 2 * values[1] + values[2]
    return 0.0 if denom >= 0 else float(np.clip(0.5 * (values[0] - values[2]) / denom, -0.5, 0.5))


def check_alignment(mr, sct, body, spacing) -> dict:
    """(f) The sCT's edges against the MR's: a shifted or flipped sCT fails."""
    shift_mm, ncc0, ncc_peak = estimate_shift(mr, sct, body, spacing)
    distance = float(np.linalg.norm(shift_mm))
    status = _above(distance, SHIFT_MM)
    reason = (f"sCT edges line up with the MR's best when moved by "
              f"({', '.join(f'{-v:+.1f}' for v in shift_mm)}) mm, |shift| {distance:.1f} mm")
    if status == "pass" and ncc_peak < 0.2:
        status, reason = "warn", f"MR and sCT edges barely correlate (NCC {ncc_peak:.2f})"
    nmi = normalized_mutual_information(mr, np.nan_to_num(sct, nan=HU_MIN), body, bins=32)
    return _check("alignment", status,
                  {"shift_mm": [float(v) for v in shift_mm], "shift_norm_mm": distance,
                   "edge_ncc_at_zero": ncc0, "edge_ncc_at_peak": ncc_peak, "nmi": nmi},
                  {"warn_above_mm": SHIFT_MM[0], "fail_above_mm": SHIFT_MM[1]}, reason)


def check_cycle(mr, sct, body, ct_to_mr: Callable[[np.ndarray], np.ndarray]) -> dict:
    """(g) MR vs ``ct_to_mr(sct)`` inside the body: Pearson r (status) and NMI."""
    mr_hat = np.asarray(ct_to_mr(sct), np.float64)
    if mr_hat.shape != mr.shape:
        raise DataError(f"cycle consistency: ct_to_mr returned shape {mr_hat.shape}, "
                        f"expected {mr.shape}")
    x, y = np.asarray(mr, np.float64)[body], mr_hat[body]
    if not np.all(np.isfinite(y)):
        return _check("cycle_consistency", "fail", {"pearson_r": None}, {},
                      "ct_to_mr returned non-finite values")
    sx, sy = x.std(), y.std()
    r = float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)) if sx * sy > 0 else 0.0
    nmi = normalized_mutual_information(mr, mr_hat, body, bins=32)
    return _check("cycle_consistency", _below(r, CYCLE_PEARSON),
                  {"pearson_r": r, "nmi": nmi},
                  {"warn_below": CYCLE_PEARSON[0], "fail_below": CYCLE_PEARSON[1]},
                  f"MR vs G_CT->MR(sCT) inside the body: r = {r:.3f}, NMI = {nmi:.3f}")


# A body voxel a CBCT shows below this (smoothed) is air: outside its field of view
# when that air reaches the body's edge.
CBCT_OUTSIDE_FOV_HU = -500.0  # halfway between air and tissue: the edge stays put


def check_cbct_field_of_view(cbct: np.ndarray, body: np.ndarray, spacing) -> dict:
    """Reports the body outside a CBCT's field of view (truncation); never a failure.

    Args:
      cbct: ``(X, Y, Z)`` CBCT in HU.
      body: ``(X, Y, Z)`` bool body mask (of the CT or the case).
      spacing: voxel size in mm.

    Returns:
      A ``pass`` check whose value is the truncated share of the body (0..1) and whose
      reason gives it with the radius of the field of view seen (mm, from the axial
      centre of the image).
    """
    smooth = ndimage.gaussian_filter(np.asarray(cbct, np.float32), 1.0)
    outside = body & (smooth < CBCT_OUTSIDE_FOV_HU)
    # Lungs or bowel gas inside the body are air too: only air connected to the image
    # border through the body counts as truncation.
    # In-plane only: the volume's first and last slices are not the body's edge.
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(outside, in_plane)
    edge = np.zeros(outside.shape, bool)
    edge[[0, -1], :, :] = edge[:, [0, -1], :] = True
    rim = edge | (body & ~ndimage.binary_erosion(body, in_plane))
    border_labels = np.unique(labels[rim & outside])
    truncated = np.isin(labels, border_labels[border_labels > 0])
    share = float(truncated.sum()) / float(body.sum())
    seen = body & ~truncated
    centre = (np.asarray(cbct.shape[:2], np.float64) - 1.0) / 2.0
    x, y = np.nonzero(seen.any(axis=2))
    radius = float(np.max(np.hypot((x - centre[0]) * spacing[0],
                                   (y - centre[1]) * spacing[1]))) if x.size else 0.0
    reason = (f"{100 * share:.1f} % of the body lies outside the CBCT's field of view "
              f"(seen to a radius of {radius:.0f} mm): the sCT there is extrapolated "
              "(reported, not an error)")
    return _check("cbct_field_of_view", "pass", share, None, reason)


def check_sample_spread(samples: Sequence[np.ndarray], body) -> tuple[dict, np.ndarray]:
    """(h) Per-voxel std (ddof 1) across samples in the body; returns the check and std."""
    if len(samples) < 2:
        raise DataError(f"qa: sample spread needs at least 2 samples, got {len(samples)}")
    for i, sample in enumerate(samples):
        if np.shape(sample) != body.shape:
            raise DataError(f"qa: sample {i} shape {np.shape(sample)} differs from the "
                            f"mr {body.shape}")
    std = np.stack([np.asarray(s, np.float32) for s in samples]).std(axis=0, ddof=1)
    return check_spread_map(std, body, len(samples)), std


def check_spread_map(std: np.ndarray, body, n_samples: int) -> dict:
    """(h) The spread check from a per-voxel std map ``(X, Y, Z)`` (ddof 1) of samples."""
    if np.shape(std) != body.shape or n_samples < 2:
        raise DataError(f"qa: sample std shape {np.shape(std)} (of {n_samples} samples) "
                        f"must be the mr's {body.shape}, from at least 2 samples")
    inside = np.asarray(std, np.float32)[body]
    mean_std = float(inside.mean()) if inside.size else 0.0
    high = float((inside > SPREAD_FLAG_HU).mean()) if inside.size else 0.0
    return _check("sample_spread", _above(mean_std, SPREAD_MEAN_STD_HU),
                  {"n_samples": n_samples, "mean_std_hu": mean_std,
                   "p95_std_hu": float(np.percentile(inside, 95)) if inside.size else 0.0,
                   "fraction_std_above_flag": high},
                  {"warn_above_hu": SPREAD_MEAN_STD_HU[0], "fail_above_hu": SPREAD_MEAN_STD_HU[1],
                   "flag_hu": SPREAD_FLAG_HU},
                  f"mean per-voxel std over {n_samples} samples {mean_std:.1f} HU; "
                  f"{high:.1%} of body voxels above {SPREAD_FLAG_HU:.0f} HU")


def run_qa(mr: np.ndarray, sct: np.ndarray, mask: np.ndarray | None = None, *,
           spacing: Sequence[float] = (1.0, 1.0, 1.0), region: str | None = None,
           reference: Mapping | None = None,
           ct_to_mr: Callable[[np.ndarray], np.ndarray] | None = None,
           samples: Sequence[np.ndarray] | None = None,
           sample_std: np.ndarray | None = None, n_samples: int = 0,
           input_kind: str = "mr") -> QAResult:
    """Runs every applicable check on one case.

    Args:
      mr: ``(X, Y, Z)`` MR in scanner units (a CBCT in HU with ``input_kind="cbct"``).
      sct: ``(X, Y, Z)`` synthetic CT in HU on the MR's grid (may hold NaN/Inf: reported).
      mask: ``(X, Y, Z)`` body mask, or ``None`` to derive one from the MR
        (:func:`mr_body_outline` dilated 2 voxels in-plane, like a SynthRAD mask).
      spacing: voxel size in mm.
      region: ``"pelvis"``/``"brain"``, selects :data:`BUILTIN_RANGES` when no
        ``reference`` is given.
      reference: a profile from :func:`build_reference_profile` (takes precedence).
      ct_to_mr: optional CT->MR generator, ``(X, Y, Z)`` HU -> ``(X, Y, Z)`` MR-like.
      samples: optional sCT samples (>= 2, each ``(X, Y, Z)`` HU) of a stochastic method.
      sample_std, n_samples: instead of ``samples``, their per-voxel std ``(X, Y, Z)``
        HU (ddof 1) computed elsewhere, and how many samples it is over (>= 2).
      input_kind: ``"mr"`` or ``"cbct"`` (the outline from HU; the field-of-view check).

    Returns:
      The :class:`QAResult`.

    Raises:
      DataError: shapes differ, an empty body, too few samples, a bad profile.
      ConfigError: neither ``region`` nor ``reference``, or an unknown region.
    """
    mr, sct = np.asarray(mr, np.float32), np.asarray(sct, np.float32)
    if sct.ndim != 3 or mr.shape != sct.shape:
        raise DataError(f"qa: sct shape {sct.shape} differs from mr {mr.shape} (need 3D, "
                        "same grid)")
    if reference is not None:
        ranges, source = validate_profile(reference)["ranges"], "reference profile"
    elif region in BUILTIN_RANGES:
        ranges, source = BUILTIN_RANGES[region], f"built-in {region}"
    else:
        raise ConfigError(f"qa: region {region!r} unknown and no reference profile given "
                          f"(expected one of {', '.join(BUILTIN_RANGES)})")
    outline = body_outline(mr, input_kind)
    if mask is not None:
        if np.shape(mask) != mr.shape:
            raise DataError(f"qa: mask shape {np.shape(mask)} differs from mr {mr.shape}")
        body = np.asarray(mask) > 0
    else:
        body = _dilate_in_plane(outline, 2)
    if not body.any():
        raise DataError("qa: the body mask is empty")

    checks = [check_hu_range(sct, body)]
    finite_sct = np.nan_to_num(sct, nan=HU_MIN, posinf=HU_MAX, neginf=HU_MIN)
    stats = case_statistics(finite_sct, body)
    checks.append(_range_check("tissue_fractions", stats, ranges,
                               [f"{t}_fraction" for t in TISSUES], source))
    checks.append(_range_check("hu_statistics", stats, ranges, ["mean_hu", "median_hu"], source))
    bone_check, flagged = check_bone_outside_body(sct, body, spacing)
    checks.append(bone_check)
    outline_check, outline_disagreement = check_body_outline(
        body if mask is not None else outline, finite_sct,
        "mask" if mask is not None else f"{'CBCT' if input_kind == 'cbct' else 'MR'} outline")
    continuity, slice_mean_hu, flagged_slices = check_slice_continuity(finite_sct, body)
    alignment = check_alignment(mr, finite_sct, body, spacing)
    checks += [outline_check, continuity, alignment]
    if input_kind == "cbct":
        checks.append(check_cbct_field_of_view(mr, body, spacing))
    if outline_check["status"] != "pass" or alignment["status"] != "pass":
        flagged |= outline_disagreement
    for z in flagged_slices:
        flagged[:, :, z] |= body[:, :, z]
    if ct_to_mr is not None:
        checks.append(check_cycle(mr, finite_sct, body, ct_to_mr))
    if samples is not None or sample_std is not None:
        if samples is not None:
            spread_check, sample_std = check_sample_spread(samples, body)
        else:
            spread_check = check_spread_map(sample_std, body, n_samples)
        checks.append(spread_check)
        flagged |= body & (np.asarray(sample_std) > SPREAD_FLAG_HU)

    report = {"status": worst(c["status"] for c in checks), "checks": checks,
              "reference": source, "shape": list(mr.shape),
              "spacing_mm": [float(s) for s in spacing],
              "body": "mask" if mask is not None else f"derived from the {input_kind.upper()}",
              "input": input_kind,
              "flagged_voxels": int(flagged.sum()), "flagged_slices": flagged_slices}
    return QAResult(report, flagged, body, slice_mean_hu, flagged_slices)


def format_report(report: Mapping) -> str:
    """One line per check (``status  name  reason``) and the overall status."""
    lines = [f"{c['status']:<5} {c['name']:<18} {c['reason']}" for c in report["checks"]]
    return "\n".join(lines + [f"overall: {report['status']}"])
