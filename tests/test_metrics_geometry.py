"""Bone and air Dice and HD95: HD95 against a brute-force reference (every pairwise
distance between the two surfaces, surfaces found voxel by voxel)."""

import itertools
import math

import numpy as np
import pytest

from sct_jax.errors import DataError
from sct_jax.metrics import geometry

SPACING = (0.8, 1.1, 2.5)


def brute_surface(mask):
    """Voxels of ``mask`` with one of the 6 face neighbours outside it or the volume."""
    out = np.zeros_like(mask)
    for index in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = list(index)
            n[axis] += step
            if not (0 <= n[axis] < mask.shape[axis]) or not mask[tuple(n)]:
                out[index] = True
                break
    return out


def brute_hd95(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _blob(rng, shape, n_balls=3):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    out = np.zeros(shape, bool)
    for _ in range(n_balls):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(1.5, 4.0)
        out |= (((grid - centre) / (1, 1, 0.5)) ** 2).sum(-1) < radius**2
    return out


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_all_pairwise_distances(seed):
    rng = np.random.default_rng(seed)
    shape = (13, 11, 9)
    a, b = _blob(rng, shape), _blob(rng, shape)
    assert a.any() and b.any()
    expected = brute_hd95(a, b, SPACING)
    assert geometry.hd95(a, b, SPACING) == pytest.approx(expected, rel=1e-12)
    assert geometry.hd95(b, a, SPACING) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(geometry.surface(a), brute_surface(a))
    assert geometry.hd95(a, a, SPACING) == 0.0


def test_hd95_conventions_and_errors():
    empty, full = np.zeros((5, 5, 5), bool), np.ones((5, 5, 5), bool)
    assert math.isnan(geometry.hd95(empty, empty, SPACING))
    assert geometry.hd95(empty, full, SPACING) == math.inf
    with pytest.raises(DataError, match="spacing"):
        geometry.hd95(full, full, (1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="shape"):
        geometry.hd95(full, full[:4], SPACING)


def test_geometry_metrics_of_bone_and_air_inside_the_body():
    rng = np.random.default_rng(7)
    shape = (14, 12, 10)
    body = np.zeros(shape, bool)
    body[1:13, 1:11, 1:9] = True
    ct = np.full(shape, 40.0)
    ct[_blob(rng, shape)] = 900.0
    ct[_blob(rng, shape, 2) & ~(ct > 250)] = -900.0
    ct[~body] = -1000.0  # outside air never counts
    sct = np.roll(ct, 1, axis=0) + rng.normal(0, 10, shape)
    result = geometry.geometry_metrics(ct, sct, body, SPACING)
    assert tuple(result) == geometry.GEOMETRY_NAMES
    for name, select in (("bone", lambda v: v > 250), ("air", lambda v: v < -400)):
        a, b = select(ct) & body, select(sct) & body
        assert result[f"dice_{name}"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert result[f"hd95_{name}"] == pytest.approx(brute_hd95(a, b, SPACING), rel=1e-12)
    flat = geometry.geometry_metrics(ct, np.full(shape, 40.0), body, SPACING)
    assert flat["dice_bone"] == 0.0 and flat["hd95_bone"] == math.inf
