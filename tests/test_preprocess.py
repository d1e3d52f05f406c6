"""Tests of sct_jax.data.preprocess against explicit formulas, np.percentile, np.pad and
plain slicing."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from sct_jax.data import preprocess as pp



# ------------------------------------------------------------------------------- CT


def test_ct_to_unit_endpoints_and_clipping_are_exact():
    hu = np.array([-5000.0, -1024.0, 988.0, 3000.0, 9000.0])
    np.testing.assert_array_equal(pp.ct_to_unit(hu), [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(pp.unit_to_ct(np.array([-3.0, -1.0, 0.0, 1.0, 1.5])),
                                  [-1024.0, -1024.0, 988.0, 3000.0, 3000.0])
    assert pp.ct_to_unit(np.zeros(2, np.int16)).dtype == np.float32


def test_ct_round_trip_on_in_range_hu_matches_the_linear_formula():
    hu = np.random.default_rng(0).uniform(-1024, 3000, (7, 6, 5))
    unit = pp.ct_to_unit(hu)
    # Independent float64 formula: linear map of [-1024, 3000] onto [-1, 1].
    np.testing.assert_allclose(unit, 2 * (hu + 1024) / 4024 - 1, atol=1e-6)
    np.testing.assert_allclose(pp.unit_to_ct(unit), hu, atol=1e-3)  # float32: ~3e-4 HU


def test_ct_maps_work_on_jax_arrays_and_under_jit():
    hu = np.random.default_rng(1).uniform(-1500, 3500, (4, 5)).astype(np.float32)
    unit = pp.ct_to_unit(jnp.asarray(hu))
    assert isinstance(unit, jax.Array)
    # XLA may divide via a reciprocal: allow 2 float32 ulps near 1.
    np.testing.assert_allclose(np.asarray(unit), pp.ct_to_unit(hu), atol=2.5e-7)
    back = jax.jit(lambda x: pp.unit_to_ct(pp.ct_to_unit(x)))(jnp.asarray(hu))
    assert isinstance(back, jax.Array)
    np.testing.assert_allclose(np.asarray(back), np.clip(hu, -1024, 3000), atol=1e-3)


# ------------------------------------------------------------------------------- MR


def test_mr_to_unit_uses_percentiles_inside_the_mask_only():
    rng = np.random.default_rng(2)
    mr = rng.gamma(2.0, 100.0, (12, 10, 6)).astype(np.float32)
    mask = np.zeros(mr.shape, bool)
    mask[2:10, 2:8, 1:5] = True
    mr[~mask] = 1e6  # would dominate the upper percentile if the mask were ignored
    lo, hi = np.percentile(mr[mask].astype(np.float64), [0.5, 99.5])
    expected = np.clip((mr.astype(np.float64) - lo) / (hi - lo) * 2 - 1, -1, 1)
    out = pp.mr_to_unit(mr, mask)
    assert out.dtype == np.float32 and out.shape == mr.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[~mask].min() == 1.0  # the outside values were clipped, not used
    inside = out[mask]
    # 0.5% of the inside voxels below lo, 0.5% above hi: both ends reached by clipping.
    assert inside.min() == -1.0 and inside.max() == 1.0


def test_mr_to_unit_other_percentiles_and_no_mask():
    mr = np.random.default_rng(3).normal(300, 50, (9, 8, 4))
    lo, hi = np.percentile(mr, [2.0, 98.0])
    expected = np.clip((mr - lo) / (hi - lo) * 2 - 1, -1, 1)
    np.testing.assert_allclose(pp.mr_to_unit(mr, None, 2.0, 98.0), expected, atol=1e-5)


def test_mr_to_unit_of_a_constant_image_is_finite():
    out = pp.mr_to_unit(np.full((4, 4, 4), 7.0), np.ones((4, 4, 4)))
    assert np.all(np.isfinite(out))


# ------------------------------------------------------------------------ crop / pad


def _reference_crop_or_pad(arr, sizes, axes, value):
    """Crop by slicing, then pad with np.pad: the centred convention, written out."""
    index = [slice(None)] * arr.ndim
    for axis, new in zip(axes, sizes):
        old = arr.shape[axis]
        if new < old:
            start = (old - new) // 2
            index[axis] = slice(start, start + new)
    out = arr[tuple(index)]
    widths = [(0, 0)] * arr.ndim
    for axis, new in zip(axes, sizes):
        old = out.shape[axis]
        if new > old:
            before = (new - old) // 2
            widths[axis] = (before, new - old - before)
    return np.pad(out, widths, constant_values=value)


SHAPES = [(7, 6), (10, 9, 4), (5, 8, 3)]
DELTAS = [-3, -2, 0, 1, 2, 5]  # odd and even crops (< 0) and pads (> 0)


def test_crop_or_pad_matches_slicing_and_np_pad_and_undo_inverts_it():
    rng = np.random.default_rng(4)
    checked = 0
    for shape in SHAPES:
        arr = rng.normal(size=shape).astype(np.float32)
        axes = tuple(range(min(2, len(shape))))
        for deltas in itertools.product(DELTAS, repeat=len(axes)):
            sizes = [shape[a] + d for a, d in zip(axes, deltas)]
            out = pp.crop_or_pad(arr, sizes, axes, value=-1.0)
            np.testing.assert_array_equal(out, _reference_crop_or_pad(arr, sizes, axes, -1.0))
            assert out.dtype == arr.dtype
            back = pp.undo_crop_or_pad(out, [shape[a] for a in axes], axes, value=-7.0)
            assert back.shape == arr.shape
            # What survived the crop comes back in place; what was cropped is the value.
            kept = np.zeros(shape, bool)
            kept[tuple(_kept_slices(shape, sizes, axes))] = True
            np.testing.assert_array_equal(back[kept], arr[kept])
            assert np.all(back[~kept] == -7.0)
            if all(d >= 0 for d in deltas):  # pure pads are exactly invertible
                np.testing.assert_array_equal(back, arr)
            # And cropping again gives the same slice: undo is a right inverse.
            np.testing.assert_array_equal(pp.crop_or_pad(back, sizes, axes, -1.0), out)
            checked += 1
    assert checked == 6 ** 2 * 3


def _kept_slices(shape, sizes, axes):
    index = [slice(None)] * len(shape)
    for axis, new in zip(axes, sizes):
        old = shape[axis]
        if new < old:
            start = (old - new) // 2
            index[axis] = slice(start, start + new)
    return index


def test_crop_or_pad_on_a_middle_axis_leaves_the_others():
    arr = np.arange(4 * 5 * 3).reshape(4, 5, 3)
    out = pp.crop_or_pad(arr, [2], axes=[1])
    np.testing.assert_array_equal(out, arr[:, 1:3, :])
    np.testing.assert_array_equal(pp.crop_or_pad(arr, [8, 6], axes=(2, 0))[1:5, :, 2:5], arr)


# ------------------------------------------------------------------------ body mask


def test_body_mask_fills_dark_bone_and_air_inside_a_bright_blob():
    shape = (40, 36, 6)
    x, y, _ = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    blob = ((x - 20) / 14.0) ** 2 + ((y - 18) / 11.0) ** 2 <= 1
    bone = ((x - 14) ** 2 + (y - 18) ** 2 <= 9)  # dark like air: a hole in the MR
    air = ((x - 25) ** 2 + (y - 20) ** 2 <= 4)
    rng = np.random.default_rng(5)
    mr = np.where(blob, 300.0, 5.0) + rng.normal(0, 10, shape)
    mr[bone | air] = rng.normal(5, 3, (bone | air).sum())
    mr = np.abs(mr)
    assert np.all(blob[bone | air])  # the holes are inside

    mask = pp.body_mask_from_mr(mr, dilation=2)
    assert mask.dtype == bool and mask.shape == shape
    assert np.all(mask[blob]), "the whole blob, holes included, is body"
    # Nothing further out than the dilation (+1 voxel for smoothing at the border).
    distance_outside = ndimage.distance_transform_edt(~blob)
    assert distance_outside[mask].max() <= 3.0
    assert mask.sum() < 1.35 * blob.sum()


def test_body_mask_keeps_the_largest_component_only():
    mr = np.zeros((30, 30, 4))
    mr[3:20, 3:20] = 100.0
    mr[25:28, 25:28] = 100.0  # a small bright artefact far from the body
    mask = pp.body_mask_from_mr(mr, dilation=0)
    assert mask[10, 10].all() and not mask[26, 26].any()


def test_otsu_threshold_matches_scikit_image():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(6)
    bimodal = np.concatenate([rng.normal(20, 5, 3000), rng.normal(300, 40, 5000)])
    for values in (bimodal, rng.gamma(2.0, 50.0, 10000)):
        assert pp.otsu_threshold(values) == pytest.approx(threshold_otsu(values), rel=1e-9)
    # And it separates the two classes (3000 dark, 5000 bright).
    threshold = pp.otsu_threshold(bimodal)
    assert np.sum(bimodal[:3000] > threshold) + np.sum(bimodal[3000:] <= threshold) < 40


SHARED_PORCINE = Path(__file__).parents[2] / "shared" / "data" / "mridir_porcine"


@pytest.mark.skipif(not SHARED_PORCINE.is_dir(),
                    reason=f"full porcine pair not present at {SHARED_PORCINE}")
def test_body_mask_of_the_real_porcine_mr_matches_its_shipped_mask():
    from sct_jax.data.io import load_volume

    # Every 2nd voxel in-plane keeps the test fast; the specimen border stays in view
    # (the small fixture lies wholly inside the specimen, so it cannot test this).
    every_other = (slice(None, None, 2), slice(None, None, 2), slice(None))
    mr = load_volume(SHARED_PORCINE / "mr_t2.nii.gz").data[every_other]
    shipped = load_volume(SHARED_PORCINE / "mask.nii.gz").data[every_other] > 0
    mask = pp.body_mask_from_mr(mr, dilation=0)
    dice = 2 * np.sum(mask & shipped) / (mask.sum() + shipped.sum())
    assert dice > 0.97, dice
