"""The four seed-02 methods (pgan, ctx_pgan, reg_pgan, meta_pgan) on their tiny configs.

Each trains 2 steps through the real loop on the phantom data. meta_pgan's two
reweighting forms are compiled exactly as the loop compiles them (so the later loop run
is a compilation-cache hit) and must give the same weights on the same batch. VGG
weights (ctx_pgan's test runs both the perceptual and the contextual term) are random,
written in the converter's format.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import numpy as np
import pytest

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError, DataError
from sct_jax.losses import pixel
from sct_jax.meta import reweight
from sct_jax.methods import _pgan_common as pgan_common
from sct_jax.methods import meta_pgan, reg_pgan
from sct_jax.methods.common import step_rng
from sct_jax.models import vgg
from sct_jax.data import datasets as train_data
from sct_jax import runs, sharding
from sct_jax.training import loop


def _random_vgg_file(path, arch, seed):
    """He-normal random weights for every conv of ``arch`` (numpy only: no compile)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, _, c_in, c_out in vgg.vgg_conv_layout(arch):
        std = math.sqrt(2.0 / (9 * c_in))
        params[name] = {"kernel": rng.normal(0, std, (3, 3, c_in, c_out)).astype(np.float32),
                        "bias": np.zeros(c_out, np.float32)}
    return str(vgg.save_vgg_npz(params, path, arch))


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg")
    return {"vgg16": _random_vgg_file(root / "vgg16.npz", "vgg16", 0),
            "vgg19": _random_vgg_file(root / "vgg19.npz", "vgg19", 1)}


def tiny(name, **loss):
    c = load_config_file(f"configs/{name}_pelvis.py:tiny")
    c.train.ckpt_every = 2  # one checkpoint, at the end
    for k, v in loss.items():
        c.loss[k] = v
    return c


def initial_state(config, workdir):
    """The state the loop started from (same key and program as ``loop.train``)."""
    method = methods.get_method(config.method)
    spec = runs.read_batch_spec(workdir)
    init_rng, _ = jax.random.split(jax.random.key_data(jax.random.key(config.seed)))
    create = functools.partial(method.create_state, config, batch_spec=spec)
    # The loop's very program (replicated outputs): a compilation-cache hit.
    repl = sharding.replicated(sharding.make_mesh(dict(config.mesh)))
    shardings = jax.tree.map(lambda _: repl, jax.eval_shape(create, init_rng))
    return jax.jit(create, out_shardings=shardings)(init_rng)


def assert_trained(config, result, networks):
    assert result.step == 2
    assert result.metrics and all(math.isfinite(v) for v in result.metrics.values()), \
        result.metrics
    before = initial_state(config, result.workdir)
    for name in networks:
        changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(before[name].params),
                       jax.tree.leaves(result.state[name].params))]
        assert all(changed), f"{name}: {changed.count(False)} parameter arrays unchanged"


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_pgan_two_steps(tmp_path):
    config = tiny("pgan")
    result = loop.train(config, tmp_path)
    assert_trained(config, result, ("gen", "disc"))
    assert result.metrics["loss"] == pytest.approx(
        result.metrics["g_adv"] + 100.0 * result.metrics["g_l1"], rel=1e-5)


def test_ctx_pgan_two_steps_with_perceptual(tmp_path, vgg_files):
    config = tiny("ctx_pgan", perceptual_weight=100.0)  # pGAN's full objective
    config.model.vgg16_weights = vgg_files["vgg16"]
    config.model.vgg19_weights = vgg_files["vgg19"]
    result = loop.train(config, tmp_path)
    assert_trained(config, result, ("gen", "disc"))
    m = result.metrics
    assert m["g_contextual"] > 0 and m["g_perceptual"] > 0
    assert m["loss"] == pytest.approx(m["g_adv"] + 100 * m["g_l1"] + 100 * m["g_perceptual"]
                                      + 30 * m["g_contextual"], rel=1e-5)
    # The frozen VGG-19 is kept only up to relu4_2 and never updated.
    assert sorted(result.state["vgg19"].params) == [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
        "conv3_4", "conv4_1", "conv4_2"]
    on_disk = vgg.load_vgg_params(vgg_files["vgg19"], "vgg19")
    np.testing.assert_array_equal(np.asarray(result.state["vgg19"].params["conv4_2"]["kernel"]),
                                  np.asarray(on_disk["conv4_2"]["kernel"]))


def test_reg_pgan_two_steps_flow_starts_near_zero(tmp_path):
    config = tiny("reg_pgan")
    config.train.image_every = 2
    result = loop.train(config, tmp_path)
    assert_trained(config, result, ("gen", "disc", "reg"))
    # RegGAN's own maps and the validation slice, as images at step 2.
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == sorted(
        [f"reg_{k}_step2.png" for k in ("ct", "fake", "flow_cols_px", "flow_magnitude_px",
                                        "flow_rows_px", "registered")]
        + [f"val_{k}_step2.png" for k in ("abs_error_hu", "ct", "mr", "sct")])
    batch = next(iter(loop.train_dataset(config, config.train.batch_size)))
    maps = jax.device_get(jax.jit(functools.partial(reg_pgan.image_summaries, config))(
        result.state, batch, jax.random.key_data(jax.random.key(0))))
    flow = np.asarray(result.state["reg"].apply_fn(
        {"params": result.state["reg"].params}, maps["reg/fake"][None, ..., None],
        batch["ct"][:1]))[0]
    np.testing.assert_allclose(maps["reg/flow_rows_px"], flow[..., 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["reg/flow_magnitude_px"],
                               np.hypot(flow[..., 0], flow[..., 1]), rtol=1e-5, atol=1e-7)
    fake = np.asarray(pgan_common.predict(config, result.state, batch["mr"][:1]))[0, ..., 0]
    np.testing.assert_allclose(maps["reg/fake"], fake, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(maps["reg/ct"], batch["ct"][0, ..., 0])
    first = read_metrics(tmp_path)[0]
    assert first["step"] == 1
    # R's output layer starts at N(0, 1e-5): the identity warp, to well under a pixel.
    assert first["flow_abs_max"] < 1e-2, first
    assert first["g_smooth"] < 1e-6
    # Near the identity warp the registered L1 is the plain L1.
    assert first["g_l1_registered"] == pytest.approx(first["g_l1"], rel=1e-2)
    m = result.metrics
    assert m["loss"] == pytest.approx(m["g_adv"] + 20 * m["g_l1_registered"]
                                      + 10 * m["g_smooth"], rel=1e-5)


def _meta_config(method):
    c = tiny("meta_pgan")
    c.meta.method = method
    return c


def test_meta_pgan_jvp_equals_lookahead_then_trains(tmp_path):
    configs = {m: _meta_config(m) for m in ("jvp", "lookahead")}
    config = configs["jvp"]
    method = methods.get_method("meta_pgan")
    mesh = sharding.make_mesh(dict(config.mesh))
    local = next(iter(loop.train_dataset(config, config.train.batch_size)))
    assert local["val_mr"].shape == (2, 32, 32, 3) and local["val_ct"].shape == (2, 32, 32, 1)
    spec = sharding.batch_spec(local)
    init_rng, base_rng = jax.random.split(jax.random.key_data(jax.random.key(config.seed)))
    metrics = {}
    for name, c in configs.items():
        create = functools.partial(method.create_state, c, batch_spec=spec)
        abstract = jax.eval_shape(create, init_rng)
        compiled, shardings, _ = loop.build_step(method, c, mesh, abstract, spec)
        state = jax.jit(create, out_shardings=shardings)(init_rng)
        _, m = compiled(state, sharding.global_batch(local, mesh), base_rng)
        metrics[name] = jax.device_get(m)
    jvp, look = metrics["jvp"], metrics["lookahead"]
    n_pixels = local["ct"].size
    # Normalised weights sum to 1 over the mini-batch.
    assert jvp["meta/weight_mean"] * n_pixels == pytest.approx(1.0, rel=1e-4)
    for key in ("meta/weight_max", "meta/u_mean", "meta/u_max", "meta/u_min",
                "meta/u_positive_sum", "g_l1_weighted", "loss"):
        assert jvp[key] == pytest.approx(look[key], rel=2e-3, abs=1e-7), key
    # A pixel whose score is within rounding of 0 may flip sign between the two forms.
    assert abs(jvp["meta/weight_zero_fraction"]
               - look["meta/weight_zero_fraction"]) <= 2 / n_pixels

    # Diagnostics: the jvp form has D; the lookahead form reports NaN for it.
    assert 0.5 <= jvp["meta/d_majority_sign_share"] <= 1.0
    assert 0.0 < jvp["meta/d_output_layer_share"] <= 1.0
    assert math.isnan(look["meta/d_majority_sign_share"])
    for tissue in ("air", "soft", "bone"):
        assert jvp[f"meta/weight_share_{tissue}"] == pytest.approx(
            look[f"meta/weight_share_{tissue}"], abs=2e-3)

    result = loop.train(config, tmp_path)  # the jvp program again: a cache hit
    assert_trained(config, result, ("gen", "disc"))
    # At the default granularity bone keeps part of the weight (the per-pixel sign
    # filter could drop it whole): the batch has bone, and bone has weight.
    assert result.metrics["meta/pixel_share_bone"] > 0.01
    assert result.metrics["meta/weight_share_bone"] > 0.0
    # The weight maps are images: written before step 2 (image_every=2), one per map,
    # beside the validation slice every method draws.
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == sorted(
        [f"meta_{k}_step2.png" for k in ("ct", "l1_error_hu", "mr", "weight_over_uniform")]
        + [f"val_{k}_step2.png" for k in ("abs_error_hu", "ct", "mr", "sct")])


def test_meta_pgan_image_summaries_are_the_steps_weights():
    """The logged map is the step's own weight map: non-negative, mean 1 over the batch."""
    config = _meta_config("jvp")
    method = methods.get_method("meta_pgan")
    local = next(iter(loop.train_dataset(config, config.train.batch_size)))
    spec = sharding.batch_spec(local)
    init_rng, base_rng = jax.random.split(jax.random.key_data(jax.random.key(config.seed)))
    state = method.create_state(config, init_rng, spec)
    maps = jax.device_get(jax.jit(functools.partial(method.image_summaries, config))(
        state, local, base_rng))
    weight = maps["meta/weight_over_uniform"]
    assert weight.shape == local["ct"].shape[1:3] and (weight >= 0).all()
    gen = state["gen"]
    train_key, val_key, _ = pgan_common.dropout_keys(step_rng(base_rng, gen))
    weights, loss_map, _ = reweight.spatial_weights(
        lambda p: pixel.l1_map(pgan_common.generator_fn(gen, local["mr"], train_key)(p),
                               local["ct"]),
        lambda p: pixel.l1(pgan_common.generator_fn(gen, local["val_mr"], val_key)(p),
                           local["val_ct"]),
        gen.params, alpha=config.meta.alpha, method="lookahead",
        granularity=config.meta.granularity, patch_size=config.meta.patch_size)
    np.testing.assert_allclose(weight, weights[0, ..., 0] * weights.size, rtol=2e-3,
                               atol=1e-4 * float(np.max(weight)))
    np.testing.assert_allclose(maps["meta/l1_error_hu"],
                               np.abs(loss_map[0, ..., 0]) * pgan_common.HU_PER_UNIT,
                               rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(maps["meta/ct"], local["ct"][0, ..., 0])


def test_meta_diagnostics_match_numpy():
    from sct_jax.methods import meta_pgan

    rng = np.random.default_rng(0)
    hu = rng.choice([-1000.0, -500.0, 40.0, 200.0, 251.0, 1200.0], size=(2, 6, 5, 1))
    ct = np.clip((hu + 1024.0) / 4024.0 * 2.0 - 1.0, -1, 1).astype(np.float32)
    mask = (rng.uniform(size=hu.shape) > 0.2).astype(np.float32)
    weights = np.where(rng.uniform(size=hu.shape) > 0.5, rng.uniform(size=hu.shape), 0.0)
    weights = (weights / weights.sum()).astype(np.float32)
    d_map = rng.normal(0.3, 1.0, hu.shape).astype(np.float32)
    d_out = (0.5 * d_map + rng.normal(0, 0.1, hu.shape)).astype(np.float32)
    got = jax.device_get(meta_pgan.diagnostics(weights, ct, mask, d_map, d_out))
    body = mask > 0
    tissues = {"air": body & (hu < -200), "bone": body & (hu > 250),
               "soft": body & (hu >= -200) & (hu <= 250)}
    for name, sel in tissues.items():
        assert sel.any()
        assert got[f"meta/weight_share_{name}"] == pytest.approx(weights[sel].sum(), rel=1e-5)
        assert got[f"meta/pixel_share_{name}"] == pytest.approx(sel.mean(), rel=1e-6)
        assert got[f"meta/zero_fraction_{name}"] == pytest.approx(
            (weights[sel] == 0).mean(), rel=1e-6)
    assert got["meta/d_majority_sign_share"] == pytest.approx(
        max((d_map > 0).mean(), (d_map < 0).mean()))
    a, b = np.abs(d_out).sum(), np.abs(d_map - d_out).sum()
    assert got["meta/d_output_layer_share"] == pytest.approx(a / (a + b), rel=1e-5)


def test_meta_slices_come_from_the_best_registered_case():
    config = tiny("meta_pgan")
    splits = train_data.case_splits(config)
    prepared = train_data.prepare(config, splits["train"])
    val_ids = meta_pgan.meta_validation_ids(config, prepared)
    from sct_jax.data.alignment import mutual_information
    by_mi = sorted(prepared, key=lambda c: -mutual_information(c.mr, c.ct, c.mask))
    assert val_ids == [by_mi[0].id]  # round(0.11 * 3) -> at least 1 case
    h, w = config.data.crop

    def slices_of(case):
        out = []
        for z in range(case.ct.shape[2]):
            s = train_data.pipeline.crop_or_pad_hw(np.asarray(case.ct[:, :, z])[..., None],
                                                   (h, w), -1.0)
            out += [s, s[::-1]]  # the pipeline flips left-right at random
        return out

    val_case = [c for c in prepared if c.id in val_ids]
    train_cases = [c for c in prepared if c.id not in val_ids]

    def source(image, cases):
        return any(np.array_equal(image, s) for c in cases for s in slices_of(c))

    iterator = iter(loop.train_dataset(config, config.train.batch_size))
    for _ in range(3):
        batch = next(iterator)
        for image in batch["val_ct"]:
            assert source(image, val_case)
        for image in batch["ct"]:  # val_exclusive: never trained on
            assert source(image, train_cases) and not source(image, val_case)


def test_missing_vgg_file_names_the_config_key(tmp_path):
    config = tiny("pgan", perceptual_weight=100.0)
    config.model.vgg16_weights = str(tmp_path / "nope.npz")
    spec = {"mr": jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
            "ct": jax.ShapeDtypeStruct((2, 32, 32, 1), np.float32)}
    method = methods.get_method("pgan")
    # At start-up (the loop validates before anything is written) ...
    with pytest.raises(DataError, match=r"config\.model\.vgg16_weights: .*nope\.npz"):
        method.validate(config)
    # ... and when the weights are read, outside the traced init.
    state = jax.jit(functools.partial(method.create_state, config, batch_spec=spec))(
        jax.random.key_data(jax.random.key(0)))
    with pytest.raises(DataError, match=r"config\.model\.vgg16_weights: .*nope\.npz"):
        method.load_pretrained(config, state, {})


@pytest.mark.parametrize("name, key, value, match", [
    ("meta_pgan", "data.mode", "slices", "config.data.mode"),
    ("meta_pgan", "meta.method", "hessian", "meta.method"),
    ("pgan", "data.crop", (30, 32), "config.data.crop"),
    ("pgan", "loss.gan", "wgan", "config.loss.gan"),
    ("meta_pgan", "loss.l1_weight", -1.0, "config.loss.l1_weight"),
    ("reg_pgan", "data.crop", (8, 8), "config.model.reg"),
])
def test_bad_configs_fail_at_start(name, key, value, match):
    config = tiny(name)
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=match):
        methods.get_method(name).validate_config(config)
