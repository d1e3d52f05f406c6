"""VGG features and weight files, the perceptual loss, and the weight converter script.

Weights are random, written in torchvision's format and read by the real loader; the
features are checked against a float64 numpy VGG written from torchvision's semantics.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError, DataError
from sct_jax.losses.perceptual import perceptual_l1
from sct_jax.models.vgg import (IMAGENET_MEAN, IMAGENET_STD, VGGFeatures, load_vgg_params,
                                save_vgg_npz, vgg_features)

# torchvision.models.vgg cfgs "D" (vgg16) and "E" (vgg19): channels, "M" = max pool.
TORCHVISION_CFGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512,
              "M", 512, 512, 512, 512, "M"],
}


def random_torchvision_state(arch, seed=0, with_classifier=False):
    """Random ``features.*`` arrays with torchvision's keys and shapes (He-scaled so
    activations keep their size through the layers)."""
    rng = np.random.default_rng(seed)
    state, index, c_in = {}, 0, 3
    for v in TORCHVISION_CFGS[arch]:
        if v == "M":
            index += 1
            continue
        std = np.sqrt(2.0 / (9 * c_in))
        state[f"features.{index}.weight"] = (
            np.float32(std) * rng.standard_normal((v, c_in, 3, 3), dtype=np.float32))
        state[f"features.{index}.bias"] = 0.1 * rng.standard_normal(v).astype(np.float32)
        index, c_in = index + 2, v  # conv, ReLU
    if with_classifier:
        state["classifier.0.weight"] = rng.standard_normal((4, 5), np.float32)
    return state


def random_vgg_npz(path, arch, seed=0):
    """Writes random VGG weights in torchvision's format (as the converter does)."""
    np.savez(path, **random_torchvision_state(arch, seed, with_classifier=True))
    return path


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    return random_vgg_npz(tmp_path_factory.mktemp("vgg") / "vgg16.npz", "vgg16")


@pytest.fixture(scope="module")
def vgg16_params(vgg16_file):
    return load_vgg_params(vgg16_file, "vgg16")


# ------------------------------------------- float64 numpy VGG, torchvision semantics

def _np_conv3(x, w, b):
    """conv2d(x, w, b, padding=1): x (B, I, H, W), w (O, I, 3, 3)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2:]
    out = sum(np.einsum("bihw,oi->bohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
              for i in range(3) for j in range(3))
    return out + b[None, :, None, None]


def _np_maxpool2(x):
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2  # MaxPool2d(2) floors
    x = x[:, :, :h, :w]
    return x.reshape(*x.shape[:2], h // 2, 2, w // 2, 2).max(axis=(3, 5))


def numpy_vgg(state, images_nhwc, arch, n_modules):
    """torchvision ``features[:n_modules]`` on ImageNet-normalised replicated images.

    Returns every module's output in NHWC, by torchvision index.
    """
    x = (np.float64(images_nhwc) + 1) / 2
    x = np.repeat(x, 3, axis=-1)
    x = ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(0, 3, 1, 2)
    outputs, index = {}, 0
    for v in TORCHVISION_CFGS[arch]:
        if index >= n_modules:
            break
        if v == "M":
            x = _np_maxpool2(x)
            outputs[index] = x
            index += 1
            continue
        x = _np_conv3(x, np.float64(state[f"features.{index}.weight"]),
                      np.float64(state[f"features.{index}.bias"]))
        outputs[index] = x
        x = np.maximum(x, 0)
        outputs[index + 1] = x
        index += 2
    return {k: v.transpose(0, 2, 3, 1) for k, v in outputs.items()}


def _images(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


def test_features_match_numpy_torchvision(vgg16_file, vgg16_params):
    images = _images((2, 12, 10, 1), seed=1)
    features = jax.jit(lambda p, x: vgg_features(
        p, x, "vgg16", layers=("conv1_2", "pool1", "relu2_2")))(vgg16_params, images)
    state = dict(np.load(vgg16_file))
    expected = numpy_vgg(state, np.asarray(images), "vgg16", n_modules=9)
    # torchvision indices: conv1_2 = 2, pool1 = 4, relu2_2 = 8.
    for name, index in (("conv1_2", 2), ("pool1", 4), ("relu2_2", 8)):
        assert features[name].shape == expected[index].shape, name
        np.testing.assert_allclose(np.asarray(features[name]), expected[index],
                                   rtol=1e-4, atol=1e-4, err_msg=name)


def test_perceptual_l1_is_mean_over_whole_batch(vgg16_file, vgg16_params):
    fake, real = _images((3, 8, 8, 1), seed=2), _images((3, 8, 8, 1), seed=3)
    loss_fn = jax.jit(perceptual_l1)
    loss = float(loss_fn(vgg16_params, fake, real))
    state = dict(np.load(vgg16_file))
    f_fake = numpy_vgg(state, np.asarray(fake), "vgg16", 9)[8]
    f_real = numpy_vgg(state, np.asarray(real), "vgg16", 9)[8]
    np.testing.assert_allclose(loss, np.abs(f_fake - f_real).mean(), rtol=1e-4)
    # Every sample counts (the reference used sample 0 only).
    assert abs(loss - np.abs(f_fake[0] - f_real[0]).mean()) > 1e-3 * loss
    assert float(loss_fn(vgg16_params, real, real)) == 0.0


def test_feature_shapes_and_only_needed_layers_built():
    model = VGGFeatures(arch="vgg19", layers=("relu3_2", "relu4_2"))
    x = jax.ShapeDtypeStruct((2, 32, 24, 1), jnp.float32)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                    x)
    assert out["relu3_2"].shape == (2, 8, 6, 256)
    assert out["relu4_2"].shape == (2, 4, 3, 512)
    assert sorted(variables["params"]) == sorted(
        ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
         "conv3_4", "conv4_1", "conv4_2"])
    assert variables["params"]["conv3_4"]["kernel"].shape == (3, 3, 256, 256)
    with pytest.raises(ConfigError, match="relu2_3"):
        jax.eval_shape(lambda x: VGGFeatures(layers=("relu2_3",)).init(
            jax.random.key(0), x), x)


def test_load_and_save_round_trip(vgg16_file, vgg16_params, tmp_path):
    state = dict(np.load(vgg16_file))
    # (O, I, 3, 3) -> (3, 3, I, O); features.28 is vgg16's conv5_3.
    np.testing.assert_array_equal(np.asarray(vgg16_params["conv1_1"]["kernel"]),
                                  state["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(vgg16_params["conv5_3"]["bias"]),
                                  state["features.28.bias"])
    assert len(vgg16_params) == 13
    out = save_vgg_npz(vgg16_params, tmp_path / "copy.npz")
    saved = dict(np.load(out))
    assert sorted(saved) == sorted(k for k in state if k.startswith("features."))
    for key, value in saved.items():
        np.testing.assert_array_equal(value, state[key])


def test_load_errors_name_the_file_and_key(tmp_path, vgg16_file):
    missing = tmp_path / "nowhere" / "vgg16.npz"
    with pytest.raises(DataError, match="convert_vgg_weights.py") as err:
        load_vgg_params(missing, "vgg16")
    assert str(missing) in str(err.value) and "vgg16-397923af.pth" in str(err.value)

    state = dict(np.load(vgg16_file))
    state["features.7.weight"] = state["features.7.weight"][:, :64]
    np.savez(tmp_path / "bad_shape.npz", **state)
    with pytest.raises(DataError, match=r"bad_shape.npz.*'features.7.weight'.*\(128, 64"):
        load_vgg_params(tmp_path / "bad_shape.npz", "vgg16")

    state = dict(np.load(vgg16_file))
    del state["features.12.bias"]
    np.savez(tmp_path / "missing_key.npz", **state)
    with pytest.raises(DataError, match=r"missing_key.npz.*'features.12.bias'"):
        load_vgg_params(tmp_path / "missing_key.npz", "vgg16")

    # A VGG-16 file read as VGG-19: its conv indices differ (features.17 is a pool in vgg19).
    with pytest.raises(DataError, match="vgg16.npz.*is not part of vgg19"):
        load_vgg_params(vgg16_file, "vgg19")

    (tmp_path / "garbage.npz").write_text("not a zip")
    with pytest.raises(DataError, match="garbage.npz.*cannot read"):
        load_vgg_params(tmp_path / "garbage.npz", "vgg16")


# ----------------------------------------------------------------- the converter script

def _load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "convert_vgg_weights.py"
    spec = importlib.util.spec_from_file_location("convert_vgg_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_script_keeps_features_and_loads(tmp_path):
    script = _load_script()
    state = random_torchvision_state("vgg19", seed=4, with_classifier=True)
    state["features.0.weight"] = state["features.0.weight"].astype(np.float64)
    arrays = script.convert_state_dict(state, "vgg19", source="vgg19-dcbb9e9d.pth")
    assert "classifier.0.weight" not in arrays
    assert len(arrays) == 2 * 16 and arrays["features.0.weight"].dtype == np.float32
    np.savez(tmp_path / "vgg19.npz", **arrays)
    params = load_vgg_params(tmp_path / "vgg19.npz", "vgg19")
    np.testing.assert_allclose(np.asarray(params["conv5_4"]["kernel"]),
                               state["features.34.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(DataError, match="vgg19-dcbb9e9d.pth.*features.2.weight"):
        bad = dict(state)
        bad["features.2.weight"] = bad["features.2.weight"][:1]
        script.convert_state_dict(bad, "vgg19", source="vgg19-dcbb9e9d.pth")


def test_convert_script_without_torch_says_so(tmp_path, monkeypatch, capsys):
    script = _load_script()
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert script.main(["--pth", str(tmp_path / "vgg16.pth"), "--arch", "vgg16",
                        "--out", str(tmp_path / "vgg16.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs PyTorch" in err and err.count("\n") == 1
    assert not (tmp_path / "vgg16.npz").exists()
