"""Single-convolution benchmark of every lowering in ``sct_jax.models.conv_lowering``.

    sct-bench conv                       # all workloads: xla, phases, cpu_fast
    sct-bench conv --workloads conv3d_k3s1_48 --impls xla,cpu_fast,sum2d,concat_in

(``sct-bench conv`` is ``python -m sct_jax.bench.conv``.) It runs on whatever backend
JAX has, so the rows of one run compare the choices of
``conv_lowering.AUTO_BY_BACKEND`` there: each row says which lowering ``auto`` picks
for its operation on this backend (``auto_picks``). Prints one JSON line per
(workload, impl, direction) (the fields of :func:`sct_jax.bench.timing.report`),
``direction`` being ``fwd`` or ``fwd_bwd`` (output, input gradient and kernel gradient,
as training computes them). ``flops`` are the useful FLOPs of the convolution
(``2 * MACs``, times 3 for ``fwd_bwd``), the same for every impl, so ``gflops`` compare
directly; XLA's own count is in ``cost_analysis_flops`` (it counts the zeros that the
``xla`` transposed convolution multiplies). ``speedup_vs_xla`` compares with the ``xla``
line of the same run (the machine may be shared: repeat and compare ratios).

Besides ``xla``, ``phases`` and ``cpu_fast``, ``--impls`` takes variants kept for the record
(measured slower than ``cpu_fast``, see the module docstring of ``conv_lowering``):
``sum2d`` and ``concat_in`` replace the 3D-as-2D step of ``cpu_fast`` (a sum of ``k_d``
2D convolutions of shifted depth slices; the shifted slices stacked on the input
channels), ``union`` computes a transposed convolution's phases as one convolution
with the union of their windows and ``2^d * C_out`` output channels. Switches of
``cpu_fast``'s own choices: ``no_im2col`` (never im2col), ``im2col`` (always, 2D),
``xla_s2_grads`` (XLA's gradients for 2D stride-2 convolutions), ``x_patches`` and
``g_patches`` (one form of the stride-1 kernel gradient).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.bench.timing import matmul_peak_gflops, report, time_jitted
from sct_jax.models import conv_lowering as cl
from sct_jax.models import conv_lowering_cpu as cl_cpu

# name: (transposed, batch, spatial, C_in, C_out, k, stride, padding, output_padding).
# Conv padding is (low, high) per axis; transposed padding is PyTorch's ``padding``.
WORKLOADS = {
    "conv3d_k3s1_48": (False, 1, (48, 48, 48), 32, 32, 3, 1, (1, 1), None),
    "conv3d_k3s2_ldm_down": (False, 1, (64, 64, 64), 32, 32, 3, 2, (0, 1), None),
    "conv3d_k4s2_pix2pix": (False, 1, (48, 48, 48), 32, 64, 4, 2, (1, 1), None),
    "convT3d_k4s2_pix2pix": (True, 1, (24, 24, 24), 64, 32, 4, 2, 1, None),
    "conv2d_k4s2_pix2pix": (False, 4, (128, 128), 64, 128, 4, 2, (1, 1), None),
    "convT2d_k4s2_pix2pix": (True, 2, (64, 64), 256, 64, 4, 2, 1, None),
    "conv2d_k3s1_pgan_res": (False, 1, (80, 48), 256, 256, 3, 1, (1, 1), None),
    "conv2d_k3s2_pgan": (False, 2, (320, 192), 64, 128, 3, 2, (1, 1), None),
    "convT2d_k3s2op1_pgan": (True, 2, (80, 48), 256, 128, 3, 2, 1, 1),
    # unet_256 at batch 1: an inner down and up layer, the outermost up layer, and
    # the PatchGAN's last two layers (C_out = 512 and 1).
    "conv2d_k4s2_unet_d4": (False, 1, (16, 16), 512, 512, 4, 2, (1, 1), None),
    "convT2d_k4s2_unet_u5": (True, 1, (4, 4), 1024, 512, 4, 2, 1, None),
    "convT2d_k4s2_unet_u1": (True, 1, (64, 64), 256, 64, 4, 2, 1, None),
    "convT2d_k4s2_unet_u0": (True, 1, (128, 128), 128, 1, 4, 2, 1, None),
    "conv2d_k4s1_patchgan_c3": (False, 1, (32, 32), 256, 512, 4, 1, (1, 1), None),
    "conv2d_k4s1_patchgan_logits": (False, 1, (31, 31), 512, 1, 4, 1, (1, 1), None),
}

# cpu_fast with one of its choices switched: impl name -> conv_lowering(_cpu) attributes.
SWITCHES = {
    "no_im2col": {"_IM2COL_MAX_ROWS_PER_OUTPUT_CHANNEL": 0.0,
                  "_IM2COL_TRANSPOSED_MAX_ROWS_PER_OUTPUT_CHANNEL": 0.0},
    "im2col": {"_IM2COL_MAX_ROWS_PER_OUTPUT_CHANNEL": 1e9,
               "_IM2COL_TRANSPOSED_MAX_ROWS_PER_OUTPUT_CHANNEL": 1e9},
    "xla_s2_grads": {"_STRIDE2_CUSTOM_GRADIENTS": False},
    "x_patches": {"_patch_the_cotangent": lambda *args: False},
    "g_patches": {"_patch_the_cotangent": lambda *args: True},
}


# ----------------------------------------------------------------- variants on record
def _conv3d_sum2d(x, kernel, padding):
    """3D stride-1 conv as ``k_d`` 2D convs of shifted depth slices, summed."""
    kd = kernel.shape[0]
    x = cl_cpu._pad_or_crop(x, [padding[0], (0, 0), (0, 0)])
    b, d_pad, h, w, c = x.shape
    d_out = d_pad - kd + 1
    total = 0
    for j in range(kd):
        y = cl_cpu._conv2d_stride1(x[:, j:j + d_out].reshape(b * d_out, h, w, c),
                                   kernel[j], tuple(padding[1:]))
        total = total + y.reshape(b, d_out, *y.shape[1:])
    return total


def _conv3d_concat_in(x, kernel, padding):
    """3D stride-1 conv as one 2D conv of the shifted slices stacked on channels."""
    kd, kh, kw, c, c_out = kernel.shape
    x = cl_cpu._pad_or_crop(x, [padding[0], (0, 0), (0, 0)])
    b, d_pad, h, w, _ = x.shape
    d_out = d_pad - kd + 1
    stacked = jnp.concatenate([x[:, j:j + d_out] for j in range(kd)], axis=-1)
    y = cl_cpu._conv2d_stride1(stacked.reshape(b * d_out, h, w, kd * c),
                               jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kd * c, c_out),
                               tuple(padding[1:]))
    return y.reshape(b, d_out, *y.shape[1:])


def _conv_transpose_union(x, kernel, strides, padding, output_padding):
    """Stride-2 transposed conv as one conv with the union window of all phases."""
    nd = x.ndim - 2
    output_padding = output_padding or (0,) * nd
    selectors, pads, outs = [], [], []
    for a in range(nd):
        n, k, p, op = x.shape[1 + a], kernel.shape[a], padding[a], output_padding[a]
        out = (n - 1) * 2 - 2 * p + k + op
        low = k - 1 - p
        cs = [(low - r) % 2 for r in (0, 1)]
        offsets = [(r + c - low) // 2 for r, c in zip((0, 1), cs)]
        taps = [len(range(c, k, 2)) for c in cs]
        u_min = min(offsets)
        u_len = max(o + t for o, t in zip(offsets, taps)) - u_min
        sel = np.zeros((u_len, 2, k), np.float32)  # union tap u, phase r <- tap j
        for r in (0, 1):
            for t in range(taps[r]):
                sel[offsets[r] + t - u_min, r, cs[r] + 2 * t] = 1.0
        m = (out + 1) // 2
        selectors.append(sel)
        pads.append((-u_min, (m - 1) + (u_len - 1) + u_min - (n - 1)))
        outs.append(out)
    w = kernel
    for a, sel in enumerate(selectors):  # contract tap axis a, append its phase axis
        w = jnp.moveaxis(jnp.tensordot(sel, w, axes=[[2], [a]]), 1, -1)
        w = jnp.moveaxis(w, 0, a)
    # w: (*U, C_in, C_out, r_0, ..., r_{nd-1}) -> (*U, C_in, (r..., C_out)).
    w = jnp.moveaxis(w, nd + 1, -1)
    w = w.reshape(*w.shape[:nd], kernel.shape[-2], -1)
    y = cl_cpu._conv_stride1_fast(x, w, pads)
    y = cl_cpu._depth_to_space(y, list(range(nd)))
    return y[(slice(None),) + tuple(slice(0, o) for o in outs)]


@contextlib.contextmanager
def _patched(impl: str) -> Iterator[None]:
    """Temporarily replaces ``conv_lowering(_cpu)`` attributes for a variant (traced inside)."""
    patch = dict(SWITCHES.get(impl, {}))
    variant = {"sum2d": _conv3d_sum2d, "concat_in": _conv3d_concat_in}.get(impl)
    if variant is not None:
        patch["_conv3d_via_2d"] = variant
    # Each attribute is replaced in the module that defines (and reads) it.
    owner = {name: cl_cpu if name in vars(cl_cpu) else cl for name in patch}
    original = {name: getattr(owner[name], name) for name in patch}
    for name, value in patch.items():
        setattr(owner[name], name, value)
    try:
        yield
    finally:
        for name, value in original.items():
            setattr(owner[name], name, value)


def _make_fn(spec, impl: str) -> Callable:
    transposed, _, spatial, _, _, k, s, pad, op = spec
    nd = len(spatial)
    if transposed:
        args = ((s,) * nd, (pad,) * nd, None if op is None else (op,) * nd)
        if impl == "union":
            return lambda x, w: _conv_transpose_union(x, w, *args)
        return lambda x, w: cl.conv_transpose(x, w, *args, impl=impl)
    return lambda x, w: cl.conv(x, w, (s,) * nd, (pad,) * nd, impl=impl)


def _useful_flops(spec) -> float:
    transposed, batch, spatial, c_in, c_out, k, s, pad, op = spec
    nd = len(spatial)
    if transposed:  # every input element meets every tap once
        positions = batch * math.prod(spatial)
    else:
        positions = batch * math.prod((n + sum(pad) - k) // s + 1 for n in spatial)
    return 2.0 * positions * k ** nd * c_in * c_out


def run(workloads, impls, directions, steps: int) -> None:
    peak = matmul_peak_gflops()
    for name in workloads:
        spec = WORKLOADS[name]
        transposed, batch, spatial, c_in, c_out, k = spec[:6]
        nd = len(spatial)
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (batch, *spatial, c_in), jnp.float32)
        w = jax.random.normal(keys[1], (k,) * nd + (c_in, c_out), jnp.float32) * 0.05
        baseline = {}
        for impl in impls:
            if impl in ("sum2d", "concat_in") and nd != 3:
                continue
            if impl == "union" and not transposed:
                continue
            fn = _make_fn(spec, impl if impl in (*cl.IMPLS, "union") else "cpu_fast")
            y_shape = jax.eval_shape(fn, x, w).shape
            g = jax.random.normal(keys[2], y_shape, jnp.float32)

            def fwd_bwd(x, w, g, fn=fn):
                y, vjp = jax.vjp(fn, x, w)
                return (y, *vjp(g))

            for direction in directions:
                with _patched(impl):
                    if direction == "fwd":
                        timing = time_jitted(fn, (x, w), steps=steps)
                    else:
                        timing = time_jitted(fwd_bwd, (x, w, g), steps=steps)
                flops = _useful_flops(spec) * (1 if direction == "fwd" else 3)
                if impl == "xla":
                    baseline[direction] = timing["s_per_step_median"]
                extra = {}
                if direction in baseline:
                    extra["speedup_vs_xla"] = round(
                        baseline[direction] / timing["s_per_step_median"], 2)
                report(f"{name}/{direction}", batch, spatial, flops,
                       timing["s_per_step_median"], peak, timing["compile_s"],
                       impl=impl, direction=direction, c_in=c_in, c_out=c_out,
                       auto_picks=cl.resolve_impl(
                           "auto", "conv_transpose" if transposed else "conv"),
                       cost_analysis_flops=timing["flops"],
                       s_per_step_all=[round(t, 5) for t in timing["s_per_step_all"]],
                       **extra)
    report("matmul_2048", 1, (2048, 2048), 2.0 * 2048 ** 3,
           2.0 * 2048 ** 3 / (matmul_peak_gflops() * 1e9), peak, 0.0,
           note="matmul peak re-measured at the end of the run")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--impls", default="xla,phases,cpu_fast",
                        help="xla, phases, cpu_fast, auto, the variants sum2d, concat_in, "
                             "union, and the "
                             f"switches {', '.join(SWITCHES)}")
    parser.add_argument("--directions", default="fwd,fwd_bwd")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="two small workloads, fwd_bwd, 2 steps (checks that it runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.directions, args.steps = (
            "conv2d_k4s2_unet_d4,convT2d_k4s2_unet_u5", "fwd_bwd", 2)
    run(args.workloads.split(","), args.impls.split(","), args.directions.split(","),
        args.steps)


if __name__ == "__main__":
    main()
