"""The stochastic latent loop's math and heads: Gaussian latent steps, their log-probability,
the REINFORCE surrogate with a KL penalty to a frozen reference, and the budget and verifier heads.
Pure building blocks; the trainer (training/latent.py) runs the loop and adds the terms up.

Terms, as used throughout this module:
  step        one latent thought inside a think block. At step k the model proposes a mean
              mu_k (D,) from its last hidden state; the step's latent is z_k = mu_k + sigma * eps_k,
              eps_k ~ N(0, I). sigma is a scalar, a per-dimension vector (D,) or a per-step array.
  policy      the distribution pi_theta(z_k | z_<k, question) = N(mu_k, sigma^2 I): the model's
              parameters theta reach it only through mu_k (and sigma when sigma is learned).
  trajectory  the K sampled latents z_1..z_K of one think block (arrays (..., K, D)), with a mask
              (..., K) that marks the steps that ran (K varies per example; the arrays are padded to
              K_max). Its log-probability is the sum over the steps that ran of log pi(z_k | ...).
  reward      R = 1[answer correct] - cost * K (`latent_reward`): a right answer is worth 1 and
              each latent step costs `cost`.
  baseline    b, any quantity that does not depend on the sampled trajectory or budget given the
              question; subtracting it leaves the gradient's expectation unchanged and can lower its
              variance. The verifier's predicted P(correct) from the question alone (every step
              masked) qualifies; its prediction from the sampled trajectory itself does not: that is
              a function of the sample, E[b(z) grad log pi(z)] != 0, and it biases the estimate.
  advantage   A = R - b, optionally normalised over the batch: (A - mean(A)) / (std(A) + eps).
  budget      the number of latent steps K in [0, K_max], drawn per example by `BudgetHead` from a
              categorical over K_max + 1 values; its log-probability joins the trajectory's in the
              REINFORCE surrogate, and the reward's cost term teaches it to spend few steps.
  verifier    `VerifierHead`: from the trajectory (mean of its latents over the steps that ran) and,
              if given, the question's pooled hidden state, the logit of P(answer correct), trained
              with binary cross-entropy against the observed correctness.
  ECE         expected calibration error of predicted probabilities p_i against outcomes y_i: cut
              [0, 1] into n equal-width bins (bin b holds p in [b/n, (b+1)/n), the last bin also
              holds 1.0); ECE = sum_b (|B_b| / N) * |mean_{i in B_b} y_i - mean_{i in B_b} p_i|.
              0 means that among the examples given probability about p, a fraction p were right.

The gradient estimator. REINFORCE (Williams 1992, "Simple statistical gradient-following
algorithms for connectionist reinforcement learning") rests on the identity
grad E_{z ~ pi_theta}[R(z)] = E[R(z) grad log pi_theta(z)]: with the sample z held fixed, the
gradient of its log-density is the score, and the mean of R times the score over samples is an
unbiased estimate of the reward's gradient. Holding z fixed is what the code below arranges:
  - `sample_latents` returns z with no gradient path to mu or sigma: the latent fed to the next
    step is an action, so every later mu_k depends on theta only through the computation that
    maps the fixed earlier latents to it (which is exactly what the score of a trajectory needs).
  - `trajectory_log_prob(mus, eps, sigma)` rebuilds z_k = stop_gradient(mu_k) +
    stop_gradient(sigma) * eps_k and evaluates log N(z_k; mu_k, sigma^2 I) with mu_k and sigma
    live. Its value is the log-density of the sample; its gradient is the score: d/dmu_k =
    (z_k - mu_k) / sigma^2 = eps_k / sigma, and d/dsigma = (eps_k^2 - 1) / sigma per dimension.
  - `reinforce_loss` = -mean(stop_gradient(A) * log_prob), whose gradient is
    -mean(A * grad log pi): descending it ascends the expected reward.
The KL penalty to a frozen reference (the model at the start of the stage) is the closed form
KL(N(mu_k, sigma^2) || N(mu_ref_k, sigma_ref^2)) per step at the states the sampled trajectory
visited, summed over the steps that ran (`gaussian_kl`); its gradient is taken through mu and
sigma at those states only (the states' own dependence on theta is not differentiated), the usual
per-step KL penalty of policy-gradient fine-tuning. The recipe as a whole (Gaussian latent steps,
REINFORCE on 1[correct] - lambda K with normalised rewards and an optional verifier baseline, KL to
a frozen reference, budget and verifier heads) follows issue 6's "stochastic latent loop" section.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import DataError, ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, named, param

NORM_EPS = 1e-6        # added to the batch std when rewards are normalised
HEAD_HIDDEN = 256      # default hidden width of the budget and verifier MLPs
LOG_2PI = math.log(2.0 * math.pi)


def _check_steps(where: str, x: jax.Array, name: str, mask: jax.Array | None) -> None:
    """`x` must be (..., K, D); a mask must be (..., K)."""
    if x.ndim < 2:
        raise DataError(f"{where}: {name} has shape {x.shape}; expected (..., K, D), one D-vector per step")
    if mask is not None and mask.shape != x.shape[:-1]:
        raise DataError(f"{where}: mask has shape {mask.shape}; expected {x.shape[:-1]}, one flag per step of {name}")


def _padded_to(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """`x` with the steps that did not run set to `fill`, so whatever padding holds (NaN included)
    reaches neither the value nor the gradient. Scalars and per-dimension (D,) arrays pass through."""
    if mask is None or x.ndim < 2:
        return x
    return jnp.where(mask.astype(bool)[..., None], x, fill)


def _sum_steps(per_dim: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Sum over D, then over the steps that ran: (..., K, D) -> (...)."""
    per_step = jnp.sum(per_dim, axis=-1)
    if mask is not None:
        per_step = jnp.where(mask.astype(bool), per_step, 0.0)
    return jnp.sum(per_step, axis=-1)


def sample_latents(mu: jax.Array, sigma: jax.Array | float, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mu (..., K, D) -> (z, eps), float32, z = mu + sigma * eps with eps ~ N(0, I).

    z carries no gradient (it is the action; see the module docstring): the score-function
    gradient comes from `trajectory_log_prob(mus, eps, sigma)`. A pathwise (reparameterised)
    sample, where that is wanted instead, is `mu + sigma * eps` from the returned eps."""
    _check_steps("sample_latents", mu, "mu", None)
    mu = jnp.asarray(mu, jnp.float32)
    eps = jax.random.normal(key, mu.shape, jnp.float32)
    z = jax.lax.stop_gradient(mu + jnp.asarray(sigma, jnp.float32) * eps)
    return z, eps


def trajectory_log_prob(mus: jax.Array, eps: jax.Array, sigma: jax.Array | float,
                        mask: jax.Array | None = None) -> jax.Array:
    """log pi(trajectory) = sum over the steps that ran of log N(z_k; mu_k, sigma^2 I): (..., K, D) -> (...).

    z_k = stop_gradient(mu_k) + stop_gradient(sigma) * eps_k is the sample held fixed; mu_k and
    sigma are differentiated, so the gradient is the score (eps / sigma w.r.t. mu, (eps^2 - 1) /
    sigma w.r.t. sigma per dimension). `mask` (..., K): 1 where the step ran."""
    _check_steps("trajectory_log_prob", mus, "mus", mask)
    if eps.shape != mus.shape:
        raise DataError(f"trajectory_log_prob: eps has shape {eps.shape}; expected mus's shape {mus.shape}")
    mus = _padded_to(jnp.asarray(mus, jnp.float32), mask, 0.0)
    eps = _padded_to(jnp.asarray(eps, jnp.float32), mask, 0.0)
    sigma = _padded_to(jnp.asarray(sigma, jnp.float32), mask, 1.0)
    z = jax.lax.stop_gradient(mus) + jax.lax.stop_gradient(sigma) * eps
    per_dim = -0.5 * jnp.square((z - mus) / sigma) - jnp.log(sigma) - 0.5 * LOG_2PI
    return _sum_steps(per_dim, mask)


def gaussian_kl(mu_p: jax.Array, sigma_p: jax.Array | float, mu_q: jax.Array, sigma_q: jax.Array | float,
                mask: jax.Array | None = None) -> jax.Array:
    """KL(N(mu_p, sigma_p^2 I) || N(mu_q, sigma_q^2 I)) per step, summed over D and over the steps
    that ran: (..., K, D) -> (...). Closed form per dimension:
    log(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2.
    p is the policy being trained, q the frozen reference; sigmas are scalars, per-dimension (D,)
    or full arrays. Both sides are differentiated: stop the reference's gradient at the caller."""
    _check_steps("gaussian_kl", mu_p, "mu_p", mask)
    if mu_q.shape != mu_p.shape:
        raise DataError(f"gaussian_kl: mu_q has shape {mu_q.shape}; expected mu_p's shape {mu_p.shape}")
    mu_p, mu_q = (_padded_to(jnp.asarray(m, jnp.float32), mask, 0.0) for m in (mu_p, mu_q))
    sigma_p, sigma_q = (_padded_to(jnp.asarray(s, jnp.float32), mask, 1.0) for s in (sigma_p, sigma_q))
    per_dim = (jnp.log(sigma_q) - jnp.log(sigma_p)
               + (jnp.square(sigma_p) + jnp.square(mu_p - mu_q)) / (2.0 * jnp.square(sigma_q)) - 0.5)
    return _sum_steps(per_dim, mask)


def latent_reward(correct: jax.Array, k: jax.Array, cost: float) -> jax.Array:
    """R = 1[correct] - cost * K per example, float32 (B,)."""
    return jnp.asarray(correct, jnp.float32) - cost * jnp.asarray(k, jnp.float32)


def advantage(reward: jax.Array, baseline: jax.Array | None = None, normalise: bool = True) -> jax.Array:
    """A = reward - baseline (B,), then (A - mean A) / (std A + NORM_EPS) over the batch when
    `normalise` (the batch mean then absorbs any constant part of the baseline: what it adds is its
    variation across examples); always under stop-gradient (nothing reaches reward or baseline)."""
    if reward.ndim != 1:
        raise DataError(f"advantage: reward has shape {reward.shape}; expected (B,), one reward per example")
    if baseline is not None and baseline.shape != reward.shape:
        raise DataError(f"advantage: baseline has shape {baseline.shape}; expected the reward's {reward.shape}")
    a = jnp.asarray(reward, jnp.float32)
    if baseline is not None:
        a = a - jnp.asarray(baseline, jnp.float32)
    if normalise:
        a = (a - jnp.mean(a)) / (jnp.std(a) + NORM_EPS)
    return jax.lax.stop_gradient(a)


def reinforce_loss(log_prob: jax.Array, reward: jax.Array, baseline: jax.Array | None = None,
                   normalise: bool = True) -> jax.Array:
    """-mean(A * log_prob), a scalar whose gradient is -mean(A * grad log pi) (the REINFORCE
    estimate of -grad E[R]; A from `advantage`). `log_prob` (B,) is the policy's log-probability
    of what it sampled: the trajectory's plus the budget's when K was sampled."""
    if log_prob.shape != reward.shape:
        raise DataError(f"reinforce_loss: log_prob has shape {log_prob.shape}; expected the reward's {reward.shape}")
    return -jnp.mean(advantage(reward, baseline, normalise) * log_prob)


class BudgetHead(nnx.Module):
    """Pooled hidden state (B, D) -> logits over K in [0, k_max]: RMSNorm, D -> hidden GELU MLP,
    hidden -> k_max + 1. The output layer starts small, so the first budgets are near uniform."""

    def __init__(self, cfg: ModelConfig, k_max: int, hidden: int = HEAD_HIDDEN, *, rngs: nnx.Rngs):
        if k_max < 1 or hidden < 1:
            raise DataError(f"BudgetHead: k_max={k_max} and hidden={hidden} must be >= 1")
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.k_max = k_max
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.w_in = param(rngs, (cfg.d_model, hidden), ("embed", "mlp"), 1 / math.sqrt(cfg.d_model), pdt)
        self.b_in = named(jnp.zeros((hidden,), pdt), ("mlp",))
        self.w_out = param(rngs, (hidden, k_max + 1), ("mlp", None), cfg.init_std, pdt)
        self.b_out = named(jnp.zeros((k_max + 1,), pdt), (None,))

    def __call__(self, h: jax.Array) -> jax.Array:
        """h (B, D) -> logits (B, k_max + 1), float32."""
        d = self.w_in.shape[0]
        if h.ndim != 2 or h.shape[-1] != d:
            raise DataError(f"BudgetHead: h has shape {h.shape}; expected (B, {d}), "
                            "one pooled hidden state per example")
        x = jax.nn.gelu(matmul(self.norm(h), self.w_in[...], self.dtype) + self.b_in[...])
        return matmul(x, self.w_out[...], self.dtype) + self.b_out[...]

    def sample(self, h: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (K int32 (B,) in [0, k_max], log pi(K) float32 (B,))."""
        logits = self(h)
        k = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        return k, _gather(jax.nn.log_softmax(logits, axis=-1), k)

    def log_prob(self, h: jax.Array, k: jax.Array) -> jax.Array:
        """log pi(K = k | h), float32 (B,)."""
        return _gather(jax.nn.log_softmax(self(h), axis=-1), jnp.asarray(k, jnp.int32))

    def expected_k(self, h: jax.Array) -> jax.Array:
        """E[K] = sum_k k pi(k | h), float32 (B,)."""
        probs = jax.nn.softmax(self(h), axis=-1)
        return probs @ jnp.arange(self.k_max + 1, dtype=jnp.float32)


def _gather(log_probs: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.take_along_axis(log_probs, k[:, None], axis=-1)[:, 0]


class VerifierHead(nnx.Module):
    """Trajectory (B, K, D) + step mask (B, K) [+ question (B, D)] -> logit of P(correct) (B,).

    The trajectory is the mean of its latents over the steps that ran (zero when none ran); it and
    the question are RMS-normalised and projected separately into one hidden layer (a question not
    given contributes nothing), GELU, then one output unit. Masked steps are never read, whatever
    they hold (NaN included). P(correct) = sigmoid(logit). With every step masked the logit reads
    the question alone, which is the form usable as a REINFORCE baseline (module docstring)."""

    def __init__(self, cfg: ModelConfig, hidden: int = HEAD_HIDDEN, *, rngs: nnx.Rngs):
        if hidden < 1:
            raise DataError(f"VerifierHead: hidden={hidden} must be >= 1")
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.d_model
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.norm_traj = RMSNorm(d, cfg.norm_eps, pdt)
        self.norm_question = RMSNorm(d, cfg.norm_eps, pdt)
        self.w_traj = param(rngs, (d, hidden), ("embed", "mlp"), 1 / math.sqrt(d), pdt)
        self.w_question = param(rngs, (d, hidden), ("embed", "mlp"), 1 / math.sqrt(d), pdt)
        self.b_in = named(jnp.zeros((hidden,), pdt), ("mlp",))
        self.w_out = param(rngs, (hidden, 1), ("mlp", None), cfg.init_std, pdt)
        self.b_out = named(jnp.zeros((1,), pdt), (None,))

    def __call__(self, states: jax.Array, mask: jax.Array | None = None,
                 question: jax.Array | None = None) -> jax.Array:
        d = self.w_traj.shape[0]
        if states.ndim != 3 or states.shape[-1] != d:
            raise DataError(f"VerifierHead: states have shape {states.shape}; expected (B, K, {d}), "
                            "the latent trajectory")
        if mask is None:
            mask = jnp.ones(states.shape[:2], bool)
        if mask.shape != states.shape[:2]:
            raise DataError(f"VerifierHead: mask has shape {mask.shape}; expected {states.shape[:2]}, "
                            "one flag per step")
        if question is not None and question.shape != (states.shape[0], d):
            raise DataError(f"VerifierHead: question has shape {question.shape}; expected ({states.shape[0]}, {d})")
        valid = mask.astype(bool)[..., None]
        total = jnp.sum(jnp.where(valid, states.astype(jnp.float32), 0.0), axis=1)
        pooled = total / jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
        x = matmul(self.norm_traj(pooled), self.w_traj[...], self.dtype) + self.b_in[...]
        if question is not None:
            x = x + matmul(self.norm_question(question), self.w_question[...], self.dtype)
        return (matmul(jax.nn.gelu(x), self.w_out[...], self.dtype) + self.b_out[...])[:, 0]


def bce_loss(logit: jax.Array, correct: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of P(correct) = sigmoid(logit) against 0/1 outcomes, float32 scalar."""
    if logit.shape != correct.shape:
        raise DataError(f"bce_loss: logit has shape {logit.shape}; expected the outcomes' {correct.shape}")
    y = jnp.asarray(correct, jnp.float32)
    logit = jnp.asarray(logit, jnp.float32)
    return -jnp.mean(y * jax.nn.log_sigmoid(logit) + (1.0 - y) * jax.nn.log_sigmoid(-logit))


def expected_calibration_error(probs: jax.Array, correct: jax.Array, n_bins: int = 10) -> jax.Array:
    """ECE over `n_bins` equal-width bins (module docstring; Naeini et al. 2015, the form used by
    Guo et al. 2017, "On calibration of modern neural networks"), float32 scalar in [0, 1]."""
    if probs.ndim != 1 or probs.shape != correct.shape:
        raise DataError(f"expected_calibration_error: probs {probs.shape} and correct {correct.shape} "
                        "must both be (N,), one prediction per outcome")
    if n_bins < 1:
        raise DataError(f"expected_calibration_error: n_bins={n_bins} must be >= 1")
    p = jnp.asarray(probs, jnp.float32)
    y = jnp.asarray(correct, jnp.float32)
    bins = jnp.clip(jnp.floor(p * n_bins).astype(jnp.int32), 0, n_bins - 1)
    gap = jax.ops.segment_sum(y - p, bins, num_segments=n_bins)   # |B_b| (acc_b - conf_b)
    return jnp.sum(jnp.abs(gap)) / p.shape[0]
