"""Spatial learning-to-reweight (Ren et al. 2018, per pixel as in seed 02).

For a training batch with per-pixel loss map ``l(theta) = |y - f(x; theta)|`` and a
per-pixel ``eps`` of the same shape, one virtual SGD step

    theta'(eps) = theta - alpha * grad_theta sum(eps * l(theta))

is scored on a well-registered validation batch, ``L_val(theta')`` (the plain mean L1).
The pixel's raw score is ``u = -dL_val(theta'(eps))/d eps`` at ``eps = 0``, the weight
map ``w = max(u, 0) / sum(max(u, 0))`` over the whole mini-batch (left all zero when
nothing is positive), and the real update minimises ``sum(w * l)`` in place of the
plain L1 term (ref: uber-research/learning-to-reweight-examples).

Two forms of the same ``u``, chosen by ``method``:

- ``"lookahead"``: the literal definition, a ``jax.grad`` with respect to ``eps``
  through the one-step lookahead, itself a gradient with respect to ``theta``
  (reverse over reverse).
- ``"jvp"``: because ``eps = 0`` makes ``theta' = theta``, the chain rule gives
  ``u_p = alpha * <grad_theta l_p(theta), g_val>`` with ``g_val = grad L_val(theta)``:
  one forward-mode pass of ``theta -> l(theta)`` in the direction ``g_val``, with no
  second-order derivative.

``alpha`` only scales ``u``; the normalisation removes it (except that it decides
nothing when every ``u <= 0``). It is kept to reproduce the reference's raw ``u``.

Granularity (``granularity``): seed 02 weights every pixel (``"pixel"``); Ren et al.
weight every example (``"slice"``: one ``eps`` per slice of the batch); ``"patch"``
weights ``k x k`` tiles. A group ``g`` has the loss ``l_g = mean_{p in g} l_p`` and its
own ``eps_g``; the lookahead form differentiates with respect to the group-shaped
``eps`` literally, the jvp form averages the pixel scores (``u_g = mean_{p in g} u_p``,
the chain rule). The weights are normalised over the groups of the mini-batch and
spread over their pixels as ``w_p = w_g / |g|``, so ``sum(w * l) = sum_g w_g l_g``.
Per pixel, ``u_p = alpha * sign(f_p - y_p) * D_p`` with ``D_p = <grad f_p, g_val>``:
when ``D`` has one sign over most of the batch, per-pixel weights keep only the pixels
whose residual has the step's majority sign (a residual-sign filter that can drop a
whole tissue); pooled scores weigh the evidence of a group together.

Randomness: ``loss_map_fn`` and ``val_loss_fn`` must be deterministic functions of the
parameters. A generator with dropout closes over one fixed ``"dropout"`` key: the
lookahead differentiates ``l`` once more inside the eps-gradient, and the real update
must weight the very loss map the weights were computed for, so every evaluation of
``l`` in a step must draw the same mask (same key); likewise ``val_loss_fn``, which the
lookahead evaluates at ``theta'`` and the jvp form at ``theta``.

Cost (F/B: forward/backward of the generator; t: train batch, v: validation batch):
``"jvp"`` is ``F_v + B_v + F_t`` plus a tangent pass on the train batch, and
:func:`spatial_weights_and_pullback` then needs only ``B_t`` for the real update (the
train forward is linearised once and shared). ``"lookahead"`` shares the train forward
the same way (``jax.vjp`` once; its pullback is the inner gradient and the real
update's gradient) but also runs the inner gradient ``B_t`` on ``eps = 0``, which only
produces zeros that XLA cannot know to be zero, before transposing it
(``sct_jax/bench/meta_step.py``: about 1.2x and 1.43x the FLOPs of a plain step plus the
validation gradient). Written without the shared pullback, both forms cost the same
FLOPs under ``jax.jit``: XLA merges the duplicated train forward itself.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError

Params = Any
LossMapFn = Callable[[Params], Any]
ValLossFn = Callable[[Params], jax.Array]
Pullback = Callable[[Any], Params]

METHODS = ("jvp", "lookahead")
GRANULARITIES = ("pixel", "patch", "slice")


def check_method(method: str, config_key: str = "meta.method") -> str:
    """Returns ``method`` or raises :class:`ConfigError` naming ``config_key``."""
    if method not in METHODS:
        raise ConfigError(f"{config_key}: unknown reweighting method {method!r}; "
                          f"expected one of {METHODS}")
    return method


def check_granularity(granularity: str, patch_size: int = 1, image_hw=None,
                      config_key: str = "meta") -> str:
    """Returns ``granularity`` or raises :class:`ConfigError` naming ``config_key``.

    Args:
      granularity: ``"pixel"``, ``"patch"`` or ``"slice"``.
      patch_size: ``k`` of the ``k x k`` patches (``"patch"`` only); positive.
      image_hw: ``(H, W)`` of the weight maps, checked to be divisible by ``k``.
      config_key: the config section named in the message.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"config.{config_key}.granularity: unknown {granularity!r}; "
                          f"expected one of {GRANULARITIES}")
    if granularity == "patch":
        k = int(patch_size)
        if k < 1:
            raise ConfigError(f"config.{config_key}.patch_size={patch_size}: must be >= 1")
        if image_hw is not None and any(int(n) % k for n in image_hw):
            raise ConfigError(f"config.{config_key}.patch_size={k}: must divide the "
                              f"training crop {tuple(int(n) for n in image_hw)}")
    return granularity


def _group_factors(map_shape, granularity: str, patch_size: int) -> tuple[int, int]:
    """``(kh, kw)``: the pixels of one group along H and W."""
    _, h, w, _ = map_shape
    if granularity == "pixel":
        return 1, 1
    if granularity == "slice":
        return h, w
    return int(patch_size), int(patch_size)


def pool_groups(x: jax.Array, granularity: str = "pixel", patch_size: int = 1) -> jax.Array:
    """Mean of a ``(B, H, W, C)`` map over each group: ``(B, H/kh, W/kw, C)``."""
    kh, kw = _group_factors(x.shape, granularity, patch_size)
    if (kh, kw) == (1, 1):
        return x
    b, h, w, c = x.shape
    return x.reshape(b, h // kh, kh, w // kw, kw, c).mean(axis=(2, 4))


def expand_groups(g: jax.Array, map_shape, granularity: str = "pixel",
                  patch_size: int = 1) -> jax.Array:
    """A group map ``(B, H/kh, W/kw, C)`` repeated onto the pixels: ``map_shape``."""
    kh, kw = _group_factors(map_shape, granularity, patch_size)
    if (kh, kw) == (1, 1):
        return g
    return jnp.repeat(jnp.repeat(g, kh, axis=1), kw, axis=2)


def normalize_weights(u: jax.Array) -> jax.Array:
    """``max(u, 0)`` divided by its sum over the whole array; all zeros if that sum is 0.

    Args:
      u: raw scores, e.g. ``(B, H, W, 1)``, for one mini-batch.

    Returns:
      Non-negative weights of ``u``'s shape and dtype summing to 1 (or all zero).
    """
    clipped = jnp.maximum(u, 0)
    total = jnp.sum(clipped)
    # Dividing by 1 where the sum is 0 keeps the all-zero map (and no NaN in the graph).
    return clipped / jnp.where(total > 0, total, jnp.ones_like(total))


def weighted_l1(weights: jax.Array, loss_map: jax.Array) -> jax.Array:
    """``sum(weights * loss_map)``: the reweighted L1 term.

    A sum, not a mean: the weights already sum to 1 over the mini-batch (uniform weights
    ``1 / loss_map.size`` give back the mean L1).

    Args:
      weights: ``(B, H, W, 1)`` from :func:`spatial_weights` (treated as constants).
      loss_map: ``(B, H, W, 1)``, ``|y - f(x; theta)|``.

    Returns:
      A scalar.
    """
    if weights.shape != loss_map.shape:
        raise ValueError(f"weighted_l1: weights shape {weights.shape} != loss map shape "
                         f"{loss_map.shape}")
    return jnp.sum(jax.lax.stop_gradient(weights) * loss_map)


def _split_outputs(out: Any, has_outputs: bool) -> tuple[jax.Array, Any]:
    """``(loss_map, other_outputs)`` of a ``loss_map_fn`` result."""
    if not has_outputs:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("with has_outputs=True, loss_map_fn must return "
                         "(loss_map, outputs)")
    return out[0], out[1]


def _scores_stats(u: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Scalar summaries of the raw scores and weights, for logging."""
    positive = u > 0
    return {"u_mean": jnp.mean(u), "u_min": jnp.min(u), "u_max": jnp.max(u),
            "u_positive_fraction": jnp.mean(positive.astype(u.dtype)),
            "u_positive_sum": jnp.sum(jnp.where(positive, u, 0)),
            "weight_max": jnp.max(weights)}


def _finish(u: jax.Array, normalize: bool, map_shape=None, granularity: str = "pixel",
            patch_size: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Group weights from group scores ``u``, spread onto the pixels (``w_g / |g|``)."""
    weights = normalize_weights(u) if normalize else jnp.maximum(u, 0)
    weights = jax.lax.stop_gradient(weights)
    stats = _scores_stats(jax.lax.stop_gradient(u), weights)
    if map_shape is not None and tuple(map_shape) != tuple(u.shape):
        kh, kw = _group_factors(map_shape, granularity, patch_size)
        weights = expand_groups(weights, map_shape, granularity, patch_size) / (kh * kw)
    return weights, stats


def _zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


class Reweighting(NamedTuple):
    """Everything one reweighted step needs (see :func:`reweight`).

    Attributes:
      weights: ``(B, H, W, 1)`` pixel weights (stop-gradient), ``w_g / |g|`` per group.
      result: ``loss_map_fn(params)`` from the shared forward.
      pullback: cotangent of ``result`` -> gradient shaped like ``params``.
      stats: scalar summaries of the group scores ``u`` and the weights.
      scores: ``u`` per group, ``(B, H/kh, W/kw, 1)`` (``(B, H, W, 1)`` per pixel).
      output_tangent: ``"jvp"`` only, else None: the tangent of ``loss_map_fn``'s
        result in the direction ``g_val`` (with ``has_outputs``, ``(dl, dout)``: for a
        generator output ``f``, ``dout`` is ``D = <grad f, g_val>`` per pixel).
      tangent_of: ``"jvp"`` only, else None: ``direction_fn -> tangent of the result
        in the direction direction_fn(g_val)`` (say ``g_val`` restricted to one layer),
        evaluated on the shared linearisation.
    """

    weights: jax.Array
    result: Any
    pullback: Pullback
    stats: dict
    scores: jax.Array
    output_tangent: Any = None
    tangent_of: Callable | None = None


def reweight(loss_map_fn: LossMapFn, val_loss_fn: ValLossFn, params: Params, *,
             alpha: float = 1.0, method: str = "jvp", normalize: bool = True,
             has_outputs: bool = False, granularity: str = "pixel",
             patch_size: int = 1) -> Reweighting:
    """Learning-to-reweight weights at a granularity, with the shared-forward pullback.

    Args: as :func:`spatial_weights_and_pullback`, plus ``granularity`` (``"pixel"``,
    ``"patch"``, ``"slice"``) and ``patch_size`` (``k`` of the ``k x k`` patches; it
    must divide ``H`` and ``W``).

    Returns:
      A :class:`Reweighting`.

    Raises:
      ConfigError: unknown ``method`` or ``granularity``, or a patch size that does not
        divide the map.
    """
    check_method(method)
    check_granularity(granularity, patch_size)
    output_tangent = tangent_of = None
    if method == "jvp":
        out, linear_fn = jax.linearize(loss_map_fn, params)
        loss_map, _ = _split_outputs(out, has_outputs)
        check_granularity(granularity, patch_size, loss_map.shape[1:3])
        g_val = jax.grad(val_loss_fn)(params)
        output_tangent = linear_fn(g_val)
        jac_g, _ = _split_outputs(output_tangent, has_outputs)
        # u_g = alpha <grad l_g, g_val> with l_g the group's mean loss: pool u_p.
        u = pool_groups(alpha * jac_g, granularity, patch_size)
        transposed = jax.linear_transpose(linear_fn, params)

        def pullback(cotangent: Any) -> Params:
            return transposed(cotangent)[0]

        def tangent_of(direction_fn: Callable[[Params], Params]) -> Any:
            return linear_fn(direction_fn(g_val))
    else:
        out, vjp_fn = jax.vjp(loss_map_fn, params)
        loss_map, outputs = _split_outputs(out, has_outputs)
        check_granularity(granularity, patch_size, loss_map.shape[1:3])
        kh, kw = _group_factors(loss_map.shape, granularity, patch_size)

        def inner_grad(eps: jax.Array) -> Params:
            # grad_theta sum_g(eps_g * mean_{p in g} l_p) is the pullback of the
            # group eps spread over its pixels (divided by the group size).
            eps_map = expand_groups(eps, loss_map.shape, granularity, patch_size) / (kh * kw)
            cotangent = (eps_map, _zeros_like_tree(outputs)) if has_outputs else eps_map
            return vjp_fn(cotangent)[0]

        def lookahead_val_loss(eps: jax.Array) -> jax.Array:
            step = inner_grad(eps)
            lookahead = jax.tree_util.tree_map(lambda p, g: p - alpha * g, params, step)
            return val_loss_fn(lookahead)

        eps0 = jnp.zeros_like(pool_groups(loss_map, granularity, patch_size))
        u = -jax.grad(lookahead_val_loss)(eps0)

        def pullback(cotangent: Any) -> Params:
            return vjp_fn(cotangent)[0]
    weights, stats = _finish(u, normalize, loss_map.shape, granularity, patch_size)
    return Reweighting(weights, out, pullback, stats, jax.lax.stop_gradient(u),
                       output_tangent, tangent_of)


def spatial_weights_and_pullback(
        loss_map_fn: LossMapFn, val_loss_fn: ValLossFn, params: Params, *,
        alpha: float = 1.0, method: str = "jvp", normalize: bool = True,
        has_outputs: bool = False, granularity: str = "pixel", patch_size: int = 1,
) -> tuple[jax.Array, jax.Array, Pullback, dict[str, jax.Array]]:
    """Per-pixel weights plus the pullback of the train loss map, sharing its forward.

    The real update needs ``grad_theta sum(w * l)``: ``pullback(w)`` gives it from the
    residuals of the forward pass the weights were computed with, so a meta step runs
    the generator forward on the train batch once.

    Args:
      loss_map_fn: ``params -> (B, H, W, 1)`` per-pixel loss ``|y - f(x; params)|``;
        deterministic (close over a fixed dropout key). With ``has_outputs`` it returns
        ``(loss_map, outputs)``, ``outputs`` any differentiable pytree (say the
        generated image, for adversarial and perceptual terms).
      val_loss_fn: ``params -> scalar`` validation loss (mean L1 on the validation
        batch); deterministic.
      params: the generator parameters ``theta`` (a pytree of float arrays).
      alpha: the virtual step size; only scales ``u``.
      method: ``"jvp"`` or ``"lookahead"`` (see the module docstring).
      normalize: divide ``max(u, 0)`` by its sum; ``False`` returns ``max(u, 0)``.
      has_outputs: see ``loss_map_fn``.
      granularity, patch_size: see :func:`reweight` (default: per pixel, seed 02).

    Returns:
      ``(weights, result, pullback, stats)``: ``weights`` ``(B, H, W, 1)``
      (stop-gradient); ``result``, ``loss_map_fn(params)`` from the shared forward: the
      ``(B, H, W, 1)`` loss map, or with ``has_outputs`` ``(loss_map, outputs)`` (so the
      caller needs no second forward for the generated image); ``pullback`` mapping
      a cotangent of ``loss_map_fn``'s result (``ct_map`` or, with ``has_outputs``,
      ``(ct_map, ct_outputs)``) to a gradient shaped like ``params`` (a
      ``jax.tree_util.Partial`` or closure: call it inside the same trace), and scalar
      ``stats`` of ``u`` and the weights.

    Raises:
      ConfigError: unknown ``method`` or ``granularity``.
    """
    r = reweight(loss_map_fn, val_loss_fn, params, alpha=alpha, method=method,
                 normalize=normalize, has_outputs=has_outputs, granularity=granularity,
                 patch_size=patch_size)
    return r.weights, r.result, r.pullback, r.stats


def spatial_weights(
        loss_map_fn: LossMapFn, val_loss_fn: ValLossFn, params: Params, *,
        alpha: float = 1.0, method: str = "jvp", normalize: bool = True,
        granularity: str = "pixel", patch_size: int = 1,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Learning-to-reweight weights of a training batch (per pixel by default).

    Args:
      loss_map_fn: ``params -> (B, H, W, 1)`` per-pixel training loss
        ``|y - f(x; params)|``; deterministic (a generator with dropout closes over one
        fixed key, the same one the real update uses).
      val_loss_fn: ``params -> scalar``, the mean L1 on a well-registered validation
        batch; deterministic.
      params: the generator parameters ``theta``.
      alpha: the virtual step size. Only the scale of ``u``: the normalisation removes
        it, unless every ``u <= 0`` (then all weights are 0 whatever ``alpha``).
      method: ``"jvp"`` (one forward-mode pass, the default) or ``"lookahead"``
        (literal nested gradient); equal up to rounding.
      normalize: divide ``max(u, 0)`` by its sum over the mini-batch (all zeros when
        that sum is 0); ``False`` returns ``max(u, 0)``.
      granularity, patch_size: see :func:`reweight`.

    Returns:
      ``(weights, loss_map, stats)``: ``weights`` ``(B, H, W, 1)``, non-negative,
      summing to 1 (or all 0), stop-gradient; ``loss_map`` ``(B, H, W, 1)``, the
      training loss map at ``params`` (free: the primal of the jvp / vjp); ``stats``,
      scalars ``u_mean, u_min, u_max, u_positive_fraction, u_positive_sum,
      weight_max``.

    Raises:
      ConfigError: unknown ``method`` or ``granularity``.
    """
    check_method(method)
    check_granularity(granularity, patch_size)
    if method == "jvp":
        # No pullback wanted: a plain jvp keeps no residuals for a backward pass.
        g_val = jax.grad(val_loss_fn)(params)
        loss_map, jac_g = jax.jvp(loss_map_fn, (params,), (g_val,))
        check_granularity(granularity, patch_size, loss_map.shape[1:3])
        u = pool_groups(alpha * jac_g, granularity, patch_size)
        weights, stats = _finish(u, normalize, loss_map.shape, granularity, patch_size)
        return weights, loss_map, stats
    weights, loss_map, _, stats = spatial_weights_and_pullback(
        loss_map_fn, val_loss_fn, params, alpha=alpha, method=method,
        normalize=normalize, granularity=granularity, patch_size=patch_size)
    return weights, loss_map, stats
