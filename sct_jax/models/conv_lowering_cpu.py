"""The ``cpu_fast`` convolution rewrites that :mod:`sct_jax.models.conv_lowering` picks from.

Each rewrite turns a convolution into the shapes XLA's CPU backend runs fast, from
differentiable ``jax`` ops plus custom JVPs for the gradients it runs slowly (their
tangents are ordinary ``jax`` ops too, so every rewrite vmaps and differentiates to
any order, forward or reverse): stride-1
2D convolutions with an im2col kernel gradient (:func:`_conv2d_stride1`), 3D stride-1
convolutions over depth slices (:func:`_conv3d_via_2d`), space-to-depth for stride 2
(:func:`_stride2_input`, :func:`_conv2d_stride2`), output phases for a transposed
convolution (:func:`_conv_transpose_fast`) and one im2col matmul for small layers
(:func:`_conv2d_im2col`). ``conv_lowering``'s docstring says which rewrite serves which
layer and ``BENCHMARKS.md`` has the measurements; the choice (thresholds, switches) is
made in ``conv_lowering``. XLA's own convolution (:func:`_xla_conv`) is here too, since
every rewrite ends in one.

Layouts: inputs ``(B, *spatial, C_in)`` (channels last), kernels ``(*k, C_in, C_out)``.
Padding is explicit: one ``(low, high)`` pair per spatial axis.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Padding = Sequence[tuple[int, int]]


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"only 1D, 2D and 3D convolutions are supported, got {nd}D")
    return lax.conv_dimension_numbers(
        (1,) * (nd + 2), (1,) * (nd + 2),
        ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


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


def _patch_the_cotangent(c_in: int, c_out: int, positions: int) -> bool:
    """Whether the kernel gradient builds its patches from ``g`` rather than from ``x``.

    Measured (jax 0.10.2, 2-core AVX-512, BENCHMARKS.md): with few
    output channels the ``x``-patch product is a long contraction with a narrow output
    that XLA's CPU dot runs at 0.2 (``C_out = 1``) to ~10 GFLOP/s; the ``g``-patch
    product, ``(k_h k_w C_out, P) @ (P, C_in)``, runs 2-90x faster there. With wide
    outputs or few positions the ``x`` patches are as fast or faster.
    """
    return c_out <= 8 or (c_out < c_in and positions >= 2048)


def _conv2d_by_kernel(x: jax.Array, k_dot: jax.Array, padding: tuple,
                      plan: tuple[bool, int, int]) -> jax.Array:
    """Stride-1 2D convolution with ``k_dot`` whose transpose in ``k_dot`` is fast on CPU.

    XLA's CPU backend runs a kernel gradient (a convolution with a huge window and a
    tiny output) at about a third of the forward speed. This kernel-tangent term of the
    custom JVPs is made of matmuls, slices and sums so that its transpose, which JAX
    derives (and so vmaps and differentiates), is an im2col kernel gradient. Two forms,
    chosen by :func:`_patch_the_cotangent`: patches of ``x`` (``k_h k_w`` shifted
    copies stacked on channels) times the kernel broadcast over blocks of positions,
    whose transpose is a batch of per-block products summed; or ``x_pad`` times the
    taps stacked on the output channels, each shifted into place and summed, whose
    transpose multiplies patches of the cotangent ``g`` with ``x_pad`` (``dW[i, j] =
    sum_p x_pad[p] g[p - (i, j)]``). Either runs over groups of images (``lax.map``,
    transposed into a loop summing the groups' gradients) to cap the patches' memory.
    Forward mode (``jax.jvp``) evaluates this form itself, not XLA's convolution.

    Args:
      x: ``(N, H, W, C_in)``.
      k_dot: ``(k_h, k_w, C_in, C_out)``.
      padding: two ``(low, high)`` pairs, each ``>= 0``.
      plan: ``(by_cotangent, group, block)``: the form, images per group and
        positions per block (see :func:`_by_kernel_tangent`).

    Returns:
      ``(N, H_out, W_out, C_out)``.
    """
    kh, kw, c_in, c_out = k_dot.shape
    by_cotangent, group, block = plan
    x = _pad_or_crop(x, padding)
    n, h_pad, w_pad, _ = x.shape
    h_out, w_out = h_pad - kh + 1, w_pad - kw + 1
    if by_cotangent:  # (kh * kw * C_out, C_in): rows ordered (tap, C_out)
        weights = jnp.transpose(k_dot, (0, 1, 3, 2)).reshape(kh * kw * c_out, c_in)
    else:
        weights = k_dot.reshape(kh * kw * c_in, c_out)

    def group_conv(xg: jax.Array) -> jax.Array:
        if by_cotangent:  # transpose: one (kh * kw * C_out, P) @ (P, C_in) contraction
            taps = jnp.split(jnp.einsum("bhwc,tc->bhwt", xg, weights), kh * kw, axis=-1)
            return sum(taps[i * kw + j][:, i:i + h_out, j:j + w_out]
                       for i in range(kh) for j in range(kw))
        patches = jnp.concatenate([xg[:, i:i + h_out, j:j + w_out]
                                   for i in range(kh) for j in range(kw)], axis=-1)
        patches = patches.reshape(-1, block, kh * kw * c_in)
        # The kernel broadcast over the blocks, so that the transpose is a batched
        # product per block summed afterwards, not one long contraction.
        per_block = jnp.broadcast_to(weights, (patches.shape[0], *weights.shape))
        y = jnp.einsum("bpk,bko->bpo", patches, per_block)
        return y.reshape(xg.shape[0], h_out, w_out, c_out)

    if group == n:
        return group_conv(x)
    # The body is checkpointed too: otherwise linearising the loop stores every
    # group's patches at once.
    y = lax.map(jax.checkpoint(group_conv, prevent_cse=False),
                x.reshape(n // group, group, h_pad, w_pad, c_in))
    return y.reshape(n, h_out, w_out, c_out)


def _by_kernel_tangent(x: jax.Array, k_dot: jax.Array, padding: tuple) -> jax.Array:
    """:func:`_conv2d_by_kernel` with ``x`` (not its patches) saved for the transpose.

    Chooses the form, the group of images and the block of positions here, outside the
    checkpoint, since ``jax.checkpoint`` caches its trace by the static arguments.
    """
    kh, kw, c_in, c_out = k_dot.shape
    n, h, w, _ = x.shape
    h_pad, w_pad = h + sum(padding[0]), w + sum(padding[1])
    h_out, w_out = h_pad - kh + 1, w_pad - kw + 1
    by_cotangent = _patch_the_cotangent(c_in, c_out, n * h_out * w_out)
    patch_bytes = (h_pad * w_pad * kh * kw * c_out if by_cotangent
                   else h_out * w_out * kh * kw * c_in) * x.dtype.itemsize
    group = _largest_divisor_at_most(n, _PATCH_BYTES_PER_STEP / patch_bytes)
    # Blocks of positions across a group's images (a divisor, so the reshape is free):
    # each block's transpose writes a kernel-sized partial product, so no more blocks
    # than needed.
    positions = group * h_out * w_out
    block = _largest_divisor_at_most(positions, _POSITIONS_PER_BLOCK)
    if positions // block > 2 * -(-positions // _POSITIONS_PER_BLOCK):
        block = positions  # no divisor near the target size: one block
    return jax.checkpoint(_conv2d_by_kernel, static_argnums=(2, 3))(
        x, k_dot, padding, (by_cotangent, group, block))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv2d_stride1(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """Stride-1 2D convolution (padding ``>= 0``) whose kernel gradient is fast on CPU.

    A custom JVP (not VJP) so that forward-mode differentiation keeps working. Its
    tangent is made of ordinary ``jax`` ops, so it transposes, vmaps and differentiates
    again (gradients of gradients, in the weights or the activations): the input term is
    XLA's convolution, which JAX transposes into XLA's input gradient; the kernel term
    is :func:`_conv2d_by_kernel`, whose transpose is the im2col kernel gradient.
    """
    return _padded_conv2d(x, kernel, padding)


def _padded_conv2d(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """XLA's stride-1 2D convolution, never unpadded.

    XLA's CPU backend (jax 0.10) runs an unpadded ("valid") convolution 2-3x slower than
    a padded one (measured, ``sct_jax/bench/conv.py``), so a valid convolution is computed
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
        by_kernel = _by_kernel_tangent(x, kernel_dot, padding)
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
    the input channels (``sct_jax/bench/conv.py``).

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


def _conv_stride1_xla(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """XLA's stride-1 convolution with negative padding applied as a crop."""
    x, padding = _crop_negative(x, padding)
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


def _stride2_input(x: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                   padding: Padding) -> tuple[jax.Array, list]:
    """Space-to-depth of the padded input of a stride-2 convolution (see _conv_fast).

    Output ``o`` of a stride-2 axis reads padded inputs ``2o + j = 2(o + a) + r`` for tap
    ``j = 2a + r``: a stride-1 correlation over blocks of 2 with ``ceil(k/2)`` taps whose
    parity ``r`` lives in the channels. The padded input must hold exactly
    ``2 * (out + ceil(k/2) - 1)`` samples (zero-padded or cropped at the high end).

    Returns:
      The rearranged input and the padding left for the stride-1 convolution.
    """
    nd = x.ndim - 2
    s2_axes = [a for a, s in enumerate(strides) if s == 2]
    explicit, remaining = [], []
    for a in range(nd):
        n, k, (lo, hi) = x.shape[1 + a], kernel_shape[a], padding[a]
        if a in s2_axes:
            out = (n + lo + hi - k) // 2 + 1
            explicit.append((lo, 2 * (out + (k + 1) // 2 - 1) - n - lo))
            remaining.append((0, 0))
        else:
            explicit.append((0, 0))
            remaining.append((lo, hi))
    return _space_to_depth(_pad_or_crop(x, explicit), s2_axes), remaining


def _stride2_kernel(kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
    """The kernel of :func:`_stride2_input`'s stride-1 convolution (a linear map).

    Each stride-2 axis is zero-padded to an even length and its taps ``j = 2a + r``
    split, ``r`` moved into the input channels (order ``(r_0, .., C_in)``).
    """
    nd = kernel.ndim - 2
    s2_axes = [a for a, s in enumerate(strides) if s == 2]
    kernel = jnp.pad(kernel, [(0, kernel.shape[a] % 2 if a in s2_axes else 0)
                              for a in range(nd)] + [(0, 0), (0, 0)])
    c_in, c_out = kernel.shape[-2:]
    kernel = _space_to_depth(kernel.reshape(1, *kernel.shape[:nd], c_in * c_out), s2_axes)[0]
    return kernel.reshape(*kernel.shape[:nd], -1, c_out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv2d_stride2(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """Stride-2 2D convolution: XLA's forward, gradients as stride-1 convolutions.

    XLA's CPU forward of a stride-2 convolution is faster than the space-to-depth
    rewrite, but its input gradient is an ``lhs``-dilated convolution that multiplies
    zeros and its kernel gradient a huge-window convolution, both slow. The tangents are
    therefore computed on the space-to-depth form (:func:`_stride2_input`), whose
    transposes are a padded stride-1 convolution (input gradient, then depth-to-space)
    and the im2col kernel gradient of :func:`_conv2d_by_kernel` (then the kernel
    regrouping undone). Like :func:`_conv2d_stride1`'s, the tangent is ordinary ops:
    forward mode, vmap and gradients of gradients work.
    """
    return _xla_conv(x, kernel, (2, 2), padding)


def _conv2d_stride2_jvp(padding, primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _xla_conv(x, kernel, (2, 2), padding)
    y_dot = None
    if type(x_dot) is not SymbolicZero:
        x_dot_s2d, remaining = _stride2_input(x_dot, kernel.shape, (2, 2), padding)
        y_dot = _padded_conv2d(x_dot_s2d, _stride2_kernel(kernel, (2, 2)),
                               tuple(remaining))
    if type(kernel_dot) is not SymbolicZero:
        # Transposed: the im2col kernel gradient of the space-to-depth form, then the
        # kernel regrouping undone (JAX transposes the reshapes of _stride2_kernel).
        x_s2d, remaining = _stride2_input(x, kernel.shape, (2, 2), padding)
        by_kernel = _by_kernel_tangent(x_s2d, _stride2_kernel(kernel_dot, (2, 2)),
                                       tuple(remaining))
        y_dot = by_kernel if y_dot is None else y_dot + by_kernel
    if y_dot is None:
        y_dot = jnp.zeros_like(y)
    return y, y_dot


_conv2d_stride2.defjvp(_conv2d_stride2_jvp, symbolic_zeros=True)


def _conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Padding, lhs_dilation: Sequence[int] = (1, 1)) -> jax.Array:
    """2D convolution as one matmul of im2col patches with the kernel as it is stored.

    For the innermost layers of a U-Net (a few positions, up to ``16 * 1024 x 512``
    weights) every rearrangement of the kernel that the other lowerings make (regrouped,
    sliced into phases, flipped for the input gradient, and back for the kernel
    gradient) costs more than the convolution itself. Here the kernel is only reshaped
    (free) and all copies are of the small activations; gradients are the transposed
    matmul and slices. A transposed convolution passes ``lhs_dilation`` (its zeros are
    multiplied, which is cheap at these sizes).

    Args:
      x: ``(B, H, W, C_in)``.
      kernel: ``(k_h, k_w, C_in, C_out)``.
      strides: two window strides.
      padding: two ``(low, high)`` pairs (negative crops).
      lhs_dilation: interior zeros + 1 between input samples (``lax`` convention).

    Returns:
      ``(B, H_out, W_out, C_out)``, as ``lax.conv_general_dilated``.
    """
    kh, kw, c_in, c_out = kernel.shape
    config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
    x = lax.pad(x, jnp.zeros((), x.dtype), config + [(0, 0, 0)])
    (sh, sw), (h, w) = strides, x.shape[1:3]
    h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
    patches = jnp.concatenate(
        [x[:, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw]
         for i in range(kh) for j in range(kw)], axis=-1)
    y = patches.reshape(-1, kh * kw * c_in) @ kernel.reshape(kh * kw * c_in, c_out)
    return y.reshape(x.shape[0], h_out, w_out, c_out)


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


def _phase_kernels(kernel: jax.Array, combos: list, s2_axes: Sequence[int]
                   ) -> list[jax.Array]:
    """The sub-kernel of each phase (``kernel[c_0::2, c_1::2, ..]`` for its parities).

    When every axis is stride 2 with an even kernel, the parities are split off by one
    reshape and transpose and the sub-kernels by ``jnp.split``, whose gradient is one
    concatenation: strided slices would make the kernel gradient ``2^d`` full-size
    zero-padded copies summed, which for a ``4 x 4 x 1024 x 512`` kernel costs more
    than the convolution at small batch (measured, BENCHMARKS.md).
    """
    nd = kernel.ndim - 2
    taps = kernel.shape[:nd]
    if len(s2_axes) != nd or any(k % 2 for k in taps):
        return [kernel[tuple(ph[0] for ph in combo)] for combo in combos]
    c_in, c_out = kernel.shape[-2:]
    split = kernel.reshape(*[d for k in taps for d in (k // 2, 2)], c_in, c_out)
    # (a_0, r_0, a_1, r_1, .., C_in, C_out) -> (r_0, r_1, .., a_0, a_1, .., ..).
    split = jnp.transpose(split, [2 * a + 1 for a in range(nd)]
                          + [2 * a for a in range(nd)] + [2 * nd, 2 * nd + 1])
    parts = jnp.split(split.reshape(2 ** nd, *[k // 2 for k in taps], c_in, c_out),
                      2 ** nd, axis=0)
    # Phase combo parities: ph[0] is slice(c, None, 2); index of (c_0, c_1, ..) row-major.
    index = {cs: i for i, cs in enumerate(itertools.product((0, 1), repeat=nd))}
    return [parts[index[tuple(ph[0].start for ph in combo)]][0] for combo in combos]


def _conv_transpose_fast(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                         padding: Sequence[int], output_padding: Sequence[int],
                         stride1_conv: Callable[[jax.Array, jax.Array, Padding], jax.Array]
                         = _conv_stride1_fast) -> jax.Array:
    """Transposed convolution as output phases of stride-1 convolutions.

    Output ``o = 2m + r`` of a stride-2 axis is a sum over the taps ``j`` of one parity
    ``c(r)`` only (the others meet the zeros interleaved into the input), so phase ``r``
    is a stride-1 correlation of ``x`` with the taps ``kernel[c::2]`` at an offset, and
    the ``2^m`` phases are interleaved (depth-to-space). No multiplications by zero, and
    no ``lhs_dilation`` in the forward or the gradients. ``stride1_conv`` computes each
    phase: the ``cpu_fast`` rewrites (default) or XLA's own (``impl="phases"``).
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
    combos = list(itertools.product(*axis_phases))
    for combo, sub_kernel in zip(combos, _phase_kernels(kernel, combos, s2_axes)):
        shape_out = [ph[2] for ph in combo]
        if sub_kernel.size == 0:  # k = 1: one parity has no taps, its outputs are 0
            outputs.append(jnp.zeros((x.shape[0], *shape_out, kernel.shape[-1]), x.dtype))
            continue
        y = stride1_conv(x, sub_kernel, [ph[1] for ph in combo])
        outputs.append(_pad_or_crop(y, [(0, size - n) for size, n in
                                        zip(shape_out, y.shape[1:-1])]))
    y = _depth_to_space(jnp.concatenate(outputs, axis=-1), s2_axes)
    out_sizes = [(x.shape[1 + a] - 1) * strides[a] - 2 * padding[a] + kernel.shape[a]
                 + output_padding[a] for a in range(nd)]
    return y[(slice(None),) + tuple(slice(0, o) for o in out_sizes)]
