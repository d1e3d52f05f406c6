"""The ``cpu_fast`` lowerings equal the ``xla`` ones, values and gradients.

``xla`` is itself checked against float64 numpy formulas of a correlation and of
PyTorch's transposed convolution (with the kernel flip documented in ``conv_transpose``).
``cpu_fast`` picks a lowering by size (im2col for the few-position, many-channel
layers); tiny test shapes would mostly take the im2col path, so each path is forced
explicitly (the ``path`` fixture) and every lowering is compared with ``xla``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.models import conv_lowering as cl
from sct_jax.models import conv_lowering_cpu as cl_cpu
from sct_jax.models.patchgan import PatchDiscriminator
from sct_jax.models.unet import UNetGenerator

RTOL = 1e-4  # relative to the largest magnitude of the compared array

# (spatial, kernel, C_in, C_out, strides, padding): conv padding is (low, high) per axis.
CONV_CASES = {
    "2d_k3_s1": ((7, 8), (3, 3), 3, 4, (1, 1), ((1, 1), (1, 1))),
    "2d_k3_s2_ldm_pad01": ((8, 7), (3, 3), 2, 3, (2, 2), ((0, 1), (0, 1))),
    "2d_k7_s1_p3": ((9, 8), (7, 7), 2, 3, (1, 1), ((3, 3), (3, 3))),
    "2d_k1_s1": ((5, 6), (1, 1), 3, 4, (1, 1), ((0, 0), (0, 0))),
    "2d_s3_fallback": ((9, 8), (3, 3), 2, 3, (3, 3), ((1, 1), (1, 1))),
    "2d_k4_s2_p1_pix2pix": ((8, 6), (4, 4), 3, 5, (2, 2), ((1, 1), (1, 1))),
    "2d_k4_s2_p1_odd": ((7, 9), (4, 4), 2, 3, (2, 2), ((1, 1), (1, 1))),
    "2d_k4_s1_p1_wide_out": ((6, 5), (4, 4), 2, 12, (1, 1), ((1, 1), (1, 1))),
    "2d_mixed_stride": ((8, 7), (3, 3), 2, 3, (2, 1), ((1, 1), (1, 1))),
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
    "2d_k4_s2_p1_wide_out": ((4, 3), (4, 4), 2, 12, (2, 2), (1, 1), None),
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


def _force_path(monkeypatch, path: str) -> None:
    """Selects one ``cpu_fast`` lowering whatever the size.

    ``rewrite``: the stride-1 / space-to-depth / phase rewrites, im2col off;
    ``im2col``: every 2D convolution as im2col; ``xla_stride2``: the rewrites with XLA's
    own gradients for 2D stride 2.
    """
    im2col = 1e9 if path == "im2col" else 0.0
    monkeypatch.setattr(cl, "_IM2COL_MAX_ROWS_PER_OUTPUT_CHANNEL", im2col)
    monkeypatch.setattr(cl, "_IM2COL_TRANSPOSED_MAX_ROWS_PER_OUTPUT_CHANNEL", im2col)
    monkeypatch.setattr(cl, "_STRIDE2_CUSTOM_GRADIENTS", path != "xla_stride2")


@pytest.fixture(params=["rewrite", "im2col"])
def path(request, monkeypatch):
    _force_path(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_cpu_fast_matches_xla(case, path):
    spatial, k, c_in, c_out, strides, padding = CONV_CASES[case]
    if path == "im2col" and len(spatial) != 2:
        pytest.skip("im2col is 2D only: a 3D case takes the 'rewrite' lowering, tested there")
    _compare_impls(lambda impl: lambda x, w: cl.conv(x, w, strides, padding, impl=impl),
                   spatial, k, c_in, c_out)


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv_transpose_cpu_fast_matches_xla(case, path):
    spatial, k, c_in, c_out, strides, padding, output_padding = TRANSPOSE_CASES[case]
    if path == "im2col" and len(spatial) != 2:
        pytest.skip("im2col is 2D only: a 3D case takes the 'rewrite' lowering, tested there")
    _compare_impls(lambda impl: lambda x, w: cl.conv_transpose(
        x, w, strides, padding, output_padding, impl=impl), spatial, k, c_in, c_out)


@pytest.mark.parametrize("by_cotangent", [True, False])
def test_both_kernel_gradient_forms(monkeypatch, by_cotangent):
    """Patches of ``x`` and patches of ``g`` give the same kernel gradient."""
    _force_path(monkeypatch, "rewrite")
    monkeypatch.setattr(cl_cpu, "_patch_the_cotangent", lambda *args: by_cotangent)
    _compare_impls(lambda impl: lambda x, w: cl.conv(x, w, (2, 2), ((1, 1), (1, 2)),
                                                     impl=impl),
                   (7, 6), (4, 3), 3, 4, seed=40)
    _compare_impls(lambda impl: lambda x, w: cl.conv_transpose(x, w, (2, 2), (1, 1),
                                                               impl=impl),
                   (3, 4), (4, 4), 3, 2, seed=41)


def test_size_rule_picks_im2col_for_the_innermost_unet_layers():
    """unet_256 at batch 1: im2col from 16^2 outputs (512 channels) inwards."""
    assert cl._use_im2col(16 * 16, 512) and not cl._use_im2col(32 * 32, 256)
    assert cl._use_im2col(8 * 8, 512, transposed=True)
    assert not cl._use_im2col(16 * 16, 512, transposed=True)


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


def test_negative_padding_against_float64(monkeypatch):
    """A negative padding crops; checked against numpy, not ``xla``: XLA's CPU stride-2
    convolution with negative padding returns garbage (uninitialised memory, jax 0.10.2).
    """
    x, kernel = _random(60, (2, 9, 8, 2)), _random(61, (3, 3, 2, 3))
    padding = ((-1, 1), (0, -1))
    cropped = np.asarray(x)[:, 1:, :-1]
    expected = _numpy_correlation(cropped, np.asarray(kernel), (2, 2), ((0, 1), (0, 0)))
    for path in ("rewrite", "im2col"):
        _force_path(monkeypatch, path)
        _assert_close(cl.conv(x, kernel, (2, 2), padding, impl="cpu_fast"), expected, path)


@pytest.mark.parametrize("by_cotangent", [True, False])
def test_kernel_grad_in_groups_and_position_blocks(monkeypatch, by_cotangent):
    """The memory-capped loop over images and the position blocks give the same gradient."""
    monkeypatch.setattr(cl_cpu, "_patch_the_cotangent", lambda *args: by_cotangent)
    monkeypatch.setattr(cl_cpu, "_PATCH_BYTES_PER_STEP", 1)  # one image per loop step
    monkeypatch.setattr(cl_cpu, "_POSITIONS_PER_BLOCK", 8)   # blocks of one output row
    _compare_impls(lambda impl: lambda x, w: cl.conv(x, w, (1, 1, 1), ((1, 1),) * 3,
                                                     impl=impl),
                   (3, 4, 8), (3, 3, 3), 2, 3, seed=20)


# (input shape, kernel shape, fn(x, kernel, impl)): the custom JVPs of each path.
FORWARD_MODE_CASES = {
    "3d_stride2": ((2, 6, 5, 4, 2), (3, 3, 3, 2, 2),
                   lambda x, k, impl: cl.conv(x, k, (2, 2, 2), ((0, 1),) * 3, impl=impl)),
    "2d_stride2_k4": ((2, 8, 6, 3), (4, 4, 3, 2),
                      lambda x, k, impl: cl.conv(x, k, (2, 2), ((1, 1),) * 2, impl=impl)),
    "2d_transposed_k4": ((2, 3, 4, 3), (4, 4, 3, 2),
                         lambda x, k, impl: cl.conv_transpose(x, k, (2, 2), (1, 1),
                                                              impl=impl)),
}


@pytest.mark.parametrize("case", list(FORWARD_MODE_CASES))
@pytest.mark.parametrize("path_name", ["rewrite", "im2col"])
def test_forward_mode_and_nested_grad_match_xla(monkeypatch, case, path_name):
    """``jax.jvp`` and a grad through a one-step lookahead (learning to reweight) work.

    The custom JVPs must keep forward mode working, and a gradient with respect to a
    per-pixel weight ``eps`` of a loss at ``theta - a * grad_theta sum(eps * l)``
    differentiates the fast kernel and input gradients with respect to their cotangent.
    (Differentiating a kernel gradient in ``x`` is checked with ``vmap`` below.)
    """
    if path_name == "im2col" and case == "3d_stride2":
        pytest.skip("im2col is 2D only: a 3D case takes the 'rewrite' lowering, tested there")
    _force_path(monkeypatch, path_name)
    x_shape, k_shape, fn = FORWARD_MODE_CASES[case]
    x, kernel = _random(30, x_shape), _random(31, k_shape)
    target = _random(32, jax.eval_shape(lambda: fn(x, kernel, "xla")).shape)

    def loss_map(x, kernel, impl):
        return jnp.abs(fn(x, kernel, impl) - target)

    def lookahead(eps, x, impl):
        inner = jax.grad(lambda k, x: jnp.sum(eps * loss_map(x, k, impl)),
                         argnums=(0, 1))(kernel, x)
        return jnp.sum(loss_map(x - 0.1 * inner[1], kernel - 0.1 * inner[0], impl) ** 2)

    tangents = (_random(33, x.shape), _random(34, kernel.shape))
    eps = jnp.ones(target.shape)
    results = {}
    for impl in ("xla", "cpu_fast"):
        results[impl] = (
            jax.jvp(lambda x, k: loss_map(x, k, impl), (x, kernel), tangents),
            jax.jit(jax.grad(lookahead), static_argnums=2)(eps, x, impl))
    jax.tree_util.tree_map(lambda a, e: _assert_close(a, e, "jvp/nested grad"),
                           results["cpu_fast"], results["xla"])


# Tiny models of the pix2pix workloads: (model kwargs, input shape).
MODEL_CASES = {
    "unet_2d": (UNetGenerator, dict(ngf=4, num_downs=4, dropout_rate=0.0), (2, 16, 16, 1)),
    "patchgan_2d": (PatchDiscriminator, dict(ndf=4, n_layers=3), (2, 32, 32, 2)),
    "unet_3d": (UNetGenerator, dict(ngf=2, num_downs=3, dropout_rate=0.0), (1, 8, 8, 8, 1)),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_models_match_between_impls(case):
    """pix2pix's tiny U-Nets and PatchGAN: same output and parameter gradient.

    At the default size rule, so the innermost layers take im2col and the outer ones
    the rewrites, as in the full-size models.
    """
    model_cls, kwargs, x_shape = MODEL_CASES[case]
    x = _random(50, x_shape)
    call = {"train": False} if model_cls is UNetGenerator else {}
    params = model_cls(conv_impl="xla", **kwargs).init(jax.random.key(0), x, **call)
    outputs = {}
    for impl in ("xla", "cpu_fast"):
        model = model_cls(conv_impl=impl, **kwargs)
        assert jax.tree_util.tree_structure(model.init(jax.random.key(0), x, **call)) == \
            jax.tree_util.tree_structure(params)

        def loss(params, x, model=model):
            y = model.apply(params, x, **call)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
        outputs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, x)
    (_, y_fast), (g_fast, gx_fast) = outputs["cpu_fast"]
    (_, y_xla), (g_xla, gx_xla) = outputs["xla"]
    _assert_close(y_fast, y_xla, "output")
    _assert_close(gx_fast, gx_xla, "input grad")
    tree_scale = max(float(jnp.max(jnp.abs(e))) for e in jax.tree_util.tree_leaves(g_xla))
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(g_fast),
                            jax.tree_util.tree_leaves(g_xla)):
        name = f"param grad {jax.tree_util.keystr(path)}"
        if float(jnp.max(jnp.abs(e))) < 1e-4 * tree_scale:
            # A bias before an instance norm: its true gradient is 0, both are rounding.
            assert float(jnp.max(jnp.abs(a))) < 1e-4 * tree_scale, name
        else:
            _assert_close(a, e, name)


def test_resolve_impl():
    assert cl.resolve_impl("auto") == ("cpu_fast" if jax.default_backend() == "cpu"
                                       else "xla")
    assert cl.resolve_impl("xla") == "xla"
    with pytest.raises(ValueError, match="unknown conv_impl"):
        cl.resolve_impl("cudnn")


# ---------------------------------------------------------------- vmap (seeds as one program)
# One case per cpu_fast rewrite: (forced path, module settings, input shape of one
# example, kernel shape, op, strides, padding: (low, high) pairs for "conv", PyTorch's
# padding for "conv_transpose").
VMAP_CASES = {
    "2d_stride1_x_patches_groups": (
        "rewrite", dict(_patch_the_cotangent=lambda *a: False, _PATCH_BYTES_PER_STEP=1,
                        _POSITIONS_PER_BLOCK=8),
        (2, 6, 5, 3), (3, 3, 3, 4), "conv", (1, 1), ((1, 1), (1, 1))),
    "2d_stride1_g_patches": ("rewrite", dict(_patch_the_cotangent=lambda *a: True),
                             (2, 6, 5, 3), (3, 2, 3, 4), "conv", (1, 1), ((1, 1), (0, 1))),
    "3d_via_2d": ("rewrite", {}, (1, 4, 5, 3, 2), (3, 3, 3, 2, 3), "conv", (1, 1, 1),
                  ((1, 1),) * 3),
    "2d_stride2": ("rewrite", {}, (2, 8, 6, 3), (4, 4, 3, 5), "conv", (2, 2),
                   ((1, 1), (1, 1))),
    "2d_transposed_phases": ("rewrite", {}, (2, 3, 4, 3), (4, 4, 3, 2), "conv_transpose",
                             (2, 2), (1, 1)),
    "2d_im2col": ("im2col", {}, (2, 4, 3, 5), (3, 3, 5, 6), "conv", (2, 1),
                  ((1, 1), (1, 1))),
    "2d_transposed_im2col": ("im2col", {}, (2, 3, 2, 4), (4, 4, 4, 3), "conv_transpose",
                             (2, 2), (1, 1)),
}


def _lax_reference(op, strides, padding, k_shape):
    """The same convolution as XLA's own ``lax.conv_general_dilated``, independently of
    ``conv_lowering`` (a transposed convolution as the zero-interleaved correlation)."""
    nd = len(strides)
    spatial = "DHW"[-nd:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    if op == "conv":
        return lambda x, k: lax.conv_general_dilated(x, k, strides, padding,
                                                     dimension_numbers=dn)
    pads = [(k - 1 - p, k - 1 - p) for k, p in zip(k_shape[:nd], padding)]
    return lambda x, k: lax.conv_general_dilated(x, k, (1,) * nd, pads,
                                                 lhs_dilation=strides, dimension_numbers=dn)


@pytest.mark.parametrize("case", list(VMAP_CASES))
def test_vmap_matches_a_loop_of_lax_convolutions(monkeypatch, case):
    """Seeds as one program: ``vmap`` over a leading axis of ``(x, kernel)``.

    The vmapped value, ``vmap(grad)`` and ``grad`` of a vmapped loss (input and kernel
    gradients) equal a loop over the examples of ``lax.conv_general_dilated``. A
    gradient of the kernel gradient in ``x`` (reverse over reverse, vmapped) equals the
    same of the loop: the kernel-gradient rewrites are ordinary differentiable ops.
    """
    path, settings, x_shape, k_shape, op, strides, padding = VMAP_CASES[case]
    _force_path(monkeypatch, path)
    for name, value in settings.items():
        monkeypatch.setattr(cl_cpu, name, value)
    fast = (functools.partial(cl.conv, strides=strides, padding=padding, impl="cpu_fast")
            if op == "conv" else
            functools.partial(cl.conv_transpose, strides=strides, padding=padding,
                              impl="cpu_fast"))
    reference = _lax_reference(op, strides, padding, k_shape)
    n = 3
    xs, ks = _random(70, (n, *x_shape)), _random(71, (n, *k_shape))
    cts = _random(72, (n, *jax.eval_shape(reference, xs[0], ks[0]).shape))

    def derived(conv):
        def loss(x, k, ct):
            return jnp.sum(conv(x, k) * ct)

        def kernel_grad_norm(x, k, ct):  # differentiated in x: a second-order use
            return jnp.sum(jax.grad(loss, argnums=1)(x, k, ct) ** 2)

        return loss, kernel_grad_norm

    loss, kernel_grad_norm = derived(fast)

    @jax.jit
    def vmapped(xs, ks, cts):
        return (jax.vmap(fast)(xs, ks),
                *jax.vmap(jax.grad(loss, argnums=(0, 1)))(xs, ks, cts),
                *jax.grad(lambda xs, ks: jnp.sum(jax.vmap(loss)(xs, ks, cts)),
                          argnums=(0, 1))(xs, ks),
                jax.vmap(jax.grad(kernel_grad_norm))(xs, ks, cts))

    ref_loss, ref_kernel_grad_norm = derived(reference)

    @jax.jit
    def one_example(x, k, ct):
        grads = jax.grad(ref_loss, argnums=(0, 1))(x, k, ct)
        return (reference(x, k), *grads, *grads, jax.grad(ref_kernel_grad_norm)(x, k, ct))

    looped = [one_example(xs[i], ks[i], cts[i]) for i in range(n)]
    names = ("value", "vmap(grad) input", "vmap(grad) kernel", "grad(vmap) input",
             "grad(vmap) kernel", "vmap(grad(kernel grad)) input")
    for name, actual, *expected in zip(names, vmapped(xs, ks, cts), *looped):
        _assert_close(actual, np.stack(expected), name)


def test_vmapped_pix2pix_train_step_equals_each_seed_alone():
    """``ablate --vmap`` of pix2pix tiny on the CPU lowering: per-seed equal results.

    ``vmap`` of ``create_state`` and of two ``train_step`` calls, as
    :func:`sct_jax.training.loop.train_seeds` runs them (keys split from ``key(seed)``), equal
    each seed's state and steps run alone: the losses, Adam's first moments (the
    gradients) and the parameters.
    """
    config = load_config_file("configs/pix2pix_pelvis.py:tiny")
    config.model.conv_impl = "cpu_fast"
    method = methods.get_method(config.method)
    b, (h, w) = int(config.train.batch_size), config.data.crop
    spec = {k: jax.ShapeDtypeStruct((b, h, w, 1), jnp.float32) for k in ("mr", "ct")}
    seeds = (0, 1, 2)
    keys = [jax.random.split(jax.random.key_data(jax.random.key(s))) for s in seeds]
    init_rngs, base_rngs = (jnp.stack([k[i] for k in keys]) for i in (0, 1))
    # The tiny config's masked L1 needs a body mask: the whole crop, so that the loss is
    # the whole-slice L1 the tolerances below were set with (a box mask leaves gradient
    # entries near zero, where float32 summation order shows at the 1e-3 level).
    mask = jnp.ones((len(seeds), b, h, w, 1), jnp.float32)
    batches = [{"mr": _random(80 + t, (len(seeds), b, h, w, 1)),
                "ct": jnp.tanh(_random(90 + t, (len(seeds), b, h, w, 1))),
                "mask": mask} for t in (0, 1)]
    create = functools.partial(method.create_state, config, batch_spec=spec)
    step = functools.partial(method.train_step, config)

    state = jax.jit(jax.vmap(create))(init_rngs)
    step_vmapped = jax.jit(jax.vmap(step))
    vmapped_metrics = []
    for batch in batches:
        state, metrics = step_vmapped(state, batch, base_rngs)
        vmapped_metrics.append(metrics)

    create_one, step_one = jax.jit(create), jax.jit(step)
    lr = float(config.optim.lr)
    for i in range(len(seeds)):
        alone = create_one(init_rngs[i])
        for t, batch in enumerate(batches):
            alone, metrics = step_one(alone, {k: v[i] for k, v in batch.items()},
                                      base_rngs[i])
            for name in ("loss", "d_loss", "g_adv", "g_l1"):
                np.testing.assert_allclose(vmapped_metrics[t][name][i], metrics[name],
                                           rtol=1e-4, err_msg=f"seed {i} step {t} {name}")
        mine = jax.tree.map(lambda x: x[i], state)
        for net in ("gen", "disc"):
            # Adam's first moments hold the gradients (relative to the largest); the
            # parameters moved by ~lr per step, a gradient of rounding noise (a bias
            # before an instance norm) by up to that in either direction.
            mu, mu_alone = (jax.tree.leaves(s[net].opt_state[0].mu) for s in (mine, alone))
            scale = max(float(jnp.max(jnp.abs(m))) for m in mu_alone)
            for a, e in zip(mu, mu_alone):
                np.testing.assert_allclose(a, e, rtol=0, atol=1e-4 * scale)
            for a, e in zip(jax.tree.leaves(mine[net].params),
                            jax.tree.leaves(alone[net].params)):
                np.testing.assert_allclose(a, e, rtol=0, atol=2.01 * lr * len(batches))
