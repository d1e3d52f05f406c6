"""How a convolution is lowered: the one place that talks to ``lax`` convolutions.

Every model convolution goes through :func:`conv` and :func:`conv_transpose`, so the
lowering can be chosen per backend without touching a model. ``impl="xla"`` is XLA's
native convolution (cuDNN on GPU, the TPU convolution unit); faster CPU lowerings are
selected by ``impl`` (``"auto"`` picks per backend).

Layouts: inputs ``(B, *spatial, C_in)`` (channels last), kernels ``(*k, C_in, C_out)``.
Padding is explicit: one ``(low, high)`` pair per spatial axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax

Padding = Sequence[tuple[int, int]]

IMPLS = ("auto", "xla")


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"only 1D, 2D and 3D convolutions are supported, got {nd}D")
    return lax.conv_dimension_numbers(
        (1,) * (nd + 2), (1,) * (nd + 2),
        ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


def resolve_impl(impl: str) -> str:
    """Maps ``"auto"`` to the lowering used on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "xla"
    return impl


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding,
         impl: str = "auto") -> jax.Array:
    """Cross-correlation, as ``torch.nn.ConvNd`` computes it.

    Args:
      x: ``(B, *spatial, C_in)``.
      kernel: ``(*k, C_in, C_out)``.
      strides: one stride per spatial axis.
      padding: one ``(low, high)`` zero-padding pair per spatial axis.
      impl: lowering, see :data:`IMPLS`.

    Returns:
      ``(B, *spatial_out, C_out)`` with ``out = (in + low + high - k) // stride + 1``.
    """
    impl = resolve_impl(impl)
    nd = x.ndim - 2
    return lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=tuple(map(tuple, padding)),
        dimension_numbers=_dimension_numbers(nd))


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[int], output_padding: Sequence[int] | None = None,
                   impl: str = "auto") -> jax.Array:
    """Transposed convolution with PyTorch's ``ConvTransposeNd`` output size.

    Computed as a stride-1 correlation of the zero-interleaved input (``lhs_dilation``)
    with ``kernel`` (not flipped: weights are learned, so the flip is immaterial; a
    converted PyTorch weight must be flipped spatially and have in/out swapped).

    Args:
      x: ``(B, *spatial, C_in)``.
      kernel: ``(*k, C_in, C_out)``.
      strides: one stride per spatial axis.
      padding: PyTorch ``padding`` per spatial axis.
      output_padding: PyTorch ``output_padding`` per spatial axis (default 0).
      impl: lowering, see :data:`IMPLS`.

    Returns:
      ``(B, *spatial_out, C_out)`` with
      ``out = (in - 1) * stride - 2 * padding + k + output_padding``.
    """
    impl = resolve_impl(impl)
    nd = x.ndim - 2
    ks = kernel.shape[:nd]
    output_padding = output_padding or (0,) * nd
    pads = [(k - 1 - p, k - 1 - p + op) for k, p, op in zip(ks, padding, output_padding)]
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1,) * nd, padding=pads, lhs_dilation=tuple(strides),
        dimension_numbers=_dimension_numbers(nd))
