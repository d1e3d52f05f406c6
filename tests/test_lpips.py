"""LPIPS: the network against a float64 numpy LPIPS, the heads and backbone loaders, and
the volume form (axial slices inside the body).

The backbone is random (ImageNet weights cannot be downloaded here) but in the converter's
torchvision format and read by the real loader; the heads are the bundled v0.1 file and
random ones in its format.
"""

import math

import numpy as np
import pytest

from sct_jax.data.preprocess import ct_to_unit
from sct_jax.errors import DataError
from sct_jax.metrics import lpips
from test_vgg import TORCHVISION_CFGS, _np_conv3, _np_maxpool2, random_vgg_npz

# torchvision features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_INDICES = (3, 8, 15, 22, 29)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    return random_vgg_npz(tmp_path_factory.mktemp("lpips") / "vgg16.npz", "vgg16", seed=3)


@pytest.fixture(scope="module")
def random_heads_file(tmp_path_factory):
    rng = np.random.default_rng(5)
    arrays = {f"lin{i}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
              for i, c in enumerate((64, 128, 256, 512, 512))}
    path = tmp_path_factory.mktemp("lpips") / "heads.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def net(vgg16_file, random_heads_file):
    return lpips.load_lpips(vgg16_file, random_heads_file)


def numpy_lpips(state, heads, x, y):
    """The LPIPS paper's network in float64: x, y (B, H, W, 1) in [-1, 1] -> (B,)."""
    def features(images):
        h = np.repeat(np.asarray(images, np.float64), 3, axis=-1)
        h = ((h - np.array(lpips.SHIFT)) / np.array(lpips.SCALE)).transpose(0, 3, 1, 2)
        out, index = [], 0
        for v in TORCHVISION_CFGS["vgg16"]:
            if v == "M":
                h = _np_maxpool2(h)
                index += 1
                continue
            h = np.maximum(_np_conv3(h, np.asarray(state[f"features.{index}.weight"], np.float64),
                                     np.asarray(state[f"features.{index}.bias"], np.float64)), 0)
            if index + 1 in LPIPS_INDICES:
                out.append(h)
            index += 2
        return out

    total = np.zeros(x.shape[0])
    for fx, fy, w in zip(features(x), features(y), heads):
        nx = fx / (np.sqrt((fx ** 2).sum(axis=1, keepdims=True)) + 1e-10)
        ny = fy / (np.sqrt((fy ** 2).sum(axis=1, keepdims=True)) + 1e-10)
        total += np.einsum("bchw,c->bhw", (nx - ny) ** 2, np.asarray(w, np.float64)).mean(axis=(1, 2))
    return total


def test_matches_float64_numpy_lpips(net, vgg16_file):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 16, 20, 1)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    got = np.asarray(lpips.lpips_images(net.vgg_params, net.heads, x, y))
    expected = numpy_lpips(dict(np.load(vgg16_file)), net.heads, x, y)
    assert np.all(expected > 1e-3)  # a non-trivial distance is compared
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    assert np.allclose(np.asarray(lpips.lpips_images(net.vgg_params, net.heads, x, x)), 0)


def test_bundled_heads_are_the_v01_vgg_heads():
    heads = lpips.load_heads(lpips.default_heads_path())
    assert [h.shape for h in heads] == [(64,), (128,), (256,), (512,), (512,)]
    assert all((h >= 0).all() for h in heads) and all(h.max() > 0 for h in heads)
    assert (lpips.default_heads_path().parent / "LICENSE.txt").is_file()  # BSD-2 kept


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("lin2.model.1.weight"), "no lin2.model.1.weight"),
    (lambda a: a.update({"lin0.model.1.weight": np.ones((1, 32, 1, 1), np.float32)}),
     "shape"),
    (lambda a: a.update({"lin4.model.1.weight": -np.ones((1, 512, 1, 1), np.float32)}),
     "negative"),
])
def test_heads_of_another_layout_are_refused(tmp_path, change, message):
    with np.load(lpips.default_heads_path()) as data:
        arrays = dict(data)
    change(arrays)
    np.savez(tmp_path / "heads.npz", **arrays)
    with pytest.raises(DataError, match=message):
        lpips.load_heads(tmp_path / "heads.npz")


def test_missing_backbone_is_refused_with_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="convert_vgg_weights"):
        lpips.load_lpips(tmp_path / "vgg16.npz")


def test_volume_is_the_mean_over_body_slices_with_air_outside(net):
    rng = np.random.default_rng(1)
    shape = (20, 12, 6)  # Y below 16: padded with air
    ct = rng.uniform(-1000, 1500, shape).astype(np.float32)
    sct = ct + rng.normal(0, 200, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[3:17, 2:10, 1:5] = True  # slices 0 and 5 hold no body
    # What lies outside the body must not count: change it in the sCT only.
    sct_outside = np.where(mask, sct, 3000.0).astype(np.float32)

    def unit(v, z):
        s = np.where(mask[:, :, z], ct_to_unit(v[:, :, z]), -1.0)
        return np.pad(s, ((0, 0), (0, 16 - shape[1])), constant_values=-1.0)[None, ..., None]

    per_slice = [float(lpips.lpips_images(net.vgg_params, net.heads, unit(ct, z),
                                          unit(sct, z))[0]) for z in range(1, 5)]
    got = lpips.lpips_volume(net, ct, sct_outside, mask, slices_per_call=3)
    assert got == pytest.approx(np.mean(per_slice), rel=1e-5)
    assert lpips.lpips_volume(net, ct, ct, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(lpips.lpips_volume(net, ct, sct, np.zeros(shape, bool)))
    with pytest.raises(DataError, match="one 3D grid"):
        lpips.lpips_volume(net, ct, sct[:, :, :5], mask)
