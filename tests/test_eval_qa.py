"""Monte-Carlo dropout sampling of the GANs and the QA of a predicted split.

One 2-step training run per model: pix2pix with a dropout level (the ``tiny`` U-Net is
too shallow to have one) and the tiny CycleGAN (no dropout, but a CT->MR generator).
"""

import functools
import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from scipy import ndimage

from sct_jax import methods
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.config_utils import load_config_file
from sct_jax.data import synthrad
from sct_jax.data.io import load_volume
from sct_jax.errors import ConfigError
from sct_jax.inference import predict as predict_lib
from sct_jax.evaluation import qa, qa_report
from sct_jax.methods import _pgan_common, cyclegan, pix2pix
from sct_jax.data import datasets as train_data
from sct_jax import runs
from sct_jax.training import loop

REPO = Path(__file__).resolve().parents[1]


def dropout_pix2pix_config():
    """pix2pix ``tiny`` with one dropout level: with ngf 4 the channels cap at 32 from
    level 3, so 6 levels give dropout at level 4 (and need a crop divisible by 64)."""
    config = load_config_file("configs/pix2pix_pelvis.py:tiny")
    config.model.gen.num_downs = 6
    config.data.crop = (64, 64)
    return config


@pytest.fixture(scope="module")
def pix2pix_run(tmp_path_factory):
    config = dropout_pix2pix_config()
    workdir = tmp_path_factory.mktemp("pix2pix_dropout")
    loop.train(config, workdir)
    return config, workdir, runs.load_state(config, workdir)[1]


@pytest.fixture(scope="module")
def cyclegan_run(tmp_path_factory):
    config = load_config_file("configs/cyclegan_pelvis.py:tiny")
    workdir = tmp_path_factory.mktemp("cyclegan")
    loop.train(config, workdir)
    return config, workdir


# ------------------------------------------------------------------- MC dropout predict

def test_pix2pix_dropout_is_the_only_source_of_randomness(pix2pix_run):
    config, _, state = pix2pix_run
    mr = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 1)).astype(np.float32)
    jitted = jax.jit(functools.partial(pix2pix.predict, config))
    deterministic = np.asarray(jitted(state, mr))
    # The deterministic sCT is the generator with dropout off, as before sampling existed
    # (jitted too: XLA's fusion changes the last bits).
    generator = pix2pix.build_models(config)[0]
    np.testing.assert_array_equal(deterministic, np.asarray(jax.jit(
        lambda params, x: generator.apply({"params": params}, x, train=False))(
            state["gen"].params, mr)))
    keys = [predict_lib.sample_rng(config, k) for k in range(2)]
    a, b = (np.asarray(jitted(state, mr, rng=key)) for key in keys)
    assert np.abs(a - b).max() > 1e-4 and np.abs(a - deterministic).max() > 1e-4
    np.testing.assert_array_equal(a, np.asarray(jitted(state, mr, rng=keys[0])))

    # The same weights in a generator built with dropout 0: a key changes nothing, so
    # train mode switches dropout only (the norms behave the same in both modes).
    config.model.gen.dropout = 0.0
    try:
        no_dropout = pix2pix.build_models(config)[0]
        state0 = {**state, "gen": state["gen"].replace(apply_fn=no_dropout.apply)}
        np.testing.assert_allclose(np.asarray(pix2pix.predict(config, state0, mr, rng=keys[0])),
                                   deterministic, atol=1e-6)
    finally:
        config.model.gen.dropout = 0.5


def test_sampling_needs_a_dropout_layer():
    config = dropout_pix2pix_config()
    predict_lib.check_samples(config, 3)
    shallow = load_config_file("configs/pix2pix_pelvis.py:tiny")  # num_downs 3: no level
    with pytest.raises(ConfigError, match=r"--samples 2: .*num_downs=3"):
        predict_lib.check_samples(shallow, 2)
    config.model.gen.dropout = 0.0
    with pytest.raises(ConfigError, match=r"--samples 2: config.model.gen.dropout=0.0"):
        predict_lib.check_samples(config, 2)
    predict_lib.check_samples(config, 1)
    pgan = load_config_file("configs/pgan_pelvis.py:tiny")  # dropout 0.5, 1 block
    assert methods.get_method("pgan").check_sampling is _pgan_common.check_sampling
    predict_lib.check_samples(pgan, 2)
    pgan.model.gen.n_blocks = 0
    with pytest.raises(ConfigError, match="config.model.gen.n_blocks=0"):
        predict_lib.check_samples(pgan, 2)


# ----------------------------------------------------------------- evaluate_run with QA

def _assert_samples_on_disk(config, workdir, case, n_samples=3):
    """sct.nii.gz / sct_std.nii.gz are the voxel-wise mean / std (ddof 0) of the K
    Monte-Carlo dropout sCTs, recomputed here from the raw files: each axial slice
    centre-padded (air) to the crop, in batches of ``config.eval.batch_size`` (the last
    zero-padded), batch ``i`` of sample ``k`` with key ``fold_in(fold_in(key(seed), k),
    i)`` (the documented keys), mapped to HU."""
    import nibabel as nib

    from sct_jax.data import preprocess

    mr = np.asarray(nib.load(case.mr).dataobj, np.float64)
    mask = np.asarray(nib.load(case.mask).dataobj) > 0
    lo, hi = config.data.mr_percentiles
    unit = preprocess.mr_to_unit(mr, mask, lo_pct=lo, hi_pct=hi)
    (h, w), (x, y, z) = tuple(config.data.crop), mr.shape
    assert x <= h and y <= w and config.data.context == 0  # padded, not cropped
    ox, oy = (h - x) // 2, (w - y) // 2
    batch = config.eval.batch_size
    n_batches = -(-z // batch)
    inputs = np.zeros((n_batches * batch, h, w, 1), np.float32)
    inputs[:z] = -1.0
    inputs[:z, ox:ox + x, oy:oy + y, 0] = np.moveaxis(unit, 2, 0)
    _, state = runs.load_state(config, workdir)
    gen = state["gen"]
    sample = jax.jit(lambda p, v, key: gen.apply_fn({"params": p}, v, train=True,
                                                     rngs={"dropout": key}))
    draws = []
    for k in range(n_samples):
        base = jax.random.fold_in(jax.random.key_data(jax.random.key(config.seed)), k)
        out = np.concatenate([np.asarray(sample(gen.params, inputs[i * batch:(i + 1) * batch],
                                                jax.random.fold_in(base, i)))
                              for i in range(n_batches)])[:z, ox:ox + x, oy:oy + y, 0]
        draws.append((np.clip(np.moveaxis(out, 0, 2).astype(np.float64), -1, 1) + 1)
                     * 2012.0 - 1024.0)
    draws = np.stack(draws)
    if config.loss.body_mask:
        # Trained inside the body mask grown in-plane by the margin: each draw is air beyond.
        r = int(config.loss.body_mask_margin)
        grown = ndimage.binary_dilation(mask, structure=np.ones((2 * r + 1, 2 * r + 1, 1)))
        draws[:, ~grown] = -1000.0
    pred = workdir / "predictions" / case.id
    mean = np.asarray(nib.load(pred / "sct.nii.gz").dataobj, np.float64)
    std = np.asarray(nib.load(pred / "sct_std.nii.gz").dataobj, np.float64)
    assert draws.std(axis=0)[mask].mean() > 1.0  # the samples differ
    np.testing.assert_allclose(mean, draws.mean(axis=0), rtol=0, atol=0.05)
    np.testing.assert_allclose(std, draws.std(axis=0), rtol=0, atol=0.05)


def test_evaluate_samples_and_qa_pix2pix(pix2pix_run, capsys):
    config, workdir, _ = pix2pix_run
    evaluate_run(config, workdir, samples=3, qa=True, panels=False)
    case = train_data.case_splits(config)["test"][0]
    pred = workdir / "predictions"
    std = load_volume(pred / case.id / "sct_std.nii.gz").data
    mask = synthrad.load_case(case).mask
    assert std.shape == mask.shape and std.min() >= 0.0 and std[mask].max() > 0.0

    _assert_samples_on_disk(config, workdir, case)

    report = json.loads((pred / case.id / "qa.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert {"hu_range", "tissue_fractions", "sample_spread"} <= set(checks)
    assert "cycle_consistency" not in checks  # pix2pix has no CT->MR generator
    # The case's status is its worst check's (pass < warn < fail).
    order = ["pass", "warn", "fail"]
    assert report["status"] == max((c["status"] for c in report["checks"]), key=order.index)
    spread = checks["sample_spread"]["value"]
    # The file holds the population std (ddof 0) of 3 draws; the check the sample std.
    assert spread["n_samples"] == 3
    assert spread["mean_std_hu"] == pytest.approx(
        float(np.mean(std[mask].astype(np.float64) * math.sqrt(3 / 2))), rel=1e-4)
    assert (pred / case.id / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The reference is the profile of the training split's CTs and masks.
    reference = json.loads((pred / "qa_reference.json").read_text())
    train_cases = train_data.case_splits(config)["train"]
    assert reference["cases"] == [c.id for c in train_cases]
    expected = qa.build_reference_profile(
        ((load_volume(c.ct).data, load_volume(c.mask).data) for c in train_cases))
    for name, ranges in expected["ranges"].items():
        for kind in ("pass", "fail"):
            assert reference["ranges"][name][kind] == pytest.approx(ranges[kind])
    assert report["reference"] == "reference profile"

    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    at = next(i for i, line in enumerate(lines) if line.startswith("case "))
    header, row = lines[at].split(), lines[at + 1].split()
    assert header[-1] == "overall" and "sample_spread" in header
    assert row[0] == case.id and row[-1] == report["status"]
    assert row[header.index("sample_spread")] == checks["sample_spread"]["status"]


def test_cyclegan_qa_has_cycle_consistency(cyclegan_run):
    config, workdir = cyclegan_run
    evaluate_run(config, workdir, qa=True, panels=False)
    case = train_data.case_splits(config)["test"][0]
    case_dir = workdir / "predictions" / case.id
    checks = {c["name"]: c for c in json.loads((case_dir / "qa.json").read_text())["checks"]}
    r = checks["cycle_consistency"]["value"]["pearson_r"]
    assert r is not None and math.isfinite(r) and -1.0 <= r <= 1.0
    assert "sample_spread" not in checks
    # The same r by numpy: MR vs G_CT->MR(sCT) inside the body mask.
    data = synthrad.load_case(case)
    sct = load_volume(case_dir / "sct.nii.gz").data
    mr_hat = qa_report.make_ct_to_mr(config, runs.load_state(config, workdir)[1])(sct)
    assert mr_hat.shape == sct.shape
    expected = np.corrcoef(data.mr.data[data.mask].astype(np.float64),
                           mr_hat[data.mask].astype(np.float64))[0, 1]
    assert r == pytest.approx(expected, abs=1e-5)


def test_cyclegan_without_dropout_cannot_sample(cyclegan_run):
    config, workdir = cyclegan_run
    assert cyclegan.METHOD.samples
    with pytest.raises(ConfigError, match=r"^--samples 2: config.model.gen.dropout=0.0"):
        evaluate_run(config, workdir, samples=2, qa=True)


# ---------------------------------------------------------------------------- the flag

@pytest.fixture
def evaluate_cli():
    """evaluate.py loaded in this process; its flags are removed again afterwards."""
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


def test_qa_flag_reaches_evaluate_run(evaluate_cli, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(evaluate_cli._cli, "evaluate_run", lambda *a, **kw: calls.append((a, kw)))
    flags.FLAGS(["evaluate.py", "--config", "configs/pix2pix_pelvis.py:tiny", "--workdir",
                 str(tmp_path), "--samples", "3", "--qa"])
    evaluate_cli.main(["evaluate.py"])
    (config, workdir), kwargs = calls[0]
    assert config.method == "pix2pix" and workdir == str(tmp_path)
    assert kwargs["qa"] is True and kwargs["samples"] == 3
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate.py", "--pred", str(tmp_path), "--data", str(tmp_path), "--qa"])
    with pytest.raises(ConfigError, match="--qa needs --config"):
        evaluate_cli.main(["evaluate.py"])
