"""SynthRAD2025 PSNR and masked MS-SSIM against a float64 reference written here from
the challenge's definition (image_metrics.py of SynthRAD2025/evaluation), by another
code path: windows summed by shifted slices, the 2x2x2 box by scipy's fftconvolve."""

import math

import numpy as np
import pytest
from scipy.signal import fftconvolve

from sct_jax import metrics
from sct_jax.metrics import synthrad2025

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _window_mean(a, w=7):
    """Mean over every full w^3 window (the crop-3 interior), by shifted-slice sums."""
    for axis in range(a.ndim):
        n = a.shape[axis] - w + 1
        a = sum(np.take(a, range(k, k + n), axis=axis) for k in range(w))
    return a / w**a.ndim


def reference_ms_ssim(gt, pred, mask, weights=WEIGHTS, lo=-1024.0, hi=3071.0):
    gt, pred = (np.asarray(v, np.float64) for v in (gt, pred))
    mask = (np.asarray(mask) > 0).astype(np.float64)
    gt, pred = (np.where(mask == 0, lo, np.clip(v, lo, hi)) - lo for v in (gt, pred))
    pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in gt.shape]
    gt, pred, mask = (np.pad(v, pads, mode="edge") for v in (gt, pred, mask))
    r = hi - lo
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    c3 = c2 / 2
    norm = 343 / 342
    values = []
    for w in weights:
        ux, uy = _window_mean(gt), _window_mean(pred)
        vx = norm * (_window_mean(gt * gt) - ux * ux)
        vy = norm * (_window_mean(pred * pred) - uy * uy)
        vxy = norm * (_window_mean(gt * pred) - ux * uy)
        sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
        lum = np.clip((2 * ux * uy + c1) / (ux**2 + uy**2 + c1), 0, None)
        con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
        struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
        level_map = lum**w * con**w * struct**w
        inner = mask[3:-3, 3:-3, 3:-3].astype(bool)
        values.append(level_map[inner].mean())
        box = np.ones((2, 2, 2)) / 8
        gt, pred = (fftconvolve(v, box, mode="same")[::2, ::2, ::2] for v in (gt, pred))
        mask = mask[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0, 1)))


def _pair(shape, seed, border=2):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ct = 400 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 600 * (grid[2] > 0.2)
    ct = ct + rng.normal(0, 80, shape) - 200
    ct[rng.random(shape) < 0.05] = 3200.0  # clipped differently in 2023 and 2025
    sct = 0.8 * ct + rng.normal(0, 300, shape) + 30
    half = grid[1] > 0.3
    sct[half] = 800 - ct[half]  # anticorrelated: the structure term is clipped at 0
    mask = np.zeros(shape, bool)
    mask[tuple(slice(border, n - border) for n in shape)] = True
    mask &= (grid[0] ** 2 + grid[1] ** 2) < 0.9
    return ct.astype(np.float32), sct.astype(np.float32), mask


@pytest.mark.parametrize("shape,border", [((23, 18, 12), 2), ((101, 20, 9), 0)])
def test_ms_ssim_matches_the_reference_definition(shape, border):
    """Padded small volume; an axis over 97 with the mask touching the border (its edge
    padding scored, odd sizes downsampled)."""
    ct, sct, mask = _pair(shape, seed=sum(shape), border=border)
    expected = reference_ms_ssim(ct, sct, mask)
    assert 0.05 < expected < 0.95
    assert synthrad2025.ms_ssim(ct, sct, mask) == pytest.approx(expected, rel=1e-9)
    assert synthrad2025.ms_ssim(ct, ct, mask) == 1.0


def test_one_level_of_weight_one_is_the_2023_ssim():
    """With SynthRAD2023's range and the mask 4+ voxels from the border, the padding
    changes nothing and one level of weight 1 is the SSIM map (no term clipped)."""
    ct, _, mask = _pair((20, 17, 14), seed=3, border=4)
    ct = np.minimum(ct, 2000)  # no positive correlation flipped by the clipping
    sct = ct + np.random.default_rng(4).normal(0, 60, ct.shape).astype(np.float32)
    one_level = synthrad2025.ms_ssim(ct, sct, mask, weights=(1.0,), hu_range=(-1024, 3000))
    assert one_level == pytest.approx(metrics.ssim(ct, sct, mask), rel=1e-10)
    assert one_level == pytest.approx(reference_ms_ssim(ct, sct, mask, weights=(1.0,),
                                                        hi=3000.0), rel=1e-10)


def test_psnr_2025_over_the_fixed_range():
    ct, sct, mask = _pair((12, 10, 8), seed=5)
    a = np.clip(ct[mask].astype(np.float64), -1024, 3071)
    b = np.clip(sct[mask].astype(np.float64), -1024, 3071)
    expected = 10 * math.log10(4095.0**2 / np.mean((a - b) ** 2))
    assert synthrad2025.psnr_2025(ct, sct, mask) == pytest.approx(expected, rel=1e-12)
    assert synthrad2025.psnr_2025(ct, ct, mask) == math.inf
    # 3200 HU: 3071 here, 3000 for SynthRAD2023.
    one = np.zeros((7, 7, 7), np.float32)
    assert synthrad2025.psnr_2025(one + 3200, one, one + 1) == pytest.approx(
        10 * math.log10(4095.0**2 / 3071.0**2))
