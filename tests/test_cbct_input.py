"""CBCT input (SynthRAD Task 2): discovery, validation, normalisation and the CBCT-as-sCT
baseline, on hand-written cases (the phantom's own Task 2 cases are tested in
tests/test_phantom_cbct.py)."""

from pathlib import Path

import numpy as np
import pytest

from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets, modality, pipeline, synthrad
from sct_jax.data.io import save_volume
from sct_jax.errors import ConfigError, DataError
from sct_jax.evaluation import baselines, qa

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 6)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def _cbct_case(folder: Path, seed=0, offset=0.0, roles=("cbct", "ct", "mask")):
    """A body ellipse: CT water with a bone rod; CBCT = CT + ``offset`` HU + noise,
    air outside. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = ((x - 12) / 9.0) ** 2 + ((y - 10) / 7.0) ** 2 <= 1
    ct = np.where(body, 20.0, -1000.0) + rng.normal(0, 5, SHAPE)
    ct[11:13, 9:11, :] = 800.0
    cbct = np.where(body, ct + offset + rng.normal(0, 20, SHAPE), -1000.0)
    arrays = {"cbct": cbct.astype(np.int16), "ct": ct.astype(np.int16),
              "mask": body.astype(np.uint8)}
    for role in roles:
        save_volume(folder / f"{role}.nii.gz", arrays[role], AFFINE)
    return arrays


@pytest.fixture
def task2(tmp_path):
    root = tmp_path / "data"
    for k in range(5):
        _cbct_case(root / "Task2" / "pelvis" / f"2PA00{k}", seed=k)
    return root


def test_task2_layout_is_found_only_with_cbct_input(task2):
    cases = synthrad.discover_cases(task2, region="pelvis", input="cbct")
    assert [c.id for c in cases] == [f"2PA00{k}" for k in range(5)]
    assert all(c.input == "cbct" and c.mr.name == "cbct.nii.gz" for c in cases)
    synthrad.validate_cases(cases)
    with pytest.raises(DataError, match=r"no cases found.*Task1/<region>/<id>/mr\.nii\.gz"):
        synthrad.discover_cases(task2, input="mr")
    assert synthrad.discover_cases(task2, input=None)[0].input == "cbct"  # either task
    with pytest.raises(ConfigError, match="input 'ct'"):
        synthrad.discover_cases(task2, input="ct")


def test_missing_cbct_other_grid_and_wrong_units_are_one_line_each(tmp_path):
    root = tmp_path / "Task2" / "pelvis"
    _cbct_case(root / "2PA001", roles=("ct", "mask"))  # no cbct: not a case
    with pytest.raises(DataError, match=r"no cases found.*Task2/<region>/<id>/cbct"):
        synthrad.discover_cases(tmp_path, input="cbct")
    _cbct_case(root / "2PA002")
    save_volume(root / "2PA002" / "cbct.nii.gz", np.zeros((20, 20, 6), np.int16) - 1000,
                AFFINE)
    arrays = _cbct_case(root / "2PA003")
    # Stored values without the rescale (HU + 1024): every voxel >= 0.
    save_volume(root / "2PA003" / "cbct.nii.gz", arrays["cbct"] + 1024, AFFINE)
    cases = synthrad.discover_cases(tmp_path, input="cbct")
    assert [c.id for c in cases] == ["2PA002", "2PA003"]
    with pytest.raises(DataError) as err:
        synthrad.validate_cases(cases)
    message = str(err.value)
    assert "\n" not in message and message.startswith("3 problem(s) in 3 file(s)")  # ct and mask of 2PA002
    assert "2PA002/ct.nii.gz: shape (24, 20, 6) differs from cbct.nii.gz (20, 20, 6)" in message
    assert "2PA003/cbct.nii.gz: CBCT no negative value" in message


def test_cbct_normalisation_is_a_fixed_hu_window_not_percentiles():
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny,cbct")
    spec = modality.spec(config)
    assert (spec.kind, spec.task, spec.stem) == ("cbct", 2, "cbct")
    hu = np.array([-2000.0, -1024.0, 988.0, 3000.0, 5000.0])
    np.testing.assert_allclose(spec.to_unit(hu), [-1, -1, 0, 1, 1], atol=1e-6)
    # A 50 HU offset stays an offset (per-image percentiles would remove it).
    base = np.linspace(-1000, 1500, 100)
    shift = spec.to_unit(base + 50.0) - spec.to_unit(base)
    np.testing.assert_allclose(shift, 50.0 * 2 / 4024.0, atol=1e-6)
    mr = modality.spec(load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny"))
    assert mr.kind == "mr"
    np.testing.assert_allclose(mr.to_unit(base + 50.0), mr.to_unit(base), atol=1e-6)
    config.data.cbct_window = (100.0, 100.0)
    with pytest.raises(ConfigError, match="cbct_window"):
        modality.spec(config)
    config.data.input = "ct"
    with pytest.raises(ConfigError, match="data.input='ct'"):
        modality.spec(config)


def test_prepared_cbct_case_holds_the_window_mapped_cbct(task2, tmp_path):
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny,cbct")
    config.data.root = str(task2)
    config.data.cache_dir = str(tmp_path / "cache")
    splits = datasets.case_splits(config)
    prepared = datasets.prepare(config, splits["train"][:1])[0]
    cbct = synthrad.load_case(splits["train"][0]).mr.data
    np.testing.assert_allclose(prepared.mr, modality.spec(config).to_unit(cbct), atol=1e-6)
    # The same case prepared as an MR case is refused rather than normalised wrongly.
    with pytest.raises(ConfigError, match="config's input is mr"):
        pipeline.prepare_case(splits["train"][0], tmp_path / "other")


def test_cbct_baseline_is_the_cbct_itself_in_the_body(task2):
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny,cbct")
    cases = synthrad.discover_cases(task2, input="cbct")
    (case, data, preds), = list(baselines.case_predictions(config, cases[:1], cases[1:]))
    assert set(preds) == {"constant", "lookup", "mean_ct", "cbct"}
    body = data.mask
    np.testing.assert_array_equal(preds["cbct"][body], data.mr.data[body])
    assert np.all(preds["cbct"][~body] == -1000.0)
    mr_case = synthrad.Case(case.id, case.region, case.dir, case.mr, case.ct, case.mask)
    mr_data = synthrad.CaseData(data.id, data.mr, data.ct, data.mask)
    assert mr_case.input == "mr" and mr_data.input == "mr"


def test_qa_reports_cbct_truncation_without_failing():
    x, y, _ = np.meshgrid(*[np.arange(s) for s in (40, 40, 6)], indexing="ij")
    r = np.hypot(x - 19.5, y - 19.5)
    body = r <= 16
    ct = np.where(body, 30.0, -1000.0).astype(np.float32)
    cbct = np.where(r <= 12, ct, -1000.0).astype(np.float32)  # field of view 12 voxels
    cbct[16:24, 16:24, :] = -1000.0  # an air pocket inside: not truncation
    check = qa.check_cbct_field_of_view(cbct, body, (1.0, 1.0, 1.0))
    truncated = body & (r > 12)
    assert check["status"] == "pass"
    assert check["value"] == pytest.approx(truncated.sum() / body.sum(), abs=0.01)
    assert "outside the CBCT's field of view" in check["reason"]
    assert "radius of 1" in check["reason"]  # about 12 mm


def test_residual_generator_output_starts_from_the_input_centre_slice():
    import jax
    import jax.numpy as jnp

    from sct_jax.models.layers import generator_output
    from sct_jax.models.unet import UNetGenerator

    x = jnp.stack([jnp.full((1, 8, 8), v) for v in (-0.5, 0.25, 0.9)], axis=-1)  # 3 slices
    h = jnp.zeros((1, 8, 8, 1))
    np.testing.assert_allclose(generator_output(h, x, True), 0.25)  # the centre slice
    np.testing.assert_allclose(generator_output(h + 10.0, x, True), 1.0)  # clipped
    np.testing.assert_allclose(generator_output(h + 0.3, x, False), np.tanh(0.3), rtol=1e-6)
    # A U-Net whose last layer is zeroed returns its input exactly when residual.
    gen = UNetGenerator(ngf=4, num_downs=3, residual=True, dropout_rate=0.0)
    image = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
    params = gen.init(jax.random.key(1), image, train=False)["params"]
    params = jax.tree_util.tree_map(lambda p: p, params)
    params["up_conv_0"] = jax.tree_util.tree_map(jnp.zeros_like, params["up_conv_0"])
    np.testing.assert_allclose(gen.apply({"params": params}, image, train=False), image,
                               atol=1e-6)
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny,cbct")
    assert config.model.gen.residual
    assert config.model.gen.calibration_bins == 128  # the CBCT is calibrated first
    mr_config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    assert "residual" not in mr_config.model.gen and mr_config.model.gen.calibration_bins == 0
