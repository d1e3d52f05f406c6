"""The brain LDM end to end on tiny configs: the three chained stages through the real
loop, the latent scale factor, sampling, evaluation with K samples.

One module-scoped chain trains autoencoder -> diffusion -> ControlNet (2 steps each, on
the tiny phantom heads); the tests inspect its runs. Compilations dominate (the
initialisation and step of each stage, the sampler): keep new tests on these runs.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.config_utils import load_config_file
from sct_jax.data.io import load_volume
from sct_jax.errors import ConfigError
from sct_jax.inference import predict as predict_lib
from sct_jax.methods import _ldm_common as common
from sct_jax.methods import ldm_autoencoder, ldm_controlnet, ldm_diffusion
from sct_jax.models import vgg
from sct_jax.data import datasets as train_data
from sct_jax import runs
from sct_jax.training import loop


def stage_config(stage, runs):
    c = load_config_file(f"configs/ldm_brain.py:{stage},tiny")
    c.ldm.autoencoder_workdir = str(runs / "autoencoder")
    c.ldm.diffusion_workdir = str(runs / "diffusion")
    return c


def random_vgg16_npz(path):
    """Random VGG-16 weights in torchvision's format (what the converter writes)."""
    rng = np.random.default_rng(0)
    params = {name: {"kernel": rng.standard_normal((3, 3, c_in, c_out), np.float32)
                     * np.float32(np.sqrt(2.0 / (9 * c_in))),
                     "bias": np.zeros(c_out, np.float32)}
              for name, _, c_in, c_out in vgg.vgg_conv_layout("vgg16")}
    return vgg.save_vgg_npz(params, path, "vgg16")


def metric_records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Trains the three tiny stages; returns ``{stage: (config, TrainResult)}``."""
    runs = tmp_path_factory.mktemp("ldm_runs")
    out = {}
    for stage in ("autoencoder", "diffusion", "controlnet"):
        config = stage_config(stage, runs)
        if stage == "autoencoder":
            # The tiny config has no perceptual term; random VGG weights exercise it.
            config.loss.perceptual_weight = 1e-3
            config.model.vgg16_weights = str(random_vgg16_npz(runs / "vgg16.npz"))
        out[stage] = (config, loop.train(config, runs / stage))
    return out


def test_autoencoder_stage_switches_adversarial_on(chain):
    config, result = chain["autoencoder"]
    records = metric_records(result.workdir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["perceptual"] > 0 for r in records)
    # adv_start = 1: step 1 (state step 0) trains the AE alone, step 2 both.
    assert [r["adv_on"] for r in records] == [0.0, 1.0]
    assert records[0]["disc/grad_norm"] == 0.0 and records[1]["disc/grad_norm"] > 0
    assert int(result.state["ae"].step) == 2 and int(result.state["disc"].step) == 1
    assert set(result.state) == {"ae", "disc", "vgg16"}


def test_random_slices_match_numpy():
    vol = np.random.default_rng(0).standard_normal((2, 4, 5, 6, 1)).astype(np.float32)
    index = np.array([3, 0])
    for axis in (1, 2, 3):
        expected = np.stack([np.take(vol[b], i, axis=axis - 1) for b in range(2)
                             for i in index])
        got = ldm_autoencoder.random_slices(jnp.asarray(vol), axis, jnp.asarray(index))
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_merge_moments_matches_float64():
    chunks = [np.random.default_rng(k).normal([3.0 + k, -2.0, 0.5 * k], 0.5 * (k + 1),
                                              (k + 2, 2, 3)) for k in range(4)]
    stats = common.init_moments(3)
    for chunk in chunks:
        stats = common.merge_moments(stats, jnp.asarray(chunk, jnp.float32))
    every = np.concatenate([c.reshape(-1, 3) for c in chunks])  # per channel
    assert float(stats["count"]) == every.shape[0]
    np.testing.assert_allclose(np.asarray(stats["mean"]), every.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["m2"]) / every.shape[0], every.var(0),
                               rtol=1e-5)
    shift, scale = common.shift_and_scale(stats)
    z = jnp.asarray(chunks[0], jnp.float32)
    np.testing.assert_allclose(common.standardise(z, shift, scale),
                               (chunks[0] - every.mean(0)) / every.std(0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(common.unstandardise(common.standardise(z, shift, scale),
                                                    shift, scale), z, rtol=1e-5, atol=1e-5)


def test_diffusion_stage_latent_statistics_stored_and_applied(chain):
    _, ae_result = chain["autoencoder"]
    config, result = chain["diffusion"]
    state = result.state
    # The frozen autoencoder is the stage-1 run's.
    jax.tree.map(np.testing.assert_array_equal, state["ae"], ae_result.state["ae"].params)
    # scale_batches = 1: step 1 estimates the per-channel mean and 1/std of the first
    # batch's latents, step 2 trains.
    records = metric_records(result.workdir)
    assert [r["estimating_statistics"] for r in records] == [1.0, 0.0]
    assert records[0]["unet/grad_norm"] == 0.0 and records[1]["unet/grad_norm"] > 0
    first = next(iter(loop.train_dataset(config, config.train.batch_size)))
    ae = common.build_autoencoder(config)
    mu, _ = jax.jit(functools.partial(ae.apply, method=ae.encode))(
        {"params": state["ae"]}, jnp.asarray(first["ct"]))
    mu = np.asarray(mu, np.float64).reshape(-1, mu.shape[-1])
    np.testing.assert_allclose(np.asarray(state["latent_shift"]), mu.mean(0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["latent_scale"]), 1.0 / mu.std(0), rtol=1e-4)

    # Restored from the checkpoint, and handed on to the ControlNet stage.
    _, restored = runs.load_state(config, result.workdir)
    controlnet_state = chain["controlnet"][1].state
    for key in ("latent_shift", "latent_scale"):
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
        np.testing.assert_array_equal(np.asarray(controlnet_state[key]),
                                      np.asarray(state[key]))

    # Applied at sampling time: the sampled standardised latent is unstandardised with
    # the restored statistics before decoding (a sampler without the inverse, or with
    # the default zeros/ones, decodes another image).
    mr = jnp.asarray(first["mr"])
    decoded = {}
    restored_stats = {k: restored[k] for k in ("latent_shift", "latent_scale")}
    for name, stats in (("restored", restored_stats), ("identity", {
            "latent_shift": jnp.zeros_like(restored["latent_shift"]),
            "latent_scale": jnp.ones_like(restored["latent_scale"])})):
        captured = {}

        def decode(config_, ae_params, z, captured=captured):
            captured["z"] = z
            return jnp.zeros(mr.shape)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(common, "decode_latent", decode)
            ldm_controlnet.predict(config, {**chain["controlnet"][1].state, **stats}, mr)
        decoded[name] = np.asarray(captured["z"], np.float64)
    shift = np.asarray(restored["latent_shift"], np.float64)
    scale = np.asarray(restored["latent_scale"], np.float64)
    np.testing.assert_allclose(decoded["restored"], decoded["identity"] / scale + shift,
                               rtol=1e-4, atol=1e-5)


def test_controlnet_stage_freezes_unet_and_starts_from_it(chain):
    diffusion_state = chain["diffusion"][1].state
    config, result = chain["controlnet"]
    state = result.state
    assert set(state) == {"controlnet", "unet", "ae", "latent_shift", "latent_scale"}
    jax.tree.map(np.testing.assert_array_equal, state["unet"],
                 diffusion_state["unet"].params)
    jax.tree.map(np.testing.assert_array_equal, state["ae"], diffusion_state["ae"])
    # After step 1 the shared submodules still equal the UNet's: their gradient is 0
    # while every ControlNet output conv is zero, so only an exact copy passes here.
    _, first = runs.load_state(config, result.workdir, step=1)
    params = first["controlnet"].params
    shared = [k for k in params if k.startswith(("time_embed", "conv_in", "down_", "middle"))]
    assert len(shared) >= 4
    for key in shared:
        jax.tree.map(np.testing.assert_array_equal, params[key],
                     diffusion_state["unet"].params[key])
    assert int(state["controlnet"].step) == 2 and np.isfinite(result.metrics["loss"])


def test_predict_samples_with_one_compilation(chain):
    config, result = chain["controlnet"]
    jitted = jax.jit(functools.partial(ldm_controlnet.predict, config))
    mr = np.random.default_rng(0).uniform(-1, 1, (1, *config.data.patch, 1)).astype(
        np.float32)
    keys = [predict_lib.sample_rng(config, k) for k in range(2)]
    a, b = (np.asarray(jitted(result.state, mr, rng=k)) for k in keys)
    a_again = np.asarray(jitted(result.state, mr * 0.5, rng=keys[0]))
    assert jitted._cache_size() == 1
    assert a.shape == mr.shape  # (values in [-1, 1] by the decoder's clip)
    assert np.abs(a - b).max() > 0  # different noise, different sample
    assert np.abs(a - a_again).max() > 0  # the MR conditions the sample
    np.testing.assert_array_equal(a, np.asarray(jitted(result.state, mr, rng=keys[0])))


def test_evaluate_writes_sct_and_mean_std_of_samples(chain):
    config, result = chain["controlnet"]
    case = train_data.case_splits(config)["test"][0]
    pred = result.workdir / "predictions" / case.id
    report = evaluate_run(config, result.workdir, samples=2)
    assert len(report.cases) == 1 and np.isfinite(report.cases[0].metrics["mae"])
    mean, std = load_volume(pred / "sct.nii.gz"), load_volume(pred / "sct_std.nii.gz")
    mr = load_volume(case.mr)
    assert mean.shape == std.shape == mr.shape
    np.testing.assert_allclose(mean.affine, mr.affine)

    # Recompute the two samples with the documented keys.
    _, state = runs.load_state(config, result.workdir)
    jitted = jax.jit(functools.partial(ldm_controlnet.predict, config))
    from sct_jax.data import synthrad
    case_data = synthrad.load_case(case)
    draws = np.stack([predict_lib.predict_case(
        predict_lib.make_volume_predictor(config, state, rng=predict_lib.sample_rng(config, k),
                                          jitted_predict=jitted), config, case_data)
        for k in range(2)]).astype(np.float64)
    np.testing.assert_allclose(mean.data, draws.mean(0), atol=1e-2)
    np.testing.assert_allclose(std.data, np.abs(draws[0] - draws[1]) / 2, atol=1e-2)
    assert std.data.max() > 0

    evaluate_run(config, result.workdir)  # one sample: no stale std map stays
    assert (pred / "sct.nii.gz").exists() and not (pred / "sct_std.nii.gz").exists()
    summary = json.loads((result.workdir / "predictions" / "metrics.json").read_text())
    assert summary["n_scored"] == 1


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="choose one stage"):
        load_config_file("configs/ldm_brain.py:autoencoder,diffusion")
    config = stage_config("diffusion", tmp_path)
    with pytest.raises(ConfigError, match="config.ldm.autoencoder_workdir"):
        runs.load_upstream(config, ldm_diffusion.upstream(config)["autoencoder"])
    pix2pix = load_config_file("configs/pix2pix_pelvis.py:tiny")
    with pytest.raises(ConfigError, match="--samples 2"):
        predict_lib.predict_split(pix2pix, tmp_path, samples=2)
    with pytest.raises(ConfigError, match="'concat' has no controlnet stage"):
        load_config_file("configs/ldm_brain.py:controlnet,concat")
    with pytest.raises(ConfigError, match="choose one conditioning"):
        load_config_file("configs/ldm_brain.py:diffusion,concat,unconditional")
    concat = stage_config("controlnet", tmp_path)
    concat.ldm.conditioning = "concat"
    with pytest.raises(ConfigError, match="no ControlNet stage"):
        ldm_controlnet.validate_config(concat)
    crop = stage_config("diffusion", tmp_path)
    crop.ldm.train_crop = (10, 16, 16)  # not a multiple of factor x stride = 4
    with pytest.raises(ConfigError, match="train_crop"):
        common.validate_ldm_config(crop, "diffusion")
    bad = stage_config("controlnet", tmp_path)
    bad.model.controlnet.conditioning_embedding_num_channels = (8, 8, 8)
    with pytest.raises(ConfigError, match="conditioning_embedding_num_channels"):
        ldm_controlnet.validate_config(bad)


def test_upstream_model_must_match(chain):
    config, _ = chain["diffusion"]
    other = config.copy_and_resolve_references()
    other.model.ae.channels = (8, 16)
    with pytest.raises(ConfigError, match="config.model.ae differs"):
        runs.load_upstream(other, ldm_diffusion.upstream(other)["autoencoder"])


def test_reduced_benchmark_model():
    from sct_jax.bench.sampling import reduced_config
    reduced = reduced_config(load_config_file("configs/ldm_brain.py:tiny"))
    assert common.latent_shape(reduced, (1, *reduced.data.patch, 1)) == (1, 48, 48, 48, 3)
    assert tuple(reduced.model.unet.channels) == (32, 64, 64)
    common.validate_ldm_config(reduced, "controlnet")


def test_image_summaries_of_the_stages(chain):
    """The autoencoder draws its reconstruction; the ControlNet stage, which predicts
    sCT, draws a sample on the fixed validation slice."""
    from sct_jax.training import validation
    config, result = chain["autoencoder"]
    ct = np.random.default_rng(1).uniform(-1, 1, (1, *config.data.patch, 1)).astype(np.float32)
    maps = jax.device_get(jax.jit(functools.partial(ldm_autoencoder.image_summaries, config))(
        result.state, {"ct": ct}, jax.random.key_data(jax.random.key(0))))
    recon = np.asarray(ldm_autoencoder.reconstruct(config, result.state, ct))
    centre = ct.shape[-2] // 2
    np.testing.assert_allclose(maps["ae/reconstruction"], recon[0, ..., centre, 0], atol=1e-5)
    np.testing.assert_array_equal(maps["ae/ct"], ct[0, ..., centre, 0])
    np.testing.assert_allclose(maps["ae/abs_error_hu"],
                               np.abs(recon - ct)[0, ..., centre, 0] * common.HU_PER_UNIT,
                               rtol=1e-4, atol=1e-2)

    config, result = chain["controlnet"]
    validator = validation.Validator(config, validation.validation_cases(config))
    images, _ = validator.images(result.state)
    assert {k: v.shape for k, v in images.items()} == {
        k: images["val/ct"].shape for k in ("val/mr", "val/ct", "val/sct", "val/abs_error_hu")}
    assert np.all(np.abs(images["val/sct"]) <= 3000.0) and images["val/sct"].std() > 0


# ------------------------------------------------------- rectified flow (ldm.objective)

def test_flow_loss_is_the_velocity_mse_at_the_interpolated_latent():
    from sct_jax.diffusion import flow
    config = load_config_file("configs/ldm_brain.py:diffusion,tiny,flow")
    z0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 4, 2)), jnp.float32)
    rng = jax.random.key_data(jax.random.key(5))
    seen = {}

    def model(x_t, t):
        seen.update(x_t=x_t, t=t)
        return jnp.zeros_like(x_t)

    loss = common.diffusion_mse(config, None, z0, rng, model)
    noise_rng, t_rng = jax.random.split(rng)
    noise = common.flat_normal(noise_rng, z0.shape)
    t = flow.sample_flow_times(t_rng, 3, "logit_normal")
    np.testing.assert_allclose(np.asarray(seen["t"]), np.asarray(t) * 1000.0, rtol=1e-6)
    expected_x_t = (1 - np.asarray(t))[:, None, None, None, None] * np.asarray(z0) \
        + np.asarray(t)[:, None, None, None, None] * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(seen["x_t"]), expected_x_t, rtol=1e-5, atol=1e-6)
    # A zero velocity misses the whole target eps - z0.
    assert float(loss) == pytest.approx(float(np.mean((np.asarray(noise) - np.asarray(z0)) ** 2)),
                                        rel=1e-5)


def test_flow_sampler_maps_noise_to_gaussian_data_in_closed_form():
    """Data x0 ~ N(0, s^2): the exact velocity at x_t is (t - (1 - t) s^2) / v_t x with
    v_t = (1 - t)^2 s^2 + t^2, and its ODE takes noise x_1 to s x_1."""
    config = load_config_file("configs/ldm_brain.py:diffusion,tiny,flow")
    config.ldm.sampler, config.ldm.sample_steps = "dpmpp_2m", 60
    s = 0.5

    def velocity(x, t_scaled):
        t = (t_scaled / 1000.0)[:, None, None, None, None]
        return (t - (1 - t) * s ** 2) / ((1 - t) ** 2 * s ** 2 + t ** 2) * x

    rng = jax.random.key_data(jax.random.key(2))
    out = common.sample_latents(config, velocity, (2, 4, 4, 4, 1), rng)
    noise = common.flat_normal(jax.random.split(rng)[0], (2, 4, 4, 4, 1))
    # 60 second-order steps: within 0.5 % of the exact endpoint.
    np.testing.assert_allclose(np.asarray(out), s * np.asarray(noise), rtol=5e-3, atol=5e-4)


def test_flow_config_checks():
    config = load_config_file("configs/ldm_brain.py:diffusion,tiny,flow")
    config.ldm.sampler = "ddim"
    with pytest.raises(ConfigError, match="flow objective samples with"):
        ldm_diffusion.validate_config(config)
    config = load_config_file("configs/ldm_brain.py:diffusion,tiny")
    config.ldm.objective = "score"
    with pytest.raises(ConfigError, match="ldm.objective='score'"):
        ldm_diffusion.validate_config(config)


def test_flow_diffusion_stage_trains_and_samples(chain, tmp_path):
    config = load_config_file("configs/ldm_brain.py:diffusion,tiny,flow")
    config.ldm.autoencoder_workdir = str(chain["autoencoder"][1].workdir)
    result = loop.train(config, tmp_path / "flow")
    records = metric_records(result.workdir)
    assert records[-1]["unet/grad_norm"] > 0 and np.isfinite(records[-1]["loss"])
    mr = np.zeros((1, *config.data.patch, 1), np.float32)
    sct = np.asarray(jax.jit(functools.partial(ldm_diffusion.predict, config))(result.state, mr))
    assert sct.shape == mr.shape and np.all(np.isfinite(sct))
