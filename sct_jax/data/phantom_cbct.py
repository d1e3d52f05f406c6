"""Cone-beam CT rendered from a phantom CT: the input of the CBCT -> CT task (Task 2).

:func:`cbct_from_ct` turns a CT in HU into what a linac's cone-beam CT shows of the same
anatomy, with the artefacts that make CBCT unfit for dose calculation as it stands, each
one a documented parameter of :class:`CbctParams` that the tests measure:

1. cupping: HU lowered by ``cupping_hu * (1 - (r / R)**2)`` inside the body, ``r`` the
   distance from the field-of-view axis and ``R`` the field-of-view radius (scatter and
   beam hardening darken the middle of a wide object most);
2. low-frequency scatter shading: a smooth random field of std ``scatter_hu`` inside the
   body;
3. streaks: for each angle of ``streak_angles_deg``, the lines through dense bone in
   that direction (a ray model: path length through bone > ``streak_bone_hu`` along the
   line), ``streak_hu`` at saturation, angle ``k`` (from 0) with sign ``-(-1)**k``:
   dark, bright, dark, ...;
4. noise: Gaussian, std ``noise_hu``, slightly correlated (higher than the CT's 10-18);
5. the scanner's calibration, applied to the image with its artefacts:
   ``scale * hu + shift_hu``;
6. a cylindrical field of view about the volume's axial centre (axis along ``Z``,
   radius ``fov_radius_mm``): outside it the CBCT is exactly -1000 HU, the fill value a
   reconstruction writes where it has no data. It is set last, after the calibration:
   it is not a measurement, so the calibration does not touch it (air *inside* the
   field of view does go through the calibration, e.g. about -880 HU at scanner B);
7. integers, clipped to [-1024, 3071].

The per-centre scanners (A, B, C) differ in calibration, cupping and noise
(:func:`scanner_params`); the region sets the field of view (a pelvis is truncated
laterally, a head fits) and halves the cupping and scatter of a head. All random draws
come from the generator passed in, in a fixed order that does not depend on the
parameter values, so two renderings with one seed and different amplitudes share their
noise and scatter fields.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from sct_jax.data import phantom_shapes as shapes
from sct_jax.errors import DataError

FOV_FILL_HU = -1000.0  # what the reconstruction writes outside its field of view
HU_RANGE = (-1024, 3071)


@dataclasses.dataclass(frozen=True)
class CbctParams:
    """How a cone-beam CT scanner renders a CT; the defaults are scanner A on a pelvis.

    Attributes:
      scanner: a label recorded in the info (the centre: ``"A"``, ``"B"``, ``"C"``).
      fov_radius_mm: radius of the cylindrical field of view; ``None``: ``fov_fraction``
        of half the image's larger in-plane extent.
      fov_fraction: the default radius as a share of that half extent. 0.8: the pelvis
        phantom's body reaches ~0.89 of it laterally, so its sides are cut off, as a
        wide pelvis is in a 45-50 cm half-fan scan.
      cupping_hu: HU lost at the field-of-view axis (falls to 0 at its edge). 60 HU:
        what is left after a clinical scatter correction (uncorrected CBCT shows 100+).
      scatter_hu: std of the smooth shading field inside the body (tens of HU).
      scatter_scale_mm: its correlation length (scatter varies over centimetres).
      streak_angles_deg: in-plane directions of the streaks, degrees from +x towards
        +y; ``()`` for none; ``None``: ``streak_count`` angles drawn uniformly in
        [0, 180).
      streak_count: how many angles to draw when ``streak_angles_deg`` is ``None``.
      streak_hu: a streak's amplitude where its ray crosses much bone (50 HU: visible,
        as bone streaks are on a clinical CBCT, but below the soft-tissue contrasts).
      streak_bone_hu: the CT HU above which a voxel counts as dense (cortical bone).
      streak_path_mm: the bone path length at which a streak reaches 63% of
        ``streak_hu`` (``1 - exp(-path / streak_path_mm)``: a thin shell makes a faint
        line, a femoral head a strong one).
      noise_hu: std of the image noise (30 HU: two to three times the CT's).
      noise_corr_vox: Gaussian correlation of the noise in voxels (a reconstruction
        kernel's blur; small, so the noise stays fine-grained).
      scale, shift_hu: the scanner's calibration ``cbct = scale * hu + shift_hu``.
    """

    scanner: str = "A"
    fov_radius_mm: float | None = None
    fov_fraction: float = 0.8
    cupping_hu: float = 60.0
    scatter_hu: float = 20.0
    scatter_scale_mm: float = 50.0
    streak_angles_deg: tuple[float, ...] | None = None
    streak_count: int = 3
    streak_hu: float = 50.0
    streak_bone_hu: float = 700.0
    streak_path_mm: float = 15.0
    noise_hu: float = 30.0
    noise_corr_vox: float = 0.7
    scale: float = 1.0
    shift_hu: float = 0.0


# Three scanners, as three centres' linacs: calibration off by up to ~8% and +-40 HU,
# cupping and noise that differ with the scatter correction and the dose of each protocol.
_SCANNERS = {
    "A": CbctParams(scanner="A"),
    "B": CbctParams(scanner="B", scale=0.92, shift_hu=40.0, cupping_hu=90.0, noise_hu=40.0),
    "C": CbctParams(scanner="C", scale=1.06, shift_hu=-30.0, cupping_hu=40.0, noise_hu=25.0),
}
# Per region: the field of view (a head fits a full-fan scan, a pelvis is cut at the
# sides) and the share of cupping and scatter (a head scatters about half as much).
_REGIONS = {"pelvis": (0.8, 1.0), "brain": (1.0, 0.5)}


def scanner_params(centre: str, region: str = "pelvis") -> CbctParams:
    """The CBCT settings of ``centre``'s scanner for ``region``.

    Args:
      centre: ``"A"``, ``"B"`` or ``"C"``.
      region: ``"pelvis"`` or ``"brain"``.

    Raises:
      DataError: an unknown centre or region.
    """
    if centre not in _SCANNERS:
        raise DataError(f"CBCT scanner {centre!r}: unknown (expected one of "
                        f"{', '.join(_SCANNERS)})")
    if region not in _REGIONS:
        raise DataError(f"region {region!r}: unknown (expected one of {', '.join(_REGIONS)})")
    fraction, artefacts = _REGIONS[region]
    p = _SCANNERS[centre]
    return dataclasses.replace(p, fov_fraction=fraction, cupping_hu=p.cupping_hu * artefacts,
                               scatter_hu=p.scatter_hu * artefacts)


def fov_radius_mm(shape, spacing, params: CbctParams) -> float:
    """The field-of-view radius in mm for a volume of ``shape`` and ``spacing``."""
    if params.fov_radius_mm is not None:
        return float(params.fov_radius_mm)
    half_extent = max(shape[0] * spacing[0], shape[1] * spacing[1]) / 2.0
    return float(params.fov_fraction * half_extent)


def radius_squared(shape, spacing) -> np.ndarray:
    """Squared in-plane distance (mm^2) of each voxel centre from the volume's axial
    centre line (the field-of-view axis; :func:`phantom.affine_for`'s world origin).

    Returns:
      ``(X, Y, 1)`` float32, broadcasting over slices.
    """
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing[0]
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing[1]
    return (x[:, None] ** 2 + y[None, :] ** 2).astype(np.float32)[:, :, None]


def fov_mask(shape, spacing, radius_mm: float) -> np.ndarray:
    """``(X, Y, 1)`` bool: the voxels inside the cylindrical field of view."""
    return radius_squared(shape, spacing) <= np.float32(radius_mm) ** 2


def cbct_from_ct(ct_hu: np.ndarray, body: np.ndarray, spacing, rng: np.random.Generator,
                 params: CbctParams | None = None) -> tuple[np.ndarray, dict]:
    """Renders the cone-beam CT of a CT.

    Args:
      ct_hu: ``(X, Y, Z)`` CT in HU (best noise-free: the CBCT adds its own noise),
        axial slices along ``Z``.
      body: ``(X, Y, Z)`` bool body outline (where cupping and scatter act).
      spacing: ``(3,)`` voxel size in mm.
      rng: generator for the random angles, the scatter field and the noise (drawn in
        that order, whatever the parameters).
      params: the scanner (default :class:`CbctParams`: scanner A on a pelvis).

    Returns:
      ``(cbct, info)``: ``(X, Y, Z)`` float32 integer HU in [-1024, 3071], exactly -1000
      outside the field of view; and the JSON-ready record of the settings used (radius,
      angles, amplitudes, calibration) and ``body_outside_fov``, the share of the body
      the field of view cuts off.

    Raises:
      DataError: shapes that are not 3D or do not match, bad spacing or parameters.
    """
    p = CbctParams() if params is None else params
    ct_hu = np.asarray(ct_hu, dtype=np.float32)
    body = np.asarray(body, dtype=bool)
    spacing = tuple(float(s) for s in spacing)
    _check(ct_hu, body, spacing, p)
    shape = ct_hu.shape
    radius = fov_radius_mm(shape, spacing, p)

    drawn_angles = rng.uniform(0.0, 180.0, size=max(int(p.streak_count), 0))
    angles = [float(a) for a in (drawn_angles if p.streak_angles_deg is None
                                 else p.streak_angles_deg)]
    scatter = shapes.smooth_noise(rng, shape, p.scatter_scale_mm / np.asarray(spacing))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                                    p.noise_corr_vox)
    noise -= noise.mean()
    noise /= max(float(noise.std()), 1e-6)

    r2 = radius_squared(shape, spacing) / np.float32(radius * radius)
    inside = r2 <= 1.0
    hu = ct_hu.copy()
    hu -= body * (np.float32(p.cupping_hu) * np.maximum(1.0 - r2, 0.0))
    hu += body * (np.float32(p.scatter_hu) * scatter)
    # Streaks come from the bone of the CT itself, before any artefact.
    hu += _streaks(ct_hu, spacing, angles, p)
    hu += np.float32(p.noise_hu) * noise
    cbct = np.float32(p.scale) * hu + np.float32(p.shift_hu)
    cbct = np.where(inside, cbct, np.float32(FOV_FILL_HU))
    cbct = np.clip(np.rint(cbct), *HU_RANGE).astype(np.float32)

    outside_body = np.count_nonzero(body & ~inside)
    info = {
        "scanner": p.scanner, "fov_radius_mm": radius, "fov_fill_hu": FOV_FILL_HU,
        "cupping_hu": float(p.cupping_hu), "scatter_hu": float(p.scatter_hu),
        "scatter_scale_mm": float(p.scatter_scale_mm), "streak_angles_deg": angles,
        "streak_hu": float(p.streak_hu), "streak_bone_hu": float(p.streak_bone_hu),
        "streak_path_mm": float(p.streak_path_mm), "noise_hu": float(p.noise_hu),
        "noise_corr_vox": float(p.noise_corr_vox), "scale": float(p.scale),
        "shift_hu": float(p.shift_hu),
        "body_outside_fov": float(outside_body / max(np.count_nonzero(body), 1)),
    }
    return cbct, info


def _check(ct_hu: np.ndarray, body: np.ndarray, spacing, p: CbctParams) -> None:
    """Raises :class:`DataError` for inputs :func:`cbct_from_ct` cannot render."""
    if ct_hu.ndim != 3 or body.shape != ct_hu.shape:
        raise DataError(f"CBCT rendering: need a 3D CT and a body mask of its shape, got "
                        f"{ct_hu.shape} and {body.shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"CBCT rendering: spacing {spacing}: need 3 sizes > 0 mm")
    radius = fov_radius_mm(ct_hu.shape, spacing, p)
    if not (np.isfinite(radius) and radius > 0):
        raise DataError(f"CBCT rendering: field-of-view radius {radius} mm: must be > 0")
    if not (np.isfinite(p.scale) and p.scale > 0):
        raise DataError(f"CBCT rendering: calibration scale {p.scale}: must be > 0")
    amplitudes = (p.cupping_hu, p.scatter_hu, p.streak_hu, p.noise_hu, p.noise_corr_vox)
    if not all(np.isfinite(a) and a >= 0 for a in amplitudes):
        raise DataError("CBCT rendering: cupping, scatter, streak and noise amplitudes "
                        f"must be >= 0, got {amplitudes[:4]}")
    if not (p.scatter_scale_mm > 0 and p.streak_path_mm > 0):
        raise DataError("CBCT rendering: scatter_scale_mm and streak_path_mm must be > 0")


def _streaks(ct_hu: np.ndarray, spacing, angles, p: CbctParams) -> np.ndarray:
    """The streak field: per slice and angle, bone projected along the angle's rays and
    smeared back along them.

    For angle ``theta`` a ray is the line of direction ``(cos theta, sin theta)`` at
    signed offset ``s = -x sin theta + y cos theta``. The bone path length of each ray
    (1 mm bins) becomes ``-(-1)**k * streak_hu * (1 - exp(-path / streak_path_mm))`` on
    every voxel of that ray.

    Returns:
      ``(X, Y, Z)`` float32 HU to add (zeros without angles or amplitude).
    """
    shape = ct_hu.shape
    streaks = np.zeros(shape, dtype=np.float32)
    if not angles or p.streak_hu == 0.0:
        return streaks
    bone = ct_hu > p.streak_bone_hu
    if not bone.any():
        return streaks
    x = ((np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing[0])[:, None]
    y = ((np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing[1])[None, :]
    bin_mm = min(spacing[0], spacing[1])
    # A voxel's area spread over one bin's width is the path length it adds to that ray.
    path_per_voxel = spacing[0] * spacing[1] / bin_mm
    n_slices = shape[2]
    bone_flat = bone.reshape(-1, n_slices)  # (X*Y, Z): one column per slice
    for k, angle in enumerate(angles):
        theta = np.radians(angle)
        s = -x * np.sin(theta) + y * np.cos(theta)
        position = (s - s.min()) / bin_mm  # (X, Y) continuous bin coordinate
        nearest = np.rint(position).astype(np.int64).ravel()
        n_bins = int(nearest.max()) + 1
        # One bincount for all slices: index = bin * Z + slice.
        index = (nearest[:, None] * n_slices + np.arange(n_slices)[None, :])[bone_flat]
        path = np.bincount(index, minlength=n_bins * n_slices).reshape(n_bins, n_slices)
        strength = 1.0 - np.exp(-path * (path_per_voxel / p.streak_path_mm))
        # Linear interpolation between bins, so oblique lines are not jagged.
        low = np.minimum(np.floor(position).astype(np.int64), n_bins - 1)
        high = np.minimum(low + 1, n_bins - 1)
        w = (position - low)[:, :, None]
        ray = (1.0 - w) * strength[low] + w * strength[high]  # (X, Y, Z)
        streaks += np.float32(-((-1) ** k) * p.streak_hu) * ray.astype(np.float32)
    return streaks
