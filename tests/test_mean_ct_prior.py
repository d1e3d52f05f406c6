"""The mean training CT as an input channel (``config.data.prior``, sct_jax.data.prior)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax import methods, runs
from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets, pipeline, preprocess
from sct_jax.data import prior as prior_lib
from sct_jax.errors import ConfigError, DataError
from sct_jax.evaluation import baselines
from sct_jax.inference import predict as predict_lib
from sct_jax.inference import windows
from sct_jax.models.resnet_generator import ResnetGenerator
from sct_jax.models.unet import UNetGenerator

REPO = Path(__file__).resolve().parents[1]


def _case(rng, shape, box_start, box_shape, hole=True):
    """A random CT (HU) and a body mask filling a box (less one voxel, when ``hole``)."""
    ct = rng.uniform(-200, 1500, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    box = tuple(slice(s, s + n) for s, n in zip(box_start, box_shape))
    mask[box] = True
    if hole:
        mask[tuple(s.start + 1 for s in box)] = False  # air inside the box
    return ct, mask


def test_the_template_is_the_voxelwise_mean_of_the_training_body_boxes():
    """Boxes of one shape need no resampling: the template is the float64 mean of each
    case's box with air outside its body; its shape is the median box shape."""
    rng = np.random.default_rng(0)
    pairs = [_case(rng, (14, 12, 9), start, (6, 5, 4))
             for start in ((0, 0, 0), (3, 4, 2), (8, 7, 5))]
    template = prior_lib.fit_template(pairs)
    expected = np.mean([np.where(m, c, -1000.0)[tuple(slice(s, s + n) for s, n in
                                                       zip(start, (6, 5, 4)))]
                        for (c, m), start in zip(pairs, ((0, 0, 0), (3, 4, 2), (8, 7, 5)))],
                       axis=0, dtype=np.float64)
    assert template.shape == (6, 5, 4) and template.dtype == np.float32
    np.testing.assert_allclose(template, expected, rtol=1e-6)
    shapes = [(6, 5, 4), (8, 5, 6), (10, 9, 4)]
    mixed = [_case(rng, (14, 12, 9), (0, 0, 0), s) for s in shapes]
    assert prior_lib.fit_template(mixed).shape == (8, 5, 4)  # the per-axis median


def test_the_prior_on_a_test_box_is_the_evaluation_baseline():
    """The template fitted on the test case's box shape, placed on its body, is the
    evaluation's "mean training CT" sCT of that case."""
    rng = np.random.default_rng(1)
    train = [_case(rng, (16, 12, 10), (1, 2, 0), s) for s in ((8, 6, 5), (10, 7, 6))]
    _, test_mask = _case(rng, (16, 12, 10), (4, 3, 2), (9, 8, 7))
    box = prior_lib.box_shape(test_mask)
    template = prior_lib.fit_template(train, shape=box)
    expected = baselines.place_in_body(baselines.mean_ct_on_boxes(iter(train), [box])[0],
                                       test_mask)
    np.testing.assert_allclose(prior_lib.prior_volume(template, test_mask), expected, rtol=1e-6)


def test_the_prior_volume_is_air_outside_the_body():
    rng = np.random.default_rng(2)
    _, mask = _case(rng, (10, 9, 8), (2, 1, 3), (5, 6, 4))
    template = rng.uniform(-100, 900, (5, 6, 4)).astype(np.float32)
    prior = prior_lib.prior_volume(template, mask)
    box = prior_lib.body_box(mask)
    np.testing.assert_array_equal(prior[box][mask[box]], template[mask[box]])
    assert (prior[~mask] == -1000.0).all()
    np.testing.assert_allclose(prior_lib.prior_unit(template, mask),
                               preprocess.ct_to_unit(prior))
    assert (prior_lib.prior_volume(template, np.zeros_like(mask)) == -1000.0).all()


def test_windows_give_the_network_the_prior_of_its_own_slice():
    """A network that returns its input's last channel predicts the prior; one that
    returns the centre MR channel predicts the MR (2D with context, and 3D patches)."""
    rng = np.random.default_rng(3)
    mr = rng.uniform(-1, 1, (20, 18, 6)).astype(np.float32)
    prior = rng.uniform(-1, 1, mr.shape).astype(np.float32)
    both = np.stack([mr, prior], axis=-1)
    stack = windows.slice_stack(both, 0, context=1)
    np.testing.assert_array_equal(stack[..., :3], np.stack([mr[:, :, 0], mr[:, :, 0],
                                                            mr[:, :, 1]], axis=-1))
    np.testing.assert_array_equal(stack[..., 3], prior[:, :, 0])
    kw = dict(tile=(16, 16), context=1, batch_size=3, overlap=0.25)
    last = windows.predict_volume_2d(lambda b: b[..., -1:], both, **kw)
    centre = windows.predict_volume_2d(lambda b: b[..., 1:2], both, **kw)
    np.testing.assert_allclose(last, prior, atol=1e-6)
    np.testing.assert_allclose(centre, mr, atol=1e-6)
    patch = windows.predict_volume_3d(lambda b: b[..., 1:2], both, patch=(8, 8, 4))
    np.testing.assert_allclose(patch, prior, atol=1e-6)
    # A plain (X, Y, Z) MR still works as before.
    np.testing.assert_allclose(windows.predict_volume_3d(lambda b: b, mr, patch=(8, 8, 4)),
                               mr, atol=1e-6)


@pytest.mark.parametrize("generator, last_layer", [
    (UNetGenerator(ngf=4, num_downs=3, residual=True, dropout_rate=0.0, calibration_bins=16,
                   upsample="resize", prior_input=True), "up_conv_0"),
    (ResnetGenerator(ngf=4, n_blocks=1, residual=True, dropout_rate=0.0, calibration_bins=16,
                     prior_input=True), "conv_out"),
])
def test_generators_calibrate_and_add_the_residual_on_the_image_channels_only(generator,
                                                                              last_layer):
    """Three MR slices and a prior: with the last layer zeroed the output is the
    calibrated centre MR slice, never the prior (which is not calibrated either)."""
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 4), minval=-1, maxval=1)
    params = generator.init(jax.random.key(1), x, train=False)["params"]
    assert params["calibration"]["knots"].shape == (17,)
    params[last_layer] = jax.tree_util.tree_map(jnp.zeros_like, params[last_layer])
    params["calibration"] = {"knots": 0.5 * jnp.linspace(-1.0, 1.0, 17) + 0.1}
    out = generator.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(out, 0.5 * x[..., 1:2] + 0.1, atol=1e-6)
    # Without the image residual the output corrects the prior: zeroed, it is the prior.
    plain = generator.clone(residual=False)
    np.testing.assert_allclose(plain.apply({"params": params}, x, train=False),
                               x[..., 3:4], atol=1e-6)
    # Untrained, its last layer starts at zero: the model starts as the mean training CT.
    untrained = plain.init(jax.random.key(2), x, train=False)
    np.testing.assert_allclose(plain.apply(untrained, x, train=False), x[..., 3:4], atol=1e-6)
    # The prior reaches the network: changing it changes a trained-like output.
    fresh = generator.init(jax.random.key(1), x, train=False)["params"]
    moved = x.at[..., 3].add(0.5)
    assert not np.allclose(generator.apply({"params": fresh}, x, train=False),
                           generator.apply({"params": fresh}, moved, train=False))


def _config(words="tiny"):
    return load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:{words}")


def test_bad_prior_settings_are_config_errors():
    config = _config()
    config.data.prior = "atlas"
    with pytest.raises(ConfigError, match=r"config.data.prior='atlas'"):
        methods.get_method("pix2pix").validate(config)
    cyclegan = load_config_file(f"{REPO / 'configs/cyclegan_pelvis.py'}:tiny")
    cyclegan.data.prior = "mean_ct"
    with pytest.raises(ConfigError, match=r"config.data.prior='mean_ct'.*unpaired"):
        methods.get_method("cyclegan").validate(cyclegan)
    ldm = load_config_file(f"{REPO / 'configs/ldm_brain.py'}:tiny")
    ldm.data.prior = "mean_ct"
    with pytest.raises(ConfigError, match=r"does not take the prior"):
        methods.get_method(ldm.method).validate(ldm)


def test_runs_saved_before_the_prior_existed_resume_and_keep_their_digest():
    from sct_jax.reproduce.ablate import config_digest
    from sct_jax.runs import lock

    config = _config()
    saved = json.loads(config.to_json_best_effort())
    del saved["data"]["prior"]
    assert lock.changed_resume_keys(saved, config) == []
    older = _config()
    with older.unlocked():
        del older.data["prior"]
    assert config_digest(older) == config_digest(config)
    config.data.prior = "mean_ct"  # another model: no resume onto it
    assert lock.changed_resume_keys(saved, config) == ["data.prior"]


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """A 2-step tiny pix2pix with the prior, trained on the tiny phantom."""
    from sct_jax.training import loop

    config = _config()
    config.data.prior = "mean_ct"
    config.train.steps = 2
    workdir = tmp_path_factory.mktemp("prior") / "run"
    loop.train(config, workdir)
    return config, workdir


def test_training_records_the_template_and_feeds_the_prior(prior_run):
    config, workdir = prior_run
    train_cases = datasets.case_splits(config)["train"]
    template = np.load(workdir / prior_lib.PRIOR_FILE)
    np.testing.assert_array_equal(template, datasets.prior_template(config, train_cases))
    assert runs.read_batch_spec(workdir)["mr"].shape[-1] == 2
    # The training batches hold the MR and the prior of the same slice.
    prepared = pipeline.with_prior(datasets.prepare(config, train_cases[:1]), template)
    ds = pipeline.slice_dataset(prepared, crop=tuple(config.data.crop), batch_size=1,
                                seed=0, train=False)
    batch = next(iter(ds))
    row = pipeline.slice_index(prepared)[0]
    expected = pipeline.crop_or_pad_hw(
        prior_lib.prior_unit(template, np.asarray(prepared[0].mask) > 0)[:, :, row[1], None],
        tuple(config.data.crop), -1.0)
    np.testing.assert_allclose(batch["mr"][0, ..., 1:], expected, atol=1e-6)


def test_prediction_uses_the_recorded_template(prior_run):
    config, workdir = prior_run
    case = datasets.case_splits(config)["test"][0]
    data = __import__("sct_jax.data.synthrad", fromlist=["load_case"]).load_case(case)
    [member] = predict_lib.load_members(config, workdir, checkpoint="latest")
    geometry = member.geometry
    assert geometry.prior is not None
    step, state = runs.load_state(config, workdir, "latest")
    volume = predict_lib.make_volume_predictor(config, state)
    sct = predict_lib.predict_mr(volume, config, data.mr, data.mask, geometry)
    import dataclasses
    brighter = dataclasses.replace(geometry, prior=geometry.prior + 500.0)
    other = predict_lib.predict_mr(volume, config, data.mr, data.mask, brighter)
    assert sct.shape == data.mr.shape and not np.allclose(sct, other)
    without = dataclasses.replace(geometry, prior=None)
    with pytest.raises(DataError, match="config.data.prior"):
        predict_lib.predict_mr(volume, config, data.mr, data.mask, without)


def test_a_run_or_export_without_its_template_is_refused(prior_run, tmp_path, capsys):
    from sct_jax.cli import predict as predict_cli
    from sct_jax.export import model as model_lib

    config, workdir = prior_run
    exported = model_lib.export_model(workdir, tmp_path / "model", serialized=False)
    assert (exported / prior_lib.PRIOR_FILE).is_file()
    assert model_lib.load_exported(exported).geometry.prior is not None
    np.save(exported / prior_lib.PRIOR_FILE, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(DataError, match="content hash"):
        model_lib.load_exported(exported)
    copy = tmp_path / "run_copy"
    shutil.copytree(workdir, copy)
    (copy / prior_lib.PRIOR_FILE).unlink()
    with pytest.raises(DataError, match=r"prior_ct.npy: missing"):
        runs.read_geometry(config, copy)
    mr = datasets.case_splits(config)["test"][0].mr
    capsys.readouterr()
    code = predict_cli.main(["-m", str(copy), "-i", str(mr), "-o", str(tmp_path / "s.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prior_ct.npy: missing" in err[0]
    assert not (tmp_path / "s.nii.gz").exists()


def test_the_seed03_heads_pix2pix_takes_the_prior_with_mr_input_only():
    from sct_jax.reproduce import seed03

    for size in ("small", "tiny"):
        mr = seed03.pix2pix_config(size, 0, {"data.root": "/data/heads"})
        assert mr.data.prior == "mean_ct" and mr.loss.l1_weight == 1000.0
        assert mr.data.root == "/data/heads"  # a user's data keep the model settings
        methods.get_method(mr.method).validate(mr)
        cbct = seed03.pix2pix_config(size, 0, input="cbct")
        assert cbct.data.prior == "" and cbct.data.input == "cbct"
        # ... and with CBCT input trains on the CTs registered to their CBCTs (the
        # cbct word's).
        assert cbct.data.register_target and not mr.data.register_target
