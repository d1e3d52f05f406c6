"""Whole-volume inference: slice-wise (2D/2.5D) and sliding windows (3D)."""

import numpy as np
import pytest

from sct_jax.inference import windows as inference


def _volume(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("crop", [(16, 12), (24, 20), (10, 8)])
@pytest.mark.parametrize("context", [0, 1])
def test_slicewise_identity_reproduces_volume(crop, context):
    vol = _volume((14, 11, 5))
    calls = []

    def centre_channel(batch):
        calls.append(batch.shape)
        return batch[..., context:context + 1]  # the slice itself among its neighbours

    out = inference.predict_volume_2d(centre_channel, vol, crop=crop, context=context,
                                      batch_size=2)
    assert all(c == (2, *crop, 2 * context + 1) for c in calls)  # fixed batch shape
    x0, y0 = max(0, (14 - crop[0]) // 2), max(0, (11 - crop[1]) // 2)
    inside = (slice(x0, x0 + min(14, crop[0])), slice(y0, y0 + min(11, crop[1])))
    np.testing.assert_array_equal(out[inside], vol[inside])
    outside = np.ones(vol.shape, bool)
    outside[inside] = False
    assert np.all(out[outside] == -1.0)  # what the crop cut away is air


def test_slice_stack_replicates_edges():
    vol = _volume((4, 3, 3))
    stack = inference.slice_stack(vol, 0, 1)
    np.testing.assert_array_equal(stack[..., 0], vol[:, :, 0])
    np.testing.assert_array_equal(stack[..., 1], vol[:, :, 0])
    np.testing.assert_array_equal(stack[..., 2], vol[:, :, 1])


@pytest.mark.parametrize("shape,patch", [((20, 17, 9), (8, 8, 4)), ((6, 7, 3), (8, 8, 4))])
def test_sliding_windows_identity_and_coverage(shape, patch):
    vol = _volume(shape, seed=1)
    out = inference.predict_volume_3d(lambda b: b, vol, patch=patch, overlap=0.5, batch_size=3)
    np.testing.assert_allclose(out, vol, rtol=0, atol=1e-6)


def test_sliding_windows_blend_smoothly():
    """A model biased by +1 at its window border and 0 at the centre: blending must
    favour window centres, so the result is closer to 0 than a plain average."""
    vol = np.zeros((24, 24, 8), np.float32)
    patch = (8, 8, 4)
    border = 1.0 - inference.blend_weight(patch)  # 0 at the centre, ~0.9 at the border

    def biased(batch):
        return batch + border[None, ..., None]

    out = inference.predict_volume_3d(biased, vol, patch=patch, overlap=0.5, batch_size=4)
    plain = inference.predict_volume_3d(biased, vol, patch=patch, overlap=0.0, batch_size=4)
    assert out[4:-4, 4:-4, 2:-2].mean() < plain[4:-4, 4:-4, 2:-2].mean()


def test_window_starts_cover_and_end_flush():
    for size, window in [(10, 4), (17, 8), (8, 8), (5, 8)]:
        starts = inference.window_starts(size, window, 0.5)
        covered = np.zeros(max(size, window), bool)
        for s in starts:
            covered[s:s + window] = True
        assert covered[:size].all()
        assert starts[-1] == max(size - window, 0)
