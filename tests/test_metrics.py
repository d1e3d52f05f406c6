"""SynthRAD2023 metrics against scikit-image (what the challenge code calls) and by hand."""

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util import crop

from sct_jax.errors import DataError
from sct_jax import metrics

SHAPE = (40, 36, 20)


def _official_ssim(ct, sct, mask):
    """The challenge's recipe, step by step, on scikit-image's full SSIM map."""
    mask = mask > 0
    gt = np.clip(ct.astype(np.float64), -1024, 3000)
    pred = np.clip(sct.astype(np.float64), -1024, 3000)
    gt = np.where(mask, gt, -1024.0) + 1024.0
    pred = np.where(mask, pred, -1024.0) + 1024.0
    _, ssim_map = structural_similarity(gt, pred, win_size=7, data_range=4024.0,
                                        full=True)
    return crop(ssim_map, 3)[crop(mask, 3)].mean(dtype=np.float64)


def _official_psnr(ct, sct, mask):
    mask = mask > 0
    gt = np.clip(ct.astype(np.float64), -1024, 3000)[mask]
    pred = np.clip(sct.astype(np.float64), -1024, 3000)[mask]
    return peak_signal_noise_ratio(gt, pred, data_range=4024.0)


@pytest.fixture(scope="module")
def volumes():
    """A CT-like volume (values beyond both clip limits), a mask and two predictions."""
    rng = np.random.default_rng(0)
    ct = rng.choice([-1000.0, 0.0, 40.0, 700.0, 1500.0], size=SHAPE)
    ct += rng.normal(0.0, 300.0, SHAPE)
    ct[0, 0, :5] = [-2000.0, 3500.0, 5000.0, -1500.0, 3000.0]  # clip limits matter
    # An irregular mask: an ellipsoid that reaches the border on some sides.
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    mask = ((grid[0] / 0.95) ** 2 + (grid[1] / 1.1) ** 2 + (grid[2] / 0.8) ** 2) < 1.0
    mask = mask.astype(np.uint8) * 3  # any value > 0 counts
    noisy = ct + rng.normal(0.0, 120.0, SHAPE)
    perturbed = ct.copy()
    perturbed[10:25, 5:20, 4:12] += 900.0  # a structural error, not just noise
    perturbed[mask == 0] = rng.normal(0.0, 2000.0, (mask == 0).sum())  # ignored
    return ct, mask, {"noisy": noisy.astype(np.float32), "perturbed": perturbed}


@pytest.fixture(scope="module")
def low_contrast():
    """Soft tissue only: local variances near C2, where sample vs population covariance
    changes SSIM by ~1e-3 (on high-contrast volumes it cancels to ~1e-7)."""
    rng = np.random.default_rng(2)
    ct = rng.normal(40.0, 40.0, SHAPE)
    return ct, ct + rng.normal(0.0, 40.0, SHAPE)


@pytest.mark.parametrize("which", ["noisy", "perturbed", "low_contrast"])
def test_ssim_psnr_match_scikit_image(volumes, low_contrast, which):
    ct, mask, preds = volumes
    if which == "low_contrast":
        ct, sct = low_contrast
    else:
        sct = preds[which]
    expected_ssim = _official_ssim(ct, sct, mask)
    assert 0.1 < expected_ssim < 0.999  # a non-trivial value
    assert metrics.ssim(ct, sct, mask) == pytest.approx(expected_ssim, rel=1e-6)
    assert metrics.psnr(ct, sct, mask) == pytest.approx(
        _official_psnr(ct, sct, mask), rel=1e-6)


def test_low_contrast_case_detects_population_covariance(low_contrast):
    # Guards the test above: the case must tell skimage's two covariance modes apart.
    ct, sct = low_contrast
    sample, population = (
        structural_similarity(ct + 1024, sct + 1024, data_range=4024.0,
                              use_sample_covariance=flag) for flag in (True, False))
    assert abs(sample - population) > 1e-4 * abs(sample)


def test_ssim_slabs_do_not_change_the_result(volumes, monkeypatch):
    ct, mask, preds = volumes
    whole = metrics.ssim(ct, preds["perturbed"], mask)
    # 1-3 planes per slab: many slab seams, each with its own halo.
    monkeypatch.setattr(metrics, "_SSIM_SLAB_VOXELS", 2 * 30 * 14)
    assert metrics.ssim(ct, preds["perturbed"], mask) == pytest.approx(whole, rel=1e-12)


def test_ssim_without_mask_equals_plain_skimage(volumes):
    ct, _, preds = volumes
    full_mask = np.ones(SHAPE, bool)
    gt = np.clip(ct, -1024, 3000) + 1024
    pred = np.clip(preds["noisy"].astype(np.float64), -1024, 3000) + 1024
    expected = structural_similarity(gt, pred, data_range=4024.0)
    assert metrics.ssim(ct, preds["noisy"], full_mask) == pytest.approx(expected, rel=1e-6)


def test_mae_me_match_numpy_and_ignore_outside_mask(volumes):
    ct, mask, preds = volumes
    sct = preds["perturbed"]
    m = mask > 0
    assert metrics.mae(ct, sct, mask) == pytest.approx(
        np.abs(ct[m] - sct[m]).mean(), rel=1e-12)
    assert metrics.me(ct, sct, mask) == pytest.approx((sct[m] - ct[m]).mean(), rel=1e-12)


def test_identical_images():
    ct = np.random.default_rng(1).normal(0, 500, (9, 8, 8))
    mask = np.zeros(ct.shape, bool)
    mask[1:8, 1:7, 2:7] = True
    result = metrics.synthrad_metrics(ct, ct.copy(), mask)
    assert result["mae"] == 0.0 and result["me"] == 0.0
    assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["psnr"] == math.inf
    assert result["dice_bone"] == 1.0


def test_psnr_equal_after_clipping_is_inf():
    ct = np.array([3500.0, -2000.0, 0.0]).reshape(3, 1, 1)
    sct = np.array([3100.0, -1100.0, 0.0]).reshape(3, 1, 1)
    assert metrics.psnr(ct, sct, np.ones_like(ct)) == math.inf
    assert metrics.mae(ct, sct, np.ones_like(ct)) == pytest.approx(1300.0 / 3)  # no clip


def test_hand_computed_tiny_case():
    ct = np.array([-1000.0, -100.0, 100.0, 300.0, 1000.0, 50.0]).reshape(2, 3, 1)
    sct = np.array([-900.0, -100.0, 400.0, 200.0, 1000.0, 9999.0]).reshape(2, 3, 1)
    mask = np.array([1, 1, 1, 1, 1, 0]).reshape(2, 3, 1)
    # Errors (sct - ct) on the 5 masked voxels: 100, 0, 300, -100, 0.
    assert metrics.mae(ct, sct, mask) == pytest.approx(500.0 / 5)
    assert metrics.me(ct, sct, mask) == pytest.approx(300.0 / 5)
    # Air: -1000 -> 100; soft: -100, 100 -> (0 + 300) / 2; bone: 300, 1000 -> 100 / 2.
    assert metrics.tissue_mae(ct, sct, mask) == pytest.approx(
        {"mae_air": 100.0, "mae_soft": 150.0, "mae_bone": 50.0})
    # Bone CT {300, 1000}, bone sCT {400 (at ct 100), 1000}; the 9999 is outside.
    assert metrics.dice_bone(ct, sct, mask) == pytest.approx(2 * 1 / (2 + 2))
    assert metrics.psnr(ct, sct, mask) == pytest.approx(
        10 * math.log10(4024.0**2 / ((100**2 + 300**2 + 100**2) / 5)))


def test_tissue_thresholds_and_empty_class():
    # -200 and 250 are soft tissue (the class bounds are inclusive).
    ct = np.array([-200.0, 250.0, 251.0]).reshape(3, 1, 1)
    sct = np.array([-190.0, 270.0, 151.0]).reshape(3, 1, 1)
    mask = np.ones(ct.shape)
    tissue = metrics.tissue_mae(ct, sct, mask)
    assert math.isnan(tissue["mae_air"])
    assert tissue["mae_soft"] == pytest.approx(15.0)
    assert tissue["mae_bone"] == pytest.approx(100.0)
    # Bone: CT {251}, sCT {270}: no overlap.
    assert metrics.dice_bone(ct, sct, mask) == 0.0
    assert math.isnan(metrics.dice_bone(ct * 0, sct * 0, mask))


def test_synthrad_metrics_agrees_with_the_single_functions(volumes):
    ct, mask, preds = volumes
    sct = preds["noisy"]
    result = metrics.synthrad_metrics(ct, sct, mask)
    assert tuple(result) == metrics.METRIC_NAMES
    assert all(type(v) is float for v in result.values())
    assert result["mae"] == metrics.mae(ct, sct, mask)
    assert result["psnr"] == metrics.psnr(ct, sct, mask)
    assert result["ssim"] == metrics.ssim(ct, sct, mask)
    assert result["me"] == metrics.me(ct, sct, mask)
    assert result["dice_bone"] == metrics.dice_bone(ct, sct, mask)
    for name, value in metrics.tissue_mae(ct, sct, mask).items():
        assert result[name] == value


def test_invalid_inputs():
    a = np.zeros((8, 8, 8))
    with pytest.raises(DataError, match=r"\(8, 8, 8\).*\(8, 8, 7\)"):
        metrics.synthrad_metrics(a, np.zeros((8, 8, 7)), a)
    with pytest.raises(DataError, match="empty mask"):
        metrics.mae(a, a, a)
    with pytest.raises(DataError, match=">= 7"):
        metrics.ssim(np.zeros((8, 6, 8)), np.zeros((8, 6, 8)), np.ones((8, 6, 8)))
    # Masked voxels only on the 3-voxel border: nothing left to average (as skimage).
    border = np.zeros((8, 8, 8))
    border[0] = 1
    assert math.isnan(metrics.ssim(a, a, border))


def test_one_dice_with_nan_for_two_empty_masks():
    """The project's one Dice (bone Dice and the QA body outline): 2|A&B| / (|A|+|B|),
    NaN when both masks are empty (left out of case means, never a perfect score)."""
    from sct_jax.evaluation import qa
    rng = np.random.default_rng(3)
    a, b = rng.random((9, 8, 7)) > 0.6, rng.random((9, 8, 7)) > 0.5
    reference = 2.0 * np.sum(a & b, dtype=np.float64) / (np.sum(a, dtype=np.float64)
                                                         + np.sum(b, dtype=np.float64))
    assert metrics.dice(a, b) == pytest.approx(reference, rel=1e-12)
    assert metrics.dice(a, a) == 1.0
    empty = np.zeros_like(a)
    assert metrics.dice(a, empty) == 0.0
    assert math.isnan(metrics.dice(empty, empty))
    assert qa.dice is metrics.dice  # no second copy with another convention
