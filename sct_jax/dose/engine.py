"""Photon and proton dose with pyradplan (DKFZ's BSD-3 Python matRad): plan on the CT,
recompute the same beams and weights on an sCT.

The optional extra: ``pip install -e ".[dose]"``, or the lean install of the README's
"Dose" section (pyradplan without its LLM-client dependencies). pyradplan is imported
only when a plan is made (:func:`require_pyradplan`), with a one-line error that says
how to install it when it is missing.

Geometry. Inputs are arrays in file voxel order with a voxel -> RAS+ mm affine (what
:func:`sct_jax.data.io.load_volume` returns). pyradplan works in LPS+ world mm on an
axis-aligned image (a RAS-stored image crashes it), so each array is permuted and
flipped to L, P, S axes (:func:`to_lps`) and the dose comes back through the inverse
(:func:`from_lps`) onto the input grid, voxel for voxel. An oblique affine keeps the
voxel sizes and origin but not its rotation: the beams are then set in the scanner's
nearest LPS axes. Gantry angles are IEC's, as the WEPL proxy's: 0 deg from anterior,
90 deg from the patient's left.

Dose. Outside the body mask the HU are set to -1000 (air) in both the CT and the sCT,
so couch and noise outside the body do not enter. The dose is computed on a
``dose_grid_mm`` grid (default 3 mm) and interpolated by pyradplan onto the CT grid.
pyradplan gives dose per unit beamlet weight; the plan is normalised once, on the CT:
its dose is scaled so the mean dose of the target is the prescription ``rx`` (Gy), and
the same factor applies to every recompute, so an sCT's dose error shows in Gy.

Plan. The fluence is optimised on the CT (target: squared deviation from ``rx``;
organs: squared overdose above half of ``rx``; body: squared overdose above 0.8
``rx``). Default beams: photons 7 coplanar equispaced fields (pelvis and brain), or a
4-field box (``beam_set="box4"``); protons two lateral fields (90 and 270 deg). A
:class:`DosePlan` keeps the beams, the weights, the CT and masks it was made on, and
saves to a folder (``plan.json`` + ``plan.npz``) so it is made once per case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from nibabel import orientations

from sct_jax.data.io import atomic_path, atomic_write_text, ras_to_lps
from sct_jax.errors import ConfigError, DataError, RunFailed

INSTALL_HINT = ('the photon/proton dose needs the optional extra: pip install -e ".[dose]" '
                '(or the lean install in the README\'s "Dose" section: pip install --no-deps '
                '"pyradplan==0.5.0" plus its core dependencies)')
MODALITIES = ("photon", "proton")
BEAM_SETS = {
    "photon": {"coplanar7": tuple(float(a) for a in np.linspace(0.0, 360.0, 7, endpoint=False)),
               "box4": (0.0, 90.0, 180.0, 270.0)},
    "proton": {"lateral2": (90.0, 270.0)},
}
DEFAULT_BEAM_SET = {"photon": "coplanar7", "proton": "lateral2"}
AIR_HU = -1000.0
# Air added around the image (mm, per side, only where the target comes closer to the
# image's edge than this): pyradplan 0.5.0 fails when a beam's rays miss the image, as
# they do when the target touches its edge. The dose is cropped back to the input grid.
EDGE_MARGIN_MM = 15.0
PLAN_FORMAT = 1
_LPS = orientations.axcodes2ornt(("L", "P", "S"))


def require_pyradplan():
    """Imports pyradplan (lazily: an optional extra), else a one-line ConfigError."""
    try:
        import pyRadPlan  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ConfigError(f"pyradplan is not installed: {INSTALL_HINT}") from e
    return pyRadPlan


def has_pyradplan() -> bool:
    """Whether the full dose can run (pyradplan importable)."""
    try:
        require_pyradplan()
    except ConfigError:
        return False
    return True


# -- geometry ----------------------------------------------------------------------


def to_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ``(X, Y, Z)`` array on a voxel -> RAS+ affine, as pyradplan wants it.

    Returns:
      ``(array, spacing, origin)``: the array permuted and flipped so that its axes run
      to the patient's left, posterior and superior, the voxel size (mm) along them and
      the LPS+ position (mm) of its first voxel.
    """
    transform = orientations.ornt_transform(orientations.io_orientation(affine), _LPS)
    out = np.ascontiguousarray(orientations.apply_orientation(np.asarray(data), transform))
    lps_affine = ras_to_lps(np.asarray(affine, np.float64)
                            @ orientations.inv_ornt_aff(transform, np.shape(data)))
    return out, np.linalg.norm(lps_affine[:3, :3], axis=0), lps_affine[:3, 3].copy()


def from_lps(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_lps`: an LPS-ordered array back onto the grid of
    ``affine`` (the input's voxel order)."""
    transform = orientations.ornt_transform(_LPS, orientations.io_orientation(affine))
    return np.ascontiguousarray(orientations.apply_orientation(np.asarray(data), transform))


def sphere_mask(shape: Sequence[int], affine: np.ndarray, center_mm: Sequence[float],
                radius_mm: float) -> np.ndarray:
    """``(X, Y, Z)`` bool: voxel centres within ``radius_mm`` of ``center_mm`` (RAS+)."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = np.asarray(affine)[:3, :3] @ index + np.asarray(affine)[:3, 3:4]
    dist2 = np.sum((world - np.asarray(center_mm, np.float64)[:, None]) ** 2, axis=0)
    return (dist2 <= radius_mm ** 2).reshape(shape)


def default_target(body: np.ndarray, affine: np.ndarray, radius_mm: float = 25.0,
                   center_mm: Sequence[float] | None = None) -> np.ndarray:
    """The default target: a sphere of ``radius_mm`` at ``center_mm`` (RAS+ mm; default
    the body's centre of mass), within the body.

    Raises:
      DataError: empty body, or the sphere holds no body voxel.
    """
    body = np.asarray(body) > 0
    if not body.any():
        raise DataError("default target: empty body mask")
    if center_mm is None:
        centre = np.argwhere(body).mean(axis=0)
        center_mm = np.asarray(affine)[:3, :3] @ centre + np.asarray(affine)[:3, 3]
    target = sphere_mask(body.shape, affine, center_mm, radius_mm) & body
    if not target.any():
        raise DataError(f"default target: a {radius_mm:g} mm sphere at "
                        f"{np.round(center_mm, 1).tolist()} mm holds no body voxel")
    return target


def default_beams(modality: str, beam_set: str | None = None) -> tuple[float, ...]:
    """Gantry angles (deg) of a named beam set (:data:`BEAM_SETS`)."""
    if modality not in BEAM_SETS:
        raise ConfigError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    name = beam_set or DEFAULT_BEAM_SET[modality]
    if name not in BEAM_SETS[modality]:
        raise ConfigError(f"beam set {name!r} for {modality}: expected one of "
                          f"{', '.join(BEAM_SETS[modality])}")
    return BEAM_SETS[modality][name]


def air_outside(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``hu`` (float32) with -1000 HU outside the body mask."""
    return np.where(np.asarray(body) > 0, np.asarray(hu, np.float32), np.float32(AIR_HU))


# -- the plan ------------------------------------------------------------------------


@dataclasses.dataclass
class DosePlan:
    """A plan optimised on a CT, enough to recompute its dose on any HU volume.

    Attributes:
      modality: ``"photon"`` or ``"proton"``.
      rx: prescription (Gy): the CT dose's target mean.
      gantry_angles: beam angles (deg, IEC); couch at 0.
      bixel_width_mm, dose_grid_mm: beamlet spacing and dose grid (mm).
      weights: ``(B,)`` optimised beamlet weights (pyradplan's units).
      scale: Gy per pyradplan dose unit (the normalisation to ``rx``).
      affine: ``(4, 4)`` voxel -> RAS+ mm of the input grid.
      ct_hu: ``(X, Y, Z)`` float32 CT the plan was made on (air outside the body).
      body, target: ``(X, Y, Z)`` bool masks.
      organs: name -> ``(X, Y, Z)`` bool mask.
      ct_dose: ``(X, Y, Z)`` float32 dose (Gy) of the plan on the CT.
      info: iso-centre (LPS mm), number of beamlets, timings (s), pyradplan version.
    """

    modality: str
    rx: float
    gantry_angles: tuple[float, ...]
    bixel_width_mm: float
    dose_grid_mm: float
    weights: np.ndarray
    scale: float
    affine: np.ndarray
    ct_hu: np.ndarray
    body: np.ndarray
    target: np.ndarray
    organs: dict[str, np.ndarray]
    ct_dose: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)
    _stf: Any = dataclasses.field(default=None, repr=False, compare=False)

    def save(self, folder: str | Path) -> Path:
        """Writes ``plan.json`` and ``plan.npz`` into ``folder`` (atomically)."""
        folder = Path(folder)
        arrays = {"weights": self.weights, "affine": self.affine, "ct_hu": self.ct_hu,
                  "body": self.body, "target": self.target, "ct_dose": self.ct_dose}
        arrays.update({f"organ_{i}": m for i, m in enumerate(self.organs.values())})
        with atomic_path(folder / "plan.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        meta = {"format": PLAN_FORMAT, "modality": self.modality, "rx": self.rx,
                "gantry_angles": list(self.gantry_angles), "bixel_width_mm": self.bixel_width_mm,
                "dose_grid_mm": self.dose_grid_mm, "scale": self.scale,
                "organs": list(self.organs), "info": self.info}
        atomic_write_text(folder / "plan.json", json.dumps(meta, indent=1) + "\n")
        return folder


def load_plan(folder: str | Path) -> DosePlan:
    """Reads a plan :meth:`DosePlan.save` wrote."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "plan.json").read_text())
        with np.load(folder / "plan.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{folder}: not a readable dose plan ({type(e).__name__})") from e
    if meta.get("format") != PLAN_FORMAT:
        raise DataError(f"{folder}: plan format {meta.get('format')!r}, expected {PLAN_FORMAT}")
    return DosePlan(
        modality=meta["modality"], rx=float(meta["rx"]),
        gantry_angles=tuple(meta["gantry_angles"]), bixel_width_mm=meta["bixel_width_mm"],
        dose_grid_mm=meta["dose_grid_mm"], weights=arrays["weights"], scale=meta["scale"],
        affine=arrays["affine"], ct_hu=arrays["ct_hu"], body=arrays["body"],
        target=arrays["target"], ct_dose=arrays["ct_dose"], info=meta["info"],
        organs={name: arrays[f"organ_{i}"] for i, name in enumerate(meta["organs"])})


def plan_fingerprint(ct: np.ndarray, body: np.ndarray, target: np.ndarray,
                     organs: Mapping[str, np.ndarray], affine: np.ndarray,
                     **settings: Any) -> str:
    """A hash of everything a plan depends on: a cached plan is reused only when its
    fingerprint (``info["fingerprint"]``) is this one."""
    h = hashlib.sha256()
    for array in (air_outside(ct, body), np.asarray(body) > 0, np.asarray(target) > 0,
                  np.asarray(affine, np.float64)):
        h.update(np.ascontiguousarray(array).tobytes())
    for name, mask in organs.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(np.asarray(mask) > 0).tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _engine_errors(modality: str, step: str) -> Iterator[None]:
    """An exception inside pyradplan becomes one line (exit status 1): pyradplan 0.5.0
    fails with a broadcasting ValueError when a beam's rays miss the image, which
    happens when the target reaches the image's edge."""
    try:
        yield
    except (DataError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 (a third-party engine's failure)
        text = " ".join(str(e).split())[:200]
        raise RunFailed(f"{modality} {step} failed in pyradplan ({type(e).__name__}: {text}); "
                        "if the target (plus a beamlet) reaches the image's edge, give a "
                        "smaller target") from e


@contextlib.contextmanager
def _quiet(prp) -> Iterator[None]:
    """pyradplan on the CPU with numpy, without its progress bars, warnings and INFO
    logs (they would bury the command's own output); settings restored afterwards."""
    from pyRadPlan.core._progress import ProgressReporter  # noqa: PLC0415 (optional)

    saved = (prp.settings.xp.prefer_gpu, ProgressReporter.console_progress)
    logger = logging.getLogger("pyRadPlan")
    level = logger.level
    try:
        prp.settings.xp.prefer_gpu = False  # deterministic numpy on every machine
        ProgressReporter.console_progress = False
        # ERROR: its WARNINGs say which default it picks (generator, engine), every call.
        logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        prp.settings.xp.prefer_gpu, ProgressReporter.console_progress = saved
        logger.setLevel(level)


def padding(plan: "DosePlan") -> np.ndarray:
    """``(3, 2)`` voxels of air added before/after each LPS axis so that the target lies
    at least :data:`EDGE_MARGIN_MM` inside the image (zeros for most images)."""
    target_lps, spacing, _ = to_lps(np.asarray(plan.target, np.uint8), plan.affine)
    idx = np.argwhere(target_lps > 0)
    need = np.ceil(EDGE_MARGIN_MM / spacing).astype(int)
    before = np.maximum(0, need - idx.min(axis=0))
    after = np.maximum(0, need - (np.array(target_lps.shape) - 1 - idx.max(axis=0)))
    return np.stack([before, after], axis=1)


def _pad(lps: np.ndarray, pad: np.ndarray, value: float) -> np.ndarray:
    return np.pad(lps, [tuple(int(v) for v in p) for p in pad], constant_values=value)


def _ct(hu_lps: np.ndarray, spacing: np.ndarray, origin: np.ndarray):
    """pyradplan's CT of an LPS-ordered HU array (sitk wants (Z, Y, X) arrays)."""
    import SimpleITK as sitk  # noqa: PLC0415 (a dependency of the optional extra)

    image = sitk.GetImageFromArray(np.ascontiguousarray(hu_lps.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    from pyRadPlan.ct import create_ct  # noqa: PLC0415
    return create_ct(cube_hu=image)


def _structure_set(ct_obj, plan: DosePlan, pad: np.ndarray):
    """The VOIs (target, organs, body) with their objectives, on ``ct_obj`` (the CT
    padded by ``pad``, see :func:`padding`)."""
    from pyRadPlan.cst import StructureSet, create_voi  # noqa: PLC0415
    from pyRadPlan.optimization.objectives import (  # noqa: PLC0415
        SquaredDeviation, SquaredOverdosing)

    def voi(kind, name, mask, objectives):
        lps = _pad(to_lps(np.asarray(mask, np.uint8), plan.affine)[0], pad, 0)
        v = create_voi(voi_type=kind, name=name, ct_image=ct_obj,
                       mask=np.ascontiguousarray(lps.transpose(2, 1, 0)))
        v.objectives = objectives
        return v

    vois = [voi("TARGET", "target", plan.target,
                [SquaredDeviation(priority=100.0, d_ref=plan.rx)])]
    vois += [voi("OAR", name, mask, [SquaredOverdosing(priority=10.0, d_max=0.5 * plan.rx)])
             for name, mask in plan.organs.items()]
    vois.append(voi("EXTERNAL", "body", plan.body,
                    [SquaredOverdosing(priority=5.0, d_max=0.8 * plan.rx)]))
    return StructureSet(vois=vois, ct_image=ct_obj)


def _pln(prp, plan: DosePlan):
    n = len(plan.gantry_angles)
    if plan.modality == "photon":
        pln = prp.PhotonPlan(machine="Generic", num_of_fractions=1, prescribed_dose=plan.rx)
    else:
        pln = prp.IonPlan(radiation_mode="protons", machine="Generic", num_of_fractions=1,
                          prescribed_dose=plan.rx)
    pln.prop_stf = {"gantry_angles": list(plan.gantry_angles), "couch_angles": [0.0] * n,
                    "bixel_width": plan.bixel_width_mm}
    pln.prop_opt = {"solver": "scipy", "max_iter": int(plan.info.get("max_iter", 100))}
    g = plan.dose_grid_mm
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": g, "y": g, "z": g}}}
    return pln


def _dose_array(result: dict, affine: np.ndarray, pad: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk  # noqa: PLC0415

    dose = result["physical_dose"]
    dose = sitk.GetArrayFromImage(dose) if isinstance(dose, sitk.Image) else np.asarray(dose)
    dose = np.asarray(dose, np.float64).transpose(2, 1, 0)
    crop = tuple(slice(int(b), n - int(a)) for (b, a), n in zip(pad, dose.shape))
    return from_lps(dose[crop], affine)


def _setup(prp, plan: DosePlan, hu: np.ndarray):
    """pyradplan's CT, structure set and plan for ``hu`` (input grid, air outside; padded
    with air where the target nears the image's edge, see :func:`padding`)."""
    lps, spacing, origin = to_lps(air_outside(hu, plan.body), plan.affine)
    pad = padding(plan)
    # LPS axes run along +L, +P, +S: voxels added before an axis start one step earlier.
    ct_obj = _ct(_pad(lps, pad, AIR_HU), spacing, origin - pad[:, 0] * spacing)
    return ct_obj, _structure_set(ct_obj, plan, pad), _pln(prp, plan)


def plan_on_ct(ct: np.ndarray, body: np.ndarray, target: np.ndarray,
               organs: Mapping[str, np.ndarray], affine: np.ndarray, modality: str,
               rx: float = 2.0, *, gantry_angles: Sequence[float] | None = None,
               beam_set: str | None = None, bixel_width_mm: float = 5.0,
               dose_grid_mm: float = 3.0, max_iter: int = 100) -> DosePlan:
    """Optimises a plan on the CT and normalises its dose to ``rx``.

    Args:
      ct: ``(X, Y, Z)`` HU.
      body, target: ``(X, Y, Z)`` masks (see :func:`default_target`).
      organs: name -> ``(X, Y, Z)`` mask (may be empty).
      affine: ``(4, 4)`` voxel -> RAS+ mm.
      modality: ``"photon"`` or ``"proton"``.
      rx: prescription (Gy, one fraction): the target's mean dose on the CT.
      gantry_angles: beam angles (deg); default the ``beam_set`` (:data:`BEAM_SETS`).
      bixel_width_mm: beamlet spacing (photons: width; protons: lateral spot spacing).
      dose_grid_mm: the dose grid's voxel size.
      max_iter: fluence optimiser iterations (scipy L-BFGS-B).

    Returns:
      The :class:`DosePlan`, with its CT dose (Gy) and timings (``info["timings"]``).

    Raises:
      ConfigError: pyradplan missing, unknown modality or beam set, ``rx <= 0``.
      DataError: shapes differ, empty body or target.
    """
    prp = require_pyradplan()
    if rx <= 0:
        raise ConfigError(f"prescription {rx:g} Gy must be > 0")
    if modality not in MODALITIES:
        raise ConfigError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    angles = tuple(float(a) for a in (gantry_angles if gantry_angles is not None
                                      else default_beams(modality, beam_set)))
    shape = np.shape(ct)
    for name, mask in [("body", body), ("target", target), *organs.items()]:
        if np.shape(mask) != shape:
            raise DataError(f"{name} mask {np.shape(mask)} differs from the CT grid {shape}")
    body, target = np.asarray(body) > 0, (np.asarray(target) > 0) & (np.asarray(body) > 0)
    if not target.any():
        raise DataError("dose plan: the target holds no body voxel")
    plan = DosePlan(modality=modality, rx=float(rx), gantry_angles=angles,
                    bixel_width_mm=float(bixel_width_mm), dose_grid_mm=float(dose_grid_mm),
                    weights=np.zeros(0), scale=1.0, affine=np.asarray(affine, np.float64),
                    ct_hu=air_outside(ct, body), body=body, target=target,
                    organs={k: np.asarray(v) > 0 for k, v in organs.items()},
                    ct_dose=np.zeros(0, np.float32),
                    info={"max_iter": int(max_iter), "pyradplan": prp.__version__})
    timings = {}
    with _engine_errors(modality, "plan"), _quiet(prp):
        ct_obj, cst, pln = _setup(prp, plan, plan.ct_hu)
        start = time.perf_counter()
        stf = prp.generate_stf(ct_obj, cst, pln)
        dij = prp.calc_dose_influence(ct_obj, cst, stf, pln)
        timings["influence_s"] = time.perf_counter() - start
        start = time.perf_counter()
        weights = np.asarray(prp.fluence_optimization(ct_obj, cst, stf, dij, pln), np.float64)
        timings["optimisation_s"] = time.perf_counter() - start
        dose = _dose_array(dij.compute_result_ct_grid(weights), plan.affine, padding(plan))
    mean = float(dose[target].mean())
    if not mean > 0:
        raise RunFailed(f"{modality} plan: the optimised plan gives the target no dose; if "
                        "the target fills the image, give a smaller target")
    plan.weights, plan.scale, plan._stf = weights, plan.rx / mean, stf
    plan.ct_dose = (dose * plan.scale).astype(np.float32)
    plan.info.update(timings=timings, n_beamlets=int(weights.size),
                     iso_center_lps_mm=[float(v) for v in stf.beams[0].iso_center],
                     normalisation="target mean dose on the CT = rx")
    return plan


def recompute(plan: DosePlan, hu: np.ndarray) -> np.ndarray:
    """The plan's dose (Gy, same beams, weights and normalisation) on another HU volume.

    Args:
      plan: from :func:`plan_on_ct` or :func:`load_plan`.
      hu: ``(X, Y, Z)`` HU on the plan's grid (an sCT; set to air outside the body).

    Returns:
      ``(X, Y, Z)`` float32 dose (Gy) on the input grid.
    """
    prp = require_pyradplan()
    if np.shape(hu) != plan.ct_hu.shape:
        raise DataError(f"recompute: volume {np.shape(hu)} differs from the plan's grid "
                        f"{plan.ct_hu.shape}")
    with _engine_errors(plan.modality, "recompute"), _quiet(prp):
        if plan._stf is None:
            # The beamlets and, for protons, their energies are set on the planning CT.
            ct_obj, cst, pln = _setup(prp, plan, plan.ct_hu)
            plan._stf = prp.generate_stf(ct_obj, cst, pln)
        if plan._stf.total_number_of_bixels != plan.weights.size:
            raise DataError(f"recompute: the plan has {plan.weights.size} weights but its "
                            f"beams {plan._stf.total_number_of_bixels} beamlets (another "
                            "pyradplan version?); make the plan again")
        ct_obj, cst, pln = _setup(prp, plan, hu)
        start = time.perf_counter()
        result = prp.calc_dose_forward(ct_obj, cst, plan._stf, pln, plan.weights.copy())
        plan.info.setdefault("recompute_s", []).append(time.perf_counter() - start)
    return (_dose_array(result, plan.affine, padding(plan)) * plan.scale).astype(np.float32)
