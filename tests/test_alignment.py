"""Mutual information against an independent float64 histogram2d reference; case ranking."""

import numpy as np
import pytest

from sct_jax.data import alignment, phantom
from sct_jax.errors import DataError

TINY_PELVIS = (64, 40, 16)


def _reference_probabilities(a, b, mask, bins):
    if mask is not None:
        a, b = a[mask > 0], b[mask > 0]
    counts, _, _ = np.histogram2d(a.astype(np.float64).ravel(), b.astype(np.float64).ravel(),
                                  bins=bins)
    return counts / counts.sum()


def _reference_mi(a, b, mask=None, bins=64):
    """sum p_ij log(p_ij / (p_i p_j)) over the non-empty cells."""
    p = _reference_probabilities(a, b, mask, bins)
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))


def _reference_entropy(q):
    q = q[q > 0]
    return float(-np.sum(q * np.log(q)))


@pytest.fixture(scope="module")
def correlated():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 24, 16)).astype(np.float32)
    b = (np.tanh(a) + 0.3 * rng.normal(size=a.shape)).astype(np.float32)
    mask = (rng.uniform(size=a.shape) < 0.7).astype(np.uint8)
    return a, b, mask


@pytest.mark.parametrize("bins", [8, 64])
def test_mi_matches_histogram2d_reference(correlated, bins):
    a, b, mask = correlated
    assert alignment.mutual_information(a, b, mask, bins) == pytest.approx(
        _reference_mi(a, b, mask, bins), rel=1e-10)
    assert alignment.mutual_information(a, b, None, bins) == pytest.approx(
        _reference_mi(a, b, None, bins), rel=1e-10)


def test_nmi_matches_reference(correlated):
    a, b, mask = correlated
    p = _reference_probabilities(a, b, mask, 32)
    expected = ((_reference_entropy(p.sum(axis=1)) + _reference_entropy(p.sum(axis=0)))
                / _reference_entropy(p.ravel()))
    assert alignment.normalized_mutual_information(a, b, mask, 32) == pytest.approx(
        expected, rel=1e-10)


def test_mi_of_identical_images_is_their_entropy(correlated):
    a, _, mask = correlated
    counts, _ = np.histogram(a[mask > 0].astype(np.float64), bins=32)
    entropy = _reference_entropy(counts / counts.sum())
    assert alignment.mutual_information(a, a, mask, 32) == pytest.approx(entropy, rel=1e-10)
    assert alignment.normalized_mutual_information(a, a, mask, 32) == pytest.approx(2.0)


def test_mi_of_independent_images_is_near_zero():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(2, 50, 50, 40))
    mi = alignment.mutual_information(a, b, bins=16)
    assert 0.0 <= mi < 0.01  # histogram bias ~ (bins - 1)^2 / (2 N) = 1e-3


def test_mi_on_integer_phantom_images_matches_reference():
    case = phantom.generate_case("pelvis", 0, seed=1, shape=TINY_PELVIS)
    expected = _reference_mi(case["mr"], case["ct"], case["mask"], 64)
    assert alignment.mutual_information(case["mr"], case["ct"], case["mask"]) == pytest.approx(
        expected, rel=1e-10)


@pytest.mark.parametrize("region, shape", [("pelvis", (96, 60, 24)), ("brain", (48, 60, 48))])
def test_mi_decreases_as_misalignment_grows(region, shape):
    mi = []
    for misalign in (0.0, 4.0, 8.0):
        case = phantom.generate_case(region, 0, seed=2, misalign_mm=misalign, shape=shape)
        mi.append(alignment.mutual_information(case["mr"], case["ct"], case["mask"]))
    assert mi[0] > mi[1] > mi[2], mi


def test_errors():
    a = np.zeros((4, 4, 4))
    with pytest.raises(DataError, match="shape"):
        alignment.mutual_information(a, np.zeros((4, 4, 5)))
    with pytest.raises(DataError, match="no voxels"):
        alignment.mutual_information(a, a, np.zeros_like(a))
    with pytest.raises(DataError, match="non-finite"):
        alignment.mutual_information(np.full((2, 2, 2), np.nan), np.zeros((2, 2, 2)))


def test_rank_cases_from_folders_and_arrays_agree(tmp_path):
    region_dir = phantom.write_dataset(tmp_path, "pelvis", cases=4, seed=2, misalign_mm=3.0,
                                       shape=TINY_PELVIS)
    from_root = alignment.rank_cases_by_mi(region_dir)
    from_dirs = alignment.rank_cases_by_mi(sorted(p for p in region_dir.iterdir() if p.is_dir()))
    arrays = {}
    for index in range(4):
        case = phantom.generate_case("pelvis", index, seed=2, misalign_mm=3.0, shape=TINY_PELVIS)
        arrays[case["info"]["id"]] = case
    from_arrays = alignment.rank_cases_by_mi(arrays)
    assert list(from_root) == list(from_dirs) == list(from_arrays)
    assert sorted(from_root) == ["1PA001", "1PA004", "1PB002", "1PC003"]
    for case_id, mi in from_root.items():
        assert from_arrays[case_id] == pytest.approx(mi, rel=1e-12)
        assert mi == pytest.approx(alignment.mutual_information(
            arrays[case_id]["mr"], arrays[case_id]["ct"], arrays[case_id]["mask"]), rel=1e-12)
    values = list(from_root.values())
    assert values == sorted(values, reverse=True)


def test_select_meta_validation_takes_the_top_fraction():
    mi = {f"1PA{i:03d}": float(i) for i in range(1, 21)}  # 20 cases, MI = number
    assert alignment.select_meta_validation(mi) == ["1PA020", "1PA019"]  # 11% of 20 -> 2
    hundred = {f"c{i:03d}": float(i) for i in range(100)}
    assert alignment.select_meta_validation(hundred) == [f"c{i:03d}" for i in range(99, 88, -1)]
    assert alignment.select_meta_validation({"a": 0.1, "b": 0.9, "c": 0.5}) == ["b"]  # >= 1
    assert alignment.select_meta_validation({"b": 1.0, "a": 1.0, "c": 0.0}, 0.5) == ["a", "b"]
    assert alignment.select_meta_validation(mi, 1.0) == sorted(mi, reverse=True)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(DataError, match="fraction"):
            alignment.select_meta_validation(mi, fraction)
    with pytest.raises(DataError):
        alignment.select_meta_validation({})
    with pytest.raises(DataError, match="non-finite"):
        alignment.select_meta_validation({"a": float("nan"), "b": 1.0})
