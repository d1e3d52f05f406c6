"""The ``cpu_fast`` lowerings equal the ``xla`` ones, values and gradients.

``xla`` is itself checked against float64 numpy formulas of a correlation and of
PyTorch's transposed convolution (with the kernel flip documented in ``conv_transpose``).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.models import conv_lowering as cl

RTOL = 1e-4  # relative to the largest magnitude of the compared array

# (spatial, kernel, C_in, C_out, strides, padding): conv padding is (low, high) per axis.
CONV_CASES = {
    "2d_k3_s1": ((7, 8), (3, 3), 3, 4, (1, 1), ((1, 1), (1, 1))),
    "2d_k3_s2_ldm_pad01": ((8, 7), (3, 3), 2, 3, (2, 2), ((0, 1), (0, 1))),
    "2d_k7_s1_p3": ((9, 8), (7, 7), 2, 3, (1, 1), ((3, 3), (3, 3))),
    "2d_k1_s1": ((5, 6), (1, 1), 3, 4, (1, 1), ((0, 0), (0, 0))),
    "2d_s3_fallback": ((9, 8), (3, 3), 2, 3, (3, 3), ((1, 1), (1, 1))),
    "3d_k3_s1": ((5, 6, 7), (3, 3, 3), 3, 4, (1, 1, 1), ((1, 1),) * 3),
    "3d_k3_s1_asym": ((5, 6, 4), (3, 3, 3), 2, 3, (1, 1, 1), ((2, 0), (0, 1), (1, 1))),
    "3d_k3_s2_ldm_pad01": ((6, 5, 7), (3, 3, 3), 2, 3, (2, 2, 2), ((0, 1),) * 3),
    "3d_k4_s2": ((6, 6, 5), (4, 4, 4), 3, 4, (2, 2, 2), ((1, 1),) * 3),
    "3d_k3_s2_odd": ((5, 7, 3), (3, 3, 3), 3, 2, (2, 2, 2), ((1, 1),) * 3),
    "3d_k1_s2": ((5, 4, 3), (1, 1, 1), 3, 4, (2, 2, 2), ((0, 0),) * 3),
    "3d_mixed_stride_asym": ((5, 7, 6), (3, 2, 4), 2, 3, (1, 2, 2),
                             ((2, 0), (0, 1), (1, 2))),
    "3d_k1_s1": ((4, 5, 3), (1, 1, 1), 3, 4, (1, 1, 1), ((0, 0),) * 3),
    "1d_k3_s2": ((9,), (3,), 3, 4, (2,), ((1, 1),)),
}

# (spatial, kernel, C_in, C_out, strides, padding, output_padding): PyTorch's meaning.
TRANSPOSE_CASES = {
    "2d_k4_s2_p1": ((7, 8), (4, 4), 3, 4, (2, 2), (1, 1), None),
    "2d_k3_s2_p1_op1": ((5, 6), (3, 3), 3, 4, (2, 2), (1, 1), (1, 1)),
    "2d_k3_s1_p1": ((5, 6), (3, 3), 3, 2, (1, 1), (1, 1), None),
    "2d_k1_s2_op1": ((4, 5), (1, 1), 2, 3, (2, 2), (0, 0), (1, 0)),
    "2d_k3_s2_p2_crops": ((7, 8), (3, 3), 2, 3, (2, 2), (2, 2), (1, 0)),
    "3d_k4_s2_p1": ((4, 5, 3), (4, 4, 4), 3, 2, (2, 2, 2), (1, 1, 1), None),
    "3d_k3_s2_p1_op1": ((3, 4, 5), (3, 3, 3), 2, 3, (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    "3d_mixed_stride": ((3, 4, 5), (3, 4, 3), 2, 3, (2, 2, 1), (1, 1, 0), (1, 0, 0)),
}


def _random(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _value_and_grads(fn, x, kernel, cotangent):
    """Output and the (input, kernel) gradients of ``<fn(x, kernel), cotangent>``."""
    def value_and_vjp(x, kernel, cotangent):
        y, vjp = jax.vjp(fn, x, kernel)
        return (y, *vjp(cotangent))
    return jax.jit(value_and_vjp)(x, kernel, cotangent)


def _assert_close(actual, expected, name: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    assert scale > 0, name
    error = np.max(np.abs(actual - expected)) / scale
    assert error < RTOL, f"{name}: relative error {error:.2e}"


def _compare_impls(make_fn, spatial, kernel_size, c_in, c_out, seed=0):
    x = _random(seed, (2, *spatial, c_in))
    kernel = _random(seed + 1, (*kernel_size, c_in, c_out))
    out_shape = jax.eval_shape(make_fn("xla"), x, kernel).shape
    cotangent = _random(seed + 2, out_shape)
    expected = _value_and_grads(make_fn("xla"), x, kernel, cotangent)
    actual = _value_and_grads(make_fn("cpu_fast"), x, kernel, cotangent)
    for name, a, e in zip(("output", "input grad", "kernel grad"), actual, expected):
        _assert_close(a, e, name)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_cpu_fast_matches_xla(case):
    spatial, k, c_in, c_out, strides, padding = CONV_CASES[case]
    _compare_impls(lambda impl: lambda x, w: cl.conv(x, w, strides, padding, impl=impl),
                   spatial, k, c_in, c_out)


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv_transpose_cpu_fast_matches_xla(case):
    spatial, k, c_in, c_out, strides, padding, output_padding = TRANSPOSE_CASES[case]
    _compare_impls(lambda impl: lambda x, w: cl.conv_transpose(
        x, w, strides, padding, output_padding, impl=impl), spatial, k, c_in, c_out)


def _numpy_correlation(x, kernel, strides, padding):
    """float64 loop reference of ``torch.nn.Conv2d`` (cross-correlation), 2D only."""
    x = np.pad(x.astype(np.float64), [(0, 0), *padding, (0, 0)])
    (kh, kw, _, c_out), (sh, sw) = kernel.shape, strides
    h_out, w_out = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], h_out, w_out, c_out))
    for i, j in itertools.product(range(h_out), range(w_out)):
        window = x[:, i * sh:i * sh + kh, j * sw:j * sw + kw]
        out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    return out


def _numpy_torch_conv_transpose(x, kernel, strides, padding, output_padding):
    """float64 reference of ``torch.nn.ConvTranspose2d`` with the kernel flipped.

    Torch scatters input ``i`` through tap ``t`` to output ``i * s + t - p``; the
    lowering here uses the spatially flipped kernel (see ``conv_transpose``).
    """
    kernel = kernel[::-1, ::-1].astype(np.float64)
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = (kernel.shape[:2], strides, padding,
                                              output_padding)
    b, h, w, _ = x.shape
    full = np.zeros((b, (h - 1) * sh + kh + oh, (w - 1) * sw + kw + ow, kernel.shape[-1]))
    for i, j in itertools.product(range(h), range(w)):
        full[:, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.einsum(
            "bc,hwco->bhwo", x[:, i, j].astype(np.float64), kernel)
    h_out, w_out = (h - 1) * sh - 2 * ph + kh + oh, (w - 1) * sw - 2 * pw + kw + ow
    return full[:, ph:ph + h_out, pw:pw + w_out]


@pytest.mark.parametrize("impl", ["xla", "cpu_fast"])
def test_against_float64_references(impl):
    x, kernel = _random(10, (2, 7, 6, 3)), _random(11, (3, 4, 3, 2))
    padding = ((0, 1), (2, 1))
    _assert_close(cl.conv(x, kernel, (2, 1), padding, impl=impl),
                  _numpy_correlation(np.asarray(x), np.asarray(kernel), (2, 1), padding),
                  "conv")
    _assert_close(cl.conv_transpose(x, kernel, (2, 2), (1, 1), (1, 0), impl=impl),
                  _numpy_torch_conv_transpose(np.asarray(x), np.asarray(kernel), (2, 2),
                                              (1, 1), (1, 0)), "conv_transpose")


def test_kernel_grad_in_groups_and_row_blocks(monkeypatch):
    """The memory-capped loop over images and the row blocks give the same gradient."""
    monkeypatch.setattr(cl, "_PATCH_BYTES_PER_STEP", 1)  # one image per loop step
    monkeypatch.setattr(cl, "_POSITIONS_PER_BLOCK", 8)   # blocks of one output row
    _compare_impls(lambda impl: lambda x, w: cl.conv(x, w, (1, 1, 1), ((1, 1),) * 3,
                                                     impl=impl),
                   (3, 4, 8), (3, 3, 3), 2, 3, seed=20)


def test_forward_mode_and_nested_grad_match_xla():
    """``jax.jvp`` and a grad through a one-step lookahead (learning to reweight) work.

    The custom JVP must keep forward mode working, and a gradient with respect to a
    per-pixel weight ``eps`` of a loss at ``theta - a * grad_theta sum(eps * l)``
    differentiates the fast kernel gradient with respect to its cotangent.
    """
    x, kernel = _random(30, (2, 6, 5, 4, 2)), _random(31, (3, 3, 3, 2, 2))
    target = _random(32, (2, 3, 2, 2, 2))

    def loss_map(kernel, impl):
        return jnp.abs(cl.conv(x, kernel, (2, 2, 2), ((0, 1),) * 3, impl=impl) - target)

    def lookahead(eps, impl):
        inner = jax.grad(lambda k: jnp.sum(eps * loss_map(k, impl)))(kernel)
        return jnp.sum(loss_map(kernel - 0.1 * inner, impl) ** 2)

    tangent = _random(33, kernel.shape)
    eps = jnp.zeros(target.shape)
    for impl_result, xla_result in zip(
            (jax.jvp(lambda k: loss_map(k, "cpu_fast"), (kernel,), (tangent,)),
             jax.jit(jax.grad(lookahead), static_argnums=1)(eps, "cpu_fast")),
            (jax.jvp(lambda k: loss_map(k, "xla"), (kernel,), (tangent,)),
             jax.jit(jax.grad(lookahead), static_argnums=1)(eps, "xla"))):
        jax.tree_util.tree_map(lambda a, e: _assert_close(a, e, "jvp/nested grad"),
                               impl_result, xla_result)


def test_resolve_impl():
    assert cl.resolve_impl("auto") == ("cpu_fast" if jax.default_backend() == "cpu"
                                       else "xla")
    assert cl.resolve_impl("xla") == "xla"
    with pytest.raises(ValueError, match="unknown conv_impl"):
        cl.resolve_impl("cudnn")
