"""Tests of sct_jax.data.synthrad (layouts, validation, loading, splits) and of the real
porcine fixture in tests/fixtures/porcine/."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sct_jax.data import synthrad
from sct_jax.data.io import load_volume, save_volume
from sct_jax.errors import ConfigError, DataError
from sct_jax.metrics import synthrad_metrics

SHAPE = (12, 10, 6)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "porcine"
SHARED_PORCINE = Path(__file__).parents[2] / "shared" / "data" / "mridir_porcine"


def _blob_case(seed=0):
    """MR (bright ellipse with a dark hole), CT (HU), box mask: ``(12, 10, 6)`` each."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = ((x - 6) / 4.5) ** 2 + ((y - 5) / 3.5) ** 2 <= 1
    mr = np.where(body, 400.0, 3.0) + rng.normal(0, 5, SHAPE)
    mr[6, 5, :] = 2.0  # dark bone inside
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, SHAPE)
    return np.abs(mr).astype(np.float32), ct.astype(np.int16), body.astype(np.uint8)


def write_case(folder, roles=("mr", "ct", "mask"), suffixes=None, seed=0):
    """Writes a valid case into ``folder``; ``suffixes`` maps a role to its file suffix."""
    suffixes = suffixes or {}
    mr, ct, mask = _blob_case(seed)
    for role, data in (("mr", mr), ("ct", ct), ("mask", mask)):
        if role in roles:
            save_volume(Path(folder) / f"{role}{suffixes.get(role, '.nii.gz')}", data, AFFINE)
    return Path(folder)


# ------------------------------------------------------------------------- discovery


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    task1 = root / "task1_layout"
    for region, case_id in (("pelvis", "1PA002"), ("pelvis", "1PC001"), ("brain", "1BB003"),
                            ("brain", "1BA001")):
        write_case(task1 / "Task1" / region / case_id, roles=("mr",))
    (task1 / "Task1" / "pelvis" / "not_a_case").mkdir()  # no mr: ignored
    (task1 / "Task1" / "pelvis" / ".hidden").mkdir()
    write_case(task1 / "Task1" / "pelvis" / ".hidden", roles=("mr",))
    regions = root / "region_layout"
    write_case(regions / "pelvis" / "1PB007", roles=("mr",))
    write_case(regions / "brain" / "1BC002", roles=("mr",))
    bare = root / "bare_layout"
    write_case(bare / "caseB", suffixes={"mr": ".mha", "ct": ".nii", "mask": ".nii.gz"})
    write_case(bare / "caseA", roles=("mr", "ct"), suffixes={"mr": ".nii"})
    (bare / "notes.txt").write_text("not a case")
    return root


def test_task1_layout_sorted_by_id_with_region_filter(layouts):
    root = layouts / "task1_layout"
    cases = synthrad.discover_cases(root)
    assert [c.id for c in cases] == ["1BA001", "1BB003", "1PA002", "1PC001"]
    assert [c.region for c in cases] == ["brain", "brain", "pelvis", "pelvis"]
    assert cases[2].dir == root / "Task1" / "pelvis" / "1PA002"
    assert cases[2].mr == cases[2].dir / "mr.nii.gz" and cases[2].ct is None
    pelvis = synthrad.discover_cases(root, region="pelvis")
    assert [c.id for c in pelvis] == ["1PA002", "1PC001"]


def test_region_layout(layouts):
    root = layouts / "region_layout"
    assert [(c.id, c.region) for c in synthrad.discover_cases(root)] == [
        ("1BC002", "brain"), ("1PB007", "pelvis")]
    assert [c.id for c in synthrad.discover_cases(root, region="brain")] == ["1BC002"]


def test_bare_layout_with_mixed_suffixes(layouts):
    root = layouts / "bare_layout"
    case_a, case_b = synthrad.discover_cases(root)
    assert (case_a.id, case_a.region) == ("caseA", "")
    assert case_a.mr.name == "mr.nii" and case_a.ct.name == "ct.nii.gz"
    assert case_a.mask is None
    assert (case_b.mr.name, case_b.ct.name, case_b.mask.name) == (
        "mr.mha", "ct.nii", "mask.nii.gz")
    # Bare layouts have no region: a filter keeps them.
    assert len(synthrad.discover_cases(root, region="pelvis")) == 2


def test_missing_empty_and_wrong_region_roots_name_the_root(layouts, tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError, match=str(root)):
            synthrad.discover_cases(root)
    with pytest.raises(DataError, match="brain"):
        synthrad.discover_cases(layouts / "region_layout", region="knee")
    empty_region = tmp_path / "r"
    write_case(empty_region / "pelvis" / "1PA001", roles=("mr",))
    with pytest.raises(DataError, match="no cases found for region 'brain'"):
        synthrad.discover_cases(empty_region, region="brain")


# ------------------------------------------------------------------------ validation


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    """A bare root with one valid case, one MR-only case and one case per problem."""
    root = tmp_path_factory.mktemp("bad_cases")
    write_case(root / "good")
    write_case(root / "mr_only", roles=("mr",))
    mr, ct, mask = _blob_case()
    write_case(root / "shape", roles=("mr", "mask"))
    save_volume(root / "shape" / "ct.nii.gz", ct[:, :, :5], AFFINE)
    write_case(root / "affine", roles=("mr", "mask"))
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    save_volume(root / "affine" / "ct.nii.gz", ct, shifted)
    write_case(root / "nan", roles=("ct", "mask"))
    bad_mr = mr.copy()
    bad_mr[1, 2, 3] = np.nan
    save_volume(root / "nan" / "mr.nii.gz", bad_mr, AFFINE)
    write_case(root / "empty_mask", roles=("mr", "ct"))
    save_volume(root / "empty_mask" / "mask.nii.gz", np.zeros_like(mask), AFFINE)
    write_case(root / "truncated", roles=("mr", "mask"))
    raw = (root / "good" / "ct.nii.gz").read_bytes()
    (root / "truncated" / "ct.nii.gz").write_bytes(raw[:len(raw) // 2])
    write_case(root / "four_d", roles=("mr", "mask"))
    nib.save(nib.Nifti1Image(np.stack([ct, ct], -1), AFFINE), root / "four_d" / "ct.nii.gz")
    write_case(root / "two_d", roles=("mr", "ct"))
    nib.save(nib.Nifti1Image(mask[:, :, 0], AFFINE), root / "two_d" / "mask.nii.gz")
    return root


def _case(root, case_id):
    return next(c for c in synthrad.discover_cases(root) if c.id == case_id)


def test_valid_case_and_mr_only_case_have_no_problems(bad_root):
    assert synthrad.validate_case(_case(bad_root, "good")) == []
    # An MR alone is a valid case for inference: no CT needed, mask made from the MR.
    mr_only = _case(bad_root, "mr_only")
    assert mr_only.ct is None and mr_only.mask is None
    assert synthrad.validate_case(mr_only) == []


@pytest.mark.parametrize("case_id, bad_file, problem", [
    ("shape", "ct.nii.gz", "shape (12, 10, 5) differs"),
    ("affine", "ct.nii.gz", "affine differs"),
    ("nan", "mr.nii.gz", "non-finite"),
    ("empty_mask", "mask.nii.gz", "empty mask"),
    ("truncated", "ct.nii.gz", "truncated"),
    ("four_d", "ct.nii.gz", "expected a 3D volume, got shape (12, 10, 6, 2)"),
    ("two_d", "mask.nii.gz", "expected a 3D volume, got shape (12, 10)"),
])
def test_each_problem_names_the_bad_file(bad_root, case_id, bad_file, problem):
    problems = synthrad.validate_case(_case(bad_root, case_id))
    assert len(problems) == 1, problems
    assert problems[0].startswith(str(bad_root / case_id / bad_file) + ":")
    assert problem in problems[0]


def test_validate_cases_lists_every_bad_case_on_one_line(bad_root):
    cases = synthrad.discover_cases(bad_root)
    with pytest.raises(DataError) as info:
        synthrad.validate_cases(cases)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("7 problem(s) in 7 file(s): ")
    for case_id in ("shape", "affine", "nan", "empty_mask", "truncated", "four_d", "two_d"):
        assert str(bad_root / case_id) in message
    assert str(bad_root / "good") not in message
    assert str(bad_root / "mr_only") not in message
    synthrad.validate_cases([_case(bad_root, "good"), _case(bad_root, "mr_only")])


def test_load_case_reads_the_mask_or_makes_one_from_the_mr(bad_root):
    mr, ct, mask = _blob_case()
    good = synthrad.load_case(_case(bad_root, "good"))
    assert good.id == "good"
    np.testing.assert_array_equal(good.mr.data, mr)
    np.testing.assert_array_equal(good.ct.data, ct)
    np.testing.assert_array_equal(good.mask, mask > 0)
    assert good.mask.dtype == bool

    made = synthrad.load_case(_case(bad_root, "mr_only"))
    assert made.ct is None
    assert made.mask.dtype == bool and made.mask.shape == SHAPE
    assert np.all(made.mask[mask > 0]), "the made mask covers the bright body"
    assert not made.mask[0, 0].any() and not made.mask[-1, -1].any()  # corners: air

    # load_case refuses what validate_case reports, naming the bad file.
    for case_id, bad_file in (("shape", "ct"), ("affine", "ct"), ("empty_mask", "mask"),
                              ("nan", "mr"), ("truncated", "ct"), ("four_d", "ct"),
                              ("two_d", "mask")):
        with pytest.raises(DataError, match=str(bad_root / case_id / bad_file)):
            synthrad.load_case(_case(bad_root, case_id))


def test_a_file_deleted_after_discovery_is_reported_missing(tmp_path):
    (case,) = synthrad.discover_cases(write_case(tmp_path / "c").parent)
    case.ct.unlink()
    assert synthrad.validate_case(case) == [f"{case.ct}: file not found"]
    with pytest.raises(DataError, match=f"{case.ct}: file not found"):
        synthrad.load_case(case)


def test_an_mr_only_case_with_a_blank_mr_cannot_be_loaded(tmp_path):
    save_volume(tmp_path / "blank" / "mr.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    (case,) = synthrad.discover_cases(tmp_path)
    with pytest.raises(DataError, match="mr.nii.gz: no body found"):
        synthrad.load_case(case)


# ------------------------------------------------------------------ file name map


def test_a_case_folder_as_root_and_custom_file_names(tmp_path):
    mr, ct, mask = _blob_case()
    folder = tmp_path / "specimen"
    save_volume(folder / "mr_t2.nii.gz", mr, AFFINE)
    save_volume(folder / "ct_rigid.nii", ct, AFFINE)
    save_volume(folder / "mask.nii.gz", mask, AFFINE)
    with pytest.raises(DataError, match=f"{folder}: no cases found .*mr.nii.gz"):
        synthrad.discover_cases(folder)
    names = {"mr": "mr_t2", "ct": "ct_rigid"}
    for root in (folder, tmp_path):  # the case folder itself, or its parent
        (case,) = synthrad.discover_cases(root, names=names)
        assert (case.id, case.region, case.dir) == ("specimen", "", folder)
        assert (case.mr.name, case.ct.name, case.mask.name) == (
            "mr_t2.nii.gz", "ct_rigid.nii", "mask.nii.gz")
    with pytest.raises(ConfigError, match="'t1'"):
        synthrad.discover_cases(folder, names={"t1": "mr_t1"})


def test_two_files_for_one_role_are_refused(tmp_path):
    write_case(tmp_path / "twice", suffixes={"mr": ".nii.gz"})
    save_volume(tmp_path / "twice" / "mr.mha", _blob_case()[0], AFFINE)
    with pytest.raises(DataError, match=r"twice: several mr volumes \(mr.nii.gz, mr.mha\)"):
        synthrad.discover_cases(tmp_path)


# ---------------------------------------------------------------------------- splits


def _fake_cases(n):
    return [synthrad.Case(f"1PA{i:03d}", "pelvis", Path("."), Path("mr.nii.gz"), None, None)
            for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    cases = _fake_cases(30)
    split = synthrad.split_cases(cases, (0.7, 0.2, 0.1), seed=3)
    assert split == synthrad.split_cases(list(reversed(cases)), (0.7, 0.2, 0.1), seed=3)
    other = synthrad.split_cases(cases, (0.7, 0.2, 0.1), seed=4)
    assert other["test"] != split["test"]
    ids = {name: [c.id for c in part] for name, part in split.items()}
    assert [len(ids[k]) for k in ("train", "val", "test")] == [21, 6, 3]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == [c.id for c in cases]
    for part in ids.values():
        assert part == sorted(part)


@pytest.mark.parametrize("n, fractions", [(3, (0.8, 0.1, 0.1)), (4, (0.1, 0.45, 0.45)),
                                          (5, (0.9, 0.05, 0.05)), (3, (0.34, 0.33, 0.33))])
def test_split_of_few_cases_leaves_no_part_empty(n, fractions):
    split = synthrad.split_cases(_fake_cases(n), fractions, seed=0)
    assert all(len(part) >= 1 for part in split.values()), split
    assert sum(len(part) for part in split.values()) == n


def test_split_with_a_zero_fraction_leaves_that_part_empty():
    split = synthrad.split_cases(_fake_cases(10), (0.9, 0.1, 0.0), seed=0)
    assert len(split["test"]) == 0 and len(split["val"]) == 1


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1),
                                       (float("nan"), 0.5, 0.5), ("a", 0.5, 0.5)])
def test_bad_split_fractions(fractions):
    with pytest.raises(DataError, match="fractions"):
        synthrad.split_cases(_fake_cases(5), fractions)


@pytest.mark.parametrize("n, folds", [(20, 5), (20, 3), (7, 2)])
def test_k_folds_keep_the_test_split_and_validate_each_other_case_once(n, folds):
    cases = _fake_cases(n)
    base = synthrad.split_cases(cases, (0.8, 0.1, 0.1), seed=2)
    pool = sorted(c.id for c in base["train"] + base["val"])
    seen = []
    for fold in range(folds):
        split = synthrad.fold_split(base, folds, fold, seed=2)
        assert split["test"] == base["test"]
        train, val = [c.id for c in split["train"]], [c.id for c in split["val"]]
        assert not set(train) & set(val) and sorted(train + val) == pool
        assert train == sorted(train) and val == sorted(val)
        assert len(val) in (len(pool) // folds, -(-len(pool) // folds))  # near-equal folds
        seen += val
    assert sorted(seen) == pool  # every non-test case validates exactly once
    assert synthrad.fold_split(base, folds, 0, seed=2) == synthrad.fold_split(
        base, folds, 0, seed=2)


@pytest.mark.parametrize("folds, fold", [(1, 0), (5, 5), (5, -1), (99, 0)])
def test_bad_folds(folds, fold):
    base = synthrad.split_cases(_fake_cases(20), (0.8, 0.1, 0.1), seed=0)
    with pytest.raises(DataError, match="data.folds"):
        synthrad.fold_split(base, folds, fold)


# ------------------------------------------------------------- real porcine fixture


@pytest.fixture(scope="module")
def porcine():
    cases = synthrad.discover_cases(FIXTURE_ROOT)
    assert [c.id for c in cases] == ["porcine01"]
    return cases[0]


def test_porcine_fixture_is_discovered_validates_and_loads(porcine):
    assert porcine.region == ""
    assert synthrad.validate_case(porcine) == []
    data = synthrad.load_case(porcine)
    assert data.mr.shape == data.ct.shape == data.mask.shape == (64, 64, 12)
    np.testing.assert_allclose(data.mr.spacing, (1.0, 1.0, 2.5), rtol=1e-6)
    np.testing.assert_allclose(data.ct.affine, data.mr.affine)
    hu = data.ct.data[data.mask]
    assert (hu > 300).sum() > 1000, "bone"
    assert (hu < -50).sum() > 100, "fat"
    assert np.all(data.ct.data == np.round(data.ct.data)) and hu.min() >= -1024


def test_metrics_of_ct_against_ct_plus_50_hu_on_real_data(porcine):
    data = synthrad.load_case(porcine)
    result = synthrad_metrics(data.ct.data, data.ct.data + 50.0, data.mask)
    assert result["mae"] == 50.0 and result["me"] == 50.0
    assert result["ssim"] < 1.0 and np.isfinite(result["psnr"])


@pytest.mark.skipif(not SHARED_PORCINE.is_dir(),
                    reason=f"full porcine pair not present at {SHARED_PORCINE}")
def test_full_porcine_pair_is_discovered_by_name_map_and_validates():
    (case,) = synthrad.discover_cases(SHARED_PORCINE, names={"mr": "mr_t2", "ct": "ct_rigid"})
    assert case.id == "mridir_porcine" and case.mask == SHARED_PORCINE / "mask.nii.gz"
    assert synthrad.validate_case(case) == []
    data = synthrad.load_case(case)
    assert data.mr.shape == data.ct.shape == data.mask.shape == (219, 217, 94)
    # The README's figures: about 2.4% bone (> 300 HU) of the specimen.
    bone = np.mean(data.ct.data[data.mask] > 300)
    assert 0.01 < bone < 0.05, bone


@pytest.mark.skipif(not SHARED_PORCINE.is_dir(),
                    reason=f"full porcine pair not present at {SHARED_PORCINE}")
def test_full_porcine_pair_loads_and_contains_the_fixture(porcine):
    vols = {name: load_volume(SHARED_PORCINE / f"{name}.nii.gz")
            for name in ("mr_t2", "ct_rigid", "mask")}
    for vol in vols.values():
        assert vol.shape == (219, 217, 94)
        np.testing.assert_allclose(vol.spacing, (1.0, 1.0, 2.5), rtol=1e-6)
        np.testing.assert_allclose(vol.affine, vols["mr_t2"].affine)
    # The fixture is the box starting at voxel (100, 81, 41), with its origin moved there.
    start, box = (100, 81, 41), (64, 64, 12)
    window = tuple(slice(s, s + b) for s, b in zip(start, box))
    full_affine = vols["mr_t2"].affine
    for full_name, cut in (("mr_t2", "mr"), ("ct_rigid", "ct"), ("mask", "mask")):
        fixture = load_volume(porcine.dir / f"{cut}.nii.gz")
        np.testing.assert_array_equal(fixture.data, vols[full_name].data[window])
        for voxel in [(0, 0, 0), (63, 5, 11)]:
            np.testing.assert_allclose(
                fixture.affine @ [*voxel, 1], full_affine @ [*np.add(voxel, start), 1],
                atol=1e-4)
