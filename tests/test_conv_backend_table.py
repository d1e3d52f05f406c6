"""``conv_impl="auto"`` per backend (the table in ``conv_lowering``) and the ``phases``
lowering it picks for transposed convolutions on GPU, checked on the CPU.

``phases`` must equal ``xla`` (itself checked against float64 numpy in
``test_conv_lowering.py``) in value and both gradients, and its gradient program must
contain no ``lhs_dilation``: the GPU slow path (jax-ml/jax#31662) it exists to avoid.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.models import conv_lowering as cl

# (spatial, kernel, C_in, C_out, strides, padding, output_padding): PyTorch's meaning.
CASES = {
    "2d_k4_s2_p1_pix2pix": ((7, 8), (4, 4), 3, 4, (2, 2), (1, 1), None),
    "2d_k3_s2_p1_op1_pgan": ((5, 6), (3, 3), 3, 4, (2, 2), (1, 1), (1, 1)),
    "2d_k3_s2_p2_crops": ((7, 8), (3, 3), 2, 3, (2, 2), (2, 2), (1, 0)),
    "3d_k4_s2_p1": ((4, 5, 3), (4, 4, 4), 3, 2, (2, 2, 2), (1, 1, 1), None),
    "3d_mixed_stride": ((3, 4, 5), (3, 4, 3), 2, 3, (2, 2, 1), (1, 1, 0), (1, 0, 0)),
}


@pytest.mark.parametrize("backend,op,expected", [
    ("cpu", "conv", "cpu_fast"), ("cpu", "conv_transpose", "cpu_fast"),
    ("gpu", "conv", "xla"), ("gpu", "conv_transpose", "phases"),
    ("cuda", "conv_transpose", "phases"), ("rocm", "conv_transpose", "phases"),
    ("tpu", "conv", "xla"), ("tpu", "conv_transpose", "xla"),
    ("metal", "conv_transpose", "xla"),
])
def test_auto_follows_the_backend_table(backend, op, expected):
    assert cl.resolve_impl("auto", op, backend=backend) == expected
    # An explicit choice is never overridden by the table.
    assert cl.resolve_impl("xla", op, backend=backend) == "xla"


def test_auto_defaults_to_this_backend_and_rejects_unknown_names():
    here = cl.AUTO_BY_BACKEND.get(jax.default_backend(), {"conv": "xla"})["conv"]
    assert cl.resolve_impl("auto") == here
    with pytest.raises(ValueError, match="unknown conv_impl"):
        cl.resolve_impl("cudnn", "conv", backend="gpu")
    with pytest.raises(ValueError, match="unknown convolution op"):
        cl.resolve_impl("auto", "deconv", backend="gpu")


def _random(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _fn(case, impl):
    _, _, _, _, strides, padding, output_padding = CASES[case]
    return lambda x, w: cl.conv_transpose(x, w, strides, padding, output_padding, impl=impl)


def _inputs(case):
    spatial, k, c_in, c_out = CASES[case][:4]
    x, w = _random(0, (2, *spatial, c_in)), _random(1, (*k, c_in, c_out))
    g = _random(2, jax.eval_shape(_fn(case, "xla"), x, w).shape)
    return x, w, g


def _value_and_grads(fn, x, w, g):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize("case", list(CASES))
def test_phases_equal_xla_with_gradients(case):
    x, w, g = _inputs(case)
    expected = jax.jit(lambda *a: _value_and_grads(_fn(case, "xla"), *a))(x, w, g)
    actual = jax.jit(lambda *a: _value_and_grads(_fn(case, "phases"), *a))(x, w, g)
    for name, a, e in zip(("output", "input grad", "kernel grad"), actual, expected):
        e = np.asarray(e, np.float64)
        assert a.shape == e.shape, name
        error = np.max(np.abs(np.asarray(a, np.float64) - e)) / np.max(np.abs(e))
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


def _lhs_dilations(fn, *args):
    """``lhs_dilation`` of every convolution in ``fn``'s program (nested ones included)."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append(tuple(eqn.params["lhs_dilation"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("case", ["2d_k4_s2_p1_pix2pix", "3d_k4_s2_p1"])
def test_phases_and_their_gradients_have_no_lhs_dilation(case):
    x, w, g = _inputs(case)
    phases = _lhs_dilations(lambda *a: _value_and_grads(_fn(case, "phases"), *a), x, w, g)
    xla = _lhs_dilations(lambda *a: _value_and_grads(_fn(case, "xla"), *a), x, w, g)
    assert phases and all(d == (1,) * len(d) for d in phases), phases
    assert any(max(d) > 1 for d in xla)  # the lowering the GPU entry avoids


def test_gpu_table_entry_reaches_the_layer(monkeypatch):
    """A model layer with ``conv_impl="auto"`` on a (pretended) GPU traces the phases."""
    from sct_jax.models.layers import ConvTranspose
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    layer = ConvTranspose(features=3, kernel_size=(4, 4), strides=(2, 2), padding=(1, 1))
    x = _random(3, (1, 5, 6, 2))
    params = layer.init(jax.random.key(0), x)
    grad_fn = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1))
    dilations = _lhs_dilations(grad_fn, params, x)
    assert dilations and all(d == (1, 1) for d in dilations)
