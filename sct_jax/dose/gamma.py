"""The gamma index (Low et al. 1998): dose difference and distance to agreement combined.

For each reference voxel ``r`` above the low-dose cut-off, gamma is the smallest value of
``sqrt((|D_eval(r + d) - D_ref(r)| / dD)^2 + (|d| / DTA)^2)`` over all displacements
``d``, with ``dD`` the dose-difference criterion (``dose_percent`` of a global
normalisation value, by default the reference maximum) and ``DTA`` the
distance-to-agreement criterion in mm. A voxel passes when gamma <= 1.

The search follows the one of ``pymedphys.gamma`` (Biggs; Wendling et al. 2007), so the two
agree to a fraction of a percentage point of pass rate: displacements are sampled on
spherical shells of growing radius, ``DTA / interp_fraction`` apart (the radius ``DTA``
itself is always visited), with points on a shell no further apart than that step; the
evaluation dose is interpolated trilinearly between its voxels (finer than the grid), and
counts as infinitely different outside the grid. A voxel stops searching once the shell
radius alone gives a gamma larger than the best one it has (``radius / DTA``), and the
search ends at ``DTA * max_gamma``: a value above ``max_gamma`` is the best one found
by then, an upper bound of the true gamma, which is larger than ``max_gamma`` (unlike
pymedphys, no clipping to ``max_gamma``, so a pass rate is exact for any
``max_gamma >= 1``, and 1 is the cheapest).

Vectorised with numpy/scipy: per shell, the voxels still searching are processed in
chunks of at most ``max_elements`` interpolated points, so the memory stays bounded
(about 60 bytes per point) whatever the volume size.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from sct_jax.errors import DataError

# Interpolated points per chunk: 2**21 points take about 130 MB of temporaries.
DEFAULT_MAX_ELEMENTS = 2 ** 21


def shell_offsets(radius_mm: float, step_mm: float) -> np.ndarray:
    """Points on a sphere of ``radius_mm`` no more than about ``step_mm`` apart.

    Rings of constant elevation, ``ceil(pi r / step) + 1`` of them from pole to pole,
    each with ``ceil(2 pi r sin(elevation) / step) + 1`` points evenly spread in azimuth
    (the pole rings are single points). Radius 0 is the single point at the centre.

    Returns:
      ``(K, 3)`` float64 offsets in mm.
    """
    if radius_mm <= 0:
        return np.zeros((1, 3))
    elevation = np.linspace(0.0, np.pi, int(math.ceil(np.pi * radius_mm / step_mm)) + 1)
    rings = []
    for phi in elevation:
        ring_radius = radius_mm * math.sin(phi)
        count = int(math.ceil(2.0 * np.pi * ring_radius / step_mm)) + 1
        azimuth = np.linspace(0.0, 2.0 * np.pi, count + 1)[:-1]
        rings.append(np.stack([ring_radius * np.cos(azimuth), ring_radius * np.sin(azimuth),
                               np.full(count, radius_mm * math.cos(phi))], axis=1))
    return np.concatenate(rings, axis=0)


def _search_radii(dta_mm: float, step_mm: float, max_gamma: float):
    """Shell radii 0, step, 2 step, ... up to ``dta * max_gamma``, with ``dta`` itself
    visited exactly (the step widens past the criterion as pymedphys's does)."""
    radius, forced = 0.0, [dta_mm]
    limit = dta_mm * max_gamma
    while radius <= limit:
        yield radius
        # Far shells matter only for large gammas, whose precision can be coarser.
        radius += max(step_mm, radius * step_mm / dta_mm / max_gamma)
        if forced and radius >= forced[0]:
            radius = forced.pop(0)


def gamma_index(reference: np.ndarray, evaluation: np.ndarray, spacing: Sequence[float],
                dose_percent: float = 2.0, dta_mm: float = 2.0, cutoff_percent: float = 10.0,
                normalisation: float | None = None, interp_fraction: int = 10,
                max_gamma: float = 2.0, skip_once_passed: bool = False,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Global 3D gamma of ``evaluation`` against ``reference`` on one grid.

    Args:
      reference: ``(X, Y, Z)`` reference dose (Gy), e.g. computed on the CT.
      evaluation: ``(X, Y, Z)`` evaluated dose (Gy) on the same grid, e.g. on the sCT.
      spacing: voxel size (mm) along the three array axes.
      dose_percent: dose-difference criterion, % of ``normalisation``.
      dta_mm: distance-to-agreement criterion (mm).
      cutoff_percent: reference voxels below this % of ``normalisation`` get no gamma.
      normalisation: the global reference value (Gy); default the reference maximum.
      interp_fraction: search step = ``dta_mm / interp_fraction``.
      max_gamma: the search stops at ``dta_mm * max_gamma``; a value above it is an
        upper bound of a gamma known to exceed ``max_gamma``.
      skip_once_passed: stop searching a voxel once its gamma is <= 1 (its value is then
        an upper bound <= 1): the pass rate is unchanged and comes much faster.
      max_elements: interpolated points per chunk (bounds the memory).

    Returns:
      ``(X, Y, Z)`` float64 gamma; NaN below the cut-off (and everywhere when no voxel
      reaches it).

    Raises:
      DataError: shapes differ, non-finite doses, non-positive criteria or spacing.
    """
    reference = np.asarray(reference, np.float64)
    evaluation = np.asarray(evaluation, np.float64)
    spacing = np.asarray(spacing, np.float64)
    if reference.shape != evaluation.shape or reference.ndim != 3:
        raise DataError(f"gamma: reference {reference.shape} and evaluation "
                        f"{evaluation.shape} must be one 3D grid")
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise DataError(f"gamma: voxel spacing {spacing.tolist()} must be 3 positive sizes")
    if min(dose_percent, dta_mm, interp_fraction, max_gamma) <= 0:
        raise DataError("gamma: dose_percent, dta_mm, interp_fraction and max_gamma must "
                        "be > 0")
    if not (np.all(np.isfinite(reference)) and np.all(np.isfinite(evaluation))):
        raise DataError("gamma: non-finite dose values")
    norm = float(reference.max() if normalisation is None else normalisation)
    if norm <= 0:
        raise DataError(f"gamma: normalisation dose {norm:g} must be > 0")
    dose_criterion = dose_percent / 100.0 * norm
    gamma = np.full(reference.shape, np.nan)
    points = np.argwhere(reference >= cutoff_percent / 100.0 * norm)  # (N, 3) voxel indices
    if len(points) == 0:
        return gamma
    ref_values = reference[tuple(points.T)]
    best = np.full(len(points), np.inf)
    searching = np.arange(len(points))
    step = dta_mm / interp_fraction
    for radius in _search_radii(dta_mm, step, max_gamma):
        offsets = shell_offsets(radius, step) / spacing[None, :]  # (K, 3) in voxels
        min_diff = _min_abs_difference(evaluation, points[searching], ref_values[searching],
                                       offsets, max_elements)
        candidate = np.sqrt((min_diff / dose_criterion) ** 2 + (radius / dta_mm) ** 2)
        best[searching] = np.minimum(best[searching], candidate)
        # Further shells cannot beat radius / DTA: only voxels with a larger gamma go on.
        keep = best[searching] > radius / dta_mm
        if skip_once_passed:
            keep &= best[searching] > 1.0
        searching = searching[keep]
        if len(searching) == 0:
            break
    gamma[tuple(points.T)] = best
    return gamma


def _min_abs_difference(evaluation: np.ndarray, points: np.ndarray, ref_values: np.ndarray,
                        offsets: np.ndarray, max_elements: int) -> np.ndarray:
    """``min over offsets |eval(point + offset) - ref|`` per point; ``inf`` where every
    offset falls outside the grid. ``points`` ``(M, 3)`` int, ``offsets`` ``(K, 3)``
    voxel units."""
    out = np.empty(len(points))
    per_chunk = max(1, max_elements // len(offsets))
    for start in range(0, len(points), per_chunk):
        chunk = points[start:start + per_chunk].astype(np.float64)
        coords = (chunk[None, :, :] + offsets[:, None, :]).reshape(-1, 3).T  # (3, K * m)
        # mode="constant": points beyond the outer voxel centres get NaN (no extrapolation).
        values = ndimage.map_coordinates(evaluation, coords, order=1, mode="constant",
                                         cval=np.nan, prefilter=False)
        diff = np.abs(values.reshape(len(offsets), len(chunk))
                      - ref_values[start:start + per_chunk][None, :])
        diff[np.isnan(diff)] = np.inf
        out[start:start + per_chunk] = diff.min(axis=0)
    return out


def pass_rate(gamma: np.ndarray) -> float:
    """Percentage of the evaluated voxels (not NaN) with gamma <= 1; NaN when none."""
    valid = gamma[~np.isnan(gamma)]
    return float(100.0 * np.mean(valid <= 1.0)) if valid.size else float("nan")


def gamma_pass_rate(reference: np.ndarray, evaluation: np.ndarray, spacing: Sequence[float],
                    dose_percent: float = 2.0, dta_mm: float = 2.0,
                    cutoff_percent: float = 10.0, normalisation: float | None = None,
                    **kwargs) -> float:
    """:func:`gamma_index` reduced to its pass rate (%); same arguments. A pass rate needs
    no search beyond the criterion nor past a pass, so ``max_gamma`` defaults to 1 and
    ``skip_once_passed`` to True."""
    kwargs.setdefault("max_gamma", 1.0)
    kwargs.setdefault("skip_once_passed", True)
    return pass_rate(gamma_index(reference, evaluation, spacing, dose_percent, dta_mm,
                                 cutoff_percent, normalisation, **kwargs))
