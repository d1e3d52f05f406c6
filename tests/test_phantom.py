"""The built-in phantom dataset: layout, determinism, tissue values, misalignment, CLI."""

import json

import numpy as np
import pytest
from scipy import ndimage

from sct_jax.data import phantom, phantom_cli
from sct_jax.data import phantom_anatomy as anat
from sct_jax.data.io import load_volume
from sct_jax.errors import DataError

TINY_PELVIS = (64, 40, 16)
SMALL_PELVIS = (96, 60, 24)
SMALL_BRAIN = (48, 60, 48)


@pytest.fixture(scope="module")
def pelvis_case():
    return phantom.generate_case("pelvis", 0, seed=7, shape=SMALL_PELVIS)


@pytest.fixture(scope="module")
def brain_case():
    return phantom.generate_case("brain", 1, seed=7, shape=SMALL_BRAIN)


@pytest.fixture(scope="module")
def pelvis_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    return phantom.write_dataset(out, "pelvis", cases=3, seed=5, misalign_mm=2.0,
                                 shape=TINY_PELVIS)


def _median(case, tissue, key="ct"):
    values = case[key][case["labels"] == tissue]
    assert values.size > 0, anat.TISSUE_NAMES[tissue]
    return float(np.median(values))


def test_layout_ids_and_manifest(pelvis_dataset):
    assert pelvis_dataset.parts[-2:] == ("Task1", "pelvis")
    ids = sorted(p.name for p in pelvis_dataset.iterdir() if p.is_dir())
    assert ids == ["1PA001", "1PB002", "1PC003"]
    for case_id in ids:
        for name in ("mr", "ct", "mask"):
            assert (pelvis_dataset / case_id / f"{name}.nii.gz").is_file()
    manifest = json.loads((pelvis_dataset / "manifest.json").read_text())
    assert (manifest["region"], manifest["seed"], manifest["misalign_mm"]) == ("pelvis", 5, 2.0)
    assert [c["id"] for c in manifest["cases"]] == ids
    assert [c["centre"] for c in manifest["cases"]] == ["A", "B", "C"]
    for record in manifest["cases"]:
        moved = record["displacement_mm"]
        assert 0.0 < moved["mean"] <= moved["max"]
        assert len(record["rotation_deg"]) == len(record["translation_mm"]) == 3
        assert record["elastic_amplitude_mm"] == pytest.approx(1.0)


def test_written_volumes_are_the_generated_arrays(pelvis_dataset):
    case = phantom.generate_case("pelvis", 1, seed=5, misalign_mm=2.0, shape=TINY_PELVIS)
    for name in ("mr", "ct", "mask"):
        vol = load_volume(pelvis_dataset / "1PB002" / f"{name}.nii.gz")
        assert vol.spacing == pytest.approx((1.0, 1.0, 2.5))
        np.testing.assert_array_equal(vol.data, case[name].astype(np.float32))
        np.testing.assert_allclose(vol.affine, case["affine"])


def test_same_seed_gives_byte_identical_arrays():
    first = phantom.generate_case("pelvis", 2, seed=11, misalign_mm=3.0, shape=TINY_PELVIS)
    again = phantom.generate_case("pelvis", 2, seed=11, misalign_mm=3.0, shape=TINY_PELVIS)
    for key in ("mr", "ct", "mask", "labels"):
        assert first[key].tobytes() == again[key].tobytes(), key
    assert first["info"] == again["info"]
    other = phantom.generate_case("pelvis", 2, seed=12, misalign_mm=3.0, shape=TINY_PELVIS)
    assert not np.array_equal(first["ct"], other["ct"])


def test_pelvis_ct_values_per_tissue(pelvis_case):
    c = pelvis_case
    outside = c["mask"] == 0
    assert abs(float(c["ct"][outside].mean()) + 1000.0) < 15.0
    assert -140.0 < _median(c, anat.FAT) < -60.0
    assert 30.0 < _median(c, anat.MUSCLE) < 75.0
    assert -10.0 < _median(c, anat.FLUID) < 30.0
    assert 100.0 < _median(c, anat.MARROW) < 600.0
    assert np.count_nonzero(c["ct"][c["labels"] == anat.CORTICAL] > 1000.0) > 20
    assert c["ct"].min() >= -1024 and c["ct"].max() <= 3071
    assert np.array_equal(c["ct"], np.rint(c["ct"]))


def test_pelvis_mr_bone_and_air_are_both_dark(pelvis_case):
    c = pelvis_case
    mean = {t: float(c["mr"][c["labels"] == t].mean())
            for t in (anat.CORTICAL, anat.MUSCLE, anat.FAT, anat.MARROW, anat.FLUID)}
    air = float(c["mr"][c["mask"] == 0].mean())
    for dark in (mean[anat.CORTICAL], air):
        assert dark < mean[anat.MUSCLE] < mean[anat.FAT]
    assert mean[anat.MARROW] > mean[anat.MUSCLE] > mean[anat.FLUID]


def test_brain_tissues(brain_case):
    c = brain_case
    assert _median(c, anat.GREY_MATTER) > _median(c, anat.WHITE_MATTER)  # CT: 40 vs 27 HU
    # Thin CSF next to the skull takes bone HU by partial volume: look away from bone.
    bone = np.isin(c["labels"], (anat.CORTICAL, anat.DIPLOE))
    deep_csf = (c["labels"] == anat.CSF) & ~ndimage.binary_dilation(bone, iterations=2)
    assert -5.0 < float(np.median(c["ct"][deep_csf])) < 35.0
    mr = {t: float(c["mr"][c["labels"] == t].mean())
          for t in (anat.WHITE_MATTER, anat.GREY_MATTER, anat.CSF, anat.CORTICAL)}
    assert mr[anat.WHITE_MATTER] > mr[anat.GREY_MATTER] > mr[anat.CSF]
    assert mr[anat.CORTICAL] < mr[anat.GREY_MATTER]
    assert _median(c, anat.DIPLOE) > 300.0
    sinus_air = (c["labels"] == anat.AIR) & (c["mask"] > 0)
    assert np.any(c["ct"][sinus_air] < -900)


@pytest.mark.parametrize("region", ["pelvis", "brain"])
def test_mask_covers_the_body(region, pelvis_case, brain_case):
    c = pelvis_case if region == "pelvis" else brain_case
    mask = c["mask"] > 0
    assert mask[c["labels"] != anat.AIR].all()
    assert 0.2 < mask.mean() < 0.9
    assert float(c["ct"][~mask].mean()) < -950.0


def test_misalignment_moves_only_the_mr_and_scales():
    cases = {m: phantom.generate_case("pelvis", 0, seed=3, misalign_mm=m, shape=TINY_PELVIS)
             for m in (0.0, 3.0, 6.0)}
    aligned = cases[0.0]["info"]
    assert aligned["displacement_mm"] == {"mean": 0.0, "max": 0.0}
    assert aligned["elastic_amplitude_mm"] == 0.0
    for m in (3.0, 6.0):
        assert cases[m]["ct"].tobytes() == cases[0.0]["ct"].tobytes()
        assert not np.array_equal(cases[m]["mr"], cases[0.0]["mr"])
    small, large = (cases[m]["info"]["displacement_mm"] for m in (3.0, 6.0))
    assert 1.0 < small["mean"] < 6.0
    assert large["mean"] / small["mean"] == pytest.approx(2.0, rel=0.05)
    assert large["max"] >= large["mean"]


def test_affine_spacing_and_centre():
    case = phantom.generate_case("brain", 0, seed=0, shape=(20, 24, 16))
    affine = case["affine"]
    np.testing.assert_allclose(np.diag(affine)[:3], (1.0, 1.0, 1.0))
    centre_voxel = (np.array([20, 24, 16]) - 1) / 2.0
    np.testing.assert_allclose(affine[:3, :3] @ centre_voxel + affine[:3, 3], 0.0, atol=1e-9)


def test_cli_writes_a_loadable_dataset_and_panel(tmp_path):
    png = tmp_path / "panel.png"
    status = phantom_cli.main(["--out", str(tmp_path / "ds"), "--region", "brain", "--cases",
                               "1", "--seed", "4", "--misalign", "1.5", "--shape", "32", "40",
                               "32", "--panel", str(png)])
    assert status == 0
    case_dir = tmp_path / "ds" / "Task1" / "brain" / "1BA001"
    ct = load_volume(case_dir / "ct.nii.gz")
    assert ct.shape == (32, 40, 32)
    assert ct.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert load_volume(case_dir / "mr.nii.gz").shape == (32, 40, 32)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--cases", "0"], "--cases"),
    (["--region", "knee"], "--region"),
    (["--shape", "8", "40", "16"], "--shape"),
    (["--misalign", "-1"], "--misalign"),
    (["--anatomy-variation", "1.5"], "--anatomy-variation"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main(["--out", str(tmp_path)] + argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_api_errors_are_data_errors():
    with pytest.raises(DataError, match="region"):
        phantom.generate_case("knee", 0, seed=0)
    with pytest.raises(DataError, match="misalign"):
        phantom.generate_case("pelvis", 0, seed=0, misalign_mm=-1.0)
    with pytest.raises(DataError, match="shape"):
        phantom.generate_case("pelvis", 0, seed=0, shape=(64, 40))


# ---------------------------------------------- seed 02: aligned minority, aligned CT
@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """5 cases at 4 mm, of which round(0.4 * 5) = 2 with no motion."""
    out = tmp_path_factory.mktemp("mixed")
    return phantom.write_dataset(out, "pelvis", cases=5, seed=3, misalign_mm=4.0,
                                 shape=TINY_PELVIS, aligned_fraction=0.4)


def test_aligned_minority_is_recorded_and_found_by_mutual_information(mixed_dataset):
    from sct_jax.data.alignment import rank_cases_by_mi

    manifest = json.loads((mixed_dataset / "manifest.json").read_text())
    assert manifest["aligned_fraction"] == 0.4
    records = {c["id"]: c for c in manifest["cases"]}
    aligned = sorted(i for i, c in records.items() if c["aligned"])
    assert len(aligned) == 2
    assert aligned == sorted(phantom.case_id("pelvis", i)[0]
                             for i in phantom.aligned_indices("pelvis", 5, 3, 0.4))
    for case_id, c in records.items():
        moved = c["displacement_mm"]["mean"]
        if c["aligned"]:
            assert c["misalign_mm"] == 0.0 and moved == 0.0
        else:
            assert c["misalign_mm"] == 4.0 and moved > 1.0
    # The best-registered cases by MR/CT mutual information are exactly the aligned ones.
    ranked = list(rank_cases_by_mi(mixed_dataset))
    assert sorted(ranked[:2]) == aligned


def test_aligned_ct_is_the_ct_the_mr_sees(mixed_dataset):
    from sct_jax.data.alignment import mutual_information

    manifest = json.loads((mixed_dataset / "manifest.json").read_text())
    for c in manifest["cases"]:
        vol = {name: load_volume(mixed_dataset / c["id"] / f"{name}.nii.gz").data
               for name in ("mr", "ct", "mask", "ct_aligned", "mask_aligned", "ct_ideal")}
        if c["aligned"]:
            np.testing.assert_array_equal(vol["ct_aligned"], vol["ct"])
            np.testing.assert_array_equal(vol["mask_aligned"], vol["mask"])
        else:
            # The MR matches the moved CT better than the scanner's CT (a field applied
            # the wrong way round would move the CT further from the MR).
            mask = vol["mask_aligned"] > 0
            mi_aligned = mutual_information(vol["mr"], vol["ct_aligned"], mask)
            mi_scanner = mutual_information(vol["mr"], vol["ct"], mask)
            assert mi_aligned > 1.2 * mi_scanner, (c["id"], mi_aligned, mi_scanner)
        # The ideal CT differs from the reference by the CT noise alone.
        body = vol["mask_aligned"] > 0
        noise = np.abs(vol["ct_aligned"] - vol["ct_ideal"])[body]
        assert 0.4 * c["ct_noise_hu"] < noise.mean() < 1.2 * c["ct_noise_hu"]


def test_aligned_fraction_out_of_range_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="aligned fraction 1.5"):
        phantom.write_dataset(tmp_path, "pelvis", cases=2, seed=0, misalign_mm=4.0,
                              shape=(16, 16, 4), aligned_fraction=1.5)


# ------------------------------------------------------------ anatomy variation (atlas)

def test_variation_pulls_ranged_draws_to_the_middle_and_keeps_the_stream():
    plain = np.random.default_rng(3)
    assert anat.Variation(np.random.default_rng(3), 1.0).uniform(2.0, 4.0) == plain.uniform(2.0, 4.0)
    rng = np.random.default_rng(3)
    half = anat.Variation(np.random.default_rng(3), 0.5)
    expected = 3.0 + 0.5 * (rng.uniform(2.0, 4.0) - 3.0)
    assert half.uniform(2.0, 4.0) == pytest.approx(expected)
    assert anat.Variation(np.random.default_rng(3), 0.0).uniform(low=2.0, high=4.0) == 3.0
    # A probability draw and the integers pass through: anatomy is moved, not removed.
    assert anat.Variation(np.random.default_rng(5), 0.0).uniform() == np.random.default_rng(5).uniform()
    assert anat.Variation(np.random.default_rng(5), 0.0).integers(3, 7) == \
        np.random.default_rng(5).integers(3, 7)


def test_full_variation_is_the_default_phantom_byte_for_byte(pelvis_case):
    again = phantom.generate_case("pelvis", 0, seed=7, shape=SMALL_PELVIS, anatomy_variation=1.0)
    np.testing.assert_array_equal(again["ct"], pelvis_case["ct"])
    np.testing.assert_array_equal(again["labels"], pelvis_case["labels"])


@pytest.mark.parametrize("region, shape", [("pelvis", TINY_PELVIS), ("brain", (32, 40, 32))])
def test_atlas_like_anatomy_differs_less_between_cases(region, shape):
    """Two cases' CTs differ far less at variation 0.2 than at 1 (the mean training CT
    becomes a strong baseline), and they still differ (appearance, noise, loops)."""
    def case_difference(variation):
        a, b = (phantom.generate_case(region, i, seed=2, shape=shape,
                                      anatomy_variation=variation) for i in (0, 1))
        body = (a["mask"] > 0) | (b["mask"] > 0)
        return float(np.mean(np.abs(a["ct"] - b["ct"])[body]))

    full, atlas = case_difference(1.0), case_difference(0.2)
    assert 0 < atlas < 0.7 * full, (atlas, full)


def test_anatomy_variation_is_recorded_checked_and_keys_the_cache(tmp_path):
    from sct_jax.config_utils import load_config_file
    from sct_jax.data import datasets
    from pathlib import Path

    argv = ["--out", str(tmp_path), "--cases", "1", "--shape", "16", "16", "4"]
    assert phantom_cli.main(argv + ["--anatomy-variation", "0.2"]) == 0
    region_dir = tmp_path / "Task1" / "pelvis"
    manifest = json.loads((region_dir / "manifest.json").read_text())
    assert manifest["anatomy_variation"] == 0.2
    assert manifest["cases"][0]["anatomy_variation"] == 0.2
    assert phantom_cli.existing_dataset_differences(region_dir, "pelvis", 1, 0, 0.0,
                                                    (16, 16, 4), 1, 1.0) == [
        "anatomy_variation 0.2 -> 1.0"]
    assert phantom_cli.main(argv) == 2  # the default variation is another dataset
    with pytest.raises(DataError, match="anatomy variation"):
        phantom.generate_case("pelvis", 0, seed=0, shape=(16, 16, 4), anatomy_variation=-0.1)
    repo = Path(__file__).resolve().parents[1]
    config = load_config_file(f"{repo / 'configs/pix2pix_pelvis.py'}:tiny,atlas")
    assert config.data.phantom.anatomy_variation == 0.2
    assert config.name.endswith("_atlas")
    config.data.cache_dir = str(tmp_path / "cache")
    assert datasets.phantom_root(config).name.endswith("_var0.2")
