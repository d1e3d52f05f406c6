"""The no-model baselines on small arrays: the lookup recovers a known MR -> HU step
function, the mean CT of identical training CTs is that CT, and the verdict."""

import math

import numpy as np
import pytest

from sct_jax.evaluation import baselines

# A step function of the normalised MR whose steps fall on bin edges of 64 bins.
STEPS = ((-0.5, -1000.0), (0.25, 40.0), (1.01, 700.0))


def step_hu(unit):
    out = np.full(unit.shape, np.nan)
    for upper, hu in reversed(STEPS):
        out[unit < upper] = hu
    return out


def test_lookup_recovers_a_step_function_and_fills_empty_bins():
    rng = np.random.default_rng(0)
    pairs = []
    for shape in ((9, 8, 7), (6, 10, 5)):
        unit = rng.uniform(-1, 1, shape).astype(np.float32)
        mask = rng.random(shape) < 0.8
        ct = np.where(mask, step_hu(unit), 3000.0)  # outside the body: never fitted
        pairs.append((unit, ct, mask))
    lookup = baselines.fit_intensity_lookup(iter(pairs))
    centres = -1 + (np.arange(64) + 0.5) / 32
    np.testing.assert_array_equal(lookup.hu, step_hu(centres))
    test_unit = rng.uniform(-1, 1, (5, 6, 7))
    body = np.zeros(test_unit.shape, bool)
    body[1:4, 1:5, 1:6] = True
    sct = lookup.predict(test_unit, body)
    np.testing.assert_array_equal(sct[body], step_hu(test_unit)[body])
    assert (sct[~body] == -1000.0).all() and sct.dtype == np.float32
    assert lookup.predict(np.array([-1.0, 1.0]), np.ones(2, bool)).tolist() == [-1000, 700]

    # Only bins 0-7 (u < -0.75) and 48-63 (u >= 0.5) seen: the gap between is filled
    # linearly from its filled neighbours, the end values held.
    fit = baselines.LookupFit()
    fit.add(np.array([-0.9, -0.9, 0.9]), np.array([-900.0, -700.0, 500.0]), np.ones(3, bool))
    lookup = fit.result()
    filled = np.flatnonzero(lookup.counts)
    assert filled.tolist() == [3, 60]
    assert lookup.hu[0] == lookup.hu[3] == -800.0 and lookup.hu[63] == lookup.hu[60] == 500.0
    np.testing.assert_allclose(lookup.hu[3:61], np.linspace(-800, 500, 58))


def test_mean_ct_of_identical_training_cts_is_that_ct():
    rng = np.random.default_rng(1)
    ct = np.full((14, 12, 10), -1000.0, np.float32)
    mask = np.zeros(ct.shape, bool)
    mask[2:12, 3:10, 1:9] = True
    ct[mask] = rng.uniform(-200, 1200, mask.sum())
    # The same anatomy elsewhere in a bigger field of view: the body box is what counts.
    shifted_ct = np.full((20, 16, 12), -1000.0, np.float32)
    shifted_mask = np.zeros(shifted_ct.shape, bool)
    shifted_ct[5:19, 1:13, 2:12], shifted_mask[5:19, 1:13, 2:12] = ct, mask
    train = [(ct, mask), (shifted_ct, shifted_mask), (ct, mask)]
    box = baselines.mean_ct_on_boxes(iter(train), [baselines.box_shape(mask)])[0]
    sct = baselines.place_in_body(box, mask)
    np.testing.assert_allclose(sct, ct, atol=1e-3)
    # On a box twice the size: the linear zoom of the training box.
    twice = baselines.mean_ct_on_boxes(iter(train), [(20, 14, 16)])[0]
    expected = baselines.resample_to(np.where(mask, ct, -1000)[2:12, 3:10, 1:9], (20, 14, 16))
    assert twice.shape == (20, 14, 16)
    np.testing.assert_allclose(twice, expected, atol=1e-3)
    assert baselines.resample_to(ct, (5, 31, 7)).shape == (5, 31, 7)


def test_verdict_names_the_best_baseline_and_both_numbers():
    base = {"constant": {"mae": 250.0, "ssim": 0.60}, "lookup": {"mae": 150.0, "ssim": 0.70},
            "mean_ct": {"mae": 164.2, "ssim": 0.743}, "perfect": {"mae": 10.0, "ssim": 0.99}}
    good = baselines.verdict({"mae": 120.0, "ssim": 0.80}, base)
    assert good["beats_best_baseline"] == {"mae": True, "ssim": True} and not good["warnings"]
    assert good["line"].startswith("verdict: MAE beats the best baseline (model 120.0 HU vs "
                                   "intensity lookup (MR -> HU) 150.0 HU)")
    bad = baselines.verdict({"mae": 140.0, "ssim": 0.699}, base)
    assert bad["beats_best_baseline"] == {"mae": True, "ssim": False}
    assert bad["best_baseline"]["ssim"] == {"name": "mean_ct", "label": "mean training CT",
                                            "value": 0.743}
    assert bad["warnings"] == ["WARNING: the model does not beat the mean training CT in "
                               "SSIM: model 0.6990, mean training CT 0.7430"]
    # A tie or a NaN does not beat.
    tie = baselines.verdict({"mae": 150.0, "ssim": math.nan}, base)
    assert tie["beats_best_baseline"] == {"mae": False, "ssim": False}
    with pytest.raises(ValueError):
        baselines.verdict({"mae": 1.0, "ssim": 1.0}, {"perfect": base["perfect"]})
