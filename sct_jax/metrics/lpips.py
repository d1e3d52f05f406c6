"""LPIPS (Zhang et al. 2018, v0.1, VGG-16) of an sCT against its CT, on axial slices.

Seed 02 reports LPIPS beside PSNR and SSIM. The network is the paper's: VGG-16 features
after ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` of both images, each unit-normalised
over channels (``f / (||f||_2 + 1e-10)``), the squared difference weighted per channel by
the v0.1 linear heads, averaged over positions and summed over the five layers::

  LPIPS(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2_{h,w,c}

Inputs in ``[-1, 1]`` are replicated to 3 channels and scaled as the reference does:
``(x - shift) / scale`` with ``shift = (-.030, -.088, -.188)``, ``scale = (.458, .448,
.450)``.

Weights: the linear heads ship with the package (``lpips_v0.1/vgg_lin.npz``, BSD-2, see
its README and LICENSE); the VGG-16 ImageNet backbone is the same local ``.npz`` the
perceptual loss uses (``scripts/convert_vgg_weights.py``). Without it there is no number:
a random backbone's LPIPS means nothing, so :func:`load_lpips` refuses and the evaluation
says why the column is empty.

On a CT volume: both volumes go to ``[-1, 1]`` with the models' CT window
(:func:`sct_jax.data.preprocess.ct_to_unit`, [-1024, 3000] HU), voxels outside the body
mask set to air (-1) in both, and the LPIPS of every axial slice (``[:, :, z]``) that holds
body voxels is averaged. Slices smaller than 16 voxels per side are padded with air (the
fifth VGG stage needs four 2x2 pools).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.data.preprocess import ct_to_unit
from sct_jax.errors import DataError
from sct_jax.models import vgg

LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
MIN_SIDE = 16  # four 2x2 max pools before relu5_3
SLICES_PER_CALL = 8  # axial slices per jitted call: one compilation per slice shape


def default_heads_path() -> Path:
    """The bundled v0.1 VGG linear heads (``sct_jax/metrics/lpips_v0.1/vgg_lin.npz``)."""
    return Path(str(resources.files("sct_jax.metrics") / "lpips_v0.1" / "vgg_lin.npz"))


def load_heads(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """Reads the five linear heads (``lin{i}.model.1.weight``, ``(1, C, 1, 1)``).

    Returns:
      One ``(C_l,)`` float32 vector per layer of :data:`LPIPS_LAYERS`.

    Raises:
      DataError: missing or unreadable file, missing key, wrong shape, negative weight
        (v0.1's heads are clamped non-negative; a negative one is another file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LPIPS linear heads not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # zipfile / ValueError / OSError: all mean unreadable.
        raise DataError(f"{path}: cannot read LPIPS heads as .npz ({err})") from err
    heads = []
    for i, channels in enumerate(vgg.VGG_CHANNELS):
        key = f"lin{i}.model.1.weight"
        if key not in arrays:
            raise DataError(f"{path}: no {key} (expected LPIPS v0.1 VGG heads)")
        w = np.asarray(arrays[key], np.float32)
        if w.shape != (1, channels, 1, 1):
            raise DataError(f"{path}: {key} has shape {w.shape}, expected "
                            f"(1, {channels}, 1, 1) for VGG-16 {LPIPS_LAYERS[i]}")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise DataError(f"{path}: {key} has negative or non-finite weights")
        heads.append(w.reshape(channels))
    return tuple(heads)


@dataclasses.dataclass(frozen=True)
class LpipsNet:
    """The frozen LPIPS network: VGG-16 parameters and the five linear heads."""

    vgg_params: Mapping[str, Any]
    heads: tuple[np.ndarray, ...]
    source: str = ""


def load_lpips(vgg16_path: str | os.PathLike,
               heads_path: str | os.PathLike | None = None) -> LpipsNet:
    """Reads the VGG-16 backbone (``scripts/convert_vgg_weights.py``'s ``.npz``) and the
    linear heads (default: the bundled v0.1 heads).

    Raises:
      DataError: a file missing (the message says how to make the backbone), unreadable
        or of the wrong layout.
    """
    heads = load_heads(heads_path or default_heads_path())
    params = vgg.load_vgg_params(vgg16_path, "vgg16")
    return LpipsNet(vgg_params=params, heads=heads, source=str(vgg16_path))


@functools.partial(jax.jit, static_argnames=("conv_impl",))
def lpips_images(vgg_params, heads, x: jax.Array, y: jax.Array,
                 conv_impl: str = "auto") -> jax.Array:
    """LPIPS of image pairs.

    Args:
      vgg_params: VGG-16 parameters up to ``conv5_3``.
      heads: five ``(C_l,)`` non-negative weight vectors.
      x, y: ``(B, H, W, 1)`` in ``[-1, 1]``, ``H, W >= 16``.
      conv_impl: convolution lowering of the VGG.

    Returns:
      ``(B,)`` float32 distances.
    """
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    both = jnp.broadcast_to(both, (*both.shape[:-1], 3))
    both = (both - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
    features = vgg.vgg_features(vgg_params, both, arch="vgg16", layers=LPIPS_LAYERS,
                                input_norm="none", conv_impl=conv_impl)
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for name, w in zip(LPIPS_LAYERS, heads):
        f = features[name]
        f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)
        fx, fy = jnp.split(f, 2, axis=0)
        total = total + jnp.mean(jnp.sum(w * (fx - fy) ** 2, axis=-1), axis=(1, 2))
    return total


def _axial_slices(volume_hu: np.ndarray, mask: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """``(len(zs), X', Y', 1)`` slices in ``[-1, 1]``, air outside the mask, padded with
    air to at least :data:`MIN_SIDE` per side."""
    unit = np.where(mask[:, :, zs], ct_to_unit(volume_hu[:, :, zs]), np.float32(-1.0))
    unit = np.moveaxis(unit, 2, 0)[..., None]
    pad = [(0, 0)] + [(0, max(0, MIN_SIDE - n)) for n in unit.shape[1:3]] + [(0, 0)]
    return np.pad(unit, pad, constant_values=-1.0).astype(np.float32)


def lpips_volume(net: LpipsNet, ct: np.ndarray, sct: np.ndarray, mask: np.ndarray,
                 slices_per_call: int = SLICES_PER_CALL) -> float:
    """Mean LPIPS over the axial slices of ``(X, Y, Z)`` volumes that hold body voxels.

    Args:
      net: from :func:`load_lpips`.
      ct, sct: ``(X, Y, Z)`` HU on one grid.
      mask: ``(X, Y, Z)`` body mask.
      slices_per_call: slices per network call (memory: ``2 x slices x X x Y x 64``
        float32 at the first layer).

    Returns:
      The mean distance (0 for identical volumes; NaN when the mask is empty).

    Raises:
      DataError: shapes differ.
    """
    if ct.shape != sct.shape or ct.shape != mask.shape or ct.ndim != 3:
        raise DataError(f"LPIPS: CT {ct.shape}, sCT {sct.shape} and mask {mask.shape} "
                        "must be one 3D grid")
    mask = np.asarray(mask) > 0
    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    if zs.size == 0:
        return math.nan
    heads = tuple(jnp.asarray(h) for h in net.heads)
    values = []
    for start in range(0, zs.size, slices_per_call):
        chunk = zs[start:start + slices_per_call]
        # Pad the last chunk to the full size (repeating a slice) so every call has one
        # shape: one compilation per volume shape, the repeats dropped below.
        padded = np.resize(chunk, slices_per_call) if chunk.size < slices_per_call else chunk
        d = lpips_images(net.vgg_params, heads, _axial_slices(ct, mask, padded),
                         _axial_slices(sct, mask, padded))
        values.append(np.asarray(d, np.float64)[:chunk.size])
    return float(np.mean(np.concatenate(values)))
