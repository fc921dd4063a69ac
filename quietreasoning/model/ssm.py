"""A light Mamba-style selective SSM expert (Gu & Dao 2023), written from the paper's equations.

The trunk runs one after some blocks (`model.ssm_layers`) and adds `gate * delta` to the
residual stream. For each inner channel i and state index n, with u the convolved input:

    dt_t   = softplus(W_up W_down u_t + dt_bias)          input-dependent step (low rank)
    B_t, C_t = W_B u_t, W_C u_t                           input-dependent, shared by channels
    A      = -exp(A_log)                                  S4D-real init: A_log = log(1..N)
    h_t    = exp(dt_t A) * h_{t-1} + dt_t B_t u_t          (zero-order hold on A, Euler on B)
    y_t    = C_t . h_t + D u_t

    delta  = W_out (y * silu(z))   with [u_pre, z] = W_in RMSNorm(x), u = silu(conv(u_pre))

Training runs the recurrence in parallel over time with `jax.lax.associative_scan` on the
pairs (decay, input) -> (a1 a2, a2 b1 + b2); decoding runs `step`, the same recurrence one
token at a time from `init_state`. Packed rows: at every segment start the decay is set to 0
(the state forgets the previous document) and convolution taps reaching back across the
start are masked, so no document sees another.

Memory: the scan's operands are (B, L, inner, state) float32, and an associative scan keeps
several such tensors alive (its sweep levels, and more in the backward pass). Over a whole 3b
row (T 8192, inner 2304, state 128) one such tensor is 9 GiB, and XLA (CPU, compiled, B = 1)
asks for 54 GiB of temporaries forward and 198 GiB for the gradient. So time is cut into
chunks of `scan_chunk` tokens: a `lax.scan` carries the state (B, inner, state) from chunk to
chunk, each chunk is an associative scan, and the chunk body is rematerialised, so the
backward pass saves one carry per chunk and (B, T, inner, state) is never built whole. Same
3b row, gradient temporaries: chunk 32: 2.2 GiB, 64: 2.7 GiB, 128: 4.0 GiB, 256: 6.3 GiB
(forward 0.6 / 0.8 / 1.2 / 2.1 GiB); about 2 GiB of that is the (B, T, inner)-sized
activations, and all of it scales with rows per device and with 1 / tensor-parallel degree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, named, param

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt starts log-uniform in [DT_MIN, DT_MAX]
HIGHEST = jax.lax.Precision.HIGHEST  # the state contractions stay true float32 on every backend


def _dt_bias(key: jax.Array, inner: int) -> jax.Array:
    """Bias b with softplus(b) log-uniform in [DT_MIN, DT_MAX]: b = dt + log(1 - exp(-dt))."""
    u = jax.random.uniform(key, (inner,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)), DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


def _combine(left, right):
    """Compose two affine maps h -> a h + b (left first): (a1 a2, a2 b1 + b2)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def selective_scan(u, dt, a, b, c, reset, h0, chunk):
    """y_t = C_t . h_t with h_t = exp(dt_t a) h_{t-1} + dt_t B_t u_t, and h_{-1} = h0.

    u, dt (B, T, I); a (I, N); b, c (B, T, N); reset (B, T) bool (decay 0 there); h0 (B, I, N).
    Returns y (B, T, I) and the last state (B, I, N), all float32. Time is cut into chunks of
    `chunk` tokens (padded at the end; padding comes after every real token so it changes nothing).
    """
    bsz, t, inner = u.shape
    chunk = max(1, min(chunk, t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t

    def chunks(v):  # (B, T, ...) -> (n_chunks, B, chunk, ...)
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return jnp.moveaxis(v.reshape(bsz, n_chunks, chunk, *v.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(h, xs):
        u_c, dt_c, b_c, c_c, reset_c = xs
        decay = jnp.exp(dt_c[..., None] * a)  # (B, L, I, N)
        decay = jnp.where(reset_c[:, :, None, None], 0.0, decay)
        drive = (dt_c * u_c)[..., None] * b_c[:, :, None, :]  # (B, L, I, N)
        cum_decay, hs = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
        hs = hs + cum_decay * h[:, None]  # bring in the state carried from earlier chunks
        y = jnp.einsum("blin,bln->bli", hs, c_c, precision=HIGHEST)
        return hs[:, -1], y

    xs = tuple(chunks(v) for v in (u, dt, b, c, reset))
    h, ys = jax.lax.scan(body, h0, xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(bsz, n_chunks * chunk, inner)[:, :t]
    return y, h


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """(B, T) bool: True where a new segment begins (position 0 and every change of id)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool), change], axis=1)


class SSMExpert(nnx.Module):
    """x (B, T, D) float32 -> delta (B, T, D) float32; the caller adds `gate * delta`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, scan_chunk: int = 64):
        d, n, k, r = cfg.d_model, cfg.ssm_state, cfg.ssm_conv, cfg.resolved_dt_rank
        inner = cfg.ssm_expand * d
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.inner, self.n_state, self.width = inner, n, k
        self.scan_chunk = scan_chunk

        self.norm = RMSNorm(d, cfg.norm_eps, pdt)
        # in-projection as two matrices so tensor parallelism splits x and z alike
        self.in_x = param(rngs, (d, inner), ("embed", "ssm_inner"), cfg.init_std, pdt)
        self.in_z = param(rngs, (d, inner), ("embed", "ssm_inner"), cfg.init_std, pdt)
        # causal depthwise conv: tap j multiplies the input j - (k - 1) steps back
        self.conv_w = param(rngs, (k, inner), ("conv", "ssm_inner"), 1.0 / math.sqrt(k), pdt)
        self.conv_b = named(jnp.zeros((inner,), pdt), ("ssm_inner",))
        # step size: inner -> rank -> inner, softplus(. + bias)
        self.dt_down = param(rngs, (inner, r), ("ssm_inner", "ssm_rank"), cfg.init_std, pdt)
        self.dt_up = param(rngs, (r, inner), ("ssm_rank", "ssm_inner"), 1.0 / math.sqrt(3 * r), pdt)
        self.dt_bias = named(_dt_bias(rngs.params(), inner).astype(pdt), ("ssm_inner",))
        self.w_b = param(rngs, (inner, n), ("ssm_inner", "ssm_state"), cfg.init_std, pdt)
        self.w_c = param(rngs, (inner, n), ("ssm_inner", "ssm_state"), cfg.init_std, pdt)
        a_log = jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (inner, n))
        self.a_log = named(a_log.astype(pdt), ("ssm_inner", "ssm_state"))
        self.d_skip = named(jnp.ones((inner,), pdt), ("ssm_inner",))
        self.out = param(rngs, (inner, d), ("ssm_inner", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    # -- pieces shared by the parallel and the one-step paths ------------------------------

    def _in_proj(self, x):
        h = self.norm(x)
        return matmul(h, self.in_x[...], self.dtype), matmul(h, self.in_z[...], self.dtype)

    def _ssm_inputs(self, u):
        """Convolved-and-activated u -> dt (.., I), B (.., N), C (.., N), all float32."""
        low = matmul(u, self.dt_down[...], self.dtype)
        dt = jax.nn.softplus(matmul(low, self.dt_up[...], self.dtype) + self.dt_bias[...].astype(jnp.float32))
        return dt, matmul(u, self.w_b[...], self.dtype), matmul(u, self.w_c[...], self.dtype)

    def _a(self):
        return -jnp.exp(self.a_log[...].astype(jnp.float32))

    def _out(self, y, u, z):
        y = y + self.d_skip[...].astype(jnp.float32) * u
        return matmul(y * jax.nn.silu(z), self.out[...], self.dtype)

    # -- training / prefill: the whole sequence at once -------------------------------------

    def _conv(self, xb, starts):
        """Causal depthwise conv over (B, T, I) with taps masked where they cross a segment start."""
        t = xb.shape[1]
        doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # document index of each token
        w = self.conv_w[...].astype(jnp.float32)
        out = jnp.broadcast_to(self.conv_b[...].astype(jnp.float32), xb.shape)
        for s in range(self.width):  # s: how many steps back the tap reads
            past = jnp.pad(xb, [(0, 0), (s, 0), (0, 0)])[:, :t]
            past_doc = jnp.pad(doc, [(0, 0), (s, 0)], constant_values=-1)[:, :t]
            out = out + jnp.where((past_doc == doc)[..., None], past, 0.0) * w[self.width - 1 - s]
        return out

    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x (B, T, D) float32 residual stream -> delta (B, T, D) float32 (the caller adds gate * delta).
        Parallel over time with jax.lax.associative_scan."""
        starts = segment_starts(segment_ids)
        xb, z = self._in_proj(x)
        u = jax.nn.silu(self._conv(xb, starts))
        dt, b, c = self._ssm_inputs(u)
        h0 = jnp.zeros((x.shape[0], self.inner, self.n_state), jnp.float32)
        y, _ = selective_scan(u, dt, self._a(), b, c, starts, h0, self.scan_chunk)
        return self._out(y, u, z)

    def prefill(self, x: jax.Array, lengths: jax.Array) -> tuple[jax.Array, dict]:
        """A prompt at once before decoding: x (B, T, D) with row b's tokens at [0, lengths_b) and padding
        after them -> (delta (B, T, D), the state `step` continues from at position lengths_b). The
        deltas of the real tokens are what `__call__` gives them; padding gets dt = 0 (decay 1, no
        input), so the last state of the scan is the state after each row's last real token."""
        t = x.shape[1]
        real = jnp.arange(t)[None, :] < lengths[:, None]
        starts = jnp.zeros(real.shape, bool).at[:, 0].set(True)
        xb, z = self._in_proj(x)
        u = jax.nn.silu(self._conv(xb, starts))
        dt, b, c = self._ssm_inputs(u)
        dt = jnp.where(real[..., None], dt, 0.0)
        h0 = jnp.zeros((x.shape[0], self.inner, self.n_state), jnp.float32)
        y, h = selective_scan(u, dt, self._a(), b, c, starts, h0, self.scan_chunk)
        back = lengths[:, None] - (self.width - 1) + jnp.arange(self.width - 1)[None, :]  # the conv's last inputs
        conv = jnp.take_along_axis(xb, jnp.maximum(back, 0)[..., None], axis=1)
        conv = jnp.where((back >= 0)[..., None], conv, 0.0).astype(jnp.float32)
        return self._out(y, u, z), {"conv": conv, "ssm": h}

    # -- decoding: one token at a time ------------------------------------------------------

    def init_state(self, batch: int) -> dict[str, jax.Array]:
        """Decode-time carried state: conv buffer (B, ssm_conv - 1, inner) and ssm state (B, inner, ssm_state), zeros."""
        return {"conv": jnp.zeros((batch, self.width - 1, self.inner), jnp.float32),
                "ssm": jnp.zeros((batch, self.inner, self.n_state), jnp.float32)}

    def step(self, x: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One decode step: x (B, D) -> (delta (B, D), new state), the one-step recurrence.
        A new document starts from `init_state` (the caller resets rows at document starts)."""
        xb, z = self._in_proj(x)
        window = jnp.concatenate([state["conv"], xb[:, None]], axis=1)  # (B, k, I), oldest first
        conv = jnp.sum(window * self.conv_w[...].astype(jnp.float32), axis=1) + self.conv_b[...].astype(jnp.float32)
        u = jax.nn.silu(conv)
        dt, b, c = self._ssm_inputs(u)
        decay = jnp.exp(dt[..., None] * self._a())  # (B, I, N)
        h = decay * state["ssm"] + (dt * u)[..., None] * b[:, None, :]
        y = jnp.einsum("bin,bn->bi", h, c, precision=HIGHEST)
        return self._out(y, u, z), {"conv": window[:, 1:], "ssm": h}


def ssm_param_count(cfg: ModelConfig) -> int:
    """Parameters of one SSMExpert: norm d; in 2 d I; conv k I + I; dt 2 I r + I; B, C 2 I N;
    A_log I N; D I; out I d."""
    d, n, k, r = cfg.d_model, cfg.ssm_state, cfg.ssm_conv, cfg.resolved_dt_rank
    inner = cfg.ssm_expand * d
    return d + 3 * d * inner + inner * (k + 1 + 2 * r + 1 + 3 * n + 1)
