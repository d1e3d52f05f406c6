"""Texture metrics (stripes between slices, checkerboard) against hand-built cases."""

import numpy as np
import pytest

from sct_jax.errors import DataError
from sct_jax.metrics import texture


def _smooth_case(shape=(40, 36, 12), seed=0):
    """A CT that varies slowly in every direction, and a body mask inside it."""
    x, y, z = np.meshgrid(*(np.linspace(0, 1, s) for s in shape), indexing="ij")
    ct = 40.0 + 300.0 * np.sin(2.0 * x) * np.cos(1.5 * y) + 50.0 * z
    mask = np.zeros(shape, bool)
    mask[4:-4, 5:-5, :] = True
    return ct.astype(np.float32), mask


def test_identical_volumes_have_no_excess():
    ct, mask = _smooth_case()
    result = texture.texture_metrics(ct, ct.copy(), mask)
    assert result == {"slice_step_excess": 0.0, "high_freq_excess": 0.0}


def test_alternating_slice_offset_adds_its_step():
    """+-a/2 on alternate slices adds steps of a between every pair: on a CT whose
    steps are all in one direction and smaller than a, the mean step grows by exactly
    a (|d + a| - |d| = a for 0 < d, and |d - a| - |d| = a - 2d otherwise: build d = 0)."""
    ct, mask = _smooth_case()
    ct = np.broadcast_to(ct[..., :1], ct.shape).copy()  # constant along z: steps 0
    a = 30.0
    sign = np.where(np.arange(ct.shape[-1]) % 2 == 0, 0.5, -0.5)
    sct = ct + a * sign
    result = texture.texture_metrics(ct, sct, mask)
    assert result["slice_step_excess"] == pytest.approx(a, rel=1e-6)
    # In-plane, each slice is the CT plus a constant: the removed mean leaves no change.
    assert result["high_freq_excess"] == pytest.approx(0.0, abs=1e-6)


def test_steps_count_only_pairs_inside_the_body():
    """Whatever the sCT does outside the body, a pair with a voxel outside is not counted
    (the body ends at slice 6 here, so pair (5, 6) straddles it)."""
    ct, mask = _smooth_case()
    mask[..., 6:] = False
    sct = np.where(mask, ct, ct + 500.0)
    assert texture.texture_metrics(ct, sct, mask)["slice_step_excess"] == 0.0


def test_checkerboard_raises_high_frequencies_by_its_amplitude():
    """A period-2 checkerboard of amplitude a sits at the Nyquist frequency: its RMS is
    a, and on a smooth CT (no energy in the band) the excess is a."""
    ct, mask = _smooth_case()
    a = 20.0
    ii, jj = np.meshgrid(np.arange(ct.shape[0]), np.arange(ct.shape[1]), indexing="ij")
    board = a * np.where((ii + jj) % 2 == 0, 1.0, -1.0)[..., None]
    result = texture.texture_metrics(ct, ct + board, mask)
    assert result["high_freq_excess"] == pytest.approx(a, rel=0.02)
    # The same board in every slice: no step between slices.
    assert result["slice_step_excess"] == pytest.approx(0.0, abs=1e-4)


def test_high_freq_rms_matches_a_direct_filter():
    """Independent reference: zero the low band of the windowed slice's spectrum with
    numpy's real FFT, transform back, and take the energy in the spatial domain."""
    rng = np.random.default_rng(3)
    vol = rng.normal(0.0, 50.0, size=(24, 20, 3))
    mask = np.ones(vol.shape, bool)
    energy = weight = 0.0
    for z in range(vol.shape[-1]):
        w = np.outer(np.hanning(vol.shape[0]), np.hanning(vol.shape[1]))
        weight += float(np.sum(w ** 2))
        s = (vol[..., z] - vol[..., z].mean()) * w
        spec = np.fft.rfft2(s)
        fx = np.abs(np.fft.fftfreq(s.shape[0]))[:, None]
        fy = np.abs(np.fft.rfftfreq(s.shape[1]))[None, :]
        spec[~((fx >= 0.25) | (fy >= 0.25))] = 0.0
        energy += float(np.sum(np.fft.irfft2(spec, s=s.shape) ** 2))
    expected = np.sqrt(energy / weight)
    assert texture.high_freq_rms(vol, mask) == pytest.approx(expected, rel=1e-9)


def test_blur_gives_negative_excess():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    ct = rng.normal(0.0, 40.0, size=(30, 30, 8)).astype(np.float32)
    mask = np.ones(ct.shape, bool)
    sct = ndimage.gaussian_filter(ct, sigma=(1.5, 1.5, 1.5))
    result = texture.texture_metrics(ct, sct, mask)
    assert result["high_freq_excess"] < -10.0
    assert result["slice_step_excess"] < -10.0


def test_shape_mismatch_and_empty_mask_are_data_errors():
    ct, mask = _smooth_case()
    with pytest.raises(DataError):
        texture.texture_metrics(ct, ct[:-1], mask)
    with pytest.raises(DataError):
        texture.texture_metrics(ct, ct, np.zeros_like(mask))
