"""The training CT moved onto its CBCT's frame (``data.register_target``,
``sct_jax/data/register.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sct_jax.config_utils import load_config_file
from sct_jax.data import phantom, pipeline, preprocess, register
from sct_jax.errors import ConfigError
from sct_jax.methods import get_method


def _anatomy(shape, rng) -> np.ndarray:
    """A smooth head-like volume in [-1, 1] with sharp edges (a shell and blobs)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    vol = np.where(r < 0.8, -0.45, -1.0) + np.where((r > 0.65) & (r < 0.8), 0.6, 0.0)
    for _ in range(4):
        c = rng.uniform(-0.4, 0.4, 3)
        vol += 0.3 * (np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) < 0.15)
    return ndimage.gaussian_filter(vol, 0.7).astype(np.float32)


@pytest.mark.parametrize("fit_voxels", [register.MAX_FIT_VOXELS, 16 ** 3])
def test_registration_recovers_a_known_smooth_motion(fit_voxels, monkeypatch):
    """A CT moved by a known smooth field (translation + a sine, about a voxel), the
    input an intensity-scaled, noisy image of the unmoved anatomy: the registered CT is
    close to the unmoved anatomy, and its field to the motion, checked against scipy's
    resampling; also when the field is fitted on a subsampled copy (a large volume)."""
    monkeypatch.setattr(register, "MAX_FIT_VOXELS", fit_voxels)
    fitted_shapes = []
    fit = register._fit_field
    monkeypatch.setattr(register, "_fit_field", lambda fixed, *a, **k: (
        fitted_shapes.append(fixed.shape), fit(fixed, *a, **k))[1])
    rng = np.random.default_rng(0)
    shape = (32, 36, 28)
    truth = _anatomy(shape, rng)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                               indexing="ij"))
    motion = np.stack([0.8 + 0.4 * np.sin(idx[1] / 6.0), -0.6 + 0 * idx[0],
                       0.5 * np.cos(idx[0] / 7.0)])
    ct = ndimage.map_coordinates(truth, idx - motion, order=1, mode="nearest")
    cbct = 0.8 * truth + 0.1 + rng.normal(0, 0.02, shape).astype(np.float32)
    mask = ndimage.binary_dilation(truth > -0.9, iterations=2)
    registered, field = register.register_to_input(cbct, ct, mask)
    before = np.abs(ct - truth)[mask].mean()
    after = np.abs(registered - truth)[mask].mean()
    # The floor: the CT resampled (by scipy) with the true motion; what is left is the
    # two linear interpolations' smoothing of the edges.
    perfect = ndimage.map_coordinates(ct, idx + motion, order=1, mode="nearest")
    floor = np.abs(perfect - truth)[mask].mean()
    assert after < 0.5 * before and after < 1.1 * floor, (before, after, floor)
    # The field is the motion: CT(x + field(x)) = truth(x), ct(x) = truth(x - motion(x)).
    inner = ndimage.binary_erosion(mask, iterations=3)
    err = np.abs(field[inner] - np.moveaxis(motion, 0, -1)[inner])
    assert np.median(err) < 0.2, np.median(err)
    assert registered.shape == ct.shape and registered.dtype == np.float32
    assert set(fitted_shapes) == {shape if fit_voxels > ct.size else (16, 18, 14)}


def test_registration_on_the_phantom_cbct_reaches_the_ct_in_its_frame():
    """A brain phantom Task 2 case (1 mm residual motion): the registered CT is near the
    phantom's CT in the CBCT's frame (``ct_ideal``: what noise alone leaves)."""
    case = phantom.generate_case("brain", 0, 0, 1.0, (40, 48, 40), task=2)
    registered, _ = register.register_to_input(
        preprocess.ct_to_unit(case["cbct"]), preprocess.ct_to_unit(case["ct"]),
        case["mask"] > 0)
    m = case["mask_aligned"] > 0
    ideal = case["ct_ideal"]
    before = np.abs(case["ct"] - ideal)[m].mean()
    after = np.abs(preprocess.unit_to_ct(registered) - ideal)[m].mean()
    noise = np.abs(case["ct_aligned"] - ideal)[m].mean()
    assert after < 0.35 * before and after < 2.5 * noise, (before, after, noise)


def test_intensity_mapped_is_the_cases_lookup():
    rng = np.random.default_rng(1)
    moving = rng.uniform(-1, 1, (8, 8, 8)).astype(np.float32)
    fixed = 0.5 * moving - 0.2
    mask = np.ones_like(moving, bool)
    mapped = register.intensity_mapped(fixed, moving, mask, bins=256)
    assert np.abs(mapped - moving).max() < 0.02  # a monotone map is undone
    with_noise = register.intensity_mapped(fixed + rng.normal(0, 0.3, fixed.shape),
                                           moving, mask, bins=16)
    assert np.isfinite(with_noise).all() and with_noise.min() >= -1 and with_noise.max() <= 1


def test_registered_ct_is_cached_per_case_and_cases_without_ct_pass(tmp_path, monkeypatch):
    calls = []

    def fake(input_unit, ct_unit, mask):
        calls.append(1)
        return np.asarray(ct_unit) + 0.5, None

    monkeypatch.setattr(register, "register_to_input", fake)
    vol = np.zeros((4, 4, 2), np.float32)
    case = pipeline.PreparedCase("c1", vol, vol, vol.astype(np.uint8), np.eye(4),
                                 folder=tmp_path)
    no_ct = pipeline.PreparedCase("c2", vol, None, vol.astype(np.uint8), np.eye(4),
                                  folder=tmp_path)
    out = pipeline.with_registered_ct([case, no_ct])
    assert np.all(out[0].ct == 0.5) and out[1] is no_ct and calls == [1]
    assert np.all(pipeline.with_registered_ct([case])[0].ct == 0.5) and calls == [1]
    assert case.ct is vol and np.all(vol == 0)  # the prepared CT is not changed
    monkeypatch.setattr(register, "STEPS", register.STEPS + 1)  # another setting
    assert np.all(pipeline.with_registered_ct([case])[0].ct == 0.5) and calls == [1, 1]


def test_register_target_is_for_paired_cbct_input_only():
    cbct = load_config_file("configs/pix2pix_pelvis.py:tiny,cbct")
    cbct.data.register_target = True
    get_method(cbct.method).validate(cbct)  # accepted
    mr = load_config_file("configs/pix2pix_pelvis.py:tiny")
    mr.data.register_target = True
    with pytest.raises(ConfigError, match="register_target=True: registers a CT to its CBCT"):
        get_method(mr.method).validate(mr)
    unpaired = load_config_file("configs/cyclegan_pelvis.py:tiny,cbct")
    unpaired.data.register_target = True
    with pytest.raises(ConfigError, match="unpaired training"):
        get_method(unpaired.method).validate(unpaired)
    assert not register.check_register_config(load_config_file("configs/pix2pix_pelvis.py:tiny"))


def test_old_runs_resume_and_keep_their_digest_but_not_onto_a_registered_target():
    import json

    from sct_jax.reproduce.ablate import config_digest
    from sct_jax.runs import lock

    def saved_before_the_option(spec):
        config = load_config_file(spec)
        saved = json.loads(config.to_json_best_effort())
        del saved["data"]["register_target"]
        older = load_config_file(spec)
        with older.unlocked():
            del older.data["register_target"]
        return config, saved, older

    config, saved, older = saved_before_the_option("configs/pix2pix_pelvis.py:tiny")
    assert not config.data.register_target
    assert lock.changed_resume_keys(saved, config) == []
    assert config_digest(older) == config_digest(config)
    # The cbct word registers: a CBCT run made before it trained on other targets.
    config, saved, older = saved_before_the_option("configs/pix2pix_pelvis.py:tiny,cbct")
    assert config.data.register_target
    assert lock.changed_resume_keys(saved, config) == ["data.register_target"]
    assert config_digest(older) != config_digest(config)
