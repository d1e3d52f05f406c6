"""Each GAN's generator update against its objective written out here, independently.

The methods compute G's gradient with one generator forward pass kept as a ``jax.vjp``
pullback (pix2pix, the pGAN family) or one ``value_and_grad`` over both generators
(CycleGAN). Here the objectives are transcribed from the papers / reference code with
plain ``jnp`` (BCE with logits and least squares by hand, a bilinear warp from
``jax.scipy.ndimage.map_coordinates``), the discriminator is updated by its own optax
Adam step in the test, and ``jax.grad`` of the transcription must equal the gradient the
method applied, recovered from Adam's first moment after one step (``mu = (1 - b1) g``).
The parameters must also have moved by Adam's first step, ``-lr g / (|g| + eps)``, so a
flipped sign anywhere between the loss and the parameters fails.

The step is the loop's own program (:func:`loop.build_step` on the tiny config and its
first training batch), a compilation-cache hit when the method's run test compiled it
first; only the reference is compiled here. The step's dropout key is the documented
``fold_in(base, step)`` (and, in the pGAN family, its first sub-key).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.methods import _pgan_common
from sct_jax.data import datasets as train_data
from sct_jax import runs, sharding
from sct_jax.training import loop


def _one_step(name, edit_state=None):
    """The tiny config, its first batch, the step's key, and the state before and after
    one step of the loop's compiled ``train_step``.

    ``edit_state(state) -> state`` changes the initial state before the step.
    """
    config = load_config_file(f"configs/{name}.py:tiny")
    method = methods.get_method(config.method)
    batch = next(iter(loop.train_dataset(config, config.train.batch_size)))
    spec = sharding.batch_spec(batch)
    mesh = sharding.make_mesh(dict(config.mesh))
    init_rng, base_rng = jax.random.split(jax.random.key_data(jax.random.key(config.seed)))
    create = functools.partial(method.create_state, config, batch_spec=spec)
    compiled, shardings, _ = loop.build_step(method, config, mesh,
                                             jax.eval_shape(create, init_rng), spec)
    state = jax.jit(create, out_shardings=shardings)(init_rng)
    if edit_state is not None:
        state = jax.jit(edit_state, out_shardings=shardings)(state)
    before = jax.device_get(state)  # the step donates its input
    after, _ = compiled(state, sharding.global_batch(batch, mesh), base_rng)
    step_key = jax.random.fold_in(base_rng, 0)
    return config, batch, step_key, before, jax.device_get(after)


# ------------------------------------------------------------- objectives, by hand

def _bce_with_logits(logits, label):
    # log(1 + exp(-x)) for label 1, log(1 + exp(x)) for label 0, stably.
    return jnp.mean(jnp.maximum(logits, 0) - logits * label + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _gan(logits, label, kind):
    if kind == "vanilla":
        return _bce_with_logits(logits, label)
    assert kind == "lsgan"
    return jnp.mean((logits - label) ** 2)


def _adam_step(optim, grads, params):
    """The discriminator's own first Adam step (schedule value at step 0 is ``lr``)."""
    tx = optax.adam(optim.lr, b1=optim.b1, b2=optim.b2)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def _apply(state, params, x, key):
    return state.apply_fn({"params": params}, x, train=True, rngs={"dropout": key})


def _disc(state, params, x):
    return state.apply_fn({"params": params}, x)


def _conditional_d_update(config, disc, mr, ct, fake):
    """pix2pix / pGAN: ``D = 0.5 (loss(D(mr, ct), 1) + loss(D(mr, fake), 0))``.

    Returns:
      ``(D's gradient, D's parameters after its own Adam step)``.
    """
    kind = config.loss.gan

    def objective(p):
        real = _disc(disc, p, jnp.concatenate([mr, ct], -1))
        fk = _disc(disc, p, jnp.concatenate([mr, fake], -1))
        return 0.5 * (_gan(real, 1.0, kind) + _gan(fk, 0.0, kind))

    grads = jax.grad(objective)(disc.params)
    return grads, _adam_step(config.optim, grads, disc.params)


# ----------------------------------------------------------------------- checks

def _first_moment(state):
    return state.opt_state[0].mu


def assert_first_adam_step(config, before, after, reference_grads, name):
    """``after`` is ``before`` moved by one Adam step on ``reference_grads``."""
    b1, lr = config.optim.b1, config.optim.lr
    grads = jax.tree.map(lambda m: np.asarray(m) / (1 - b1), _first_moment(after))
    ref = jax.tree.map(np.asarray, reference_grads)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(ref))
    assert scale > 0, name
    paths = jax.tree_util.tree_leaves_with_path(ref)
    for (path, r), g, p0, p1 in zip(paths, jax.tree.leaves(grads),
                                    jax.tree.leaves(before.params),
                                    jax.tree.leaves(after.params)):
        where = f"{name}{jax.tree_util.keystr(path)}"
        # Some gradients are 0 in theory (a conv bias before instance norm) and float
        # noise in practice: the absolute tolerance is relative to the largest one.
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=1e-5 * scale, err_msg=where)
        # Adam's first step is -lr g / (|g| + eps): about -lr sign(g) where g is not ~0.
        delta = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
        big = np.abs(r) > 1e-3 * scale
        np.testing.assert_allclose(delta[big], -lr * np.sign(r[big]), rtol=0, atol=2e-3 * lr,
                                   err_msg=where)
        assert np.all(np.abs(delta) <= lr * 1.001), where


# ------------------------------------------------------------------------ methods

def _conditional_gan_reference(config, state, batch, key, generator_objective, extra=()):
    """D's gradient, then the gradient of ``generator_objective(params, d_params)``
    (``params``: G's parameters, then those of the networks named in ``extra``) against
    D after its own Adam step; one compiled program. ``key``: G's dropout key."""
    mr, ct = batch["mr"], batch["ct"]
    gen, disc = state["gen"], state["disc"]

    @jax.jit
    def reference(params):
        fake = _apply(gen, params[0], mr, key)
        d_grads, disc_new = _conditional_d_update(config, disc, mr, ct, fake)
        return d_grads, jax.grad(generator_objective)(params, disc_new)

    return reference((gen.params,) + tuple(state[name].params for name in extra))


def test_pix2pix_generator_gradient():
    """G = BCE(D'(mr, G(mr)), 1) + 100 |G(mr) - ct| averaged over the body mask,
    D' = D after its own Adam step."""
    config, batch, key, before, after = _one_step("pix2pix_pelvis")
    assert config.loss.gan == "vanilla"
    assert config.loss.body_mask and config.loss.body_mask_margin == 0
    mr, ct, body = batch["mr"], batch["ct"], jnp.asarray(batch["mask"], jnp.float32)
    assert 0 < float(body.mean()) < 1  # the mask leaves voxels out: the mean is not the sum's
    gen, disc = before["gen"], before["disc"]

    def objective(params, d_params):
        f = _apply(gen, params[0], mr, key)
        logits = _disc(disc, d_params, jnp.concatenate([mr, f], -1))
        l1 = jnp.sum(jnp.abs(f - ct) * body) / jnp.sum(body)
        return _bce_with_logits(logits, 1.0) + config.loss.l1_weight * l1

    d_grads, (g_grads,) = _conditional_gan_reference(config, before, batch, key, objective)
    assert_first_adam_step(config, disc, after["disc"], d_grads, "disc")
    assert_first_adam_step(config, gen, after["gen"], g_grads, "gen")


def test_pgan_generator_gradient():
    """G = adv (LSGAN) + 100 L1 against the updated D (the perceptual weight is 0 in tiny)."""
    config, batch, key, before, after = _one_step("pgan_pelvis")
    assert config.loss.gan == "lsgan" and config.loss.perceptual_weight == 0
    key = _pgan_common.dropout_keys(key)[0]
    mr, ct = batch["mr"], batch["ct"]
    gen, disc = before["gen"], before["disc"]
    w = config.loss

    def objective(params, d_params):
        f = _apply(gen, params[0], mr, key)
        logits = _disc(disc, d_params, jnp.concatenate([mr, f], -1))
        return (w.adv_weight * jnp.mean((logits - 1.0) ** 2)
                + w.l1_weight * jnp.mean(jnp.abs(f - ct)))

    d_grads, (g_grads,) = _conditional_gan_reference(config, before, batch, key, objective)
    assert_first_adam_step(config, disc, after["disc"], d_grads, "disc")
    assert_first_adam_step(config, gen, after["gen"], g_grads, "gen")


def _bilinear_warp_border(image, flow):
    """``image (B, H, W, C)`` sampled at ``(row + flow[..., 0], col + flow[..., 1])``,
    linear interpolation, edge values beyond the border (grid_sample's "border")."""
    h, w = image.shape[1:3]
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=flow.dtype), jnp.arange(w, dtype=flow.dtype),
                              indexing="ij")

    def one(img, f):  # (H, W), (H, W, 2)
        return jax.scipy.ndimage.map_coordinates(img, [rows + f[..., 0], cols + f[..., 1]],
                                                 order=1, mode="nearest")

    per_channel = jax.vmap(one, in_axes=(2, None), out_axes=2)
    return jax.vmap(per_channel)(image, flow)


def _larger_flow(state):
    """R's output layer at N(0, 0.05) instead of N(0, 1e-5): flows of a good fraction of
    a pixel, so the warp moves the image (near 0 the sampling position rounds to the
    pixel grid in float32 and the bilinear gradient flips between neighbours)."""
    reg = state["reg"]
    kernel = reg.params["flow"]["kernel"]
    big = 0.05 * jax.random.normal(jax.random.key(7), kernel.shape, kernel.dtype)
    params = {**reg.params, "flow": {**reg.params["flow"], "kernel": big}}
    return {**state, "reg": reg.replace(params=params)}


def test_reg_pgan_generator_and_registration_gradients():
    """G and R jointly: adv + 20 L1(warp(G(mr), R(G(mr), ct)), ct) + 10 smoothness."""
    config, batch, key, before, after = _one_step("reg_pgan_pelvis", edit_state=_larger_flow)
    key = _pgan_common.dropout_keys(key)[0]
    mr, ct = batch["mr"], batch["ct"]
    gen, disc, reg = before["gen"], before["disc"], before["reg"]
    w = config.loss

    def objective(params, d_params):
        gp, rp = params
        f = _apply(gen, gp, mr, key)
        flow = reg.apply_fn({"params": rp}, f, ct)
        registered = _bilinear_warp_border(f, flow)
        smooth = (jnp.mean((flow[:, 1:] - flow[:, :-1]) ** 2)
                  + jnp.mean((flow[:, :, 1:] - flow[:, :, :-1]) ** 2))
        logits = _disc(disc, d_params, jnp.concatenate([mr, f], -1))
        return (w.adv_weight * jnp.mean((logits - 1.0) ** 2)
                + w.l1_weight * jnp.mean(jnp.abs(registered - ct)) + w.smooth_weight * smooth)

    d_grads, (g_grads, r_grads) = _conditional_gan_reference(config, before, batch, key, objective,
                                                             extra=("reg",))
    assert_first_adam_step(config, disc, after["disc"], d_grads, "disc")
    assert_first_adam_step(config, gen, after["gen"], g_grads, "gen")
    assert_first_adam_step(config, reg, after["reg"], r_grads, "reg")


def test_cyclegan_generator_gradients():
    """Both Gs on GAN + cycle + identity against the *initial* Ds (G is updated first),
    then both Ds by their own Adam step on this step's fakes (the pools are filling)."""
    config, batch, key, before, after = _one_step("cyclegan_pelvis")
    assert config.model.pool_size >= batch["mr"].shape[0]  # the pool returns its input
    assert config.model.gen.dropout == 0  # no dropout: the generators' keys do not matter
    mr, ct = batch["mr"], batch["ct"]
    w = config.loss
    lam_mr, lam_ct, lam_idt = w.cycle_mr_weight, w.cycle_ct_weight, w.identity_weight
    assert lam_idt > 0

    def objective(params):
        def g_mr2ct(x):
            return _apply(before["g_mr2ct"], params["g_mr2ct"], x, key)

        def g_ct2mr(x):
            return _apply(before["g_ct2mr"], params["g_ct2mr"], x, key)

        fake_ct, fake_mr = g_mr2ct(mr), g_ct2mr(ct)
        adv = (jnp.mean((_disc(before["d_ct"], before["d_ct"].params, fake_ct) - 1) ** 2)
               + jnp.mean((_disc(before["d_mr"], before["d_mr"].params, fake_mr) - 1) ** 2))
        cycle = (lam_mr * jnp.mean(jnp.abs(g_ct2mr(fake_ct) - mr))
                 + lam_ct * jnp.mean(jnp.abs(g_mr2ct(fake_mr) - ct)))
        identity = lam_idt * (lam_ct * jnp.mean(jnp.abs(g_mr2ct(ct) - ct))
                              + lam_mr * jnp.mean(jnp.abs(g_ct2mr(mr) - mr)))
        return adv + cycle + identity, (fake_ct, fake_mr)

    def d_objective(name, params, real, fake):
        d = before[name]
        return 0.5 * (jnp.mean((_disc(d, params, real) - 1) ** 2)
                      + jnp.mean(_disc(d, params, fake) ** 2))

    @jax.jit
    def reference(gen_params, disc_params):
        grads, (fake_ct, fake_mr) = jax.grad(objective, has_aux=True)(gen_params)
        grads["d_ct"] = jax.grad(functools.partial(d_objective, "d_ct"))(
            disc_params["d_ct"], ct, fake_ct)
        grads["d_mr"] = jax.grad(functools.partial(d_objective, "d_mr"))(
            disc_params["d_mr"], mr, fake_mr)
        return grads

    grads = reference({n: before[n].params for n in ("g_mr2ct", "g_ct2mr")},
                      {n: before[n].params for n in ("d_ct", "d_mr")})
    for name in ("g_mr2ct", "g_ct2mr", "d_ct", "d_mr"):
        assert_first_adam_step(config, before[name], after[name], grads[name], name)
