"""How a convolution is lowered: the one place that talks to ``lax`` convolutions.

Every model convolution goes through :func:`conv` and :func:`conv_transpose`, so the
lowering can be chosen per backend without touching a model. ``impl="xla"`` is XLA's
native convolution (cuDNN on GPU, the TPU convolution unit). ``impl="cpu_fast"``
rewrites a convolution into the shapes XLA's CPU backend runs fast, padded stride-1 2D
convolutions, from differentiable ``jax`` ops (gradients are exact and are stride-1 2D
convolutions too) plus one custom JVP for the kernel gradient:

- 2D stride 1: XLA's convolution forward and input gradient, the kernel gradient as
  batched im2col matmuls (:func:`_conv2d_stride1`; XLA runs it ~3x slower than the
  forward), and never an unpadded convolution (XLA runs those 2-3x slower);
- 3D stride 2 -> space-to-depth of the (padded) input and a stride-1 convolution with
  the kernel regrouped the same way (``ceil(k/2)`` taps, ``8`` times the input
  channels). 2D stride 2 stays XLA's (its forward is fast on CPU, measured);
- stride-2 transposed convolution -> ``2^d`` output phases, each a stride-1 convolution
  with the kernel taps of its parity, interleaved (depth-to-space);
- 3D stride 1 -> 2D convolutions over depth slices folded into the batch axis: one 2D
  convolution of every depth slice with all ``k_d`` depth taps stacked on the output
  channels, then a shifted sum over depth (see :func:`_conv3d_via_2d`).

``impl="auto"`` is ``"cpu_fast"`` on the CPU backend and ``"xla"`` elsewhere. Strides
other than 1 and 2, and 1D convolutions, always use XLA. ``benchmarks/conv.py``
measures every lowering.

Layouts: inputs ``(B, *spatial, C_in)`` (channels last), kernels ``(*k, C_in, C_out)``.
Padding is explicit: one ``(low, high)`` pair per spatial axis.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero, linear_call

Padding = Sequence[tuple[int, int]]

IMPLS = ("auto", "xla", "cpu_fast")


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
        return "cpu_fast" if jax.default_backend() == "cpu" else "xla"
    return impl


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
              padding: Padding) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=tuple(map(tuple, padding)),
        dimension_numbers=_dimension_numbers(x.ndim - 2))


def _pad_or_crop(x: jax.Array, padding: Padding) -> jax.Array:
    """Zero-pads (positive) or crops (negative) each spatial axis of ``(B, *sp, C)``."""
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)]
    if all(lo == 0 and hi == 0 for lo, hi, _ in config):
        return x
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _crop_negative(x: jax.Array, padding: Padding) -> tuple[jax.Array, list]:
    """Applies the negative part of ``padding`` as a crop; returns the rest (>= 0)."""
    x = _pad_or_crop(x, [(min(lo, 0), min(hi, 0)) for lo, hi in padding])
    return x, [(max(lo, 0), max(hi, 0)) for lo, hi in padding]


# Kernel-gradient patches are built for at most this many bytes at a time (a loop over
# groups of images above it): im2col multiplies an activation's memory by k_h * k_w.
_PATCH_BYTES_PER_STEP = 256 * 2 ** 20
# Positions per matmul in the kernel gradient: one long contraction runs at ~half the
# speed of a batch of ~2-8k-long ones summed afterwards (measured with jax 0.10.2 on a
# 2-core AVX-512 CPU: 10 vs 22 GFLOP/s; XLA's own kernel gradient: 12).
_POSITIONS_PER_BLOCK = 4096


def _largest_divisor_at_most(n: int, limit: float) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(limit, 1))


def _kernel_grad_2d(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                    padding: Padding) -> jax.Array:
    """Kernel gradient of a stride-1 2D convolution as batched patches^T @ cotangent.

    XLA's CPU backend runs this gradient (a convolution with a huge window and a tiny
    output) at about a third of the forward speed; im2col of ``x`` one group of images
    at a time, multiplied by ``g`` in blocks of positions and summed, about twice as fast.

    Args:
      x: ``(N, H, W, C_in)``.
      g: ``(N, H_out, W_out, C_out)``, the output cotangent.
      kernel_shape: ``(k_h, k_w, C_in, C_out)``.
      padding: two ``(low, high)`` pairs, each ``>= 0``.

    Returns:
      ``(k_h, k_w, C_in, C_out)``.
    """
    kh, kw, c_in, c_out = kernel_shape
    x = _pad_or_crop(x, padding)
    n, h_out, w_out, _ = g.shape
    # Blocks of whole output rows: the row count divides H_out, so reshapes are free.
    rows = _largest_divisor_at_most(h_out, max(1, _POSITIONS_PER_BLOCK // w_out))
    patch_bytes = h_out * w_out * kh * kw * c_in * x.dtype.itemsize
    group = _largest_divisor_at_most(n, _PATCH_BYTES_PER_STEP / patch_bytes)

    def group_grad(xg: jax.Array, gg: jax.Array) -> jax.Array:
        patches = jnp.concatenate([xg[:, i:i + h_out, j:j + w_out]
                                   for i in range(kh) for j in range(kw)], axis=-1)
        patches = patches.reshape(-1, rows * w_out, kh * kw * c_in)
        products = jnp.einsum("bpk,bpo->bko", patches,
                              gg.reshape(-1, rows * w_out, c_out))
        return products.sum(axis=0)

    if group == n:
        grad = group_grad(x, g)
    else:
        def step(total, xs):
            return total + group_grad(*xs), None
        grad, _ = lax.scan(step, jnp.zeros((kh * kw * c_in, c_out), g.dtype),
                           (x.reshape(n // group, group, *x.shape[1:]),
                            g.reshape(n // group, group, *g.shape[1:])))
    return grad.reshape(kh, kw, c_in, c_out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv2d_stride1(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """Stride-1 2D convolution (padding ``>= 0``) whose kernel gradient is fast on CPU.

    A custom JVP (not VJP) so that forward-mode differentiation keeps working: the
    kernel-tangent term is a ``linear_call`` whose transpose is :func:`_kernel_grad_2d`;
    the input term is an ordinary convolution that JAX transposes itself. Limitation of
    ``linear_call``: a kernel gradient cannot itself be differentiated with respect to
    the activations (Hessians in the weights); use ``impl="xla"`` there.
    """
    return _padded_conv2d(x, kernel, padding)


def _padded_conv2d(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """XLA's stride-1 2D convolution, never unpadded.

    XLA's CPU backend (jax 0.10) runs an unpadded ("valid") convolution 2-3x slower than
    a padded one (measured, ``benchmarks/conv.py``), so a valid convolution is computed
    with one zero column each side and the two extra output columns dropped.
    """
    if any(lo or hi for lo, hi in padding) or kernel.shape[1] == 1:
        return _xla_conv(x, kernel, (1, 1), padding)
    y = _xla_conv(x, kernel, (1, 1), (padding[0], (1, 1)))
    return y[:, :, 1:-1]


def _conv2d_stride1_jvp(padding, primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _padded_conv2d(x, kernel, padding)
    y_dot = None
    if type(x_dot) is not SymbolicZero:
        y_dot = _padded_conv2d(x_dot, kernel, padding)
    if type(kernel_dot) is not SymbolicZero:
        by_kernel = linear_call(
            lambda x, k_dot: _padded_conv2d(x, k_dot, padding),
            lambda x, g: _kernel_grad_2d(x, g, kernel.shape, padding), x, kernel_dot)
        y_dot = by_kernel if y_dot is None else y_dot + by_kernel
    if y_dot is None:
        y_dot = jnp.zeros_like(y)
    return y, y_dot


_conv2d_stride1.defjvp(_conv2d_stride1_jvp, symbolic_zeros=True)


def _conv3d_via_2d(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 3D convolution as one 2D convolution over depth slices.

    Every padded depth slice is convolved in 2D with all ``k_d`` depth taps at once
    (stacked on the output channels), and output slice ``d`` sums tap ``j`` of slice
    ``d + j``. This costs ``(D_pad / D_out)`` times the FLOPs of the 3D convolution
    (a few percent) but is a single large stride-1 2D convolution, the case XLA's CPU
    backend runs fast, and so are both of its gradients. Measured faster than summing
    ``k_d`` 2D convolutions of shifted slices and than stacking the shifted slices on
    the input channels (``benchmarks/conv.py``).

    Args:
      x: ``(B, D, H, W, C_in)``.
      kernel: ``(k_d, k_h, k_w, C_in, C_out)``.
      padding: three ``(low, high)`` pairs, each ``>= 0``.

    Returns:
      ``(B, D_out, H_out, W_out, C_out)``.
    """
    kd, kh, kw, c_in, c_out = kernel.shape
    (d_lo, d_hi), hw_padding = padding[0], padding[1:]
    x = _pad_or_crop(x, [(d_lo, d_hi), (0, 0), (0, 0)])
    b, d_pad, h, w, _ = x.shape
    d_out = d_pad - kd + 1
    # (kd, kh, kw, Cin, Cout) -> (kh, kw, Cin, kd * Cout): tap j in block j of outputs.
    stacked = jnp.moveaxis(kernel, 0, 3).reshape(kh, kw, c_in, kd * c_out)
    y = _conv2d_stride1(x.reshape(b * d_pad, h, w, c_in), stacked, tuple(hw_padding))
    y = y.reshape(b, d_pad, *y.shape[1:3], kd, c_out)
    return sum(y[:, j:j + d_out, :, :, j] for j in range(kd))


def _conv_stride1_fast(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    x, padding = _crop_negative(x, padding)
    if x.ndim == 5:
        return _conv3d_via_2d(x, kernel, padding)
    if x.ndim == 4:
        return _conv2d_stride1(x, kernel, tuple(padding))
    return _xla_conv(x, kernel, (1,) * (x.ndim - 2), padding)


def _space_to_depth(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Moves the parity of each spatial axis in ``axes`` (even length) into channels.

    ``(B, *sp, C) -> (B, *sp', 2^len(axes) * C)`` with ``sp'[a] = sp[a] // 2`` on the
    given axes (0-based spatial indices); channel index ``(r_0, r_1, ..., c)`` row-major.
    """
    shape, perm_tail, new_shape = [x.shape[0]], [], [x.shape[0]]
    for a, n in enumerate(x.shape[1:-1]):
        if a in axes:
            shape += [n // 2, 2]
            new_shape.append(n // 2)
        else:
            shape.append(n)
            new_shape.append(n)
    x = x.reshape(*shape, x.shape[-1])
    spatial_dims, pos = [], 1
    for a in range(len(new_shape) - 1):
        spatial_dims.append(pos)
        if a in axes:
            perm_tail.append(pos + 1)
            pos += 2
        else:
            pos += 1
    x = jnp.transpose(x, [0] + spatial_dims + perm_tail + [pos])
    return x.reshape(*new_shape, -1)


def _conv_fast(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               padding: Padding) -> jax.Array:
    """``cpu_fast`` cross-correlation: space-to-depth for stride-2 axes, then stride 1."""
    nd = x.ndim - 2
    if nd == 1 or any(s not in (1, 2) for s in strides) or (nd == 2 and 2 in strides):
        # 2D stride 2: XLA's own (YNNPACK) forward is faster than space-to-depth, and
        # forward+backward is no slower (measured, benchmarks/conv.py).
        return _xla_conv(x, kernel, strides, padding)
    s2_axes = [a for a, s in enumerate(strides) if s == 2]
    if not s2_axes:
        return _conv_stride1_fast(x, kernel, padding)
    # Output o of a stride-2 axis reads padded inputs 2o + j = 2(o + a) + r for tap
    # j = 2a + r: a stride-1 correlation over blocks of 2 with ceil(k/2) taps whose
    # parity r lives in the channels. The padded input must hold exactly
    # 2 * (out + ceil(k/2) - 1) samples (zero-padded or cropped at the high end).
    explicit, remaining = [], []
    for a in range(nd):
        n, k, (lo, hi) = x.shape[1 + a], kernel.shape[a], padding[a]
        if a in s2_axes:
            out = (n + lo + hi - k) // 2 + 1
            explicit.append((lo, 2 * (out + (k + 1) // 2 - 1) - n - lo))
            remaining.append((0, 0))
        else:
            explicit.append((0, 0))
            remaining.append((lo, hi))
    x = _space_to_depth(_pad_or_crop(x, explicit), s2_axes)
    # Kernel: pad each stride-2 axis to even length, split taps (a, r), move r to C_in.
    kernel = jnp.pad(kernel, [(0, kernel.shape[a] % 2 if a in s2_axes else 0)
                              for a in range(nd)] + [(0, 0), (0, 0)])
    c_in, c_out = kernel.shape[-2:]
    kernel = _space_to_depth(kernel.reshape(1, *kernel.shape[:nd], c_in * c_out), s2_axes)[0]
    kernel = kernel.reshape(*kernel.shape[:nd], -1, c_out)  # channels (r_0, .., C_in)
    return _conv_stride1_fast(x, kernel, remaining)


def _depth_to_space(y: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Inverse of :func:`_space_to_depth`: ``(B, *sp, 2^m * C) -> (B, *sp'', C)``."""
    nd, m = y.ndim - 2, len(axes)
    c = y.shape[-1] // 2 ** m
    y = y.reshape(*y.shape[:-1], *([2] * m), c)
    perm, parity_dim = [0], 1 + nd
    for a in range(nd):
        perm.append(1 + a)
        if a in axes:
            perm.append(parity_dim)
            parity_dim += 1
    y = jnp.transpose(y, perm + [y.ndim - 1])
    return y.reshape(y.shape[0], *_doubled(y.shape, nd, axes), c)


def _doubled(shape: Sequence[int], nd: int, axes: Sequence[int]) -> list[int]:
    """Spatial sizes after merging each parity dim of ``axes`` into its axis."""
    sizes, pos = [], 1
    for a in range(nd):
        if a in axes:
            sizes.append(shape[pos] * 2)
            pos += 2
        else:
            sizes.append(shape[pos])
            pos += 1
    return sizes


def _conv_transpose_fast(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                         padding: Sequence[int], output_padding: Sequence[int]
                         ) -> jax.Array:
    """``cpu_fast`` transposed convolution: output phases of stride-1 convolutions.

    Output ``o = 2m + r`` of a stride-2 axis is a sum over the taps ``j`` of one parity
    ``c(r)`` only (the others meet the zeros interleaved into the input), so phase ``r``
    is a stride-1 correlation of ``x`` with the taps ``kernel[c::2]`` at an offset, and
    the ``2^m`` phases are interleaved (depth-to-space). No multiplications by zero.
    """
    nd = x.ndim - 2
    # Per axis: list of phases (tap slice, (low, high) padding, output length).
    axis_phases, s2_axes = [], []
    for a in range(nd):
        n, k, s, p, op = (x.shape[1 + a], kernel.shape[a], strides[a], padding[a],
                          output_padding[a])
        out = (n - 1) * s - 2 * p + k + op
        low = k - 1 - p  # padding of the zero-interleaved input in the xla lowering
        if s == 1:
            axis_phases.append([(slice(None), (low, low + op), out)])
            continue
        s2_axes.append(a)
        phases = []
        for r in (0, 1):
            c = (low - r) % 2
            taps = len(range(c, k, 2))
            offset = (r + c - low) // 2  # phase r, tap t reads x[m + t + offset]
            m_out = (out - r + 1) // 2  # outputs of this parity
            pad = (-offset, (m_out - 1) + (taps - 1) + offset - (n - 1))
            # Padded to the length of phase 0 (the longer one) before interleaving.
            phases.append((slice(c, None, 2), pad, (out + 1) // 2))
        axis_phases.append(phases)
    outputs = []
    for combo in itertools.product(*axis_phases):
        sub_kernel = kernel[tuple(ph[0] for ph in combo)]
        shape_out = [ph[2] for ph in combo]
        if sub_kernel.size == 0:  # k = 1: one parity has no taps, its outputs are 0
            outputs.append(jnp.zeros((x.shape[0], *shape_out, kernel.shape[-1]), x.dtype))
            continue
        y = _conv_stride1_fast(x, sub_kernel, [ph[1] for ph in combo])
        outputs.append(_pad_or_crop(y, [(0, size - n) for size, n in
                                        zip(shape_out, y.shape[1:-1])]))
    y = _depth_to_space(jnp.concatenate(outputs, axis=-1), s2_axes)
    out_sizes = [(x.shape[1 + a] - 1) * strides[a] - 2 * padding[a] + kernel.shape[a]
                 + output_padding[a] for a in range(nd)]
    return y[(slice(None),) + tuple(slice(0, o) for o in out_sizes)]


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
    ``impl="cpu_fast"`` computes the same numbers without the zeros.

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
    output_padding = tuple(output_padding or (0,) * nd)
    if impl == "cpu_fast" and nd > 1 and all(s in (1, 2) for s in strides):
        return _conv_transpose_fast(x, kernel, tuple(strides), tuple(padding),
                                    output_padding)
    pads = [(k - 1 - p, k - 1 - p + op) for k, p, op in zip(ks, padding, output_padding)]
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1,) * nd, padding=pads, lhs_dilation=tuple(strides),
        dimension_numbers=_dimension_numbers(nd))
