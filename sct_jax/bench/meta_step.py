"""Cost of a learning-to-reweight generator step against the plain L1 step.

    sct-bench meta_step --small                 # ~1 min on a 2-core CPU
    sct-bench meta_step --model resnet          # seed 02: 320x192, B 6, val 32
    sct-bench meta_step --variants plain,jvp --batch 6 --val-batch 6

(``sct-bench meta_step`` is ``python -m sct_jax.bench.meta_step``.) Workloads (one JSON
line each, the fields of :func:`sct_jax.bench.timing.report`), every one a full jitted
generator update ending in Adam:

- ``plain``: forward, mean L1, backward, Adam (the pGAN generator step without its
  adversarial and perceptual terms);
- ``val_grad``: the gradient of the mean L1 on the validation batch alone, the part of
  the meta step no reformulation can remove (it is ``val_batch / batch`` plain steps);
- ``jvp``: :func:`sct_jax.meta.reweight.spatial_weights_and_pullback` with
  ``method="jvp"`` (train forward linearised once, tangent pass in the direction of the
  validation gradient, the real update by transposing the same linearisation);
- ``jvp_recompute``: ``spatial_weights`` then a fresh ``jax.grad`` of ``sum(w * l)``,
  as a method would write it without the pullback (XLA may or may not share the forward);
- ``lookahead``: ``method="lookahead"``, the literal nested gradient with the train
  forward shared through one ``jax.vjp``;
- ``lookahead_naive``: the definition typed as nested ``jax.grad`` calls, the forward
  recomputed in each.

Each line has ``ratio_to_plain`` and ``ratio_to_plain_plus_val_grad`` (when those were
run), in seconds and in XLA FLOPs (``flops_ratio_*``): the second is the overhead beyond
the unavoidable validation gradient. ``peak_rss_mb`` is the process's peak so far
(workloads run in the order given).

XLA's FLOP counts with ``--small`` (exact; seconds depend on the machine): the
``jvp`` step is 1.20x (U-Net) / 1.22x (ResNet) ``plain + val_grad`` in FLOPs (the extra
is the tangent pass, about two train forwards), ``lookahead`` 1.43x for both (plus one
train backward run on ``eps = 0``);
``jvp_recompute`` and ``lookahead_naive`` have exactly the FLOPs of ``jvp`` and
``lookahead``: XLA already merges the duplicated train forward. Against ``plain`` alone
the meta step cannot come near 1x: ``val_grad`` is ``val_batch / batch`` plain steps
(5.3 at seed 02's 32 / 6).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from sct_jax.bench.timing import matmul_peak_gflops, report, time_jitted
from sct_jax.meta.reweight import (normalize_weights, spatial_weights,
                                   spatial_weights_and_pullback, weighted_l1)
from sct_jax.models.resnet_generator import ResnetGenerator
from sct_jax.models.unet import UNetGenerator

VARIANTS = ("plain", "val_grad", "jvp", "jvp_recompute", "lookahead", "lookahead_naive")
DEFAULT_VARIANTS = ("plain", "val_grad", "jvp", "lookahead")


def build_model(name: str, ngf: int, num_downs: int, n_blocks: int, conv_impl: str
                ) -> tuple[Any, int]:
    """The generator and its input channels (pGAN's ResNet takes 3 MR slices)."""
    if name == "unet":
        return UNetGenerator(ngf=ngf, num_downs=num_downs, conv_impl=conv_impl), 1
    if name == "resnet":
        return ResnetGenerator(ngf=ngf, n_blocks=n_blocks, conv_impl=conv_impl), 3
    raise ValueError(f"--model must be unet or resnet, got {name!r}")


def make_steps(model: Any, tx: optax.GradientTransformation
               ) -> dict[str, Callable[..., Any]]:
    """Every variant as ``(params, opt_state, x, y, xv, yv, key) -> (params, opt_state,
    loss)``; ``x``: ``(B, H, W, C_in)``, ``y``: ``(B, H, W, 1)``, ``xv, yv`` the same with
    the validation batch size."""

    def fns(x, y, xv, yv, key):
        rngs = {"dropout": key}  # one key for every evaluation in the step
        loss_map_fn = lambda p: jnp.abs(y - model.apply({"params": p}, x, train=True,
                                                         rngs=rngs))
        val_loss_fn = lambda p: jnp.mean(jnp.abs(
            yv - model.apply({"params": p}, xv, train=True, rngs=rngs)))
        return loss_map_fn, val_loss_fn

    def adam(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def plain(params, opt_state, x, y, xv, yv, key):
        loss_map_fn, _ = fns(x, y, xv, yv, key)
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_map_fn(p)))(params)
        return (*adam(params, opt_state, grads), loss)

    def val_grad(params, opt_state, x, y, xv, yv, key):
        _, val_loss_fn = fns(x, y, xv, yv, key)
        loss, grads = jax.value_and_grad(val_loss_fn)(params)
        return (*adam(params, opt_state, grads), loss)

    def shared(method):
        def step(params, opt_state, x, y, xv, yv, key):
            loss_map_fn, val_loss_fn = fns(x, y, xv, yv, key)
            weights, loss_map, pullback, _ = spatial_weights_and_pullback(
                loss_map_fn, val_loss_fn, params, method=method)
            grads = pullback(weights)
            return (*adam(params, opt_state, grads), weighted_l1(weights, loss_map))
        return step

    def jvp_recompute(params, opt_state, x, y, xv, yv, key):
        loss_map_fn, val_loss_fn = fns(x, y, xv, yv, key)
        weights, _, _ = spatial_weights(loss_map_fn, val_loss_fn, params, method="jvp")
        loss, grads = jax.value_and_grad(
            lambda p: weighted_l1(weights, loss_map_fn(p)))(params)
        return (*adam(params, opt_state, grads), loss)

    def lookahead_naive(params, opt_state, x, y, xv, yv, key):
        loss_map_fn, val_loss_fn = fns(x, y, xv, yv, key)

        def lookahead_val_loss(eps):
            inner = jax.grad(lambda p: jnp.sum(eps * loss_map_fn(p)))(params)
            return val_loss_fn(jax.tree_util.tree_map(lambda p, g: p - g, params, inner))

        u = -jax.grad(lookahead_val_loss)(jnp.zeros(y.shape, y.dtype))
        weights = jax.lax.stop_gradient(normalize_weights(u))
        loss, grads = jax.value_and_grad(
            lambda p: weighted_l1(weights, loss_map_fn(p)))(params)
        return (*adam(params, opt_state, grads), loss)

    return {"plain": plain, "val_grad": val_grad, "jvp": shared("jvp"),
            "jvp_recompute": jvp_recompute, "lookahead": shared("lookahead"),
            "lookahead_naive": lookahead_naive}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("unet", "resnet"), default="unet")
    parser.add_argument("--small", action="store_true",
                        help="128x128, batch 2, val batch 4, ngf 16, 4 U-Net levels or "
                             "3 ResNet blocks: about a minute on a CPU")
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--val-batch", type=int, default=32)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--num-downs", type=int, default=6,
                        help="U-Net levels (320x192 allows at most 6)")
    parser.add_argument("--n-blocks", type=int, default=9, help="ResNet blocks")
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.small:
        args.height, args.width, args.batch, args.val_batch = 128, 128, 2, 4
        args.ngf, args.num_downs, args.n_blocks, args.steps = 16, 4, 3, 3
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark; returns the report lines (also printed as JSON)."""
    args = parse_args(argv)
    model, in_channels = build_model(args.model, args.ngf, args.num_downs, args.n_blocks,
                                     args.conv_impl)
    keys = jax.random.split(jax.random.key(0), 6)
    size = (args.height, args.width)

    def images(key, batch, channels):
        flat = jax.random.normal(key, (batch * args.height * args.width * channels,))
        return flat.reshape(batch, *size, channels)

    x = images(keys[0], args.batch, in_channels)
    y = jnp.tanh(images(keys[1], args.batch, 1))
    xv = images(keys[2], args.val_batch, in_channels)
    yv = jnp.tanh(images(keys[3], args.val_batch, 1))
    params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x[:1],
                                          train=True)["params"])(keys[4])
    tx = optax.adam(2e-4, b1=0.5)
    opt_state = tx.init(params)
    step_args = (params, opt_state, x, y, xv, yv, keys[5])
    steps = make_steps(model, tx)

    peak = matmul_peak_gflops()
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    seconds: dict[str, float] = {}
    flops: dict[str, float] = {}
    lines = []
    for name in args.variants.split(","):
        timing = time_jitted(steps[name], step_args, steps=args.steps)
        s = seconds[name] = timing["s_per_step_median"]
        flops[name] = timing["flops"]
        extra: dict[str, Any] = {}
        # FLOP ratios too: on a shared machine they are the stable part of the answer.
        for what, values in (("", seconds), ("flops_", flops)):
            if "plain" in values:
                extra[f"{what}ratio_to_plain"] = round(values[name] / values["plain"], 3)
            if "plain" in values and "val_grad" in values:
                extra[f"{what}ratio_to_plain_plus_val_grad"] = round(
                    values[name] / (values["plain"] + values["val_grad"]), 3)
        lines.append(report(
            f"meta_step_{name}", args.batch, size, timing["flops"], s, peak,
            timing["compile_s"], model=args.model, val_batch=args.val_batch,
            ngf=args.ngf, n_params=int(n_params), flops_source="xla cost_analysis",
            backend=jax.default_backend(),
            s_per_step_all=[round(t, 5) for t in timing["s_per_step_all"]], **extra))
    return lines


if __name__ == "__main__":
    main()
