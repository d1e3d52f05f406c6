"""Water-equivalent path length (WEPL): what a proton beam sees of an sCT, with no dose engine.

A proton's range is set by the integral of the relative stopping power (RSP, water = 1)
along its path. An sCT that is wrong by 200 HU over 3 cm of bone moves the Bragg peak by
millimetres even when its MAE looks good. This module integrates RSP along straight rays
from outside the patient to a target point, in the CT and in the sCT, and reports the
difference in mm: the range error a proton plan made on the sCT would carry there.

HU -> RSP: :data:`HU_TO_RSP`, a generic piecewise-linear calibration (nodes below; the
shape of the stoichiometric curves of Schneider et al. 2000 for tissue-like materials:
air 0.001, lung and fat rising to water 1.0 at 0 HU, soft tissue about 1.02-1.05,
bone rising to about 1.75 at 1500 HU and 2.5 at 3000 HU). A clinic's own scanner
calibration can be passed as ``table``. Voxels outside the body mask count as air in both
volumes (RSP 0), so couch, immobilisation and noise outside the body do not enter.

Geometry, in world (RAS+) millimetres from the volume's affine: beams lie in the axial
plane; a beam at angle ``theta`` comes from the direction ``s = (-sin theta, cos theta, 0)``
(0 deg: from anterior, 90 deg: from the patient's left, 180: posterior, 270: right, as
a gantry seen from the feet of a head-first supine patient) and travels along ``-s``.
Each ray is sampled every ``step_mm`` (default a tenth of the smallest voxel) with
trilinear interpolation of the RSP volume (linear interpolation integrates a step
between two voxels to its exact position, so an axis-aligned slab's WEPL is exact up to
the quadrature), from the target point back towards the source until it leaves the
volume, and from the target point onwards to the distal edge.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from sct_jax.errors import DataError

# (HU, RSP) nodes, linear in between, constant beyond the ends.
HU_TO_RSP = np.array([
    (-1000.0, 0.001),
    (-800.0, 0.20),   # lung
    (-100.0, 0.93),   # adipose
    (0.0, 1.00),      # water
    (100.0, 1.07),    # muscle, blood, liver
    (1500.0, 1.75),   # cortical bone
    (3000.0, 2.50),   # dense bone, dental
])
DEFAULT_ANGLES = (0.0, 90.0, 180.0, 270.0)


def hu_to_rsp(hu: np.ndarray, table: np.ndarray = HU_TO_RSP) -> np.ndarray:
    """Relative stopping power of ``hu`` by linear interpolation of ``table`` (``(N, 2)``
    HU, RSP nodes; constant beyond its ends), float32."""
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] != 2 or np.any(np.diff(table[:, 0]) <= 0):
        raise DataError("HU -> RSP table: expected (N, 2) rows of increasing HU")
    return np.interp(np.asarray(hu, np.float64), table[:, 0], table[:, 1]).astype(np.float32)


def rsp_volume(hu: np.ndarray, mask: np.ndarray, table: np.ndarray = HU_TO_RSP) -> np.ndarray:
    """``(X, Y, Z)`` float32 RSP, 0 outside the body mask (air, as in the dose comparison).

    Computed slice by slice, so the float64 temporaries stay one slice big."""
    out = np.empty(hu.shape, np.float32)
    for z in range(hu.shape[2]):
        out[:, :, z] = np.where(np.asarray(mask[:, :, z]) > 0, hu_to_rsp(hu[:, :, z], table),
                                np.float32(0.0))
    return out


def source_direction(angle_deg: float) -> np.ndarray:
    """Unit vector (RAS+) from the patient towards the beam's source at ``angle_deg``."""
    a = math.radians(angle_deg)
    return np.array([-math.sin(a), math.cos(a), 0.0])


def _to_index(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World points ``(N, 3)`` -> fractional voxel indices ``(3, N)``."""
    inverse = np.linalg.inv(affine)
    return inverse[:3, :3] @ points_mm.T + inverse[:3, 3:4]


def _line_integral(rsp: np.ndarray, affine: np.ndarray, start_mm: np.ndarray,
                   direction: np.ndarray, length_mm: float, step_mm: float) -> float:
    """Trapezoid integral of RSP from ``start_mm`` along ``direction`` for ``length_mm``."""
    if length_mm <= 0:
        return 0.0
    n = max(2, int(math.ceil(length_mm / step_mm)) + 1)
    t = np.linspace(0.0, length_mm, n)
    points = start_mm[None, :] + t[:, None] * direction[None, :]
    values = ndimage.map_coordinates(rsp, _to_index(points, affine), order=1,
                                     mode="constant", cval=0.0)
    return float(np.trapezoid(values, t))


def _exit_length(shape: Sequence[int], affine: np.ndarray) -> float:
    """A length (mm) that takes any ray from inside the volume out of it."""
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1])
                        for k in (0, shape[2])], np.float64)
    world = (affine[:3, :3] @ corners.T).T
    return float(np.linalg.norm(world.max(axis=0) - world.min(axis=0))) + 1.0


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the beams aim: a centre (RAS+ mm) and, per angle, how far beyond it the
    distal edge lies along the beam (mm)."""

    center_mm: np.ndarray
    distal_mm: dict[float, float]
    description: str


def sphere_target(center_mm: Sequence[float], radius_mm: float,
                  angles: Sequence[float] = DEFAULT_ANGLES) -> Target:
    """A sphere: its distal edge lies ``radius_mm`` beyond the centre at every angle."""
    return Target(np.asarray(center_mm, np.float64), {float(a): float(radius_mm) for a in angles},
                  f"sphere of radius {radius_mm:g} mm at {np.round(center_mm, 1).tolist()} mm")


def body_center_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The body's centre of mass in world mm."""
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        raise DataError("WEPL: empty body mask")
    centre = idx.mean(axis=0)
    return affine[:3, :3] @ centre + affine[:3, 3]


def mask_target(target: np.ndarray, affine: np.ndarray,
                angles: Sequence[float] = DEFAULT_ANGLES, step_mm: float = 0.5) -> Target:
    """A target mask: centre of mass, and per angle the last point of the central ray
    (travelling along the beam) still inside the target's voxels (their far face, to
    ``step_mm``)."""
    target = np.asarray(target) > 0
    if not target.any():
        raise DataError("WEPL: empty target mask")
    center = body_center_mm(target, affine)
    distal = {}
    length = _exit_length(target.shape, affine)
    t = np.arange(0.0, length, step_mm)
    for angle in angles:
        points = center[None, :] - t[:, None] * source_direction(angle)[None, :]
        inside = ndimage.map_coordinates(target.astype(np.float32), _to_index(points, affine),
                                         order=0, mode="constant", cval=0.0) > 0.5
        distal[float(angle)] = float(t[np.nonzero(inside)[0].max()]) if inside.any() else 0.0
    return Target(center, distal, "target mask (centre of mass, distal edge per beam)")


def wepl_to_target(rsp: np.ndarray, affine: np.ndarray, target: Target, angle: float,
                   step_mm: float | None = None) -> tuple[float, float]:
    """``(WEPL to the target centre, WEPL to its distal edge)`` in mm along the central
    ray of the beam at ``angle``."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    step = float(step_mm or spacing.min() / 10.0)
    s = source_direction(angle)
    to_center = _line_integral(rsp, affine, target.center_mm, s,
                               _exit_length(rsp.shape, affine), step)
    beyond = _line_integral(rsp, affine, target.center_mm, -s,
                            target.distal_mm.get(float(angle), 0.0), step)
    return to_center, to_center + beyond


def wepl_differences(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                     target: Target | None = None, angles: Sequence[float] = DEFAULT_ANGLES,
                     radius_mm: float = 25.0, table: np.ndarray = HU_TO_RSP,
                     step_mm: float | None = None) -> dict:
    """WEPL of CT and sCT per beam angle, and their differences.

    Args:
      ct, sct: ``(X, Y, Z)`` HU on one grid.
      mask: ``(X, Y, Z)`` body mask (outside: air in both).
      affine: ``(4, 4)`` voxel -> RAS+ mm.
      target: where the beams aim; ``None``: a sphere of ``radius_mm`` at the body's
        centre of mass.
      angles: beam angles in degrees (see the module docstring).
      table: HU -> RSP nodes.
      step_mm: ray sampling step (default a tenth of the smallest voxel size).

    Returns:
      ``{"target": description, "angles": {angle: {"ct_center", "sct_center",
      "ct_distal", "sct_distal", "diff_center", "diff_distal"}}, "mean_abs_diff_center",
      "mean_abs_diff_distal", "max_abs_diff_distal"}``, all in mm (diff = sCT - CT:
      positive means the sCT sees more water, a proton plan on it would stop short).
    """
    if ct.shape != sct.shape or ct.shape != mask.shape or ct.ndim != 3:
        raise DataError(f"WEPL: CT {ct.shape}, sCT {sct.shape} and mask {mask.shape} must "
                        "be one 3D grid")
    affine = np.asarray(affine, np.float64)
    if target is None:
        target = sphere_target(body_center_mm(mask, affine), radius_mm, angles)
    rsp_ct, rsp_sct = rsp_volume(ct, mask, table), rsp_volume(sct, mask, table)
    per_angle = {}
    for angle in angles:
        ct_c, ct_d = wepl_to_target(rsp_ct, affine, target, angle, step_mm)
        sct_c, sct_d = wepl_to_target(rsp_sct, affine, target, angle, step_mm)
        per_angle[float(angle)] = {"ct_center": ct_c, "sct_center": sct_c, "ct_distal": ct_d,
                                   "sct_distal": sct_d, "diff_center": sct_c - ct_c,
                                   "diff_distal": sct_d - ct_d}
    diffs_c = [abs(v["diff_center"]) for v in per_angle.values()]
    diffs_d = [abs(v["diff_distal"]) for v in per_angle.values()]
    return {"target": target.description, "angles": per_angle,
            "mean_abs_diff_center": float(np.mean(diffs_c)),
            "mean_abs_diff_distal": float(np.mean(diffs_d)),
            "max_abs_diff_distal": float(np.max(diffs_d))}
