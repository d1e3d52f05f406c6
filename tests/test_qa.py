"""Reference-free sCT fidelity checks (sct_jax.evaluation.qa) and their CLI.

The phantom CT stands in for a perfect sCT; deliberately corrupted copies must fail,
each in the check meant to catch it.
"""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from sct_jax.cli import qa as qa_cli
from sct_jax.data.io import load_volume, save_volume
from sct_jax.data.phantom import SPACING_MM, generate_case, write_dataset
from sct_jax.errors import ConfigError, DataError
from sct_jax.evaluation import qa

SHAPE = (96, 64, 24)
SPACING = SPACING_MM["pelvis"]


@pytest.fixture(scope="module")
def case():
    return generate_case("pelvis", 0, seed=0, shape=SHAPE)


def shift_x(volume, voxels, fill=-1024.0):
    """Moves the volume by +voxels along x; the vacated side becomes air."""
    out = np.full_like(volume, fill)
    out[voxels:] = volume[:-voxels]
    return out


def corrupt(name, case):
    ct, mask = case["ct"].copy(), case["mask"] > 0
    z = SHAPE[2] // 2
    if name == "clean":
        return ct
    if name == "noise":  # a scanner-like CT: noise, then the scanner's clip
        noise = np.random.default_rng(0).normal(0.0, 20.0, ct.shape).astype(np.float32)
        return np.clip(ct + noise, -1024.0, 3000.0)
    if name == "bone_removed":
        ct[ct > 250] = 40.0
    elif name == "slice_zeroed":
        ct[:, :, z] = 0.0
    elif name == "slice_air":
        ct[:, :, z] = -1000.0
    elif name == "offset_300":
        ct[mask] += 300.0
    elif name == "shifted_8x":
        ct = shift_x(ct, 8)
    return ct


# corruption -> the check that must fail (None: everything must pass).
EXPECTED = {"clean": None, "noise": None, "bone_removed": "tissue_fractions",
            "slice_zeroed": "slice_continuity", "slice_air": "slice_continuity",
            "offset_300": "tissue_fractions", "shifted_8x": "alignment"}


def statuses(result):
    return {c["name"]: c["status"] for c in result.report["checks"]}


@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "mr_derived_body"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_corruptions_fail_and_clean_passes(case, name, use_mask):
    result = qa.run_qa(case["mr"], corrupt(name, case), case["mask"] if use_mask else None,
                       spacing=SPACING, region="pelvis")
    got = statuses(result)
    if EXPECTED[name] is None:
        assert result.status == "pass", got
        assert result.flagged.sum() == 0
    else:
        assert result.status == "fail", got
        assert got[EXPECTED[name]] == "fail", got
    json.dumps(result.report)  # the report is JSON-ready


def test_offset_also_fails_hu_statistics_and_shift_is_measured(case):
    offset = qa.run_qa(case["mr"], corrupt("offset_300", case), case["mask"], spacing=SPACING,
                       region="pelvis")
    assert statuses(offset)["hu_statistics"] == "fail"
    shifted = qa.run_qa(case["mr"], corrupt("shifted_8x", case), case["mask"], spacing=SPACING,
                        region="pelvis")
    alignment = next(c for c in shifted.report["checks"] if c["name"] == "alignment")
    np.testing.assert_allclose(alignment["value"]["shift_mm"], [8.0, 0.0, 0.0], atol=1.0)


def test_brain_phantom_passes_builtin_brain_ranges():
    brain = generate_case("brain", 1, seed=0, shape=(48, 60, 40))
    result = qa.run_qa(brain["mr"], brain["ct"], brain["mask"], spacing=SPACING_MM["brain"],
                       region="brain")
    assert result.status == "pass", statuses(result)


def test_estimate_shift_sign_and_axes(case):
    body = case["mask"] > 0
    for axis, voxels in ((1, 5), (2, -2)):
        moved = np.roll(case["ct"], voxels, axis=axis)  # body is clear of the edges
        shift_mm, _, ncc_peak = qa.estimate_shift(case["mr"], moved, body, SPACING)
        expected = np.zeros(3)
        expected[axis] = voxels * SPACING[axis]
        np.testing.assert_allclose(shift_mm, expected, atol=0.5 * SPACING[axis] + 0.5)
        assert ncc_peak > 0.2


def test_slice_scores_match_the_formula_on_a_ramp():
    # Inside the body the sCT rises by 10 HU per slice; slice 4 gets +60 HU.
    ramp = np.broadcast_to(10.0 * np.arange(8), (6, 5, 8)).astype(np.float64).copy()
    body = np.zeros(ramp.shape, bool)
    body[1:5, 1:4, :] = True
    scores = qa.slice_continuity_scores(ramp, body)
    np.testing.assert_allclose(scores[1:-1], 10.0 / (20.0 + 5.0))
    np.testing.assert_allclose(scores[[0, -1]], 10.0 / (2 * 10.0 + 5.0))
    ramp[:, :, 4] += 60.0
    scores = qa.slice_continuity_scores(ramp, body)
    # min(|70 - 0|... ): D(4, 3) = 70, D(4, 5) = 50, D(3, 5) = 20.
    assert scores[4] == pytest.approx(50.0 / 25.0)
    assert scores[3] == pytest.approx(min(10.0, 70.0) / (80.0 + 5.0))


def test_case_statistics_bins_and_boundaries():
    values = np.array([-1000] * 10 + [-200, -31] * 10 + [-30, 250, 100] * 10
                      + [251, 1000, 1000, 1000] * 10, dtype=np.float32)
    stats = qa.case_statistics(values.reshape(1, 1, -1), np.ones((1, 1, values.size)))
    n = values.size
    assert stats["air_fraction"] == pytest.approx(10 / n)
    assert stats["fat_fraction"] == pytest.approx(20 / n)  # -200 is fat, -31 too
    assert stats["soft_fraction"] == pytest.approx(30 / n)  # -30 and 250 are soft
    assert stats["bone_fraction"] == pytest.approx(40 / n)
    assert stats["mean_hu"] == pytest.approx(float(np.mean(values.astype(np.float64))))
    assert stats["median_hu"] == pytest.approx(float(np.median(values)))


def test_reference_profile_ranges_and_use(case):
    cases = [generate_case("pelvis", i, seed=0, shape=SHAPE) for i in (1, 2, 3)]
    profile = qa.build_reference_profile([(c["ct"], c["mask"]) for c in cases], "pelvis")
    assert profile["n_cases"] == 3
    for c in cases:
        stats = qa.case_statistics(c["ct"], c["mask"])
        for name in qa.PROFILE_STATS:
            lo, hi = profile["ranges"][name]["pass"]
            assert lo <= stats[name] <= hi
    # Built without `case`: a new patient passes, the same patient without bone fails.
    clean = qa.run_qa(case["mr"], case["ct"], case["mask"], spacing=SPACING, reference=profile)
    assert clean.status == "pass", statuses(clean)
    assert clean.report["reference"] == "reference profile"
    no_bone = qa.run_qa(case["mr"], corrupt("bone_removed", case), case["mask"],
                        spacing=SPACING, reference=json.loads(json.dumps(profile)))
    assert statuses(no_bone)["tissue_fractions"] == "fail"
    with pytest.raises(DataError, match="ranges.bone_fraction"):
        broken = json.loads(json.dumps(profile))
        del broken["ranges"]["bone_fraction"]
        qa.validate_profile(broken)
    with pytest.raises(DataError, match="not an sct_jax QA reference profile"):
        qa.validate_profile({"ranges": {}})


def test_cycle_consistency_with_trivial_generators(case):
    mr, ct, mask = case["mr"], case["ct"], case["mask"]
    rng = np.random.default_rng(1)

    def check(ct_to_mr):
        result = qa.run_qa(mr, ct, mask, spacing=SPACING, region="pelvis", ct_to_mr=ct_to_mr)
        return next(c for c in result.report["checks"] if c["name"] == "cycle_consistency")

    good = check(lambda sct: mr * 0.01 + rng.normal(0, 0.3, mr.shape))  # any units
    assert good["status"] == "pass" and good["value"]["pearson_r"] > 0.95
    bad = check(lambda sct: rng.normal(0, 1, mr.shape))
    assert bad["status"] == "fail" and abs(bad["value"]["pearson_r"]) < 0.1
    with pytest.raises(DataError, match="ct_to_mr returned shape"):
        check(lambda sct: sct[:-1])


def test_sample_spread_and_flagged_voxels(case):
    ct, mask = case["ct"], case["mask"]
    rng = np.random.default_rng(2)

    def spread(sigma):
        samples = [ct + rng.normal(0, sigma, ct.shape) for _ in range(3)]
        return qa.run_qa(case["mr"], ct, mask, spacing=SPACING, region="pelvis",
                         samples=samples)

    calm, wild = spread(10.0), spread(250.0)
    check = next(c for c in calm.report["checks"] if c["name"] == "sample_spread")
    assert check["status"] == "pass"
    # E[sample std of 3 normals] = c4(3) sigma, c4(3) = Gamma(3/2) / Gamma(1) = sqrt(pi) / 2.
    assert check["value"]["mean_std_hu"] == pytest.approx(10.0 * np.sqrt(np.pi) / 2, rel=0.02)
    assert calm.flagged.sum() == 0
    assert statuses(wild)["sample_spread"] == "fail"
    assert wild.flagged[mask > 0].mean() > 0.3  # std > 150 HU in many body voxels
    with pytest.raises(DataError, match="at least 2 samples"):
        qa.run_qa(case["mr"], ct, mask, spacing=SPACING, region="pelvis", samples=[ct])


def test_hu_range_and_bone_outside_body(case):
    ct, mask = case["ct"].copy(), case["mask"] > 0
    ct[tuple(np.argwhere(mask)[0])] = np.nan  # one body voxel
    assert statuses(qa.run_qa(case["mr"], ct, mask, spacing=SPACING,
                              region="pelvis"))["hu_range"] == "fail"
    ct = case["ct"].copy()
    ct[:6, :6, :] = 1200.0  # a bone block in the corner, outside the body
    assert not mask[:6, :6, :].any()
    result = qa.run_qa(case["mr"], ct, mask, spacing=SPACING, region="pelvis")
    assert statuses(result)["bone_outside_body"] == "fail"
    assert result.flagged[:6, :6, :].all()


def test_bad_arguments(case):
    with pytest.raises(ConfigError, match="region"):
        qa.run_qa(case["mr"], case["ct"])
    with pytest.raises(DataError, match="differs from mr"):
        qa.run_qa(case["mr"], case["ct"][:, :, :-1], region="pelvis")


def _red_pixels(png):
    import matplotlib.image
    rgb = matplotlib.image.imread(png)[..., :3]
    return int((rgb[..., 0] - rgb[..., 1:].max(axis=-1) > 0.4).sum())


def test_cli_reports_pngs_profile_and_errors(tmp_path, capsys):
    region_dir = write_dataset(tmp_path / "data", "pelvis", 3, seed=0, shape=SHAPE)
    cases = sorted(p for p in region_dir.iterdir() if p.is_dir())
    target = cases[0]
    ct = load_volume(target / "ct.nii.gz")
    bad = ct.data.copy()
    bad[:, :, SHAPE[2] // 2] = -1000.0
    save_volume(tmp_path / "bad.nii.gz", bad, ct.affine)
    common = ["--mr", str(target / "mr.nii.gz"), "--mask", str(target / "mask.nii.gz")]

    assert qa_cli.main(common + ["--sct", str(target / "ct.nii.gz"), "--region", "pelvis",
                                 "--report", str(tmp_path / "clean.json")]) == 0
    report = json.loads((tmp_path / "clean.json").read_text())
    assert report["status"] == "pass" and report["inputs"]["sct"].endswith("ct.nii.gz")
    assert _red_pixels(tmp_path / "clean.png") == 0

    assert qa_cli.main(["--build-reference", str(tmp_path / "profile.json"), "--cases",
                        *map(str, cases[1:])]) == 0
    assert qa_cli.main(common + ["--sct", str(tmp_path / "bad.nii.gz"), "--reference",
                                 str(tmp_path / "profile.json"), "--report",
                                 str(tmp_path / "bad.json"), "--png",
                                 str(tmp_path / "figs" / "bad.png")]) == 1
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["status"] == "fail" and report["flagged_slices"] == [SHAPE[2] // 2]
    assert _red_pixels(tmp_path / "figs" / "bad.png") > 100
    assert "overall: fail" in capsys.readouterr().out

    assert qa_cli.main(["--mr", str(target / "mr.nii.gz"), "--sct", str(tmp_path / "no.nii.gz"),
                        "--region", "pelvis", "--report", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no.nii.gz" in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()
    # The module runs as a program, and a grid mismatch is a one-line error.
    short = tmp_path / "short.nii.gz"
    save_volume(short, ct.data[:, :, :-1], ct.affine)
    proc = subprocess.run([sys.executable, "-m", "sct_jax.cli.qa", *common, "--sct", str(short),
                           "--region", "pelvis", "--report", str(tmp_path / "y.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1


def _save_with_sform(path, data, affine):
    """A NIfTI whose only geometry is the sform ``affine`` (nibabel's qform cannot hold
    a singular one): how a zero voxel size reaches a reader."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), None, header=header), path)
    return path


@pytest.mark.parametrize("kind", ["zero", "singular", "non_finite"])
def test_cli_refuses_an_mr_grid_without_a_voxel_size(tmp_path, capsys, case, kind):
    affine = np.diag([*SPACING, 1.0])
    if kind == "zero":
        affine[1, 1] = 0.0
    elif kind == "singular":
        affine[:3, 1] = affine[:3, 0]  # two axes along x: no volume
    else:
        affine[0, 3] = np.inf
    mr = _save_with_sform(tmp_path / "mr.nii.gz", case["mr"], affine)
    sct = _save_with_sform(tmp_path / "sct.nii.gz", case["ct"], affine)
    report = tmp_path / "out" / "qa.json"
    assert qa_cli.main(["--mr", str(mr), "--sct", str(sct), "--region", "pelvis",
                        "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {mr}: "), err
    assert "voxel" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
