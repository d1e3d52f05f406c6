"""The built-in phantom dataset: procedural pelvis and head MR/CT and CBCT/CT pairs, no
download needed.

Writes the SynthRAD2023 layouts so everything downstream runs on them unchanged::

    python -m sct_jax.data.phantom --out data/phantom --region pelvis --cases 20 --seed 0 \\
        [--task 2] [--misalign 4] [--anatomy-variation 0.2] [--shape 256 160 64] \\
        [--panel docs/images/phantom_pelvis.png]

(the command line: :mod:`sct_jax.data.phantom_cli`)

gives ``data/phantom/Task1/pelvis/<id>/{mr,ct,mask}.nii.gz`` (ids like ``1PA001``: task
1, P(elvis)/B(rain), centre A/B/C, number) and ``manifest.json`` next to the cases; with
``--task 2``, ``data/phantom/Task2/pelvis/<id>/{cbct,ct,mask}.nii.gz`` (ids ``2PA001``):
a cone-beam CT of the day of treatment in place of the MR (no MR is written).

Each case draws a random anatomy (:mod:`sct_jax.data.phantom_anatomy`; with
``anatomy_variation`` < 1 drawn closer to the population's middle, as data registered to
an atlas are, where the mean training CT is a strong baseline), renders the CT
in HU (tissue values, texture, partial volume, noise) and a T1-weighted MR (cortical bone
and air both dark, fat and marrow bright, bias field, Rician noise, per-centre gain,
offset and contrast), then moves the MR against the CT by a rigid transform plus a
smooth elastic field whose size is set by ``misalign_mm`` (0: perfectly aligned); the
displacement actually applied inside the body is measured and recorded. With
``aligned_fraction`` (:func:`write_dataset`) a well-registered minority of the cases
(that share, chosen by the seed) gets no motion at all and the rest the configured
level, so a method that looks for well-registered cases (seed 02's meta-validation:
top 11% by mutual information) has some to find; the manifest records each case's
level and whether it is aligned. Every case folder also holds the CT as the MR sees it:
``ct_aligned`` and ``mask_aligned`` (the CT and body mask moved by the MR's
displacement, noise added after the move; equal to ``ct`` and ``mask`` for an aligned
case), the reference to score an sCT against, and ``ct_ideal`` (the same without CT
noise: the prediction of a perfect model, whose score is the floor). Generation is
deterministic: the same seed gives byte-identical arrays. The direction of the
misalignment does not depend on its size, so one seed at 0, 4 and 8 mm gives the same
motion, scaled.

Task 2 (CBCT -> CT): the same anatomy and CT; the CBCT is rendered by
:func:`sct_jax.data.phantom_cbct.cbct_from_ct` from the noise-free CT in the moved frame
(``ct_ideal``; ``misalign_mm`` is then the residual motion between the planning CT and
the CBCT), with the scanner of the case's centre (calibration, cupping, scatter,
streaks, noise, a cylindrical field of view that cuts a pelvis at the sides) and a
random stream of its own, so Task 1 cases are unchanged. Its masks (``mask``,
``mask_aligned``) are limited to that field of view: outside it the CBCT holds no data
(-1000 HU), so nothing there is trained on or scored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from sct_jax.data import phantom_anatomy as anatomy
from sct_jax.data import phantom_cbct
from sct_jax.data import phantom_shapes as shapes
from sct_jax.data.io import atomic_write_text, save_volume
from sct_jax.errors import DataError

REGIONS = ("pelvis", "brain")
SPACING_MM = {"pelvis": (1.0, 1.0, 2.5), "brain": (1.0, 1.0, 1.0)}
DEFAULT_SHAPE = {"pelvis": (256, 160, 64), "brain": (128, 160, 128)}
MIN_SHAPE = (16, 16, 4)
CENTRES = "ABC"
_REGION_CODE = {"pelvis": 1, "brain": 2}
TASKS = (1, 2)  # SynthRAD2023: 1 MR -> CT, 2 CBCT -> CT
_STREAM_ANATOMY, _STREAM_APPEARANCE, _STREAM_MOTION, _STREAM_CBCT = 0, 1, 2, 3
_PARTIAL_VOLUME_VOX = (0.6, 0.6, 0.5)  # tissue borders blur by this much before sampling

# Per tissue (index = anatomy label): CT mean HU, CT texture std, case-to-case CT spread,
# T1 signal relative to fat, T1 texture std (cortical bone and air are both void in MR).
_TISSUE_TABLE = np.array([
    # ct_hu, ct_tex, ct_jitter, t1, t1_tex
    [-1000.0, 0.0, 0.0, 0.00, 0.00],   # air, bowel gas, sinuses: void in MR
    [-100.0, 10.0, 8.0, 1.00, 0.04],   # fat: bright
    [50.0, 8.0, 5.0, 0.32, 0.03],      # muscle / skin: low-intermediate
    [8.0, 3.0, 3.0, 0.10, 0.01],       # fluid (urine, vitreous): dark
    [-40.0, 90.0, 20.0, 0.30, 0.10],   # stool: mottled
    [260.0, 70.0, 40.0, 0.80, 0.08],   # cancellous bone with fatty marrow: bright
    [1500.0, 150.0, 120.0, 0.04, 0.01],  # cortical bone: void, like air
    [650.0, 120.0, 60.0, 0.65, 0.08],  # diploe
    [10.0, 3.0, 2.0, 0.08, 0.01],      # CSF: dark
    [40.0, 3.0, 2.0, 0.48, 0.02],      # grey matter
    [27.0, 3.0, 2.0, 0.68, 0.02],      # white matter: brighter than grey in T1
    [40.0, 6.0, 4.0, 0.40, 0.04],      # organ (prostate, bowel wall, septum)
], dtype=np.float32)

# Scanner differences between centres: T1 signal s -> gain * s**gamma + offset.
_CENTRE_SCALING = {"A": (1000.0, 0.0, 1.0), "B": (1600.0, 30.0, 0.8), "C": (700.0, 0.0, 1.25)}


def case_id(region: str, index: int, task: int = 1) -> tuple[str, str]:
    """The SynthRAD-style id and centre of case ``index`` (0-based): ``("1PA001", "A")``
    (``"2PA001"`` for task 2)."""
    centre = CENTRES[index % len(CENTRES)]
    return f"{int(task)}{region[0].upper()}{centre}{index + 1:03d}", centre


def _check_args(region, index, seed, misalign_mm, shape, task=1) -> tuple[int, ...]:
    """Validates the arguments of :func:`generate_case`; returns the shape to use."""
    if task not in TASKS:
        raise DataError(f"task {task!r}: unknown (expected 1 (MR -> CT) or 2 (CBCT -> CT))")
    if region not in REGIONS:
        raise DataError(f"region {region!r}: unknown (expected one of {', '.join(REGIONS)})")
    if not 0 <= int(index) <= 998:
        raise DataError(f"case index {index}: out of range 0..998 (ids have 3 digits)")
    if int(seed) < 0:
        raise DataError(f"seed {seed}: must be >= 0")
    if not (np.isfinite(misalign_mm) and 0.0 <= misalign_mm <= 50.0):
        raise DataError(f"misalign {misalign_mm} mm: must be in [0, 50]")
    shape = DEFAULT_SHAPE[region] if shape is None else tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n < m for n, m in zip(shape, MIN_SHAPE)):
        raise DataError(f"shape {shape}: need 3 sizes of at least {MIN_SHAPE}")
    return shape


def _check_variation(anatomy_variation: float) -> float:
    value = float(anatomy_variation)
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise DataError(f"anatomy variation {anatomy_variation}: must be in [0, 1]")
    return value


def _rng(seed: int, region: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), _REGION_CODE[region], int(index), stream]))


def affine_for(shape, spacing) -> np.ndarray:
    """A RAS+ voxel -> mm affine with the volume centred on the world origin; ``(4, 4)``."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return affine


def generate_case(region: str, index: int, seed: int, misalign_mm: float = 0.0,
                  shape=None, task: int = 1, anatomy_variation: float = 1.0) -> dict:
    """One phantom case.

    Args:
      region: ``"pelvis"`` or ``"brain"``.
      index: 0-based case number (sets the id and centre; varies the anatomy).
      seed: dataset seed (>= 0).
      misalign_mm: scale of the MR-to-CT (task 2: CBCT-to-CT) misalignment in mm
        (0 = aligned).
      shape: ``(X, Y, Z)`` voxels (default :data:`DEFAULT_SHAPE`); the anatomy is
        stretched to the field of view.
      task: 1 (MR -> CT) or 2 (CBCT -> CT: ``cbct`` in place of ``mr``; the same
        anatomy and CT as task 1's case of this index and seed).
      anatomy_variation: in [0, 1], how far each case's anatomy strays from the
        population's middle (:class:`phantom_anatomy.Variation`): 1 the full
        population, about 0.2 data registered to an atlas, 0 one anatomy for every case
        (appearance, noise and motion still vary).

    Returns:
      ``dict(mr, ct, mask, labels, affine, info)`` (task 2: ``cbct`` in place of ``mr``):

      - ``mr``: ``(X, Y, Z)`` float32, integer scanner units in [0, 32767];
      - ``cbct`` (task 2): ``(X, Y, Z)`` float32 integer HU in [-1024, 3071], -1000
        outside the cylindrical field of view, in the moved frame (like ``ct_aligned``);
      - ``ct``: ``(X, Y, Z)`` float32, integer HU in [-1024, 3071];
      - ``mask``: ``(X, Y, Z)`` uint8 body mask (dilated ~3 mm) on the CT grid;
      - ``labels``: ``(X, Y, Z)`` uint8 tissue classes of the CT
        (:data:`phantom_anatomy.TISSUE_NAMES`), for tests and analysis;
      - ``affine``: ``(4, 4)`` voxel -> RAS+ mm, volume centred on the origin;
      - ``info``: the JSON-ready record written to the manifest (task 2: ``task`` and
        the CBCT's settings, ``cbct``, in place of ``mr_scaling``);
      - ``ct_aligned``, ``mask_aligned``: the CT (noise added after the move) and body
        mask in the MR's frame, like ``ct`` and ``mask``; ``ct_ideal``: ``ct_aligned``
        without CT noise (a perfect model's sCT). Task 2: both masks are limited to
        the CBCT's field of view.

    Raises:
      DataError: unknown region or task, bad index, seed, misalignment, shape or
        anatomy variation.
    """
    shape = _check_args(region, index, seed, misalign_mm, shape, task)
    variation = _check_variation(anatomy_variation)
    spacing = SPACING_MM[region]
    grid = anatomy.make_grid(region, shape, spacing)
    build = anatomy.build_pelvis if region == "pelvis" else anatomy.build_brain
    anatomy_rng = _rng(seed, region, index, _STREAM_ANATOMY)
    # A gentler bend for the head: a skull is smoother than a pelvic outline.
    amplitude, cell = (2.0, 18.0) if region == "pelvis" else (0.8, 30.0)
    labels, body = _organic_warp(*build(grid, anatomy.Variation(anatomy_rng, variation)),
                                 grid, anatomy_rng, variation * amplitude, cell)

    rng = _rng(seed, region, index, _STREAM_APPEARANCE)
    table = _TISSUE_TABLE.copy()
    table[:, 0] += table[:, 2] * rng.standard_normal(len(table)).astype(np.float32)
    table[:, 3] *= 1.0 + 0.05 * rng.standard_normal(len(table)).astype(np.float32)
    # One texture field for both modalities: the same trabeculae show in CT and MR.
    texture = _unit_field(ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), (0.8, 0.8, 0.5)))
    ct_clean, ct_noise, ct_noise_hu = _render_ct(labels, table, texture, rng)
    ct = _quantize_ct(ct_clean + ct_noise)
    t1 = np.maximum(table[labels, 3] + table[labels, 4] * texture, 0.0)
    t1 = ndimage.gaussian_filter(t1, _PARTIAL_VOLUME_VOX)
    motion = _misalignment(_rng(seed, region, index, _STREAM_MOTION), shape, spacing,
                           float(misalign_mm), body)
    if motion["field"] is not None:
        t1 = ndimage.map_coordinates(t1, motion["field"], order=1, mode="nearest",
                                     output=np.float32)
        ct_clean = ndimage.map_coordinates(ct_clean, motion["field"], order=1,
                                           mode="nearest", output=np.float32)
        body_seen = ndimage.map_coordinates(body.astype(np.float32), motion["field"],
                                            order=1, mode="nearest") >= 0.5
    else:
        body_seen = body
    # The CT the MR shows (the MR's frame), with the noise of the scanner's CT added
    # after the move: the reference an sCT is scored against, and its noise-free form.
    ct_aligned, ct_ideal = _quantize_ct(ct_clean + ct_noise), _quantize_ct(ct_clean)
    case, centre = case_id(region, index, task)
    if task == 1:
        name, (image, scaling) = "mr", _render_mr(t1, centre, rng, spacing)
    else:  # the day's CBCT of the moved anatomy; its own stream leaves task 1 unchanged
        name, (image, cbct_info) = "cbct", phantom_cbct.cbct_from_ct(
            ct_clean, body_seen, spacing, _rng(seed, region, index, _STREAM_CBCT),
            phantom_cbct.scanner_params(centre, region))

    xy_steps = max(1, int(round(3.0 / spacing[0])))  # dilate ~3 mm in-plane
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    mask, mask_aligned = (
        ndimage.binary_dilation(b, in_plane, iterations=xy_steps).astype(np.uint8)
        for b in (body, body_seen))
    if task == 2:  # no CBCT data outside its field of view: nothing to learn or score
        fov = phantom_cbct.fov_mask(shape, spacing, cbct_info["fov_radius_mm"])
        mask, mask_aligned = mask * fov, mask_aligned * fov
    info = {
        "id": case, "centre": centre, "index": int(index), "seed": int(seed),
        "region": region, "shape": list(shape), "spacing_mm": list(spacing),
        "misalign_mm": float(misalign_mm), "anatomy_variation": variation,
        "rotation_deg": motion["rotation_deg"], "translation_mm": motion["translation_mm"],
        "elastic_amplitude_mm": motion["elastic_mm"],
        "displacement_mm": motion["displacement_mm"],
    }
    info.update({"mr_scaling": scaling, "ct_noise_hu": ct_noise_hu} if task == 1 else
                {"task": 2, "ct_noise_hu": ct_noise_hu, "cbct": cbct_info})
    return {name: image, "ct": ct, "mask": mask, "labels": labels,
            "affine": affine_for(shape, spacing), "info": info, "ct_aligned": ct_aligned,
            "mask_aligned": mask_aligned, "ct_ideal": ct_ideal}


def _render_ct(labels, table, texture, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """CT in HU: tissue values + texture, blurred borders; and its correlated noise.

    Returns:
      ``(clean, noise, noise_std_hu)``: ``(X, Y, Z)`` float32 fields; the scanner's CT
      is :func:`_quantize_ct` of ``clean + noise``.
    """
    clean = ndimage.gaussian_filter(table[labels, 0] + table[labels, 1] * texture,
                                    _PARTIAL_VOLUME_VOX)
    noise_hu = float(rng.uniform(10.0, 18.0))
    noise = noise_hu * _unit_field(ndimage.gaussian_filter(
        rng.standard_normal(labels.shape, dtype=np.float32), 0.5))
    return clean, noise, noise_hu


def _quantize_ct(ct: np.ndarray) -> np.ndarray:
    """Integer HU in [-1024, 3071], float32, as a scanner writes them."""
    return np.clip(np.rint(ct), -1024, 3071).astype(np.float32)


def _render_mr(t1, centre, rng, spacing) -> tuple[np.ndarray, dict]:
    """Scanner MR from relative T1 signal: centre contrast, bias field, Rician noise.

    Args:
      t1: ``(X, Y, Z)`` float32 relative T1 signal (fat ~1, bone and air ~0).
      centre: ``"A"``, ``"B"`` or ``"C"`` (gain, offset and contrast exponent).
      rng: appearance generator.
      spacing: voxel size in mm (the bias field varies over ~60 mm).

    Returns:
      ``(mr, scaling)``: ``(X, Y, Z)`` float32 integers in [0, 32767] and the record of
      gain, offset, gamma and noise std.
    """
    gain, offset, gamma = _CENTRE_SCALING[centre]
    gain *= float(rng.uniform(0.9, 1.1))
    bias = np.exp(rng.uniform(0.1, 0.2) * shapes.smooth_noise(
        rng, t1.shape, 60.0 / np.asarray(spacing)))
    signal = gain * bias * np.power(t1, gamma, dtype=np.float32)
    sigma = gain * float(rng.uniform(0.015, 0.025))
    real = signal + sigma * rng.standard_normal(t1.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(t1.shape, dtype=np.float32)
    # Rician magnitude, kept as integers like scanner output (lossless as int16).
    mr = np.clip(np.rint(np.sqrt(real * real + imag * imag) + offset), 0, 32767)
    return mr.astype(np.float32), {"gain": gain, "offset": offset, "gamma": gamma,
                                   "noise": sigma}


def _organic_warp(labels: np.ndarray, body: np.ndarray, grid: shapes.Grid,
                  rng: np.random.Generator, amplitude: float = 2.0,
                  cell: float = 18.0) -> tuple[np.ndarray, np.ndarray]:
    """Bends the ellipsoidal anatomy with a smooth random displacement.

    Args:
      labels: ``(X, Y, Z)`` uint8 tissue labels (< 128).
      body: ``(X, Y, Z)`` bool body outline.
      grid: the design grid.
      rng: generator for the displacement.
      amplitude: RMS displacement per axis in design mm.
      cell: correlation length in design mm.

    Returns:
      The warped ``(labels, body)`` (nearest-neighbour resampling keeps labels discrete).
    """
    packed = labels | (body.astype(np.uint8) << 7)  # one resampling for both
    cell_vox = cell / grid.voxel
    coords = []
    for axis in range(3):
        shift = shapes.smooth_noise(rng, grid.shape, cell_vox)
        shift *= np.float32(amplitude / grid.voxel[axis])
        index = np.arange(grid.shape[axis], dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(3)])
        coords.append(shift + index)
    packed = ndimage.map_coordinates(packed, coords, order=0, mode="nearest")
    return packed & 127, packed >= 128


def _unit_field(field: np.ndarray) -> np.ndarray:
    """``field`` rescaled to zero mean and unit standard deviation (in place)."""
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _rotation(angles_deg) -> np.ndarray:
    """``(3, 3)`` rotation about x, then y, then z by ``angles_deg``."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _misalignment(rng, shape, spacing, misalign_mm, body) -> dict:
    """A rigid + elastic displacement of the MR relative to the CT.

    The unit draws come first and do not depend on ``misalign_mm``, so the same seed
    gives the same motion at every magnitude. The MR is resampled at ``p + u(p)``:
    rotation about the volume centre (std ``0.25 * misalign_mm`` degrees per axis),
    translation (std ``0.5 * misalign_mm`` mm per axis) and a smooth elastic field
    (correlation ~40 mm, RMS ``0.5 * misalign_mm`` mm).

    Returns:
      dict with ``field`` (``(3, X, Y, Z)`` float32 voxel sampling coordinates, or None
      when there is no motion), the parameters, and ``displacement_mm`` (mean and max of
      ``|u|`` over the body).
    """
    rotation_unit, translation_unit = rng.standard_normal(3), rng.standard_normal(3)
    rotation_deg = 0.25 * misalign_mm * rotation_unit
    translation_mm = 0.5 * misalign_mm * translation_unit
    elastic_mm = 0.5 * misalign_mm
    record = {"rotation_deg": [float(v) for v in rotation_deg],
              "translation_mm": [float(v) for v in translation_mm],
              "elastic_mm": float(elastic_mm),
              "displacement_mm": {"mean": 0.0, "max": 0.0}, "field": None}
    if misalign_mm == 0.0:
        return record
    spacing = np.asarray(spacing, dtype=np.float64)
    coords = [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32).reshape(
        [-1 if a == axis else 1 for a in range(3)])
        for axis, (n, s) in enumerate(zip(shape, spacing))]
    rot_minus_eye = (_rotation(rotation_deg) - np.eye(3)).astype(np.float32)
    cell = 40.0 / spacing
    field, magnitude_sq = [], np.zeros(shape, dtype=np.float32)
    for a in range(3):
        u = shapes.smooth_noise(rng, shape, cell) * np.float32(elastic_mm / np.sqrt(3.0))
        u += np.float32(translation_mm[a]) + sum(rot_minus_eye[a, b] * coords[b] for b in range(3))
        magnitude_sq += u * u
        field.append((coords[a] + u) / np.float32(spacing[a]) + np.float32((shape[a] - 1) / 2.0))
    magnitude = np.sqrt(magnitude_sq[body])
    record["displacement_mm"] = {"mean": float(magnitude.mean()), "max": float(magnitude.max())}
    record["field"] = np.stack(field)
    return record


def aligned_indices(region: str, cases: int, seed: int, aligned_fraction: float) -> list[int]:
    """The cases of a dataset that get no misalignment: ``round(fraction * cases)`` of
    them (halves up), chosen by the dataset seed, sorted."""
    if not (np.isfinite(aligned_fraction) and 0.0 <= aligned_fraction <= 1.0):
        raise DataError(f"aligned fraction {aligned_fraction}: must be in [0, 1]")
    count = int(np.floor(aligned_fraction * int(cases) + 0.5))
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(seed), _REGION_CODE[region], 999_999, _STREAM_MOTION]))
    return sorted(int(i) for i in rng.permutation(int(cases))[:count])



def write_dataset(out, region: str, cases: int, seed: int, misalign_mm: float = 0.0,
                  shape=None, aligned_fraction: float = 0.0, task: int = 1,
                  anatomy_variation: float = 1.0) -> Path:
    """Writes ``cases`` phantom cases and a manifest in the SynthRAD2023 layout.

    Args:
      out: dataset root; cases go to ``out/Task1/<region>/<id>/{mr,ct,mask}.nii.gz``
        (task 2: ``out/Task2/<region>/<id>/{cbct,ct,mask}.nii.gz``, no MR), each with
        ``ct_aligned``, ``mask_aligned`` and ``ct_ideal`` beside them.
      region, seed, misalign_mm, shape, task, anatomy_variation: as in
        :func:`generate_case`.
      cases: number of cases (1..999).
      aligned_fraction: share of the cases generated with no misalignment (a
        well-registered minority, :func:`aligned_indices`); the others get
        ``misalign_mm``.

    Returns:
      The region folder ``out/Task<task>/<region>``.

    Raises:
      DataError: bad arguments, or an unwritable output folder.
    """
    if not 1 <= int(cases) <= 999:
        raise DataError(f"cases {cases}: must be in 1..999")
    shape = _check_args(region, 0, seed, misalign_mm, shape, task)
    variation = _check_variation(anatomy_variation)
    aligned = set(aligned_indices(region, cases, seed, aligned_fraction))
    region_dir = Path(out) / f"Task{task}" / region
    try:
        region_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{region_dir}: cannot create the output folder ({e.strerror})") from e
    records = []
    for index in range(int(cases)):
        case = generate_case(region, index, seed, 0.0 if index in aligned else misalign_mm,
                             shape, task, variation)
        case_dir = region_dir / case["info"]["id"]
        for name in ("mr" if task == 1 else "cbct", "ct", "ct_aligned", "ct_ideal"):
            save_volume(case_dir / f"{name}.nii.gz", case[name], case["affine"],
                        dtype=np.int16)
        for name in ("mask", "mask_aligned"):
            save_volume(case_dir / f"{name}.nii.gz", case[name], case["affine"])
        records.append({**case["info"], "aligned": index in aligned or misalign_mm == 0.0})
    manifest = {"generator": "sct_jax.data.phantom", "task": int(task), "region": region,
                "seed": int(seed), "misalign_mm": float(misalign_mm),
                "aligned_fraction": float(aligned_fraction), "anatomy_variation": variation,
                "shape": list(shape),
                "spacing_mm": list(SPACING_MM[region]), "cases": records}
    atomic_write_text(region_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return region_dir


if __name__ == "__main__":
    # The command line lives in phantom_cli, which imports this module (not at the top).
    from sct_jax.data.phantom_cli import main
    sys.exit(main())
