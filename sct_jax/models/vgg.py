"""VGG-16 / VGG-19 feature extractors (torchvision layouts) and their weight files.

The perceptual (pGAN), contextual (Mechrez et al.) and LPIPS losses compare images in
the feature space of an ImageNet-trained VGG. Layout of torchvision's ``vgg16`` /
``vgg19`` ``features``: 3 x 3 convs (padding 1), each followed by a ReLU, and a 2 x 2
max pool after every stage::

  vgg16: 2, 2, 3, 3, 3 convs per stage (64, 128, 256, 512, 512 channels)
  vgg19: 2, 2, 4, 4, 4 convs per stage

Feature names: ``conv{s}_{i}`` is the output of the i-th conv of stage s *before* its
ReLU, ``relu{s}_{i}`` the same after it, ``pool{s}`` the max pool closing stage s.
Mechrez's contextual-loss code names its layers ``conv3_2`` / ``conv4_2`` but its
``build_net('conv', ...)`` applies the ReLU inside, so its ``conv3_2`` is our
``relu3_2``.

Input: a CT ``(B, H, W, 1)`` in ``[-1, 1]`` (or 3 channels). ``input_norm="imagenet"``
maps it to ``[0, 1]``, replicates it to 3 channels and normalises with the ImageNet
mean / std the weights were trained with. ``"none"`` only replicates: what pGAN's
reference does (it feeds its ``[-1, 1]`` images to the VGG unnormalised).

Weights: ImageNet weights cannot be downloaded at run time. ``scripts/
convert_vgg_weights.py`` turns torchvision's ``vgg16-397923af.pth`` /
``vgg19-dcbb9e9d.pth`` into an ``.npz`` with torchvision's key names
(``features.0.weight`` ``(O, I, 3, 3)``, ``features.0.bias`` ``(O,)``, ...), which
:func:`load_vgg_params` reads. The parameters are frozen: losses take them as an
argument, they are never part of a trained state's optimizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sct_jax.data.io import atomic_path
from sct_jax.errors import ConfigError, DataError
from sct_jax.models.layers import Conv

# Convs per stage and channels per stage, torchvision's configurations "D" and "E".
VGG_STAGES: dict[str, tuple[int, ...]] = {
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
VGG_CHANNELS = (64, 128, 256, 512, 512)

# The torchvision files the converter starts from (torchvision.models weights URLs).
TORCHVISION_FILES = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("imagenet", "none")


def check_arch(arch: str) -> str:
    """Returns ``arch`` or raises :class:`ConfigError`."""
    if arch not in VGG_STAGES:
        raise ConfigError(f"unknown VGG arch {arch!r}; expected one of {tuple(VGG_STAGES)}")
    return arch


def vgg_conv_layout(arch: str) -> list[tuple[str, int, int, int]]:
    """Every conv of ``arch`` in order: ``(name, torchvision index, C_in, C_out)``.

    torchvision's ``features`` is a flat ``nn.Sequential`` in which each conv is
    followed by a ReLU (2 indices) and each stage by a max pool (1 index), so
    ``vgg16``'s convs sit at 0, 2, 5, 7, 10, 12, 14, 17, ... and ``vgg19``'s at
    0, 2, 5, 7, 10, 12, 14, 16, 19, ...
    """
    layout, index, c_in = [], 0, 3
    for stage, (n_convs, c_out) in enumerate(zip(VGG_STAGES[check_arch(arch)],
                                                 VGG_CHANNELS), start=1):
        for i in range(1, n_convs + 1):
            layout.append((f"conv{stage}_{i}", index, c_in, c_out))
            index += 2
            c_in = c_out
        index += 1
    return layout


def vgg_layer_names(arch: str) -> list[str]:
    """All feature names of ``arch`` in forward order (conv, relu, ..., pool per stage)."""
    names = []
    for stage, n_convs in enumerate(VGG_STAGES[check_arch(arch)], start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{stage}_{i}", f"relu{stage}_{i}"]
        names.append(f"pool{stage}")
    return names


def preprocess(images: jax.Array, input_norm: str = "imagenet") -> jax.Array:
    """Maps images in ``[-1, 1]`` to the VGG's 3-channel input.

    Args:
      images: ``(B, H, W, 1)`` or ``(B, H, W, 3)`` in ``[-1, 1]``.
      input_norm: ``"imagenet"``: to ``[0, 1]`` then ``(x - mean) / std`` per channel
        with the ImageNet statistics; ``"none"``: unchanged (pGAN's reference).

    Returns:
      ``(B, H, W, 3)``.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"VGG expects (B, H, W, 1 or 3) images, got shape {images.shape}")
    if input_norm not in INPUT_NORMS:
        raise ConfigError(f"unknown VGG input_norm {input_norm!r}; expected one of "
                          f"{INPUT_NORMS}")
    x = jnp.broadcast_to(images, (*images.shape[:-1], 3))
    if input_norm == "imagenet":
        mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
        std = jnp.asarray(IMAGENET_STD, x.dtype)
        x = ((x + 1) / 2 - mean) / std
    return x


class VGGFeatures(nn.Module):
    """VGG ``features`` up to the deepest requested layer.

    Attributes:
      arch: ``"vgg16"`` or ``"vgg19"``.
      layers: feature names to return, see :func:`vgg_layer_names`.
      input_norm: see :func:`preprocess`.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters); the features
        are returned in float32 whatever it is (the losses on them run in float32).
    """

    arch: str = "vgg16"
    layers: Sequence[str] = ("relu2_2",)
    input_norm: str = "imagenet"
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Extracts features.

        Args:
          images: ``(B, H, W, 1 or 3)`` in ``[-1, 1]``.

        Returns:
          ``{name: (B, H / 2**p, W / 2**p, C)}`` for every requested layer, where ``p``
          is the number of pools before it (floor division, as ``MaxPool2d``).
        """
        names = vgg_layer_names(self.arch)
        unknown = [n for n in self.layers if n not in names]
        if unknown or not self.layers:
            raise ConfigError(f"unknown {self.arch} layers {unknown or list(self.layers)}; "
                              f"expected names among {names}")
        deepest = max(names.index(n) for n in self.layers)
        wanted = set(self.layers)
        out: dict[str, jax.Array] = {}

        def keep(name: str, value: jax.Array) -> None:
            if name in wanted:
                out[name] = value.astype(jnp.float32)

        h = preprocess(images, self.input_norm)
        for name, _, _, c_out in vgg_conv_layout(self.arch):
            if names.index(name) > deepest:
                break
            h = Conv(c_out, kernel_size=3, padding=1, conv_impl=self.conv_impl,
                     dtype=self.dtype, name=name)(h)
            keep(name, h)
            h = nn.relu(h)
            keep(name.replace("conv", "relu"), h)
            stage, i = (int(v) for v in name[4:].split("_"))
            if i == VGG_STAGES[self.arch][stage - 1]:
                if names.index(f"pool{stage}") > deepest:
                    break
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
                keep(f"pool{stage}", h)
        return out


def vgg_features(params: Mapping[str, Any], images: jax.Array, arch: str = "vgg16",
                 layers: Sequence[str] = ("relu2_2",), input_norm: str = "imagenet",
                 conv_impl: str = "auto", dtype: Any = None) -> dict[str, jax.Array]:
    """Applies :class:`VGGFeatures` with frozen ``params`` (from :func:`load_vgg_params`).

    Args:
      params: ``{"conv1_1": {"kernel": (3, 3, I, O), "bias": (O,)}, ...}``; layers past
        the deepest requested one are ignored.
      images: ``(B, H, W, 1 or 3)`` in ``[-1, 1]``.
      arch, layers, input_norm, conv_impl, dtype: see :class:`VGGFeatures`.

    Returns:
      ``{name: (B, h, w, C)}``.
    """
    model = VGGFeatures(arch=arch, layers=tuple(layers), input_norm=input_norm,
                        conv_impl=conv_impl, dtype=dtype)
    return model.apply({"params": params}, images)


# ------------------------------------------------------------------------ weight files

def _how_to_make(path: str | os.PathLike, arch: str) -> str:
    return (f"python scripts/convert_vgg_weights.py --arch {arch} "
            f"--pth {TORCHVISION_FILES[arch]} --out {path}")


def params_from_state_dict(state_dict: Mapping[str, Any], arch: str,
                           source: str = "<state dict>") -> dict[str, dict[str, np.ndarray]]:
    """Converts torchvision ``features.*`` arrays into this module's parameters.

    Args:
      state_dict: ``{"features.0.weight": (O, I, 3, 3), "features.0.bias": (O,), ...}``
        as numpy arrays; other keys (``classifier.*``) are ignored.
      arch: ``"vgg16"`` or ``"vgg19"``.
      source: the file the arrays came from, for error messages.

    Returns:
      ``{"conv1_1": {"kernel": (3, 3, I, O) float32, "bias": (O,) float32}, ...}``.

    Raises:
      DataError: a missing key, a wrong shape, non-finite values, or conv keys that
        ``arch`` does not have (a file of the other architecture).
    """
    layout = vgg_conv_layout(arch)
    expected_keys = {f"features.{idx}.{kind}" for _, idx, _, _ in layout
                     for kind in ("weight", "bias")}
    extra = sorted(k for k in state_dict
                   if k.startswith("features.") and k not in expected_keys)
    if extra:
        raise DataError(f"{source}: key {extra[0]!r} is not part of {arch}'s features "
                        f"(a file for another architecture?)")
    params = {}
    for name, idx, c_in, c_out in layout:
        arrays = {}
        for kind, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))):
            key = f"features.{idx}.{kind}"
            if key not in state_dict:
                raise DataError(f"{source}: missing key {key!r} ({arch} {name} {kind})")
            value = np.asarray(state_dict[key])
            if value.shape != shape:
                raise DataError(f"{source}: key {key!r} has shape {value.shape}, "
                                f"expected {shape} for {arch} {name}")
            if not np.all(np.isfinite(value)):
                raise DataError(f"{source}: key {key!r} has non-finite values")
            arrays[kind] = value.astype(np.float32)
        # torch (O, I, kh, kw) cross-correlation == ours (kh, kw, I, O): no flip.
        params[name] = {"kernel": arrays["weight"].transpose(2, 3, 1, 0),
                        "bias": arrays["bias"]}
    return params


def state_dict_from_params(params: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict`: torchvision keys and layouts."""
    state = {}
    for name, idx, _, _ in vgg_conv_layout(arch):
        if name not in params:
            raise ValueError(f"params have no {name!r} ({arch} needs every conv)")
        state[f"features.{idx}.weight"] = np.asarray(
            params[name]["kernel"], np.float32).transpose(3, 2, 0, 1)
        state[f"features.{idx}.bias"] = np.asarray(params[name]["bias"], np.float32)
    return state


def check_weights_file(path: str | os.PathLike, arch: str) -> None:
    """Raises :class:`DataError` (saying how to make it) when the weights file is missing:
    the start-up check before the file is read."""
    check_arch(arch)
    if not Path(path).is_file():
        raise DataError(f"{path}: VGG weights file not found ({arch} ImageNet weights are "
                        f"needed; make it with: {_how_to_make(path, arch)})")


def placeholder_params(arch: str, deepest: str) -> dict[str, dict[str, jax.Array]]:
    """Zeros shaped like the parameters of the convs of ``arch`` up to layer ``deepest``
    (what :func:`load_vgg_params` fills in, outside any trace)."""
    names = vgg_layer_names(arch)
    last = names.index(deepest)
    return {name: {"kernel": jnp.zeros((3, 3, c_in, c_out), jnp.float32),
                   "bias": jnp.zeros((c_out,), jnp.float32)}
            for name, _, c_in, c_out in vgg_conv_layout(arch) if names.index(name) <= last}


def load_vgg_params(path: str | os.PathLike, arch: str) -> dict[str, dict[str, jax.Array]]:
    """Reads VGG weights from an ``.npz`` with torchvision's key names.

    Never falls back to random weights: a perceptual loss on a random VGG trains
    silently to something else.

    Args:
      path: the ``.npz`` written by ``scripts/convert_vgg_weights.py``.
      arch: ``"vgg16"`` or ``"vgg19"``.

    Returns:
      The parameter pytree for :class:`VGGFeatures` / :func:`vgg_features` (pass it as
      ``{"params": ...}`` to ``VGGFeatures.apply``).

    Raises:
      DataError: the file is missing (the message says how to make it), unreadable, or
        has wrong keys / shapes.
    """
    path = Path(path)
    check_weights_file(path, arch)
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {key: data[key] for key in data.files}
    except Exception as err:  # zipfile / ValueError / OSError: all mean unreadable.
        raise DataError(f"{path}: cannot read VGG weights as .npz ({err})") from err
    params = params_from_state_dict(state, arch, source=str(path))
    return jax.tree.map(jnp.asarray, params)


def save_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Writes ``arrays`` to an uncompressed ``.npz`` atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def save_vgg_npz(params: Mapping[str, Any], path: str | os.PathLike,
                 arch: str | None = None) -> Path:
    """Writes :class:`VGGFeatures` parameters as an ``.npz`` in torchvision's format.

    Args:
      params: ``{"conv1_1": {"kernel", "bias"}, ...}`` with every conv of ``arch``.
      path: the output file.
      arch: ``"vgg16"`` / ``"vgg19"``; ``None`` infers it from the number of convs.
    """
    if arch is None:
        n_convs = sum(1 for name in params if name.startswith("conv"))
        by_count = {sum(stages): a for a, stages in VGG_STAGES.items()}
        if n_convs not in by_count:
            raise ValueError(f"cannot infer the VGG arch from {n_convs} convs")
        arch = by_count[n_convs]
    return save_npz_atomic(path, state_dict_from_params(params, arch))
