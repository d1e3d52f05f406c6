"""How a convolution is lowered: the one place that talks to ``lax`` convolutions.

Every model convolution goes through :func:`conv` and :func:`conv_transpose`, so the
lowering can be chosen per backend without touching a model. ``impl="xla"`` is XLA's
native convolution (cuDNN on GPU, the TPU convolution unit). ``impl="cpu_fast"``
rewrites a convolution into the shapes XLA's CPU backend runs fast, padded stride-1 2D
convolutions and matmuls, from differentiable ``jax`` ops plus custom JVPs for the
gradients XLA's CPU backend runs slowly:

- 2D stride 1: XLA's convolution forward and input gradient, the kernel gradient as
  im2col matmuls (:func:`_conv2d_stride1`, :func:`_conv2d_by_kernel`: patches of ``x``,
  or of the cotangent when it has few channels), and never an unpadded convolution
  (XLA runs those 2-3x slower);
- 2D stride 2: XLA's forward (faster than space-to-depth); input and kernel gradients
  computed on the space-to-depth form, i.e. as stride-1 ones (:func:`_conv2d_stride2`);
- 3D stride 2 -> space-to-depth of the (padded) input and a stride-1 convolution with
  the kernel regrouped the same way (``ceil(k/2)`` taps, ``8`` times the input
  channels);
- stride-2 transposed convolution -> ``2^d`` output phases, each a stride-1 convolution
  with the kernel taps of its parity, interleaved (depth-to-space);
- 3D stride 1 -> 2D convolutions over depth slices folded into the batch axis: one 2D
  convolution of every depth slice with all ``k_d`` depth taps stacked on the output
  channels, then a shifted sum over depth (see :func:`_conv3d_via_2d`);
- 2D layers with few positions and many channels (a U-Net's innermost levels) -> one
  im2col matmul with the kernel as stored (:func:`_conv2d_im2col`): there the kernel
  rearrangements of the rewrites above cost more than the convolution.

``impl="phases"`` is XLA's convolution, except that a stride-2 transposed
convolution is computed as its ``2^d`` output phases, each an XLA stride-1
convolution (the ``cpu_fast`` phase rewrite without the CPU-specific parts): no
``lhs_dilation`` anywhere, forward or backward.

``impl="auto"`` looks the lowering up per backend and operation in
:data:`AUTO_BY_BACKEND`, the one table of these choices. Strides other than 1 and 2,
mixed 2D strides and 1D convolutions always use XLA. ``sct-bench conv`` (``python -m
sct_jax.bench.conv``) compares the lowerings on whatever backend it runs on;
``BENCHMARKS.md`` has the numbers.

The rewrites and their custom gradients are in
:mod:`sct_jax.models.conv_lowering_cpu`; this module chooses among them.

Layouts: inputs ``(B, *spatial, C_in)`` (channels last), kernels ``(*k, C_in, C_out)``.
Padding is explicit: one ``(low, high)`` pair per spatial axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax import lax

from sct_jax.models.conv_lowering_cpu import (Padding, _conv2d_im2col, _conv2d_stride2,
                                              _conv_stride1_fast, _conv_stride1_xla,
                                              _conv_transpose_fast, _crop_negative,
                                              _dimension_numbers, _stride2_input,
                                              _stride2_kernel, _xla_conv)

IMPLS = ("auto", "xla", "phases", "cpu_fast")
OPS = ("conv", "conv_transpose")

# What ``impl="auto"`` is, per backend (``jax.default_backend()``) and operation. The one
# place these choices live: change a row when a measurement on that backend says so.
AUTO_BY_BACKEND = {
    # Measured (BENCHMARKS.md: whole train steps and single convolutions, 2-core CPU):
    # the rewrites are 1.3-30x faster than XLA's CPU convolutions.
    "cpu": {"conv": "cpu_fast", "conv_transpose": "cpu_fast"},
    # Not measured yet. JAX on GPU runs the gradients of lhs-dilated (transposed)
    # convolutions very slowly (jax-ml/jax#31662); the phases have no lhs dilation.
    "gpu": {"conv": "xla", "conv_transpose": "phases"},
    # Not measured yet: XLA's own convolutions on the TPU's convolution unit.
    "tpu": {"conv": "xla", "conv_transpose": "xla"},
}
# Any other backend (and platform names that jax reports for a GPU).
_AUTO_DEFAULT = {"conv": "xla", "conv_transpose": "xla"}
_BACKEND_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def resolve_impl(impl: str, op: str = "conv", backend: str | None = None) -> str:
    """Maps ``"auto"`` to the lowering :data:`AUTO_BY_BACKEND` gives ``op`` on ``backend``.

    Args:
      impl: one of :data:`IMPLS`.
      op: ``"conv"`` or ``"conv_transpose"``.
      backend: a backend name (``"cpu"``, ``"gpu"``, ``"tpu"``, ...); default
        ``jax.default_backend()``.

    Returns:
      ``"xla"``, ``"phases"`` or ``"cpu_fast"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; expected one of {IMPLS}")
    if op not in OPS:
        raise ValueError(f"unknown convolution op {op!r}; expected one of {OPS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    backend = _BACKEND_ALIASES.get(backend, backend)
    return AUTO_BY_BACKEND.get(backend, _AUTO_DEFAULT)[op]


# im2col (:func:`_conv2d_im2col`) is used while its patch matrix has at most this many
# rows (``B * output positions``) per output channel (columns of the kernel matrix):
# there the kernel's rearrangements dominate the other lowerings. A transposed
# convolution's patches are 4x larger (zeros), hence its lower bound. Measured on
# unet_256 at batch 1 and 6 (BENCHMARKS.md).
_IM2COL_MAX_ROWS_PER_OUTPUT_CHANNEL = 1.0
_IM2COL_TRANSPOSED_MAX_ROWS_PER_OUTPUT_CHANNEL = 0.25
# The stride-2 2D convolution's custom gradients (:func:`_conv2d_stride2`); a switch
# so that sct_jax/bench/conv.py can compare with XLA's own gradients.
_STRIDE2_CUSTOM_GRADIENTS = True


def _use_im2col(rows: int, c_out: int, transposed: bool = False) -> bool:
    limit = (_IM2COL_TRANSPOSED_MAX_ROWS_PER_OUTPUT_CHANNEL if transposed
             else _IM2COL_MAX_ROWS_PER_OUTPUT_CHANNEL)
    return rows <= limit * c_out


def _conv_fast(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               padding: Padding) -> jax.Array:
    """``cpu_fast`` cross-correlation: space-to-depth for stride-2 axes, then stride 1."""
    nd = x.ndim - 2
    if nd == 1 or any(s not in (1, 2) for s in strides) or (
            nd == 2 and tuple(strides) in ((1, 2), (2, 1))):
        return _xla_conv(x, kernel, strides, padding)
    if nd == 2:
        out_positions = x.shape[0] * math.prod(
            (n + lo + hi - k) // st + 1
            for n, (lo, hi), k, st in zip(x.shape[1:3], padding, kernel.shape, strides))
        if _use_im2col(out_positions, kernel.shape[-1]):
            return _conv2d_im2col(x, kernel, strides, padding)
    if nd == 2 and tuple(strides) == (2, 2) and _STRIDE2_CUSTOM_GRADIENTS:
        x, padding = _crop_negative(x, padding)
        return _conv2d_stride2(x, kernel, tuple(padding))
    if 2 not in strides:
        return _conv_stride1_fast(x, kernel, padding)
    x_s2d, remaining = _stride2_input(x, kernel.shape, strides, padding)
    return _conv_stride1_fast(x_s2d, _stride2_kernel(kernel, strides), remaining)


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
    padding = [tuple(p) for p in padding]
    if impl == "cpu_fast":
        return _conv_fast(x, kernel, tuple(strides), padding)
    return _xla_conv(x, kernel, strides, padding)


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[int], output_padding: Sequence[int] | None = None,
                   impl: str = "auto") -> jax.Array:
    """Transposed convolution with PyTorch's ``ConvTransposeNd`` output size.

    Computed as a stride-1 correlation of the zero-interleaved input (``lhs_dilation``)
    with ``kernel`` (not flipped: weights are learned, so the flip is immaterial; a
    converted PyTorch weight must be flipped spatially and have in/out swapped).
    ``impl="cpu_fast"`` and ``impl="phases"`` compute the same numbers without the
    zeros.

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
    impl = resolve_impl(impl, "conv_transpose")
    nd = x.ndim - 2
    ks = kernel.shape[:nd]
    output_padding = tuple(output_padding or (0,) * nd)
    pads = [(k - 1 - p, k - 1 - p + op) for k, p, op in zip(ks, padding, output_padding)]
    if impl == "cpu_fast" and nd == 2 and _use_im2col(
            x.shape[0] * math.prod(x.shape[1:3]) * math.prod(strides), kernel.shape[-1],
            transposed=True):
        return _conv2d_im2col(x, kernel, (1, 1), pads, strides)
    if impl == "cpu_fast" and nd > 1 and all(s in (1, 2) for s in strides):
        return _conv_transpose_fast(x, kernel, tuple(strides), tuple(padding),
                                    output_padding)
    if impl == "phases" and nd > 1 and all(s in (1, 2) for s in strides) and 2 in strides:
        return _conv_transpose_fast(x, kernel, tuple(strides), tuple(padding),
                                    output_padding, stride1_conv=_conv_stride1_xla)
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1,) * nd, padding=pads, lhs_dilation=tuple(strides),
        dimension_numbers=_dimension_numbers(nd))
