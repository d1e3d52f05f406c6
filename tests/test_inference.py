"""Whole-volume inference: slice-wise (2D/2.5D) and sliding windows (3D)."""

import numpy as np
import pytest

from sct_jax.inference import windows as inference


def _volume(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("tile", [(16, 12), (24, 20), (8, 8), (0, 0), (0, 8)])
@pytest.mark.parametrize("context", [0, 1])
def test_slicewise_identity_covers_the_whole_slice(tile, context):
    """Every voxel, also outside the tile, gets the model's value (never a fill)."""
    vol = _volume((14, 11, 5))
    calls = []

    def centre_channel(batch):
        calls.append(batch.shape)
        assert batch.shape[1] % 4 == 0 and batch.shape[2] % 4 == 0  # the network stride
        return batch[..., context:context + 1]  # the slice itself among its neighbours

    out = inference.predict_volume_2d(centre_channel, vol, tile=tile, context=context,
                                      batch_size=2, stride=4, min_size=8)
    window = tuple(t if t else -(-max(n, 8) // 4) * 4 for t, n in zip(tile, (14, 11)))
    assert len(set(calls)) == 1 and calls[0] == (2, *window, 2 * context + 1)
    np.testing.assert_allclose(out, vol, rtol=0, atol=1e-6)


def test_slicewise_blends_overlapping_tiles():
    """A model whose output is the window's ordinal in its slice: where windows overlap
    the result is their mean weighted by ``blend_weight`` (reference: explicit loops
    over the window origins in float64)."""
    vol = np.zeros((20, 9, 2), np.float32)
    tile, overlap = (8, 8), 0.5
    origins = [(a, b) for a in inference.window_starts(20, 8, overlap)
               for b in inference.window_starts(9, 8, overlap)]
    assert len(origins) == 8  # 4 along x, 2 along y (9 > 8)
    seen = []

    def window_ordinal(batch):
        out = np.empty(batch.shape[:3] + (1,), np.float32)
        for k in range(batch.shape[0]):
            out[k] = len(seen) % len(origins)
            seen.append(k)
        return out

    out = inference.predict_volume_2d(window_ordinal, vol, tile=tile, batch_size=3,
                                      overlap=overlap, stride=4)
    weight = inference.blend_weight(tile).astype(np.float64)
    acc, norm = np.zeros((20, 9)), np.zeros((20, 9))
    for ordinal, (a, b) in enumerate(origins):
        acc[a:a + 8, b:b + 8] += weight * ordinal
        norm[a:a + 8, b:b + 8] += weight
    for z in range(2):
        np.testing.assert_allclose(out[..., z], acc / norm, rtol=1e-5)


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
