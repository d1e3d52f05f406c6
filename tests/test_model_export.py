"""The exported model's serialized function (sct_jax.export.model): any batch size.

A tiny pix2pix trained for 2 steps on synthetic batches is exported; the deserialized
function must give the method's own ``predict`` on the same windows whatever the number
of windows per call.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import export

from sct_jax import methods, runs
from sct_jax.errors import DataError
from sct_jax.export import model as model_lib
from sct_jax.training import loop

sys.path.insert(0, str(Path(__file__).parent))
from test_training import synthetic_dataset, tiny_config  # noqa: E402


def _calibrated_tiny_config():
    """The tiny pix2pix with the CBCT models' learned input calibration and residual
    output: the export must trace parameters that are host arrays there."""
    config = tiny_config(steps=2)
    config.model.gen.calibration_bins = 8
    config.model.gen.residual = True
    return config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(model_dir, config, state)`` of a 2-step tiny pix2pix, exported."""
    workdir = tmp_path_factory.mktemp("run")
    result = loop.train(_calibrated_tiny_config(), workdir, make_dataset=synthetic_dataset)
    model_dir = model_lib.export_model(workdir, tmp_path_factory.mktemp("m") / "model")
    return model_dir, _calibrated_tiny_config(), result.state


def _windows(n: int, config) -> np.ndarray:
    window, channels = model_lib.inference_window(config)
    rng = np.random.default_rng(n)
    return rng.uniform(-1, 1, (n, *window, channels)).astype(np.float32)


def test_the_serialized_function_takes_any_batch(exported):
    model_dir, config, state = exported
    function = export.deserialize(bytearray((model_dir / model_lib.SERIALIZED).read_bytes()))
    method = methods.get_method(config.method)
    for n in (1, 3):
        mr = _windows(n, config)
        expected = np.asarray(method.predict(config, jax.device_get(state), mr))
        got = np.asarray(function.call(mr))
        assert got.shape == expected.shape == (n, *mr.shape[1:-1], 1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_model_json_describes_the_batch_and_the_lowering(exported):
    model_dir, config, _ = exported
    info = json.loads((model_dir / model_lib.MODEL_JSON).read_text())["serialized_function"]
    assert info["batch"] == "any" and "any batch size B" in info["input"]
    assert info["input"].startswith("(B, 32, 32, 1)")
    assert info["windows_per_call"] == config.eval.batch_size
    if jax.default_backend() == "cpu":  # "auto" is cpu_fast: its im2col choice needs a batch
        assert info["conv_impl"] == "xla" and "conv_impl='auto'" in info["note"]


def test_the_volume_predictor_runs_at_any_batch_size(exported):
    model_dir, config, _ = exported
    mr = np.random.default_rng(0).uniform(-1, 1, (40, 36, 5)).astype(np.float32)
    default = model_lib.serialized_volume_predictor(model_dir)(mr)
    other = model_lib.serialized_volume_predictor(model_dir, batch_size=3)(mr)
    assert default.shape == mr.shape
    np.testing.assert_allclose(other, default, rtol=0, atol=1e-5)


def test_a_fixed_batch_export_is_read_and_its_batch_kept(exported, tmp_path, monkeypatch):
    """An export made at a fixed batch (a method that needs one, or an older export)."""
    model_dir, config, state = exported
    real = model_lib._export_predict

    def concrete_only(export_config, export_state, spec):
        if not isinstance(spec.shape[0], int):
            raise jax.errors.InconclusiveDimensionOperation("needs a concrete batch")
        return real(export_config, export_state, spec)

    monkeypatch.setattr(model_lib, "_export_predict", concrete_only)
    data, info = model_lib.serialize_predict(config, state, runs.read_batch_spec(model_dir))
    assert info["batch"] == config.eval.batch_size and "concrete batch" in info["note"]
    function = export.deserialize(bytearray(data))
    mr = _windows(config.eval.batch_size, config)
    method = methods.get_method(config.method)
    np.testing.assert_allclose(np.asarray(function.call(mr)),
                               np.asarray(method.predict(config, jax.device_get(state), mr)),
                               rtol=0, atol=1e-5)
    fixed_dir = tmp_path / "fixed"
    fixed_dir.mkdir()
    description = json.loads((model_dir / model_lib.MODEL_JSON).read_text())
    description["serialized_function"] = info
    (fixed_dir / model_lib.MODEL_JSON).write_text(json.dumps(description))
    (fixed_dir / model_lib.SERIALIZED).write_bytes(data)
    assert model_lib.serialized_volume_predictor(fixed_dir) is not None
    with pytest.raises(DataError, match=f"exported for batches of {config.eval.batch_size}"):
        model_lib.serialized_volume_predictor(fixed_dir, batch_size=3)
