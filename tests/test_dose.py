"""Dose scoring: gamma (analytic, brute force, pymedphys), DVH metrics, orientation, the
pyradplan plans on a small phantom (photons and protons) and the sct-dose command line.

The full-dose tests need the optional extra (``pip install -e ".[dose]"``) and are
skipped without it; the rest runs everywhere.
"""

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from sct_jax.cli import dose as dose_cli
from sct_jax.data.io import lps_to_ras, ras_to_lps
from sct_jax.dose import dvh, engine, gamma
from sct_jax.errors import ConfigError, DataError, RunFailed

NEEDS_EXTRA = "the photon/proton dose needs the [dose] extra (pyradplan)"

# -- gamma ---------------------------------------------------------------------------


def _grid(shape, spacing):
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    return axes, np.meshgrid(*axes, indexing="ij")


def _gaussian(mesh, centre, sigma=9.0, peak=2.0):
    return peak * np.exp(-sum((m - c) ** 2 for m, c in zip(mesh, centre)) / (2 * sigma ** 2))


def test_uniform_dose_difference_gives_its_ratio_to_the_criterion():
    ref = np.full((8, 8, 8), 2.0)
    g = gamma.gamma_index(ref, ref * 1.03, (2.0, 2.0, 2.0), 2.0, 2.0, 10.0, max_gamma=1.6)
    # A flat dose: moving does not help, gamma = 3 % / 2 % everywhere.
    np.testing.assert_allclose(g, 1.5, atol=1e-12)
    assert gamma.pass_rate(g) == 0.0
    assert gamma.gamma_pass_rate(ref, ref, (2.0, 2.0, 2.0)) == 100.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_linear_ramp_matches_the_closed_form(axis):
    """D = G x_axis, evaluated D(x - s): gamma = a b s / sqrt(a^2 + b^2), a = G / dD,
    b = 1 / DTA (minimum of a^2 (t - s)^2 + b^2 t^2). Anisotropic voxels: a spacing
    mix-up between axes moves the ramp's gradient and fails this."""
    spacing = (1.5, 2.5, 3.5)
    shape = (16, 14, 12)
    _, mesh = _grid(shape, spacing)
    slope, shift = 0.05, 1.0  # Gy/mm, mm
    ref = 1.0 + slope * mesh[axis]
    ev = 1.0 + slope * (mesh[axis] - shift)
    g = gamma.gamma_index(ref, ev, spacing, 2.0, 2.0, 0.0, max_gamma=2.0)
    a, b = slope / (0.02 * ref.max()), 1.0 / 2.0
    expected = a * b * shift / np.hypot(a, b)
    interior = [slice(3, -3)] * 3  # away from the edges, where the search leaves the grid
    np.testing.assert_allclose(g[tuple(interior)], expected, atol=0.01)


def _trilinear(volume, points):
    """Trilinear interpolation at ``(N, 3)`` voxel coordinates; NaN outside the grid."""
    out = np.full(len(points), np.nan)
    upper = np.array(volume.shape) - 1
    inside = np.all((points >= 0) & (points <= upper), axis=1)
    p = points[inside]
    base = np.minimum(np.floor(p).astype(int), upper - 1)
    frac = p - base
    total = 0.0
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([frac[:, k] if corner[k] else 1 - frac[:, k] for k in range(3)], axis=0)
        total = total + weight * volume[tuple((base + corner).T)]
    out[inside] = total
    return out


def brute_force_gamma(ref, ev, spacing, dose_percent, dta, cutoff, reach=1.25, per_dta=10):
    """Every displacement of a cubic lattice (``dta / per_dta`` apart) within
    ``reach * dta``, for every voxel above the cut-off."""
    norm = ref.max()
    k = int(np.ceil(reach * per_dta))
    steps = np.arange(-k, k + 1) * dta / per_dta
    shifts = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(shifts, axis=1)
    shifts, dist = shifts[dist <= reach * dta], dist[dist <= reach * dta]
    out = np.full(ref.shape, np.nan)
    for idx in np.argwhere(ref >= cutoff / 100 * norm):
        values = _trilinear(ev, idx[None, :] + shifts / np.asarray(spacing))
        gam = np.hypot((values - ref[tuple(idx)]) / (dose_percent / 100 * norm), dist / dta)
        out[tuple(idx)] = np.nanmin(gam)
    return out


def _analytic_pair(shape=(12, 10, 8), spacing=(2.0, 2.5, 3.0)):
    _, mesh = _grid(shape, spacing)
    centre = [s * (n - 1) / 2 for n, s in zip(shape, spacing)]
    ref = _gaussian(mesh, centre)
    ev = 1.015 * _gaussian(mesh, [c + d for c, d in zip(centre, (1.1, -0.6, 0.9))])
    return ref, ev, spacing


def test_gamma_against_a_brute_force_search():
    ref, ev, spacing = _analytic_pair(shape=(10, 8, 6))
    reach = 1.25
    brute = brute_force_gamma(ref, ev, spacing, 2.0, 2.0, 10.0, reach=reach)
    ours = gamma.gamma_index(ref, ev, spacing, 2.0, 2.0, 10.0, max_gamma=reach)
    assert np.array_equal(np.isnan(ours), np.isnan(brute))
    # Shells and a lattice sample the displacements differently, DTA/10 apart: where the
    # dose falls 0.13 Gy/mm, 0.1 mm moves the dose term by a third of the 2 % criterion.
    both = np.minimum(ours, reach), np.minimum(brute, reach)
    assert np.nanmax(np.abs(both[0] - both[1])) < 0.15
    assert np.nanmean(np.abs(both[0] - both[1])) < 0.03
    assert abs(gamma.pass_rate(ours) - gamma.pass_rate(brute)) < 2.0
    assert 20.0 < gamma.pass_rate(ours) < 100.0  # a case with both passes and failures


def test_gamma_against_pymedphys():
    pymedphys = pytest.importorskip("pymedphys", reason="pymedphys (the [dose] extra) is "
                                    "not installed; the brute-force test still runs")
    ref, ev, spacing = _analytic_pair(shape=(12, 10, 8))
    ev = ev + 0.03 * np.sin(np.arange(ev.size).reshape(ev.shape) / 7.0)
    axes, _ = _grid(ref.shape, spacing)
    for dose_percent, dta in ((2.0, 2.0), (1.0, 1.0)):
        theirs = pymedphys.gamma(tuple(axes), ref, tuple(axes), ev, dose_percent, dta,
                                 lower_percent_dose_cutoff=10, max_gamma=2.0,
                                 interp_algo="scipy")
        ours = gamma.gamma_index(ref, ev, spacing, dose_percent, dta, 10.0, max_gamma=2.0)
        valid = ~np.isnan(theirs)
        assert np.array_equal(valid, ~np.isnan(ours))
        assert abs(gamma.pass_rate(ours) - 100 * np.mean(theirs[valid] <= 1)) <= 0.1
        np.testing.assert_allclose(np.minimum(ours, 2.0)[valid], theirs[valid], atol=1e-6)


def test_gamma_shortcuts_do_not_change_the_result():
    """Memory chunks change nothing; a pass rate searched only to the criterion and not
    past a pass (gamma_pass_rate) is that of the full search."""
    ref, ev, spacing = _analytic_pair()
    whole = gamma.gamma_index(ref, ev, spacing, 1.0, 1.0, 10.0, max_gamma=2.0)
    chunked = gamma.gamma_index(ref, ev, spacing, 1.0, 1.0, 10.0, max_gamma=2.0,
                                max_elements=500)
    np.testing.assert_array_equal(whole, chunked)
    assert 10.0 < gamma.pass_rate(whole) < 90.0
    assert gamma.gamma_pass_rate(ref, ev, spacing, 1.0, 1.0) == gamma.pass_rate(whole)


def test_gamma_refuses_bad_input():
    with pytest.raises(DataError, match="one 3D grid"):
        gamma.gamma_index(np.zeros((3, 3, 3)), np.zeros((3, 3, 2)), (1, 1, 1))
    with pytest.raises(DataError, match="must be > 0"):
        gamma.gamma_index(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1))


# -- DVH -----------------------------------------------------------------------------


def test_dvh_metrics_by_hand():
    dose = np.arange(1.0, 101.0).reshape(10, 10, 1)  # 1..100 Gy
    mask = np.ones_like(dose, bool)
    m = dvh.structure_metrics(dose, mask)
    # numpy's linear percentile of 1..100: p -> 1 + 99 p / 100.
    assert m["D98"] == pytest.approx(1 + 99 * 0.02)
    assert m["D2"] == pytest.approx(1 + 99 * 0.98)
    assert m["Dmean"] == pytest.approx(50.5)
    assert dvh.dose_at_volume(dose, mask, 50) == pytest.approx(50.5)
    levels, volume = dvh.cumulative_dvh(dose, mask, bin_gy=1.0, max_gy=100.0)
    assert volume[0] == 100.0 and volume[levels == 51.0][0] == 50.0  # 51..100 Gy: half
    assert volume[levels == 100.0][0] == 1.0


def test_dose_mae_uses_the_ct_high_dose_region_only():
    ct = np.array([2.0, 1.9, 1.8, 1.79, 0.5]).reshape(5, 1, 1)
    sct = ct + np.array([0.02, -0.04, 0.06, 1.0, 1.0]).reshape(5, 1, 1)
    # Region: CT >= 1.8 Gy (90 % of 2 Gy): |0.02|, |-0.04|, |0.06| -> mean 0.04 Gy = 2 %.
    assert dvh.dose_mae_percent(ct, sct, 2.0) == pytest.approx(2.0)
    assert dvh.dose_mae_percent(ct, ct, 2.0) == 0.0
    with pytest.raises(DataError, match="reaches 90%"):
        dvh.dose_mae_percent(ct, sct, 10.0)
    diff = dvh.dvh_differences(ct, sct, 2.0, ct >= 1.8, {"organ": ct < 1.8})
    # Target CT (1.8, 1.9, 2.0), sCT (1.86, 1.86, 2.02): Dmean +0.04/3 Gy; D98 at index
    # 0.04 of the sorted values: 1.804 -> 1.86 Gy.
    assert diff["target"]["Dmean"]["diff_percent_rx"] == pytest.approx(100 * 0.04 / 3 / 2)
    assert diff["target"]["D98"]["diff_percent_rx"] == pytest.approx(100 * 0.056 / 2)
    assert diff["organs"]["organ"]["Dmean"]["diff_percent_rx"] == pytest.approx(50.0)


# -- orientation and defaults (no pyradplan) ----------------------------------------


def test_lps_reorientation_round_trip_and_world_positions():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7))
    ras = np.diag([2.0, 3.0, 4.0, 1.0])
    ras[:3, 3] = (-10.0, 20.0, 5.0)
    lps_stored = np.diag([-2.0, -3.0, 4.0, 1.0])  # the same voxels stored L->R, P->A
    lps_stored[:3, 3] = ras[:3, 3] + (4 * 2.0, 5 * 3.0, 0.0)
    flipped = data[::-1, ::-1, :]
    for array, affine in ((data, ras), (flipped, lps_stored)):
        out, spacing, origin = engine.to_lps(array, affine)
        np.testing.assert_array_equal(engine.from_lps(out, affine), array)
        np.testing.assert_allclose(spacing, (2.0, 3.0, 4.0))
        # The first LPS voxel is the patient's most right-anterior-inferior: here RAS
        # (-10 + 8, 20 + 15, 5) = LPS (2, -35, 5).
        np.testing.assert_allclose(origin, (2.0, -35.0, 5.0))
        np.testing.assert_array_equal(out, engine.to_lps(data, ras)[0])
    # A permuted grid (axes stored Z, X, Y) lands on the same LPS array.
    perm = np.zeros((4, 4))
    perm[:3, :3] = ras[:3, :3][:, [2, 0, 1]]
    perm[:, 3] = ras[:, 3]
    np.testing.assert_array_equal(engine.to_lps(data.transpose(2, 0, 1), perm)[0],
                                  engine.to_lps(data, ras)[0])
    assert np.allclose(lps_to_ras(ras_to_lps(ras)), ras)


def test_default_target_and_beams():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    body = np.zeros((20, 20, 20), bool)
    body[4:16, 4:16, 4:16] = True
    target = engine.default_target(body, affine, radius_mm=6.0)
    centre = np.argwhere(target).mean(axis=0)
    np.testing.assert_allclose(centre, (9.5, 9.5, 9.5))
    # 2 voxels: centres at +-0.5 voxel on every axis (8) or +-1.5 on one of them (24).
    assert target.sum() == 32
    with pytest.raises(DataError, match="holds no body voxel"):
        engine.default_target(body, affine, radius_mm=3.0, center_mm=(0.0, 0.0, 0.0))
    assert len(engine.default_beams("photon")) == 7
    assert engine.default_beams("photon", "box4") == (0.0, 90.0, 180.0, 270.0)
    assert engine.default_beams("proton") == (90.0, 270.0)
    with pytest.raises(ConfigError, match="modality"):
        engine.default_beams("electron")


# -- the phantom: plans with pyradplan ----------------------------------------------

SPACING = 3.0
SHAPE = (34, 34, 20)


def phantom():
    """A water cylinder (radius 45 mm) with a 9 mm bone slab on the patient's left (low X
    on a RAS+ affine, origin off zero), crossed by the 90 deg proton field and by photon
    beams. Returns ``(ct, body, target, organ, affine)``."""
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = (-50.0, -40.0, 10.0)
    x, y, _ = np.indices(SHAPE)
    body = (x - 16.5) ** 2 + (y - 16.5) ** 2 <= 15 ** 2
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    ct[body & (x >= 5) & (x <= 7)] = 900.0
    ct[:, :2, :] = 200.0  # a couch outside the body: air for the dose
    target = engine.default_target(body, affine, radius_mm=12.0)
    centre = affine[:3, :3] @ np.array([16.5, 21.5, 9.5]) + affine[:3, 3]
    organ = engine.sphere_mask(SHAPE, affine, centre, 6.0)
    return ct, body, target, organ, affine


@pytest.fixture(scope="module")
def plans():
    """One plan per modality on the phantom, made once for the module (photons: 5 beams,
    to keep the test short)."""
    pytest.importorskip("pyRadPlan", reason=NEEDS_EXTRA)
    ct, body, target, organ, affine = phantom()
    made = {}
    for modality, angles in (("photon", (0.0, 72.0, 144.0, 216.0, 288.0)),
                             ("proton", None)):
        made[modality] = engine.plan_on_ct(ct, body, target, {"organ": organ}, affine,
                                           modality, 2.0, gantry_angles=angles)
    return made


@pytest.mark.parametrize("modality", ["photon", "proton"])
def test_sct_equal_to_ct_scores_perfectly_and_a_perturbed_one_does_not(plans, modality):
    plan = plans[modality]
    ct, body, target, _, _ = phantom()
    assert plan.ct_dose[target].mean() == pytest.approx(2.0, rel=1e-5)  # normalised to rx
    assert np.all(plan.ct_hu[~body] == -1000.0) and np.all(plan.ct_hu[body] == ct[body])
    # Outside the body the CT and sCT differ (noise, couch): air in both, no effect.
    noisy = np.where(body, ct, np.float32(300.0))
    same = engine.recompute(plan, noisy)
    np.testing.assert_allclose(same, plan.ct_dose, atol=1e-5)
    assert dvh.dose_mae_percent(plan.ct_dose, same, 2.0) < 1e-3
    spacing = (SPACING,) * 3
    assert gamma.gamma_pass_rate(plan.ct_dose, same, spacing, 2.0, 2.0) == 100.0
    # The bone slab read as soft tissue: protons overshoot, photons attenuate less.
    perturbed = ct.copy()
    perturbed[perturbed == 900.0] = 0.0
    dose = engine.recompute(plan, perturbed)
    assert dvh.dose_mae_percent(plan.ct_dose, dose, 2.0) > 0.2
    assert gamma.gamma_pass_rate(plan.ct_dose, dose, spacing, 1.0, 1.0) < 100.0
    if modality == "proton":
        assert gamma.gamma_pass_rate(plan.ct_dose, dose, spacing, 2.0, 2.0) < 100.0


def test_proton_fields_enter_from_the_patients_sides(plans):
    """IEC angles 90/270: entrance dose on both lateral sides, none beyond the target
    anteriorly (WEPL's convention); the target's centre row has dose."""
    dose = plans["proton"].ct_dose
    row_lr = dose[:, 16, 9]  # along X (RAS+: from the patient's left to the right)
    row_ap = dose[16, :, 9]
    assert row_lr[3] > 0.5 and row_lr[30] > 0.5  # entrance plateaus, left and right
    assert row_ap[2] < 0.05 and row_ap[31] < 0.05  # outside the lateral fields


def test_an_lps_stored_copy_gives_the_same_dose_on_its_grid(plans):
    """Orientation round trip: the phantom stored L->R and P->A (an LPS file) plans and
    recomputes to the same dose, read back on its own voxel order."""
    ct, body, target, organ, affine = phantom()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    lps_affine = affine @ flip  # voxel (i, j) of the copy is (33 - i, 33 - j) of the RAS one
    copy = [a[::-1, ::-1, :] for a in (ct, body, target, organ)]
    plan = engine.plan_on_ct(copy[0], copy[1], copy[2], {"organ": copy[3]}, lps_affine,
                             "proton", 2.0)
    np.testing.assert_allclose(plan.ct_dose[::-1, ::-1, :], plans["proton"].ct_dose,
                               atol=1e-4)
    np.testing.assert_allclose(engine.recompute(plan, copy[0])[::-1, ::-1, :],
                               plans["proton"].ct_dose, atol=1e-4)


def test_a_saved_plan_recomputes_the_same_dose(plans, tmp_path):
    ct = phantom()[0]
    plans["proton"].save(tmp_path / "plan")
    loaded = engine.load_plan(tmp_path / "plan")
    assert loaded._stf is None and loaded.organs.keys() == {"organ"}
    np.testing.assert_allclose(engine.recompute(loaded, ct), plans["proton"].ct_dose,
                               atol=1e-5)


def test_missing_pyradplan_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyradplan(name, *args, **kwargs):
        if name.startswith("pyRadPlan"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyradplan)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[dose\]"') as info:
        engine.require_pyradplan()
    assert "\n" not in str(info.value)
    assert not engine.has_pyradplan()


# -- sct-dose ------------------------------------------------------------------------


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    ct, body, target, organ, affine = phantom()
    folder = tmp_path / "case"
    folder.mkdir()
    sct = ct.copy()
    sct[sct == 900.0] = 400.0
    return {"ct": _write(folder / "ct.nii.gz", ct, affine),
            "sct": _write(folder / "sct_a.nii.gz", sct, affine),
            "mask": _write(folder / "mask.nii.gz", body, affine),
            "organ": _write(folder / "organ.nii.gz", organ, affine),
            "folder": folder, "tmp": tmp_path}


def test_cli_wepl_without_the_extra(case, capsys):
    out = case["tmp"] / "out"
    code = dose_cli.main(["--ct", case["ct"], "--sct", case["sct"], "--mask", case["mask"],
                          "--target-radius", "12", "--modality", "wepl", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "dose_metrics.json").read_text())
    assert report["dose"] == {} and report["modalities"] == []
    angles = report["wepl"]["sct_a"]["angles"]
    # 9 mm of bone (900 -> 400 HU) on the patient's left: the 90 deg ray only.
    assert angles["90.0"]["diff_center"] < -1.0
    assert abs(angles["270.0"]["diff_center"]) < 1e-6
    assert "sct_a wepl" in capsys.readouterr().out


def test_cli_falls_back_to_wepl_when_pyradplan_is_missing(case, monkeypatch, capsys):
    monkeypatch.setattr(engine, "has_pyradplan", lambda: False)
    out = case["tmp"] / "out"
    assert dose_cli.main(["--ct", case["ct"], "--sct", case["sct"], "--mask", case["mask"],
                          "--target-radius", "12", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert 'pip install -e ".[dose]"' in err and err.startswith("note:")
    report = json.loads((out / "dose_metrics.json").read_text())
    assert report["wepl"]["sct_a"] and report["dose"] == {} and "WEPL only" in report["note"]


def test_cli_proton_dose_writes_every_output(case, capsys):
    pytest.importorskip("pyRadPlan", reason=NEEDS_EXTRA)
    out = case["tmp"] / "out"
    argv = ["--ct", case["ct"], "--sct", case["sct"], case["ct"], "--mask", case["mask"],
            "--organs", case["organ"], "--target-radius", "12", "--modality", "proton",
            "--out", str(out)]
    assert dose_cli.main(argv) == 0
    report = json.loads((out / "dose_metrics.json").read_text())
    scts = report["dose"]["proton"]["scts"]
    assert scts["ct"]["dose_mae_percent_rx"] < 1e-3
    assert scts["ct"]["gamma_pass_2pct_2mm"] == 100.0
    assert scts["sct_a"]["dose_mae_percent_rx"] > 0.1
    assert set(scts["sct_a"]["organs"]) == {"organ"}
    for name in ("dose_ct_proton.nii.gz", "dose_sct_a_proton.nii.gz", "dvh_sct_a_proton.png",
                 "dose_diff_sct_a_proton.png", "plan_proton/plan.json"):
        assert (out / name).is_file(), name
    dose = nib.load(str(out / "dose_ct_proton.nii.gz"))
    assert dose.shape == SHAPE and np.allclose(dose.affine, nib.load(case["ct"]).affine)
    # A second run reuses the cached plan.
    assert dose_cli.main(argv) == 0
    again = json.loads((out / "dose_metrics.json").read_text())
    assert again["dose"]["proton"]["plan"]["cached"] is True
    assert again["dose"]["proton"]["scts"]["sct_a"]["dose_mae_percent_rx"] == pytest.approx(
        scts["sct_a"]["dose_mae_percent_rx"], rel=1e-5)


def _exit_code(argv) -> int:
    """The status of ``sct-dose argv``: argparse's errors exit, the rest return it."""
    try:
        return dose_cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("change, message", [
    (lambda c: ["--ct", str(c["tmp"] / "elsewhere" / "ct.nii.gz")], "file not found"),
    (lambda c: ["--modality", "photon,electron"], "--modality: unknown electron"),
    (lambda c: ["--rx", "0"], "--rx"),
    (lambda c: ["--out", str(c["folder"])], "holds the input"),
    (lambda c: ["--out", str(c["folder"] / "dose")], "lies in the case folder"),
    (lambda c: ["--out", c["ct"]], "is the input"),
    (lambda c: ["--mask", _write(c["folder"] / "small.nii.gz", np.ones((4, 4, 4)),
                                 np.eye(4))], "differs from the CT"),
])
def test_cli_bad_inputs_exit_2_and_write_nothing(case, capsys, change, message):
    argv = {"--ct": case["ct"], "--sct": case["sct"], "--mask": case["mask"],
            "--modality": "wepl", "--out": str(case["tmp"] / "out")}
    extra = change(case)
    argv.update(dict(zip(extra[::2], extra[1::2])))
    assert _exit_code([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (case["tmp"] / "out").exists()


def test_cli_keeps_the_other_results_when_a_modality_fails(case, monkeypatch, capsys):
    """pyradplan failing on one modality (its rays missing the image): that modality's
    error is in the file, WEPL is kept, exit status 1 with one error line."""

    def fail(*args, **kwargs):
        raise RunFailed("photon plan failed in pyradplan (ValueError: operands could not "
                        "be broadcast); give a smaller target")

    monkeypatch.setattr(engine, "has_pyradplan", lambda: True)
    monkeypatch.setattr(engine, "plan_on_ct", fail)
    out = case["tmp"] / "out"
    assert _exit_code(["--ct", case["ct"], "--sct", case["sct"], "--mask", case["mask"],
                       "--target-radius", "12", "--modality", "photon", "--out",
                       str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: photon plan failed") and err[-1].startswith("error: ")
    report = json.loads((out / "dose_metrics.json").read_text())
    assert "smaller target" in report["dose"]["photon"]["error"]
    assert report["wepl"]["sct_a"]["angles"]


def test_padding_only_where_the_target_nears_the_image_edge():
    ct, body, target, _, affine = phantom()
    assert not engine.padding(SimpleNamespace(target=target, affine=affine)).any()
    thin = target[:, :, 8:12]  # 4 slices of 3 mm: the sphere is cut by both z faces
    pad = engine.padding(SimpleNamespace(target=thin, affine=affine))
    need = int(np.ceil(engine.EDGE_MARGIN_MM / SPACING))
    assert pad[:2].sum() == 0 and pad[2].tolist() == [need, need]  # S axis only, both ends


def test_a_target_at_the_image_edge_plans_on_air_padding(monkeypatch):
    """pyradplan 0.5.0 fails (a broadcasting ValueError) when a beam's rays miss the
    image: a 25 mm target in a 48 x 32 x 8 image of 1 x 1 x 2.5 mm that the body fills.
    Padded with air, it plans, and the dose comes back on the input grid."""
    pytest.importorskip("pyRadPlan", reason=NEEDS_EXTRA)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    body = np.zeros((48, 32, 8), bool)
    body[1:-1, 1:-1, :] = True
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    target = engine.default_target(body, affine, 25.0)
    plan = engine.plan_on_ct(ct, body, target, {}, affine, "photon", 2.0,
                             gantry_angles=(0.0, 90.0, 180.0, 270.0))
    assert plan.ct_dose.shape == ct.shape
    assert plan.ct_dose[target].mean() == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(engine.recompute(plan, ct), plan.ct_dose, atol=1e-5)
    monkeypatch.setattr(engine, "EDGE_MARGIN_MM", 0.0)  # what the padding prevents
    with pytest.raises(RunFailed, match="reaches the image's edge"):
        engine.plan_on_ct(ct, body, target, {}, affine, "photon", 2.0,
                          gantry_angles=(0.0, 90.0, 180.0, 270.0))
