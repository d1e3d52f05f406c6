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

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sct_jax.errors import ConfigError

Params = Any
LossMapFn = Callable[[Params], Any]
ValLossFn = Callable[[Params], jax.Array]
Pullback = Callable[[Any], Params]

METHODS = ("jvp", "lookahead")


def check_method(method: str, config_key: str = "meta.method") -> str:
    """Returns ``method`` or raises :class:`ConfigError` naming ``config_key``."""
    if method not in METHODS:
        raise ConfigError(f"{config_key}: unknown reweighting method {method!r}; "
                          f"expected one of {METHODS}")
    return method


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


def _finish(u: jax.Array, normalize: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    weights = normalize_weights(u) if normalize else jnp.maximum(u, 0)
    weights = jax.lax.stop_gradient(weights)
    return weights, _scores_stats(jax.lax.stop_gradient(u), weights)


def _zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def spatial_weights_and_pullback(
        loss_map_fn: LossMapFn, val_loss_fn: ValLossFn, params: Params, *,
        alpha: float = 1.0, method: str = "jvp", normalize: bool = True,
        has_outputs: bool = False,
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
      ConfigError: unknown ``method``.
    """
    check_method(method)
    if method == "jvp":
        out, linear_fn = jax.linearize(loss_map_fn, params)
        g_val = jax.grad(val_loss_fn)(params)
        loss_map, outputs = _split_outputs(out, has_outputs)
        jac_g, _ = _split_outputs(linear_fn(g_val), has_outputs)
        u = alpha * jac_g
        transposed = jax.linear_transpose(linear_fn, params)

        def pullback(cotangent: Any) -> Params:
            return transposed(cotangent)[0]
    else:
        out, vjp_fn = jax.vjp(loss_map_fn, params)
        loss_map, outputs = _split_outputs(out, has_outputs)

        def inner_grad(eps: jax.Array) -> Params:
            # grad_theta sum(eps * l(theta)) is the pullback of eps through l.
            cotangent = (eps, _zeros_like_tree(outputs)) if has_outputs else eps
            return vjp_fn(cotangent)[0]

        def lookahead_val_loss(eps: jax.Array) -> jax.Array:
            step = inner_grad(eps)
            lookahead = jax.tree_util.tree_map(lambda p, g: p - alpha * g, params, step)
            return val_loss_fn(lookahead)

        u = -jax.grad(lookahead_val_loss)(jnp.zeros_like(loss_map))

        def pullback(cotangent: Any) -> Params:
            return vjp_fn(cotangent)[0]
    weights, stats = _finish(u, normalize)
    return weights, (loss_map, outputs) if has_outputs else loss_map, pullback, stats


def spatial_weights(
        loss_map_fn: LossMapFn, val_loss_fn: ValLossFn, params: Params, *,
        alpha: float = 1.0, method: str = "jvp", normalize: bool = True,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Per-pixel learning-to-reweight weights of a training batch.

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

    Returns:
      ``(weights, loss_map, stats)``: ``weights`` ``(B, H, W, 1)``, non-negative,
      summing to 1 (or all 0), stop-gradient; ``loss_map`` ``(B, H, W, 1)``, the
      training loss map at ``params`` (free: the primal of the jvp / vjp); ``stats``,
      scalars ``u_mean, u_min, u_max, u_positive_fraction, u_positive_sum,
      weight_max``.

    Raises:
      ConfigError: unknown ``method``.
    """
    check_method(method)
    if method == "jvp":
        # No pullback wanted: a plain jvp keeps no residuals for a backward pass.
        g_val = jax.grad(val_loss_fn)(params)
        loss_map, jac_g = jax.jvp(loss_map_fn, (params,), (g_val,))
        weights, stats = _finish(alpha * jac_g, normalize)
        return weights, loss_map, stats
    weights, loss_map, _, stats = spatial_weights_and_pullback(
        loss_map_fn, val_loss_fn, params, alpha=alpha, method=method,
        normalize=normalize)
    return weights, loss_map, stats
