"""The shift-tolerant L1 (``config.loss.shift_tolerance``) for targets a voxel away from
their input."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.losses import pixel

REPO = Path(__file__).resolve().parents[1]


def _reference(pred, target, mask, s):
    """float64 numpy: per sample, the minimum over offsets of the masked mean error."""
    pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
    nd = pred.ndim - 2
    pad = [(0, 0)] + [(s, s)] * nd + [(0, 0)]
    tp, mp = np.pad(target, pad, mode="edge"), np.pad(mask, pad, mode="edge")
    per_sample = []
    for b in range(pred.shape[0]):
        best = np.inf
        for offset in itertools.product(range(-s, s + 1), repeat=nd):
            idx = tuple(slice(s + o, s + o + n) for o, n in zip(offset, pred.shape[1:-1]))
            t, m = tp[b][idx], np.broadcast_to(mp[b][idx], pred[b].shape)
            best = min(best, (m * np.abs(pred[b] - t)).sum() / max(m.sum(), 1.0))
        per_sample.append(best)
    return float(np.mean(per_sample))


@pytest.mark.parametrize("shape, s", [((3, 7, 6, 1), 1), ((2, 6, 5, 1), 2), ((2, 5, 4, 6, 1), 1)])
def test_against_a_float64_reference(shape, s):
    rng = np.random.default_rng(0)
    pred, target = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    mask = (rng.random(shape) > 0.3).astype(np.float32)
    got = float(pixel.shift_tolerant_l1(pred, target, mask, s))
    assert got == pytest.approx(_reference(pred, target, mask, s), rel=1e-5)
    ones = np.ones(shape, np.float32)
    assert float(pixel.shift_tolerant_l1(pred, target, None, s)) == pytest.approx(
        _reference(pred, target, ones, s), rel=1e-5)


def test_a_target_one_voxel_away_costs_nothing_and_only_the_best_shift_has_a_gradient():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 12, 10, 1)).astype(np.float32)
    pred = image[:, 2:10, 2:8]
    target = np.stack([image[0, 3:11, 2:8], image[1, 2:10, 1:7]])  # (+1, 0) and (0, -1)
    mask = np.zeros_like(pred)
    mask[:, 1:-1, 1:-1] = 1.0  # the border's shifted voxels repeat the edge
    assert float(pixel.shift_tolerant_l1(pred, target, mask, 1)) == pytest.approx(0, abs=1e-6)
    assert float(pixel.shift_tolerant_l1(pred, target, mask, 0)) > 0.5
    assert float(pixel.shift_tolerant_l1(pred, target, mask, 0)) == pytest.approx(
        float(pixel.masked_l1(pred, target, mask)), rel=1e-6)  # one size per sample
    # Away from a perfect match the gradient is the masked L1's against the best shift.
    noisy = pred + 0.01 * rng.normal(size=pred.shape).astype(np.float32)
    grad = np.asarray(jax.grad(lambda p: pixel.shift_tolerant_l1(p, target, mask, 1))(noisy))
    # The best shifts, (-1, 0) and (0, +1); the mask moves with the target.
    def moved(a, b, rows, cols):
        return np.pad(a[b], ((1, 1), (1, 1), (0, 0)), mode="edge")[rows, cols]

    best = np.stack([moved(target, 0, slice(0, 8), slice(1, 7)),
                     moved(target, 1, slice(1, 9), slice(2, 8))])
    best_mask = np.stack([moved(mask, 0, slice(0, 8), slice(1, 7)),
                          moved(mask, 1, slice(1, 9), slice(2, 8))])
    np.testing.assert_allclose(grad, best_mask * np.sign(noisy - best) / (2 * mask[0].sum()),
                               rtol=1e-5)


def test_the_pix2pix_step_forgives_the_shift_only_when_asked():
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    method = methods.get_method("pix2pix")
    rng = np.random.default_rng(2)
    shape = (2, *config.data.crop, 1)
    batch = {"mr": rng.uniform(-1, 1, shape).astype(np.float32),
             "ct": rng.uniform(-1, 1, shape).astype(np.float32),
             "mask": np.ones(shape, np.float32)}
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    results = {}
    for s in (0, 1):
        config.loss.shift_tolerance = s
        state = method.create_state(config, jax.random.key(0), spec)
        _, metrics = method.train_step(config, state, batch, jax.random.key(3))
        results[s] = float(metrics["g_l1"])
    assert results[1] < results[0]  # the minimum over 9 shifts, 0 among them


def test_shift_tolerance_is_checked_and_refused_where_a_registration_aligns():
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    config.loss.shift_tolerance = -1
    with pytest.raises(ConfigError, match="config.loss.shift_tolerance=-1"):
        methods.get_method("pix2pix").validate_config(config)
    cbct = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny,cbct")
    assert cbct.loss.shift_tolerance == 1
    assert load_config_file(f"{REPO / 'configs/pgan_pelvis.py'}:tiny,cbct").loss.shift_tolerance == 1
    for name in ("reg_pgan_pelvis.py", "meta_pgan_pelvis.py", "cyclegan_pelvis.py"):
        assert "shift_tolerance" not in load_config_file(
            f"{REPO / 'configs' / name}:tiny,cbct").loss
