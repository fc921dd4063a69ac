"""Bayesian surprise (utils/surprise.py): the Normal-Gamma update and closed-form KL against a hand
computation and a Monte-Carlo estimate, forgetting, and the write gate's z-score, warm-up and
cooldown."""

import numpy as np
import pytest

from helpers import micro_config
from quietreasoning.config import ConfigError, DataError
from quietreasoning.utils.surprise import (NormalGamma, SurpriseGate, SurpriseTracker, bayesian_surprise,
                                           kl_normal_gamma, surprise_writes)


def ng(m, kappa, alpha, beta):
    return NormalGamma(*(np.float64(v) for v in (m, kappa, alpha, beta)))


# --- the belief and its KL ---------------------------------------------------------------------

def test_kl_matches_hand_computed_case():
    # prior NG(m=0, kappa=1, alpha=1, beta=1), observation x = 2. Posterior:
    #   kappa' = 2, m' = (1*0 + 2)/2 = 1, alpha' = 1.5, beta' = 1 + 1*(2-0)^2/(2*2) = 2.
    # Gamma part: (1.5-1) psi(1.5) - lnG(1.5) + lnG(1) + 1*(ln 2 - ln 1) + 1.5*(1-2)/2
    #   psi(1.5) = 2 - gamma_E - 2 ln 2 = 0.0364900, lnG(1.5) = ln(sqrt(pi)/2) = -0.1207822
    #   = 0.0182450 + 0.1207822 + 0 + 0.6931472 - 0.75 = 0.0821744
    # Normal part: 1/2 [kappa/kappa' - 1 - ln(kappa/kappa') + kappa (alpha'/beta') (m'-m)^2]
    #   = 1/2 [0.5 - 1 + 0.6931472 + 1 * 0.75 * 1] = 0.4715736
    # KL = 0.5537480
    surprise, post = bayesian_surprise(NormalGamma.vague(), 2.0)
    assert (post.m, post.kappa, post.alpha, post.beta) == (1.0, 2.0, 1.5, 2.0)
    assert surprise == pytest.approx(0.5537480, abs=1e-6)


@pytest.mark.parametrize("prior,x", [((0.0, 1.0, 1.0, 1.0), 2.0), ((3.0, 5.0, 4.0, 6.0), 7.5),
                                     ((-1.0, 0.5, 2.5, 0.7), -1.2)])
def test_kl_matches_monte_carlo_estimate(prior, x):
    q = ng(*prior)
    p = q.update(x)
    rng = np.random.default_rng(0)
    n = 400_000
    lam = rng.gamma(p.alpha, 1.0 / p.beta, n)
    mu = rng.normal(p.m, 1.0 / np.sqrt(p.kappa * lam))
    log_ratio = p.log_pdf(mu, lam) - q.log_pdf(mu, lam)  # KL(p || q) = E_p[log p - log q]
    stderr = log_ratio.std() / np.sqrt(n)
    assert abs(log_ratio.mean() - kl_normal_gamma(p, q)) < 4 * stderr


def test_log_pdf_integrates_to_one():
    belief = ng(0.5, 2.0, 3.0, 1.5)
    mu, lam = np.meshgrid(np.linspace(-6, 7, 1301), np.linspace(1e-6, 12, 1200), indexing="ij")
    mass = np.exp(belief.log_pdf(mu, lam)).sum() * (13 / 1300) * (12 / 1199)
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_kl_is_zero_for_identical_beliefs_and_positive_otherwise():
    a = ng(1.0, 2.0, 3.0, 4.0)
    assert kl_normal_gamma(a, a) == pytest.approx(0.0, abs=1e-12)
    for other in (ng(1.1, 2.0, 3.0, 4.0), ng(1.0, 3.0, 3.0, 4.0), ng(1.0, 2.0, 2.0, 4.0), ng(1.0, 2.0, 3.0, 5.0)):
        assert kl_normal_gamma(a, other) > 0 and kl_normal_gamma(other, a) > 0


def test_sequential_updates_equal_the_batch_posterior():
    x = np.random.default_rng(1).normal(4.0, 2.0, 50)
    m0, k0, a0, b0 = 1.0, 0.5, 2.0, 3.0
    belief = ng(m0, k0, a0, b0)
    for xi in x:
        belief = belief.update(xi)
    n, mean = len(x), x.mean()
    assert belief.kappa == pytest.approx(k0 + n)
    assert belief.m == pytest.approx((k0 * m0 + n * mean) / (k0 + n))
    assert belief.alpha == pytest.approx(a0 + n / 2)
    assert belief.beta == pytest.approx(b0 + 0.5 * np.sum((x - mean) ** 2) + k0 * n * (mean - m0) ** 2 / (2 * (k0 + n)))


def test_forget_is_the_renormalised_power_of_the_density():
    belief, rho = ng(0.3, 4.0, 5.0, 2.0), 0.7
    faded = belief.forget(rho)
    points = [(0.1, 0.5), (1.0, 2.0), (-0.4, 1.3)]
    # log faded = rho * log belief + a constant: differences between points scale by rho
    diffs = [faded.log_pdf(*p) - rho * belief.log_pdf(*p) for p in points]
    assert np.allclose(diffs, diffs[0])


def test_tracker_belief_settles_at_window_observations():
    tracker = SurpriseTracker(window=32)
    for x in np.random.default_rng(2).normal(3.0, 1.0, 2000):
        tracker.observe(x)
    assert tracker.belief.kappa == pytest.approx(32.0, rel=1e-6)
    assert tracker.belief.m == pytest.approx(3.0, abs=0.6)


def test_an_outlier_is_more_surprising_than_a_typical_value():
    tracker = SurpriseTracker((2,), window=128)
    for x in np.random.default_rng(3).normal(2.0, 0.5, 300):
        tracker.observe(np.array([x, x]))
    typical, outlier = tracker.observe(np.array([2.0, 6.0]))
    assert outlier > 10 * typical


def test_tracker_rejects_a_window_below_one():
    with pytest.raises(ConfigError, match="window"):
        SurpriseTracker(window=0.5)


# --- the write gate ----------------------------------------------------------------------------

def test_gate_z_score_uses_statistics_before_the_observation():
    gate = SurpriseGate(z=1.0, cooldown=0, warmup=3)
    for s in (1.0, 2.0, 3.0):
        write, _ = gate.observe(s)
        assert not write  # warm-up
    # mean 2, population std sqrt(2/3) = 0.8165: z of 4 = 2 / 0.8165 = 2.449
    write, z = gate.observe(4.0)
    assert write and z == pytest.approx(2.0 / np.sqrt(2.0 / 3.0))
    # now mean 2.5, std sqrt(1.25) = 1.118: z of 3.5 = 0.894, below 1
    write, z = gate.observe(3.5)
    assert not write and z == pytest.approx(1.0 / np.sqrt(1.25))


def test_gate_waits_for_warmup():
    gate = SurpriseGate(z=1.0, cooldown=0, warmup=10)
    values = np.tile([0.0, 1.0], 20)
    values[3] = values[9] = values[25] = 100.0
    writes = [bool(gate.observe(v)[0]) for v in values]
    assert not any(writes[:10]) and writes[25]  # the same spike is written once warm


def test_gate_keeps_cooldown_tokens_between_writes():
    cooldown = 5
    gate = SurpriseGate(z=1.0, cooldown=cooldown, warmup=2)
    rng = np.random.default_rng(4)
    writes = [bool(gate.observe(s)[0]) for s in rng.exponential(1.0, 3000)]
    at = np.flatnonzero(writes)
    assert len(at) > 50
    assert np.diff(at).min() == cooldown + 1  # exactly `cooldown` tokens between the closest writes


def test_gate_writes_the_gaussian_tail_fraction_without_cooldown():
    gate = SurpriseGate(z=1.0, cooldown=0, warmup=2, window=1e9)
    s = np.random.default_rng(5).normal(0.0, 1.0, 20000)
    writes = np.array([gate.observe(v)[0] for v in s])
    assert writes.mean() == pytest.approx(0.1587, abs=0.01)  # P(Z > 1) for a standard normal


def test_gate_from_config_reads_the_memory_keys():
    gate = SurpriseGate.from_config(micro_config("memory.surprise_z=2.5", "memory.surprise_cooldown=7"), (3,))
    assert (gate.z, gate.cooldown, gate.count.shape) == (2.5, 7, (3,))


def test_streams_of_a_batch_are_independent():
    rng = np.random.default_rng(6)
    nll = rng.gamma(2.0, 1.5, (2, 400))
    nll[1, 200:210] += 8.0
    surprise, write = surprise_writes(nll, SurpriseTracker((2,)), SurpriseGate(1.0, 16, (2,)))
    alone, alone_write = surprise_writes(nll[1:], SurpriseTracker((1,)), SurpriseGate(1.0, 16, (1,)))
    assert np.array_equal(surprise[1:], alone) and np.array_equal(write[1:], alone_write)
    assert write[1, 200:210].any()  # the jump in loss is written
    assert (np.diff(np.flatnonzero(write[0])) > 16).all()


def test_surprise_writes_rejects_mismatched_shapes():
    with pytest.raises(DataError, match=r"\(B, T\)"):
        surprise_writes(np.zeros((3, 5)), SurpriseTracker((2,)), SurpriseGate(1.0, 4, (2,)))
