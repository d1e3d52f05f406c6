"""Noise schedules, forward process and the DDIM/DDPM samplers.

References are independent: float64 numpy closed forms of the schedules and of Ho et
al.'s posterior, an oracle denoiser that knows the clean data, and a Gaussian toy
problem whose exact noise predictor is known in closed form.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.diffusion import (ddim_step, ddim_timesteps, ddpm_step, make_schedule,
                               predict_x0_and_eps, q_sample, sample, sample_python_loop,
                               training_target)
from sct_jax.diffusion.samplers import alphas_cumprod_at
from sct_jax.errors import ConfigError

T = 1000
SHAPE = (2, 4, 4, 4, 3)  # (B, D, H, W, C): a tiny 3D latent


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("scaled_linear", T, 0.0015, 0.0195)


@pytest.fixture(scope="module")
def x0_and_noise():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=SHAPE), jnp.float32),
            jnp.asarray(rng.normal(size=SHAPE), jnp.float32))


# ------------------------------------------------------------------------ schedules

def _reference_alphas_cumprod(kind, n, b0, b1):
    """Element by element in float64, without numpy's linspace/cumprod."""
    if kind == "cosine":
        # Closed form abar_t = f(t + 1) / f(0); the 0.999 beta cap only bites at the end.
        f = [math.cos(((i / n) + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        return np.array([f[i + 1] / f[0] for i in range(n)])
    if kind == "linear":
        betas = [b0 + i * (b1 - b0) / (n - 1) for i in range(n)]
    else:
        step = (math.sqrt(b1) - math.sqrt(b0)) / (n - 1)
        betas = [(math.sqrt(b0) + i * step) ** 2 for i in range(n)]
    return np.array([math.prod(1.0 - b for b in betas[:i + 1]) for i in range(n)])


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_alphas_cumprod_match_closed_form(kind):
    s = make_schedule(kind, T, 0.0015, 0.0195)
    ref = _reference_alphas_cumprod(kind, T, 0.0015, 0.0195)
    got = np.asarray(s.alphas_cumprod, np.float64)
    assert s.alphas_cumprod.dtype == jnp.float32 and got.shape == (T,)
    if kind == "cosine":
        capped = np.asarray(s.betas) >= 0.999 - 1e-6
        assert capped.sum() <= 2 and capped[-1]  # only the singular last step(s)
        np.testing.assert_allclose(got[~capped], ref[~capped], rtol=2e-5, atol=1e-9)
    else:
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(s.alphas), 1.0 - np.asarray(s.betas), atol=1e-7)
    assert np.all(np.diff(got) < 0)


def test_scaled_linear_endpoints_and_shape(schedule):
    betas = np.asarray(schedule.betas)
    np.testing.assert_allclose([betas[0], betas[-1]], [0.0015, 0.0195], rtol=1e-6)
    # sqrt(beta) is linear in t (what makes it "scaled"), so beta is not.
    np.testing.assert_allclose(np.diff(np.sqrt(betas.astype(np.float64)), 2), 0, atol=1e-7)
    assert np.diff(betas, 2).min() > 0
    assert schedule.num_train_timesteps == T


def test_bad_schedule_config():
    with pytest.raises(ConfigError, match="unknown"):
        make_schedule("quadratic")
    with pytest.raises(ConfigError, match="betas"):
        make_schedule("linear", 10, 0.5, 1.5)


# ------------------------------------------------------------ forward process

def test_q_sample_matches_formula(schedule, x0_and_noise):
    x0, noise = x0_and_noise
    t = jnp.array([3, 700])
    ab = np.asarray(schedule.alphas_cumprod, np.float64)[np.array([3, 700])]
    ref = (np.sqrt(ab)[:, None, None, None, None] * np.asarray(x0)
           + np.sqrt(1 - ab)[:, None, None, None, None] * np.asarray(noise))
    np.testing.assert_allclose(q_sample(schedule, x0, noise, t), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_and_prediction_round_trip(schedule, x0_and_noise, prediction_type):
    x0, noise = x0_and_noise
    for t in ([0, 999], [10, 500]):
        t = jnp.array(t)
        x_t = q_sample(schedule, x0, noise, t)
        target = training_target(schedule, x0, noise, t, prediction_type)
        x0_hat, eps_hat = predict_x0_and_eps(schedule, target, x_t, t, prediction_type)
        np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
        np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


def test_v_target_formula(schedule, x0_and_noise):
    x0, noise = x0_and_noise
    ab = float(schedule.alphas_cumprod[250])
    v = training_target(schedule, x0, noise, jnp.array([250, 250]), "v_prediction")
    np.testing.assert_allclose(v, math.sqrt(ab) * noise - math.sqrt(1 - ab) * x0, atol=1e-6)


def test_v_prediction_target_and_inversion_match_float64_closed_form(x0_and_noise):
    """v = a eps - b x0 with a = sqrt(abar_t), b = sqrt(1 - abar_t) from the float64
    closed-form schedule; x0 = a x_t - b v and eps = b x_t + a v invert it, also at the
    ends of the schedule where epsilon-prediction's x0 = (x_t - b eps) / a degrades."""
    s = make_schedule("scaled_linear", T, 0.0015, 0.0195)
    abar = _reference_alphas_cumprod("scaled_linear", T, 0.0015, 0.0195)
    x0 = np.asarray(x0_and_noise[0], np.float64)
    noise = np.asarray(x0_and_noise[1], np.float64)
    for t in ([0, 999], [500, 960]):
        a = np.sqrt(abar[t])[:, None, None, None, None]
        b = np.sqrt(1.0 - abar[t])[:, None, None, None, None]
        v_ref = a * noise - b * x0
        x_t_ref = a * x0 + b * noise
        t = jnp.asarray(t)
        v = training_target(s, x0_and_noise[0], x0_and_noise[1], t, "v_prediction")
        np.testing.assert_allclose(np.asarray(v, np.float64), v_ref, rtol=1e-5, atol=2e-6)
        # The inversion of the exact v (in float32) recovers x0 and eps of the float64 data.
        x0_hat, eps_hat = predict_x0_and_eps(s, jnp.asarray(v_ref, jnp.float32),
                                             jnp.asarray(x_t_ref, jnp.float32), t,
                                             "v_prediction")
        np.testing.assert_allclose(np.asarray(x0_hat, np.float64), x0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(eps_hat, np.float64), noise, atol=2e-5)


# ---------------------------------------------------------------- timesteps, steps

def test_ddim_timesteps_leading_spacing():
    t, t_prev = ddim_timesteps(1000, 50)
    np.testing.assert_array_equal(t, np.arange(980, -1, -20))
    np.testing.assert_array_equal(t_prev, t - 20)
    t, t_prev = ddim_timesteps(10, 10)  # every step: the plain chain t -> t - 1
    np.testing.assert_array_equal(t, np.arange(9, -1, -1))
    np.testing.assert_array_equal(t_prev, np.arange(8, -2, -1))
    t, _ = ddim_timesteps(1000, 3)  # T // N = 333, no rounding
    np.testing.assert_array_equal(t, [666, 333, 0])
    with pytest.raises(ConfigError, match="num_inference_steps"):
        ddim_timesteps(10, 11)


def test_alpha_cumprod_before_first_step_is_one(schedule):
    np.testing.assert_allclose(alphas_cumprod_at(schedule, jnp.array([-20, 0, 999])),
                               [1.0, schedule.alphas_cumprod[0], schedule.alphas_cumprod[999]])


def test_ddpm_step_matches_ho_posterior(schedule, x0_and_noise):
    """With t_prev = t - 1 the strided posterior is Ho et al.'s eq. 7 (float64 numpy)."""
    x0, z = x0_and_noise
    x_t = q_sample(schedule, x0, z[::-1], 400)
    betas = np.asarray(schedule.betas, np.float64)
    ab = np.cumprod(1 - betas)
    b, a, ab_t, ab_prev = betas[400], 1 - betas[400], ab[400], ab[399]
    mean = (math.sqrt(ab_prev) * b / (1 - ab_t) * np.asarray(x0)
            + math.sqrt(a) * (1 - ab_prev) / (1 - ab_t) * np.asarray(x_t))
    std = math.sqrt((1 - ab_prev) / (1 - ab_t) * b)
    out = ddpm_step(schedule, x0, 400, 399, x_t, noise=z, prediction_type="sample")
    np.testing.assert_allclose(out, mean + std * np.asarray(z), rtol=1e-4, atol=1e-5)


def test_ddim_eta_one_has_ddpm_variance_and_mean(schedule, x0_and_noise):
    """DDIM with eta = 1 is the DDPM posterior (Song et al. 2021, sec. 4.1), strided too."""
    x0, z = x0_and_noise
    x_t = q_sample(schedule, x0, z[::-1], 600)
    eps = jnp.sin(x_t)  # any model output
    ddim = ddim_step(schedule, eps, 600, 580, x_t, eta=1.0, noise=z)
    ddpm = ddpm_step(schedule, eps, 600, 580, x_t, noise=z)
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ samplers

def _oracle(schedule, x0, prediction_type):
    """A denoiser that knows x0: its output is exact at every x_t."""
    def denoise_fn(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        if prediction_type == "epsilon":
            return eps
        return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
    return denoise_fn


@pytest.mark.parametrize("prediction_type,sampler",
                         [("epsilon", "ddim"), ("v_prediction", "ddim"),
                          ("epsilon", "ddpm")])
def test_sampler_with_oracle_recovers_clean_latent(schedule, x0_and_noise, prediction_type,
                                                   sampler):
    x0, x_T = x0_and_noise
    run = jax.jit(lambda x: sample(_oracle(schedule, x0, prediction_type), schedule, x,
                                   num_steps=50, sampler=sampler,
                                   rng=jax.random.key(3), prediction_type=prediction_type))
    np.testing.assert_allclose(run(x_T), x0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_follows_the_forward_trajectory(schedule, x0_and_noise, prediction_type):
    """A denoiser that knows x0 and the noise e but ignores x_t: started on
    x_980 = q_sample(x0, e, 980), eta = 0 DDIM must land on q_sample(x0, e, t_prev) at
    every step, so x0 comes out only if each step's t_prev is the next step's t (a
    "sample" prediction would return x0 on the last step whatever came before)."""
    x0, e = x0_and_noise

    def denoise_fn(x_t, t):
        return training_target(schedule, x0, e, t, prediction_type)

    first_t = int(ddim_timesteps(T, 50)[0][0])
    x_T = q_sample(schedule, x0, e, first_t)
    run = jax.jit(lambda x: sample(denoise_fn, schedule, x, num_steps=50,
                                   prediction_type=prediction_type))
    np.testing.assert_allclose(run(x_T), x0, atol=1e-4)


def _toy_denoiser(x_t, t):
    """Non-linear in x and t, so a wrong timestep or step order shows."""
    return jnp.tanh(x_t) * (t.astype(jnp.float32) / T).reshape(-1, 1, 1, 1, 1) + 0.1 * x_t


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_scanned_sampler_equals_python_loop(schedule, x0_and_noise, sampler, eta):
    _, x_T = x0_and_noise
    kw = dict(num_steps=7, sampler=sampler, eta=eta, rng=jax.random.key(5),
              prediction_type="v_prediction")
    scanned = jax.jit(lambda x: sample(_toy_denoiser, schedule, x, **kw))(x_T)
    looped = sample_python_loop(_toy_denoiser, schedule, x_T, **kw)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
    assert not np.allclose(scanned, x_T, atol=1e-2)


def test_jitted_sampler_compiles_once(schedule, x0_and_noise):
    x0, x_T = x0_and_noise
    traces = []

    def denoise_fn(x_t, t):
        traces.append(1)  # Python side effect: runs once per trace, not per step
        return _toy_denoiser(x_t, t)

    run = jax.jit(lambda sched, x, rng: sample(denoise_fn, sched, x, num_steps=20,
                                               sampler="ddpm", rng=rng))
    first = run(schedule, x_T, jax.random.key(0))
    second = run(schedule, x0, jax.random.key(1))
    assert run._cache_size() == 1
    assert len(traces) == 1  # the scan traces the denoiser once for all 20 steps
    assert not np.allclose(first, second)


def test_sampler_needs_rng_for_noise(schedule, x0_and_noise):
    with pytest.raises(ValueError, match="rng"):
        sample(_toy_denoiser, schedule, x0_and_noise[1], num_steps=2, sampler="ddpm")
    with pytest.raises(ConfigError, match="sampler"):
        sample(_toy_denoiser, schedule, x0_and_noise[1], num_steps=2, sampler="euler")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_of_gaussian_data_have_its_spread(schedule, sampler):
    """Data x0 ~ N(0, s^2): the exact noise predictor is E[eps | x_t] =
    sqrt(1 - ab) x_t / (ab s^2 + 1 - ab); 1000 steps must give samples of std s."""
    s = 0.5

    def denoise_fn(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - ab) * x_t / (ab * s ** 2 + 1 - ab)

    x_T = jax.random.normal(jax.random.key(0), (64 * 64,)).reshape(1, 64, 64, 1)
    out = jax.jit(lambda x: sample(denoise_fn, schedule, x, num_steps=T, sampler=sampler,
                                   rng=jax.random.key(1)))(x_T)
    # 4096 samples: the std estimate's standard error is about 0.0055.
    assert abs(float(jnp.std(out)) - s) < 0.03
    assert abs(float(jnp.mean(out))) < 0.03
