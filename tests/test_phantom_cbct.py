"""Phantom CBCT (task 2): each artefact measured against its parameter, the Task2 layout,
determinism (task 1 untouched) and the CLI."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from sct_jax.data import phantom, phantom_cli
from sct_jax.data import phantom_cbct as pc
from sct_jax.data.io import load_volume
from sct_jax.errors import DataError

SHAPE = (64, 48, 8)  # a small pelvis: 1 x 1 x 2.5 mm
SPACING = (1.0, 1.0, 2.5)
# Everything off: each test turns on the artefact it measures.
QUIET = pc.CbctParams(cupping_hu=0.0, scatter_hu=0.0, streak_angles_deg=(), noise_hu=0.0)


def _xy_mm(shape=SHAPE, spacing=SPACING):
    """In-plane voxel-centre coordinates about the volume centre, ``(X, Y, 1)`` each."""
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing[0]
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing[1]
    return x[:, None, None], y[None, :, None]


def _cylinder(radius_mm, hu=0.0, shape=SHAPE):
    """A uniform cylinder of ``hu`` in air along Z: ``(ct, body)``."""
    x, y = _xy_mm(shape)
    body = np.broadcast_to(np.hypot(x, y) <= radius_mm, shape).copy()
    return np.where(body, np.float32(hu), np.float32(-1000.0)), body


def _render(ct, body, params, seed=0):
    return pc.cbct_from_ct(ct, body, SPACING, np.random.default_rng(seed), params)


def test_cupping_follows_its_radial_profile_inside_the_body():
    # Would fail: a flipped sign, r from a corner instead of the axis, a wrong exponent,
    # cupping applied to the air around the body.
    radius = 22.0
    ct, body = _cylinder(15.0)
    cbct, info = _render(ct, body, dataclasses.replace(QUIET, cupping_hu=80.0,
                                                       fov_radius_mm=radius))
    x, y = _xy_mm()
    r = np.broadcast_to(np.hypot(x, y), SHAPE)
    expected = -80.0 * (1.0 - (r / radius) ** 2)
    assert np.abs(cbct[body] - expected[body]).max() <= 0.5 + 1e-4
    assert cbct[body].min() == -80.0  # deepest at the axis
    ring = body & (np.abs(r - 14.0) < 0.5)
    assert float(cbct[ring].mean()) == pytest.approx(-80.0 * (1 - (14.0 / radius) ** 2), abs=1.0)
    in_fov_air = ~body & (r <= radius)
    assert np.all(cbct[in_fov_air] == -1000.0)
    assert info["cupping_hu"] == 80.0 and info["fov_radius_mm"] == radius


@pytest.mark.parametrize("scanner", ["A", "B", "C"])
def test_field_of_view_truncates_at_its_radius(scanner):
    # Would fail: the fill value calibrated with the rest, the cylinder off-centre or
    # sized on the wrong axis, truncation missing.
    ct, body = _cylinder(40.0)  # wider than the field of view: truncated
    params = pc.scanner_params(scanner, "pelvis")
    cbct, info = _render(ct, body, params)
    radius = 0.8 * max(SHAPE[0], SHAPE[1]) / 2.0  # 0.8 x the larger half-width
    assert info["fov_radius_mm"] == pytest.approx(radius)
    x, y = _xy_mm()
    r = np.broadcast_to(np.hypot(x, y), SHAPE)
    assert np.all(cbct[r > radius] == pc.FOV_FILL_HU)
    assert not np.any(cbct[r <= radius] == pc.FOV_FILL_HU)  # water, however shaded
    assert 0.0 < info["body_outside_fov"] < 1.0
    explicit, _ = _render(ct, body, dataclasses.replace(params, fov_radius_mm=12.0))
    assert np.all(explicit[r > 12.0] == -1000.0) and not np.any(explicit[r <= 12.0] == -1000.0)


def test_head_fits_the_field_of_view_and_pelvis_does_not():
    pelvis = phantom.generate_case("pelvis", 0, seed=3, shape=SHAPE, task=2)
    brain = phantom.generate_case("brain", 0, seed=3, shape=(32, 40, 24), task=2)
    assert pelvis["info"]["cbct"]["body_outside_fov"] > 0.005
    assert brain["info"]["cbct"]["body_outside_fov"] < 0.005


@pytest.mark.parametrize("scanner", ["A", "B", "C"])
def test_calibration_scale_and_shift_fit_from_uniform_inserts(scanner):
    # Would fail: scale and shift swapped, the shift applied before the scale, a
    # scanner's calibration not reaching the image.
    # Artefacts and noise off: the fit sees the calibration alone (and the rounding).
    params = dataclasses.replace(pc.scanner_params(scanner, "pelvis"), cupping_hu=0.0,
                                 scatter_hu=0.0, streak_angles_deg=(), noise_hu=0.0)
    ct, body = _cylinder(24.0, hu=0.0)
    x, y = _xy_mm()
    inserts = {-500.0: (-10, 0), -100.0: (0, -10), 400.0: (10, 0), 1000.0: (0, 10)}
    regions = {0.0: body & (np.hypot(x + 12, y + 12) <= 3.0)}
    for hu, (cx, cy) in inserts.items():
        disc = np.broadcast_to(np.hypot(x - cx, y - cy) <= 4.0, SHAPE)
        ct[disc] = hu
        regions[hu] = disc & (np.hypot(x - cx, y - cy) <= 3.0)  # away from the edges
    cbct, info = _render(ct, body, params)
    hus = np.array(sorted(regions))
    medians = np.array([np.median(cbct[regions[h]]) for h in hus])
    slope, intercept = np.polyfit(hus, medians, 1)
    assert slope == pytest.approx(params.scale, abs=0.002)
    assert intercept == pytest.approx(params.shift_hu, abs=1.0)
    assert (info["scale"], info["shift_hu"]) == (params.scale, params.shift_hu)


def test_calibration_comes_after_the_artefacts():
    # The documented order: cupping first, then scale and shift (so it is scaled too).
    ct, body = _cylinder(30.0)
    params = dataclasses.replace(QUIET, cupping_hu=80.0, scale=0.92, shift_hu=40.0)
    cbct, _ = _render(ct, body, params)
    x, y = _xy_mm()
    axis = np.broadcast_to(np.hypot(x, y) < 0.8, SHAPE)
    assert np.all(cbct[axis] == np.rint(0.92 * -80.0 * (1 - 0.5 / 25.6 ** 2) + 40.0))


def test_noise_std_and_a_little_correlation():
    # Would fail: noise not normalised, std scaled wrongly, white or heavily blurred noise.
    ct, body = _cylinder(40.0)
    cbct, _ = _render(ct, body, dataclasses.replace(QUIET, noise_hu=35.0))
    x, y = _xy_mm()
    inside = np.broadcast_to(np.hypot(x, y) <= 25.0, SHAPE)
    expected = np.sqrt(35.0 ** 2 + 1.0 / 12.0)  # plus the rounding to integers
    assert float(cbct[inside].std()) == pytest.approx(expected, rel=0.06)
    assert abs(float(cbct[inside].mean())) < 3.0
    a, b = cbct[:-1][inside[1:] & inside[:-1]], cbct[1:][inside[1:] & inside[:-1]]
    neighbours = float(np.corrcoef(a, b)[0, 1])
    assert 0.3 < neighbours < 0.8  # sigma 0.7 voxel: exp(-1 / (4 * 0.49)) ~ 0.6


def test_scatter_is_smooth_of_its_amplitude_and_only_in_the_body():
    # Would fail: an amplitude not in HU std, white instead of smooth shading, shading
    # of the air around the body.
    params = dataclasses.replace(QUIET, scatter_hu=25.0, fov_radius_mm=100.0)  # no cut
    ct, body = _cylinder(100.0)  # all body: the whole field is seen
    cbct, _ = _render(ct, body, params)
    assert float(cbct.std()) == pytest.approx(25.0, abs=0.3)
    assert abs(float(cbct.mean())) < 0.5
    assert float(np.abs(np.diff(cbct, axis=0)).mean()) < 2.0  # ~25 HU over tens of mm
    ct, body = _cylinder(20.0)
    cbct, _ = _render(ct, body, params)
    assert np.all(cbct[~body] == -1000.0) and cbct[body].std() > 5.0


def _rod_phantom():
    """Water (radius 30 mm) with a bone rod (radius 4 mm at (-8, -6) mm) in slices 2..5."""
    ct, body = _cylinder(30.0)
    x, y = _xy_mm()
    rod = np.broadcast_to(np.hypot(x + 8.0, y + 6.0) <= 4.0, SHAPE).copy()
    rod[:, :, [0, 1, 6, 7]] = False
    ct[rod] = 1500.0
    return ct, body


def _offset_from_line(angle_deg, through=(-8.0, -6.0)):
    """Distance (mm) of each voxel from the line of direction ``angle_deg`` (degrees from
    +x towards +y) through ``through``; ``(X, Y, 1)``."""
    x, y = _xy_mm()
    theta = np.radians(angle_deg)
    return np.abs(-(x - through[0]) * np.sin(theta) + (y - through[1]) * np.cos(theta))


@pytest.mark.parametrize("angles", [(30.0,), (30.0, 120.0)])
def test_streaks_lie_along_their_angles_through_bone(angles):
    # Would fail: streaks along the wrong direction (x/y swapped, degrees as radians),
    # not through the bone, in slices without bone, with one sign for every angle.
    ct, body = _rod_phantom()
    base = dataclasses.replace(QUIET, fov_radius_mm=30.0, streak_hu=50.0, streak_path_mm=4.0)
    without, _ = _render(ct, body, base)
    with_streaks, info = _render(ct, body, dataclasses.replace(base, streak_angles_deg=angles))
    assert info["streak_angles_deg"] == list(angles)
    diff = with_streaks - without
    x, y = _xy_mm()
    away_from_rod = np.broadcast_to(np.hypot(x + 8.0, y + 6.0) > 8.0, SHAPE)
    fov = np.broadcast_to(np.hypot(x, y) <= 30.0, SHAPE)
    bone_slices = np.zeros(SHAPE, dtype=bool)
    bone_slices[:, :, 2:6] = True
    bands = [np.broadcast_to(_offset_from_line(a) < 1.0, SHAPE) for a in angles]
    near_any = np.zeros(SHAPE, dtype=bool)
    for a in angles:
        near_any |= np.broadcast_to(_offset_from_line(a) < 6.0, SHAPE)
    for k, band in enumerate(bands):
        on_line = band & away_from_rod & fov & bone_slices
        others = [b for j, b in enumerate(bands) if j != k]
        for other in others:
            on_line &= ~np.broadcast_to(other, SHAPE)
        sign = -((-1) ** k)  # dark, bright, dark, ...
        assert sign * float(diff[on_line].mean()) > 0.6 * 50.0, (angles[k], diff[on_line].mean())
    # Nowhere else: off the lines, outside the field of view, in slices without bone.
    assert np.all(diff[~near_any] == 0.0)
    assert np.all(diff[~fov] == 0.0)
    assert np.all(diff[:, :, [0, 1, 6, 7]] == 0.0)


def test_no_angles_no_streaks():
    ct, body = _rod_phantom()
    params = dataclasses.replace(QUIET, streak_hu=50.0)
    plain, info = _render(ct, body, params)
    assert info["streak_angles_deg"] == []
    np.testing.assert_array_equal(plain, np.where(np.broadcast_to(
        np.hypot(*_xy_mm()) <= 25.6, SHAPE), ct, -1000.0))
    drawn, info = _render(ct, body, dataclasses.replace(params, streak_angles_deg=None))
    assert len(info["streak_angles_deg"]) == 3
    assert all(0.0 <= a < 180.0 for a in info["streak_angles_deg"])
    assert not np.array_equal(drawn, plain)


def test_cbct_is_quantised_and_deterministic():
    ct, body = _rod_phantom()
    first, info = _render(ct, body, pc.scanner_params("C", "pelvis"), seed=4)
    again, info_again = _render(ct, body, pc.scanner_params("C", "pelvis"), seed=4)
    assert first.tobytes() == again.tobytes() and info == info_again
    other, _ = _render(ct, body, pc.scanner_params("C", "pelvis"), seed=5)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and np.array_equal(first, np.rint(first))
    assert first.min() >= -1024 and first.max() <= 3071
    json.dumps(info)  # JSON-ready


def test_bad_inputs_are_data_errors():
    ct, body = _cylinder(20.0)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="shape"):
        pc.cbct_from_ct(ct, body[:, :, :4], SPACING, rng)
    with pytest.raises(DataError, match="amplitudes"):
        pc.cbct_from_ct(ct, body, SPACING, rng, dataclasses.replace(QUIET, noise_hu=-1.0))
    with pytest.raises(DataError, match="radius"):
        pc.cbct_from_ct(ct, body, SPACING, rng, dataclasses.replace(QUIET, fov_radius_mm=0.0))
    with pytest.raises(DataError, match="scanner"):
        pc.scanner_params("D")
    with pytest.raises(DataError, match="task 3"):
        phantom.generate_case("pelvis", 0, seed=0, shape=SHAPE, task=3)


def test_task2_case_shares_task1_anatomy_and_ct():
    one = phantom.generate_case("pelvis", 1, seed=2, misalign_mm=2.0, shape=SHAPE)
    two = phantom.generate_case("pelvis", 1, seed=2, misalign_mm=2.0, shape=SHAPE, task=2)
    assert "mr" not in two and "cbct" in two and two["info"]["id"] == "2PB002"
    for key in ("ct", "labels", "ct_aligned", "ct_ideal"):
        assert one[key].tobytes() == two[key].tobytes(), key
    # Task 2's masks are task 1's, cut to the CBCT's field of view.
    fov = pc.fov_mask(SHAPE, SPACING, two["info"]["cbct"]["fov_radius_mm"])
    np.testing.assert_array_equal(two["mask_aligned"], one["mask_aligned"] * fov)
    np.testing.assert_array_equal(two["mask"], one["mask"] * fov)
    assert two["info"]["cbct"]["scanner"] == "B" and two["info"]["task"] == 2


def test_cbct_is_in_the_moved_frame():
    case = phantom.generate_case("pelvis", 0, seed=6, misalign_mm=4.0, shape=SHAPE, task=2)
    inside = case["mask_aligned"] > 0
    cbct = case["cbct"][inside]
    moved = np.corrcoef(cbct, case["ct_ideal"][inside])[0, 1]
    planning = np.corrcoef(cbct, case["ct"][inside])[0, 1]
    assert moved > planning + 0.05, (moved, planning)


@pytest.fixture(scope="module")
def task2_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("task2")
    return phantom.write_dataset(out, "pelvis", cases=3, seed=5, misalign_mm=1.0,
                                 shape=SHAPE, task=2)


def test_task2_layout_manifest_and_files(task2_dataset):
    assert task2_dataset.parts[-2:] == ("Task2", "pelvis")
    ids = sorted(p.name for p in task2_dataset.iterdir() if p.is_dir())
    assert ids == ["2PA001", "2PB002", "2PC003"]
    manifest = json.loads((task2_dataset / "manifest.json").read_text())
    assert manifest["task"] == 2 and manifest["region"] == "pelvis"
    assert [c["id"] for c in manifest["cases"]] == ids
    for record in manifest["cases"]:
        case_dir = task2_dataset / record["id"]
        names = {p.name for p in case_dir.iterdir()}
        assert names == {f"{n}.nii.gz" for n in ("cbct", "ct", "mask", "ct_aligned",
                                                 "mask_aligned", "ct_ideal")}
        assert nib.load(case_dir / "cbct.nii.gz").get_data_dtype() == np.int16
        want = pc.scanner_params(record["centre"], "pelvis")
        cbct = record["cbct"]
        assert (cbct["scale"], cbct["shift_hu"], cbct["scanner"]) == (
            want.scale, want.shift_hu, record["centre"])
        assert cbct["fov_radius_mm"] == pytest.approx(25.6)
    case = phantom.generate_case("pelvis", 2, seed=5, misalign_mm=1.0, shape=SHAPE, task=2)
    for name in ("cbct", "ct", "mask", "mask_aligned"):
        vol = load_volume(task2_dataset / "2PC003" / f"{name}.nii.gz")
        np.testing.assert_array_equal(vol.data, case[name].astype(np.float32))
        np.testing.assert_allclose(vol.affine, case["affine"])


def test_cli_task2_writes_task2_and_a_panel(tmp_path, capsys):
    png = tmp_path / "panel.png"
    argv = ["--out", str(tmp_path / "ds"), "--region", "pelvis", "--cases", "1",
            "--shape", *map(str, SHAPE), "--task", "2"]
    assert phantom_cli.main(argv + ["--misalign", "1", "--panel", str(png)]) == 0
    case_dir = tmp_path / "ds" / "Task2" / "pelvis" / "2PA001"
    assert load_volume(case_dir / "cbct.nii.gz").shape == SHAPE
    assert not (case_dir / "mr.nii.gz").exists()
    assert not (tmp_path / "ds" / "Task1").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The existing-dataset check reads Task2's manifest, task included.
    capsys.readouterr()
    assert phantom_cli.main(argv + ["--misalign", "2"]) == 2
    assert "misalign_mm 1.0 -> 2.0" in capsys.readouterr().err
    region_dir = case_dir.parent
    assert phantom_cli.existing_dataset_differences(region_dir, "pelvis", 1, 0, 1.0, SHAPE,
                                                task=1) == ["task 2 -> 1"]


def test_cli_rejects_task_3_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main(["--out", str(tmp_path), "--task", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--task" in err and "\n" not in err
    assert not any(tmp_path.iterdir())
