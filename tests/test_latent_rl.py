"""The stochastic latent loop's math and heads (model/latent_rl.py): the REINFORCE estimator is
unbiased on a toy Gaussian chain with a closed-form expected reward (plain, with a baseline, and
normalised), the closed-form KL matches Monte Carlo and finite differences, the trajectory
log-probability matches scipy and its gradient is the score, the budget head samples from its
softmax, the verifier learns a separable toy set and ignores masked steps, ECE matches hand values.

All float32; each Monte-Carlo check compares within a few standard errors that the test
estimates from its own samples. Functions under test run jitted: eager JAX compiles every
primitive on its own, which is most of what a small test costs on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import norm

from helpers import micro_config
from quietreasoning.config import DataError
from quietreasoning.model.latent_rl import (BudgetHead, VerifierHead, advantage, bce_loss, expected_calibration_error,
                                            gaussian_kl, latent_reward, reinforce_loss, sample_latents,
                                            trajectory_log_prob)
from quietreasoning.training.sharding import RULES, logical_to_spec

log_prob_jit = jax.jit(trajectory_log_prob)
kl_jit = jax.jit(gaussian_kl)
ece_jit = jax.jit(expected_calibration_error, static_argnames="n_bins")

# the toy policy: a two-step chain in D dimensions, mu_1 = theta, mu_2 = W * z_1 + theta, reward
# f = -|z_2 - c|^2. z_2 ~ N((1 + W) theta, SIGMA^2 (1 + W^2) I), so
# E[f] = -|(1 + W) theta - c|^2 - D SIGMA^2 (1 + W^2) and dE[f]/dtheta = -2 (1 + W) ((1 + W) theta - c).
D, W, SIGMA = 2, 0.5, 0.7
THETA = np.array([0.3, -0.4], np.float32)
C = np.array([1.0, 0.5], np.float32)
MEAN_Z2 = (1 + W) * THETA
VAR_Z2 = SIGMA ** 2 * (1 + W ** 2)
EXPECTED_F = -np.sum((MEAN_Z2 - C) ** 2) - D * VAR_Z2
ANALYTIC_GRAD = -2 * (1 + W) * (MEAN_Z2 - C)
STD_F = np.sqrt(np.sum(2 * VAR_Z2 ** 2 + 4 * VAR_Z2 * (MEAN_Z2 - C) ** 2))  # Var of a sum of independent -(x - c)^2


def _chain_loss(theta, key, n, baseline, normalise):
    """The REINFORCE surrogate of one batch of n trajectories of the toy chain. mu_2 is computed from
    the sampled z_1, which carries no gradient: were it differentiable, theta would reach mu_2 by two
    paths and the estimate would be off by a factor (1 + W) on the second step's score."""
    k1, k2 = jax.random.split(key)
    mu1 = jnp.broadcast_to(theta, (n, 1, D))
    z1, eps1 = sample_latents(mu1, SIGMA, k1)
    mu2 = W * z1 + theta
    z2, eps2 = sample_latents(mu2, SIGMA, k2)
    log_prob = trajectory_log_prob(jnp.concatenate([mu1, mu2], 1), jnp.concatenate([eps1, eps2], 1), SIGMA)
    reward = -jnp.sum(jnp.square(z2[:, 0] - C), axis=-1)
    return reinforce_loss(log_prob, reward, jnp.full((n,), baseline), normalise=normalise)


@functools.partial(jax.jit, static_argnames=("n", "normalise"))
def _estimates(keys, baseline, n, normalise):
    grad = jax.grad(_chain_loss)
    return jax.vmap(lambda key: -grad(jnp.asarray(THETA), key, n, baseline, normalise))(keys)


@functools.cache
def _batch_estimates(n_batches, n, baseline=0.0, normalise=False):
    """(n_batches, D): the REINFORCE estimate of +grad E[f] from each of n_batches independent batches."""
    keys = jax.random.split(jax.random.key(0), n_batches)
    return np.asarray(_estimates(keys, np.float32(baseline), n, normalise), np.float64)


def _assert_mean_within(estimates, target, n_se=4.0, rtol=0.0):
    mean = estimates.mean(0)
    se = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    assert np.all(np.abs(mean - target) <= n_se * se + rtol * np.abs(target)), (mean, target, se)


def test_reinforce_estimator_mean_matches_the_analytic_gradient_through_a_two_step_chain():
    _assert_mean_within(_batch_estimates(400, 50), ANALYTIC_GRAD)


def test_a_constant_baseline_keeps_the_mean_and_lowers_the_variance():
    plain = _batch_estimates(400, 50)
    based = _batch_estimates(400, 50, baseline=float(EXPECTED_F))
    _assert_mean_within(based, ANALYTIC_GRAD)
    assert np.all(based.std(0) < 0.8 * plain.std(0)), (based.std(0), plain.std(0))


def test_normalised_rewards_estimate_the_gradient_divided_by_the_reward_std():
    _assert_mean_within(_batch_estimates(40, 2000, normalise=True), ANALYTIC_GRAD / STD_F, rtol=0.02)


def test_sampled_latents_carry_no_gradient_and_follow_mu_plus_sigma_eps():
    mu = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, D)), jnp.float32)
    def sum_z(m):
        return jnp.sum(sample_latents(m, SIGMA, jax.random.key(1))[0])

    (z, eps), g = jax.jit(lambda m: (sample_latents(m, SIGMA, jax.random.key(1)), jax.grad(sum_z)(m)))(mu)
    np.testing.assert_allclose(z, mu + SIGMA * eps, rtol=1e-6)
    assert np.all(np.asarray(g) == 0.0)


def test_no_gradient_reaches_the_reward_or_the_baseline():
    log_prob = np.array([-1.0, -2.0, -0.5], np.float32)
    reward, baseline = np.array([1.0, 0.0, 1.0], np.float32), np.array([0.5, 0.5, 0.2], np.float32)

    @jax.jit
    def run(log_prob, reward, baseline):
        g_reward, g_base = jax.grad(lambda r, b: reinforce_loss(log_prob, r, b), argnums=(0, 1))(reward, baseline)
        g_lp = jax.grad(lambda lp: reinforce_loss(lp, reward, baseline, normalise=False))(log_prob)
        return (g_reward, g_base, g_lp, advantage(reward, baseline), advantage(jnp.ones(4)),
                latent_reward(jnp.array([True, False, True]), jnp.array([0, 2, 4]), 0.05))

    g_reward, g_base, g_lp, a, a_equal, r = jax.device_get(run(log_prob, reward, baseline))
    assert np.all(g_reward == 0) and np.all(g_base == 0)
    np.testing.assert_allclose(g_lp, -(reward - baseline) / 3, rtol=1e-6)
    assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-4
    np.testing.assert_array_equal(a_equal, np.zeros(4))  # equal rewards: no signal, no NaN
    np.testing.assert_allclose(r, [1.0, -0.1, 0.8], rtol=1e-6)


# trajectory log-probability ---------------------------------------------------------------------------

def test_trajectory_log_prob_matches_scipy_and_respects_the_mask():
    rng = np.random.default_rng(0)
    mus = rng.standard_normal((3, 5, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 5, 4)).astype(np.float32)
    sigma = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    z = mus + sigma * eps
    per_step = norm.logpdf(z.astype(np.float64), mus, sigma).sum(-1)
    np.testing.assert_allclose(log_prob_jit(mus, eps, sigma, mask), (per_step * mask).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(log_prob_jit(mus, eps, 0.8), norm.logpdf(mus + 0.8 * eps, mus, 0.8).sum((1, 2)),
                               rtol=1e-5)
    garbage = np.where(mask[..., None] > 0, mus, np.nan).astype(np.float32)  # masked steps never read
    np.testing.assert_allclose(log_prob_jit(garbage, eps, sigma, mask), (per_step * mask).sum(-1), rtol=1e-5)


def test_trajectory_log_prob_gradient_is_the_score_with_the_sample_held_fixed():
    rng = np.random.default_rng(1)
    mus = rng.standard_normal((2, 3, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 3, 4)).astype(np.float32)
    sigma = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    score = jax.jit(jax.grad(lambda m, s: jnp.sum(trajectory_log_prob(m, eps, s, mask)), argnums=(0, 1)))
    g_mu, g_sigma = score(mus, sigma)
    np.testing.assert_allclose(g_mu, eps / sigma * mask[..., None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sigma, np.sum((np.square(eps) - 1) / sigma * mask[..., None], (0, 1)), rtol=1e-5)
    nan_padded = np.where(mask[..., None] > 0, mus, np.nan).astype(np.float32)  # padding reaches no gradient
    np.testing.assert_array_equal(score(nan_padded, sigma)[0], g_mu)


# KL to the reference -------------------------------------------------------------------------------------

def _kl_case():
    rng = np.random.default_rng(2)
    mu_p = rng.standard_normal((2, 3, 4)).astype(np.float32)
    mu_q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    sigma_p = np.array([0.6, 0.9, 1.2, 0.8], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    return mu_p, sigma_p, mu_q, np.float32(1.1), mask


def test_gaussian_kl_matches_a_monte_carlo_estimate():
    mu_p, sigma_p, mu_q, sigma_q, mask = _kl_case()
    z = mu_p + sigma_p * np.random.default_rng(3).standard_normal((100_000, *mu_p.shape))
    log_ratio = (norm.logpdf(z, mu_p, sigma_p) - norm.logpdf(z, mu_q, sigma_q)).sum(-1)
    samples = (log_ratio * mask).sum(-1)                                         # (N, 2)
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(len(samples))
    kl = np.asarray(kl_jit(mu_p, sigma_p, mu_q, sigma_q, mask))
    assert np.all(np.abs(kl - mean) < 4 * se), (kl, mean, se)


def test_gaussian_kl_is_zero_for_equal_distributions_and_scalar_sigma_equals_its_broadcast():
    mu_p, sigma_p, mu_q, sigma_q, mask = _kl_case()
    kl = np.asarray(kl_jit(mu_p, sigma_p, mu_q, sigma_q, mask))
    np.testing.assert_allclose(kl_jit(mu_p, sigma_p, mu_p, sigma_p, mask), 0.0, atol=1e-6)
    np.testing.assert_allclose(kl_jit(mu_p, sigma_p, mu_q, np.full(4, sigma_q), mask), kl, rtol=1e-6)
    assert np.all(kl > 0)
    nan_padded = np.where(mask[..., None] > 0, mu_p, np.nan).astype(np.float32)  # steps that did not run
    np.testing.assert_array_equal(kl_jit(nan_padded, sigma_p, mu_q, sigma_q, mask), kl)


def test_gaussian_kl_gradient_matches_finite_differences():
    *args, mask = _kl_case()
    kl = jax.jit(lambda *a: jnp.sum(gaussian_kl(*a, mask)))
    grads = jax.jit(jax.grad(kl, argnums=(0, 1, 2, 3)))(*args)
    rng, h = np.random.default_rng(4), 1e-3
    for i, (arg, grad) in enumerate(zip(args, grads)):
        direction = rng.standard_normal(np.shape(arg)).astype(np.float32)
        plus = [a + h * direction if j == i else a for j, a in enumerate(args)]
        minus = [a - h * direction if j == i else a for j, a in enumerate(args)]
        numeric = (float(kl(*plus)) - float(kl(*minus))) / (2 * h)
        np.testing.assert_allclose(numeric, float(np.sum(np.asarray(grad) * direction)), rtol=1e-2, atol=1e-3,
                                   err_msg=f"argument {i}")


# heads -----------------------------------------------------------------------------------------------------

K_MAX, HIDDEN = 4, 16


@pytest.fixture(scope="module")
def cfg():
    return micro_config("model.compute_dtype=float32").model


@pytest.fixture(scope="module")
def budget(cfg):
    """(graphdef, params) of one budget head, and its methods jitted over (params, ...)."""
    graphdef, params = nnx.split(BudgetHead(cfg, K_MAX, HIDDEN, rngs=nnx.Rngs(0)))

    @jax.jit
    def outputs(params, h, key):
        head = nnx.merge(graphdef, params)
        k, log_prob = head.sample(h, key)
        return {"k": k, "sample_log_prob": log_prob, "log_prob": head.log_prob(h, k), "logits": head(h),
                "expected_k": head.expected_k(h)}
    return graphdef, params, outputs


@pytest.fixture(scope="module")
def verifier(cfg):
    graphdef, params = nnx.split(VerifierHead(cfg, HIDDEN, rngs=nnx.Rngs(0)))
    logits = jax.jit(lambda params, states, mask, question=None: nnx.merge(graphdef, params)(states, mask, question))
    return graphdef, params, logits


def test_every_head_parameter_carries_logical_names(budget, verifier):
    for graphdef, params, _ in (budget, verifier):
        for path, var in nnx.iter_graph(nnx.merge(graphdef, params)):
            if isinstance(var, nnx.Param):
                names = var.get_metadata().get("out_sharding")
                assert names is not None and len(names) == var[...].ndim, path
                assert all(n is None or n in RULES for n in names), (path, names)
                logical_to_spec(tuple(names))


def test_budget_samples_lie_in_range_with_log_probs_from_the_logits(cfg, budget):
    _, params, outputs = budget
    h = np.random.default_rng(0).standard_normal((64, cfg.d_model)).astype(np.float32)
    out = jax.device_get(outputs(params, h, jax.random.key(0)))
    k = out["k"]
    assert k.dtype == np.int32 and k.min() >= 0 and k.max() <= K_MAX
    log_softmax = out["logits"] - np.log(np.exp(out["logits"]).sum(-1, keepdims=True))
    np.testing.assert_allclose(out["sample_log_prob"], log_softmax[np.arange(64), k], rtol=1e-5)
    np.testing.assert_allclose(out["log_prob"], out["sample_log_prob"], rtol=1e-6)
    np.testing.assert_allclose(out["expected_k"], np.exp(log_softmax) @ np.arange(K_MAX + 1), rtol=1e-5)


def test_budget_sampling_frequencies_match_the_softmax(cfg, budget):
    _, params, outputs = budget
    logits = np.array([1.0, -0.5, 0.0, 2.0, -1.0], np.float32)
    fixed = jax.tree.map(lambda x: x, params)          # the output layer set to constant logits
    fixed["w_out"] = nnx.Param(np.zeros_like(params["w_out"][...]))
    fixed["b_out"] = nnx.Param(logits)
    n = 20_000
    k = np.asarray(outputs(fixed, np.ones((n, cfg.d_model), np.float32), jax.random.key(3))["k"])
    counts = np.bincount(k, minlength=K_MAX + 1)
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.all(np.abs(counts - n * p) < 4 * np.sqrt(n * p * (1 - p))), (counts, n * p)


def test_budget_reinforce_with_a_step_cost_learns_the_cheapest_sufficient_budget(cfg, budget):
    """Correct iff K >= 2, each step costs 0.1: the best budget is K = 2."""
    graphdef, params, _ = budget
    h = np.random.default_rng(1).standard_normal((128, cfg.d_model)).astype(np.float32)
    opt = optax.adam(3e-2)

    def loss(params, key):
        k, log_prob = nnx.merge(graphdef, params).sample(h, key)
        return reinforce_loss(log_prob, latent_reward(k >= 2, k, 0.1))

    def step(carry, key):
        params, opt_state = carry
        updates, opt_state = opt.update(jax.grad(loss)(params, key), opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def train(params):
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(jax.random.key(0), 150))
        return jnp.mean(jax.nn.softmax(nnx.merge(graphdef, params)(h), axis=-1), axis=0)

    probs = np.asarray(train(params))
    assert probs[2] > 0.8, probs


def _verifier_data(cfg, n=256, k=4, seed=1):
    """Right iff the latents lean along one fixed direction; padded steps hold NaN."""
    direction = np.random.default_rng(0).standard_normal(cfg.d_model).astype(np.float32)
    rng = np.random.default_rng(seed)
    correct = rng.integers(0, 2, n).astype(np.float32)
    states = rng.standard_normal((n, k, cfg.d_model)).astype(np.float32) + (2 * correct - 1)[:, None, None] * direction
    lengths = rng.integers(1, k + 1, n)
    mask = np.arange(k)[None] < lengths[:, None]
    return np.where(mask[..., None], states, np.nan).astype(np.float32), mask, correct


def test_verifier_learns_a_separable_toy_set(cfg, verifier):
    graphdef, params, logits = verifier
    states, mask, correct = _verifier_data(cfg)
    opt = optax.adam(1e-2)

    def step(carry, _):
        params, opt_state = carry
        value, grads = jax.value_and_grad(lambda p: bce_loss(nnx.merge(graphdef, p)(states, mask), correct))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), value

    train = jax.jit(lambda params: jax.lax.scan(step, (params, opt.init(params)), length=60))
    (trained, _), losses = train(params)
    test_states, test_mask, test_correct = _verifier_data(cfg, seed=2)
    accuracy = np.mean((np.asarray(logits(trained, test_states, test_mask)) > 0) == (test_correct > 0))
    assert losses[-1] < 0.3 * losses[0], losses
    assert accuracy > 0.95, accuracy


def test_verifier_ignores_masked_steps_and_reads_the_question(cfg, verifier):
    _, params, logits = verifier
    states, mask, _ = _verifier_data(cfg, n=8)
    zeros = np.where(mask[..., None], states, 0.0)
    reference = np.asarray(logits(params, zeros, mask))
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(logits(params, states, mask), reference, rtol=1e-6)    # NaN in masked steps
    longer = np.concatenate([zeros, np.full((8, 3, cfg.d_model), 7.0, np.float32)], 1)
    longer_mask = np.concatenate([mask, np.zeros((8, 3), bool)], 1)
    np.testing.assert_allclose(logits(params, longer, longer_mask), reference, rtol=1e-6)  # extra padded steps
    assert np.all(np.isfinite(np.asarray(logits(params, states, np.zeros_like(mask)))))  # no step ran
    question = np.random.default_rng(5).standard_normal((8, cfg.d_model)).astype(np.float32)
    assert not np.allclose(logits(params, zeros, mask, question), reference)


def test_ece_is_zero_when_calibrated_and_matches_hand_computed_values():
    calibrated = np.array([0.25] * 8 + [0.75] * 4, np.float32)
    outcomes = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], np.float32)
    assert float(ece_jit(calibrated, outcomes)) < 1e-6
    # one example per bin: (0.05 + 0.85 + 0.15 + 0.05 + 0.55) / 5
    probs = np.array([0.05, 0.15, 0.85, 0.95, 0.55], np.float32)
    np.testing.assert_allclose(ece_jit(probs, np.array([0, 1, 1, 1, 0], np.float32)), 0.33, rtol=1e-5)
    # one bin [0.6, 0.8) of three: accuracy 2/3, confidence 0.6466..; p = 1.0 falls in the last bin
    probs, outcomes = np.array([0.62, 0.68, 0.64, 1.0], np.float32), np.array([1, 0, 1, 1], np.float32)
    np.testing.assert_allclose(ece_jit(probs, outcomes, n_bins=5), 3 * abs(2 / 3 - 1.94 / 3) / 4, rtol=1e-4)
    p = np.array([0.9, 0.2], np.float32)  # bce against outcomes, by hand
    np.testing.assert_allclose(bce_loss(np.log(p / (1 - p)), np.array([1.0, 0.0])), -np.log([0.9, 0.8]).mean(),
                               rtol=1e-5)


def test_shape_errors_name_the_argument_and_the_expected_shape(cfg):
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(DataError, match=r"mask has shape \(2, 4\); expected \(2, 3\)"):
        trajectory_log_prob(x, x, 1.0, np.ones((2, 4)))
    with pytest.raises(DataError, match="mu_q has shape"):
        gaussian_kl(x, 1.0, x[:, :2], 1.0)
    with pytest.raises(DataError, match="log_prob has shape"):
        reinforce_loss(np.zeros(3), np.zeros(4))
    with pytest.raises(DataError, match=rf"expected \(B, {cfg.d_model}\)"):
        BudgetHead(cfg, 4, 16, rngs=nnx.Rngs(0))(jnp.zeros((2, 3)))
    with pytest.raises(DataError, match="states have shape"):
        VerifierHead(cfg, 16, rngs=nnx.Rngs(0))(jnp.zeros((2, cfg.d_model)))
