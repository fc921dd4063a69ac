"""Bayesian surprise of a scalar signal (per-token loss), and the gate that decides episodic writes.

The model of the signal. Observations x_1, x_2, ... (e.g. each token's negative log-likelihood, in
nats) are Gaussian with unknown mean mu and precision lam: x | mu, lam ~ N(mu, 1/lam). The belief
about (mu, lam) is the conjugate Normal-Gamma distribution NG(m, kappa, alpha, beta):

    lam ~ Gamma(alpha, rate=beta),   mu | lam ~ N(m, 1 / (kappa * lam)).

Update. Observing x turns NG(m, kappa, alpha, beta) into the posterior

    kappa' = kappa + 1,   m' = (kappa * m + x) / kappa',
    alpha' = alpha + 1/2, beta' = beta + kappa * (x - m)^2 / (2 * kappa').

Forgetting. A stream drifts (a new document, a new topic), so the running belief forgets: before
each update it is raised to the power rho = 1 - 1/window and renormalised (a power prior), which
stays Normal-Gamma: NG(m, rho * kappa, rho * (alpha - 1/2) + 1/2, rho * beta). kappa then
settles at `window`: the belief rests on about the last `window` observations. window = inf is
exact Bayesian accumulation.

Bayesian surprise. The surprise of x is how far it moves the belief: the Kullback-Leibler
divergence of the posterior after x from the belief just before it (Itti & Baldi, "Bayesian
surprise attracts human attention", NIPS 2005), in closed form (`kl_normal_gamma`):

    KL(NG_1 || NG_0) = (alpha1 - alpha0) psi(alpha1) - lnG(alpha1) + lnG(alpha0)
                       + alpha0 (ln beta1 - ln beta0) + alpha1 (beta0 - beta1) / beta1
                       + 1/2 [kappa0 / kappa1 - 1 - ln(kappa0 / kappa1)
                              + kappa0 (alpha1 / beta1) (m1 - m0)^2]

(psi: digamma, lnG: log-gamma). The first line is the KL of the Gamma parts; the second is the
KL of the conditional Normals averaged over lam ~ Gamma(alpha1, beta1), which uses E[lam] =
alpha1 / beta1. An observation far from m, or one that changes the spread, scores high.

The write gate (`SurpriseGate`). The z-score of a surprise value is (s - mean) / std against the
running mean and standard deviation of the surprise values seen before it (exact means over
the first `window` values, then exponentially weighted with weight 1/window). The gate says
"write" when z > memory.surprise_z, the stream has seen at least `warmup` values, and at least
memory.surprise_cooldown observations have passed since the last write without one (so writes
are at least cooldown + 1 tokens apart). Every value updates the statistics, written or not.

Everything is float64 numpy over an array of independent streams (shape `shape`, e.g. (batch,)):
one call observes one token of every stream. This is host-side bookkeeping, outside the jitted
step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import digamma, gammaln

from quietreasoning.config import Config, ConfigError, DataError

# the stream defaults: the belief rests on about this many tokens; the gate's statistics too
TRACKER_WINDOW = 256.0
GATE_WINDOW = 1024.0
# tokens the gate watches before its first write: the first surprises are large while the belief
# forms from the vague prior, and its statistics need a few values to mean anything
GATE_WARMUP = 32
STD_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class NormalGamma:
    """The belief NG(m, kappa, alpha, beta) about a Gaussian's mean and precision (see the module
    docstring); each field is a float64 array of the stream shape (or broadcastable to it)."""
    m: np.ndarray
    kappa: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray

    @classmethod
    def vague(cls, shape: tuple[int, ...] = (), m: float = 0.0, kappa: float = 1.0, alpha: float = 1.0,
              beta: float = 1.0) -> NormalGamma:
        """A weak prior worth about one observation, for every stream of `shape`."""
        if not (kappa > 0 and alpha > 0 and beta > 0):
            raise ConfigError(f"NormalGamma prior: kappa={kappa}, alpha={alpha}, beta={beta} must all be positive")
        full = lambda v: np.full(shape, v, np.float64)
        return cls(full(m), full(kappa), full(alpha), full(beta))

    def update(self, x) -> NormalGamma:
        """The posterior after observing `x` (one value per stream)."""
        x = np.asarray(x, np.float64)
        kappa = self.kappa + 1.0
        return NormalGamma((self.kappa * self.m + x) / kappa, kappa, self.alpha + 0.5,
                           self.beta + self.kappa * np.square(x - self.m) / (2.0 * kappa))

    def forget(self, rho: float) -> NormalGamma:
        """The belief raised to the power `rho` in (0, 1] and renormalised (still Normal-Gamma)."""
        return NormalGamma(self.m, rho * self.kappa, rho * (self.alpha - 0.5) + 0.5, rho * self.beta)

    def log_pdf(self, mu, lam) -> np.ndarray:
        """log NG(mu, lam | m, kappa, alpha, beta): the joint log-density of a (mean, precision) pair."""
        mu, lam = np.asarray(mu, np.float64), np.asarray(lam, np.float64)
        return (self.alpha * np.log(self.beta) - gammaln(self.alpha) + (self.alpha - 1.0) * np.log(lam)
                - self.beta * lam + 0.5 * np.log(self.kappa * lam / (2.0 * np.pi))
                - 0.5 * self.kappa * lam * np.square(mu - self.m))


def kl_normal_gamma(p: NormalGamma, q: NormalGamma) -> np.ndarray:
    """KL(p || q) of two Normal-Gamma beliefs, in nats, in closed form (module docstring)."""
    gamma_part = ((p.alpha - q.alpha) * digamma(p.alpha) - gammaln(p.alpha) + gammaln(q.alpha)
                  + q.alpha * (np.log(p.beta) - np.log(q.beta)) + p.alpha * (q.beta - p.beta) / p.beta)
    ratio = q.kappa / p.kappa
    normal_part = 0.5 * (ratio - 1.0 - np.log(ratio) + q.kappa * (p.alpha / p.beta) * np.square(p.m - q.m))
    return gamma_part + normal_part


def bayesian_surprise(prior: NormalGamma, x) -> tuple[np.ndarray, NormalGamma]:
    """(KL(posterior || prior), posterior) for the observation `x`."""
    posterior = prior.update(x)
    return kl_normal_gamma(posterior, prior), posterior


class SurpriseTracker:
    """The running belief about a stream of scalar observations (one stream per element of
    `shape`); `observe(x)` forgets, updates, and returns each stream's Bayesian surprise of x."""

    def __init__(self, shape: tuple[int, ...] = (), *, prior: NormalGamma | None = None,
                 window: float = TRACKER_WINDOW):
        if not window >= 1:
            raise ConfigError(f"SurpriseTracker: window={window} must be at least 1 observation (inf: never forget)")
        self.rho = 1.0 - 1.0 / window
        self.belief = NormalGamma.vague(shape) if prior is None else prior

    def observe(self, x) -> np.ndarray:
        prior = self.belief.forget(self.rho)
        surprise, self.belief = bayesian_surprise(prior, x)
        return surprise


class SurpriseGate:
    """Decides, token by token, which observations to write to episodic memory: z-score of the
    surprise above `z`, after `warmup` values, at least `cooldown` tokens since the last write."""

    def __init__(self, z: float, cooldown: int, shape: tuple[int, ...] = (), *, window: float = GATE_WINDOW,
                 warmup: int = GATE_WARMUP):
        if cooldown < 0 or warmup < 2 or not window >= 1:
            raise ConfigError(f"SurpriseGate: cooldown={cooldown} must not be negative, warmup={warmup} must be at "
                              f"least 2 (a std needs two values), window={window} at least 1")
        self.z, self.cooldown, self.window, self.warmup = float(z), int(cooldown), float(window), int(warmup)
        self.count = np.zeros(shape, np.int64)
        self.mean = np.zeros(shape, np.float64)
        self.var = np.zeros(shape, np.float64)
        self.since_write = np.full(shape, np.iinfo(np.int64).max // 2, np.int64)

    @classmethod
    def from_config(cls, cfg: Config, shape: tuple[int, ...] = ()) -> SurpriseGate:
        """The gate of memory.surprise_z and memory.surprise_cooldown."""
        return cls(cfg.memory.surprise_z, cfg.memory.surprise_cooldown, shape)

    def observe(self, surprise) -> tuple[np.ndarray, np.ndarray]:
        """(write (bool), z-score) for one surprise value per stream; then updates the statistics."""
        s = np.asarray(surprise, np.float64)
        z = (s - self.mean) / np.maximum(np.sqrt(self.var), STD_FLOOR)
        self.since_write = self.since_write + 1
        write = (self.count >= self.warmup) & (z > self.z) & (self.since_write > self.cooldown)
        self.since_write = np.where(write, 0, self.since_write)
        # running mean and (population) variance; weight 1/n is exact, 1/window past the window
        self.count = self.count + 1
        w = np.maximum(1.0 / self.count, 1.0 / self.window)
        delta = s - self.mean
        self.mean = self.mean + w * delta
        self.var = (1.0 - w) * (self.var + w * np.square(delta))
        return write, z


def surprise_writes(nll, tracker: SurpriseTracker, gate: SurpriseGate) -> tuple[np.ndarray, np.ndarray]:
    """(surprise, write) arrays of shape (B, T) for per-token losses `nll` (B, T), observed in
    token order by a tracker and a gate of stream shape (B,)."""
    nll = np.asarray(nll, np.float64)
    if nll.ndim != 2 or nll.shape[:1] != gate.count.shape or gate.count.shape != tracker.belief.m.shape:
        raise DataError(f"surprise_writes: nll has shape {nll.shape}, tracker streams {tracker.belief.m.shape}, "
                          f"gate streams {gate.count.shape}; pass (B, T) losses to a tracker and gate of shape (B,)")
    surprise = np.empty_like(nll)
    write = np.zeros(nll.shape, bool)
    for t in range(nll.shape[1]):
        surprise[:, t] = tracker.observe(nll[:, t])
        write[:, t] = gate.observe(surprise[:, t])[0]
    return surprise, write
