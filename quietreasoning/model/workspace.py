"""The latent workspace: S slots of width W that the token stream writes chunk by chunk and
later blocks read by cross-attention.

Causality (ARCHITECTURE.md rule 1). The T tokens are cut into C = T / ws_chunk chunks.
`states[c]` is the state the tokens of chunk c may read: `states[0]` is the learned initial
slots and `states[c + 1] = update(states[c], hidden states of chunk c)`. A token therefore sees
only what earlier chunks wrote; its own chunk's write lands in the next chunk's state.

Write: one `jax.lax.scan` over chunks, `ws_max_steps` refinement steps inside each.
  - Slot attention (Locatello et al. 2020): queries from the RMS-normalised slots, keys and
    values from the RMS-normalised tokens projected D -> W; the softmax runs over the slots
    (plus a fixed zero-logit "null" option, so a token may go to no slot), so slots compete for
    tokens; the weights are then renormalised over tokens (a weighted mean per slot). Tokens
    that do not write (padding, segment 0) are masked out.
  - Gated residual, the GRN of Temporal Fusion Transformers: h = ELU(update W_in),
    slots <- slots + sigmoid(h W_gate + b) * (h W_value).
  - ACT halting (Graves 2016): a halting unit on the pooled slots gives p_n after step n. All
    steps are computed (fixed shapes) and mixed with ACT weights: p_n while the running sum
    stays below 1 - HALT_EPS, the remainder on the step where it reaches it (or on the last
    step), zero after. The expected step count sum_n n w_n lies in [1, ws_max_steps].
  - Packed rows: chunk c is written by the tokens of the segment of its last token; when that
    segment differs from the one that wrote the incoming state, the write starts again from the
    initial slots. `read(..., segment_ids=...)` lets a token use its chunk's state only when that
    state belongs to its own segment (otherwise it reads the initial slots), so documents packed
    into one row never see each other through the workspace.

Read: per block in `ws_read_layers`, tokens (own RMSNorm) -> W-wide queries over the S slots of
their chunk's state, `ws_heads` heads, output W -> D initialised small. The workspace reaches the
LM head only through these residual deltas.

Aux (for training/losses.py), every entry float32:
  ws_expected_steps (B, C)   ACT expected steps per chunk
  ws_chunk_mask     (B, C)   1 where the chunk had tokens that wrote
  ws_attn_l1        (B, C)   mean |weight| of the slot attention (before the renormalisation over
                             tokens) over writing tokens, heads and slots, ACT-weighted over steps
  ws_next_pred      (B, C, S, W)  predictor output on states[c]
  ws_next_target    (B, C, S, W)  states[c + 1] (no stop-gradient here; the loss applies it)
  ws_next_mask      (B, C)   1 where states[c + 1] was written from states[c] (no restart)
  ws_answer_query   (B, C, D)     answer_proj(summary(states)) for InfoNCE
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, named, param

HALT_EPS = 0.01          # ACT: halt once the summed halting probabilities reach 1 - HALT_EPS
NULL_LOGIT = 0.0         # the "no slot" option in the write softmax
WEIGHT_EPS = 1e-8        # renormalisation over tokens (a slot that took nothing stays finite)


def _halt_bias(target: float, max_steps: int) -> float:
    """The halting bias whose constant probability p gives `target` expected ACT steps, so the
    halting average starts near its target (and well inside [1, max_steps])."""
    if max_steps == 1:
        return 0.0

    def expected(p: float) -> float:
        total, steps = 0.0, 0.0
        for n in range(1, max_steps + 1):
            if n == max_steps or total + p >= 1.0 - HALT_EPS:
                return steps + n * (1.0 - total)
            total, steps = total + p, steps + n * p
        return steps

    lo, hi = 1e-4, 1.0 - HALT_EPS / 2  # expected() falls from ~max_steps to 1 over this range
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(mid) > target else (lo, mid)
    p = 0.5 * (lo + hi)
    return math.log(p / (1.0 - p))


def act_weights(p: jax.Array) -> jax.Array:
    """ACT mixing weights (..., N) from halting probabilities p (..., N): p_n on the steps before
    the running sum reaches 1 - HALT_EPS, the remainder on the step where it does (the last step
    at the latest), zero after. The weights sum to 1."""
    n = p.shape[-1]
    cum = jnp.cumsum(p, axis=-1)
    before = cum - p                                   # sum of p over the earlier steps
    running = before < 1.0 - HALT_EPS                  # this step is still computed
    last = running & ((cum >= 1.0 - HALT_EPS) | (jnp.arange(n) == n - 1))
    return jnp.where(last, 1.0 - before, jnp.where(running, p, 0.0))


def _heads(x: jax.Array, n_heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


class WorkspaceRead(nnx.Module):
    """One read: tokens attend over the S slots of their chunk's state (cross-attention)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, w, pdt = cfg.d_model, cfg.ws_dim, jnp.dtype(cfg.param_dtype)
        self.n_heads = cfg.ws_heads
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.token_norm = RMSNorm(d, cfg.norm_eps, pdt)
        self.slot_norm = RMSNorm(w, cfg.norm_eps, pdt)
        self.w_q = param(rngs, (d, w), ("embed", "ws_heads"), cfg.init_std, pdt)
        self.w_k = param(rngs, (w, w), ("ws_embed", "ws_heads"), 1 / math.sqrt(w), pdt)
        self.w_v = param(rngs, (w, w), ("ws_embed", "ws_heads"), 1 / math.sqrt(w), pdt)
        self.w_o = param(rngs, (w, d), ("ws_heads", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q (B, C, L, H, dh) over k, v (B, C', S, H, dh), C' in {C, 1} -> (B, C, L, H, dh)."""
        scores = jnp.einsum("bclhd,bcshd->bchls", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bchls,bcshd->bclhd", probs.astype(self.dtype), v.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, x: jax.Array, states: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        c, h = states.shape[1], self.n_heads
        q = _heads(matmul(self.token_norm(x), self.w_q[...], self.dtype), h).reshape(b, c, t // c, h, -1)
        slots = self.slot_norm(states)
        k = _heads(matmul(slots, self.w_k[...], self.dtype), h)  # (B, C, S, H, dh)
        v = _heads(matmul(slots, self.w_v[...], self.dtype), h)
        out = self._attend(q, k, v)
        if segment_ids is not None:
            # states[c] belongs to the segment of the last token of chunk c - 1; other tokens read
            # the initial slots, states[:, 0] (the same for every row)
            seg = segment_ids.reshape(b, c, t // c)
            owner = jnp.concatenate([jnp.full((b, 1), -1, seg.dtype), seg[:, :-1, -1]], axis=1)
            own = (seg == owner[:, :, None])[..., None, None]
            out = jnp.where(own, out, self._attend(q, k[:, :1], v[:, :1]))
        return matmul(out.reshape(b, t, -1), self.w_o[...], self.dtype)


class Workspace(nnx.Module):
    """Slots written chunk by chunk from the hidden states after block ws_layer - 1 (`write`),
    read by the blocks in ws_read_layers (`read`), pooled for the router and InfoNCE (`summary`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, w, s, pdt = cfg.d_model, cfg.ws_dim, cfg.ws_slots, jnp.dtype(cfg.param_dtype)
        self.n_heads, self.chunk, self.max_steps = cfg.ws_heads, cfg.ws_chunk, cfg.ws_max_steps
        self.dtype = jnp.dtype(cfg.compute_dtype)
        # the write path is small and runs inside a scan: its W x W matrices stay replicated
        # (ws_embed on both sides, fan-in init); only token-facing matrices split over fsdp (embed)
        ws, sq = ("ws_embed", "ws_embed"), 1 / math.sqrt(w)
        # write: learned initial slots, slot attention, GRN update
        self.slots_init = param(rngs, (s, w), ("slots", "ws_embed"), 1.0, pdt)
        self.token_norm = RMSNorm(d, cfg.norm_eps, pdt)
        self.slot_norm = RMSNorm(w, cfg.norm_eps, pdt)
        self.w_k = param(rngs, (d, w), ("embed", "ws_embed"), 1 / math.sqrt(d), pdt)
        self.w_v = param(rngs, (d, w), ("embed", "ws_embed"), 1 / math.sqrt(d), pdt)
        self.w_q = param(rngs, (w, w), ws, sq, pdt)
        self.grn_in = param(rngs, (w, w), ws, sq, pdt)
        self.grn_gate = param(rngs, (w, w), ws, sq, pdt)
        self.grn_gate_bias = named(jnp.zeros((w,), pdt), ("ws_embed",))
        self.grn_value = param(rngs, (w, w), ws, sq, pdt)
        # halting unit on the pooled slots; the bias starts the halting average near its target
        self.halt_norm = RMSNorm(w, cfg.norm_eps, pdt)
        self.halt_w = param(rngs, (w,), ("ws_embed",), cfg.init_std, pdt)
        self.halt_b = named(jnp.asarray(_halt_bias(cfg.ws_halt_target, cfg.ws_max_steps), pdt), ())
        # next-latent predictor: states[c] -> states[c + 1], residual MLP per slot
        self.pred_norm = RMSNorm(w, cfg.norm_eps, pdt)
        self.pred_in = param(rngs, (w, w), ws, sq, pdt)
        self.pred_out = param(rngs, (w, w), ws, cfg.init_std, pdt)
        # InfoNCE: the pooled state projected to the embedding space of the answer
        self.answer_proj = param(rngs, (w, d), ("ws_embed", "embed"), sq, pdt)
        self.reads = nnx.List([WorkspaceRead(cfg, rngs=rngs) for _ in cfg.ws_read_layers])

    # -- write -----------------------------------------------------------------------------

    def _step(self, slots, k, v, writes):
        """One slot-attention + GRN step on slots (B, S, W) over one chunk's keys/values
        (B, H, L, dh) -> (new slots, halting probability (B,), attention L1 (B,))."""
        b, s, w = slots.shape
        q = matmul(self.slot_norm(slots), self.w_q[...], self.dtype).reshape(b, s, self.n_heads, -1)
        q = q.transpose(0, 2, 1, 3)                                                      # (B, H, S, dh)
        logits = jnp.einsum("bhld,bhsd->bhls", k.astype(self.dtype), q.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        null = jnp.full(logits.shape[:-1] + (1,), NULL_LOGIT, logits.dtype)
        attn = jax.nn.softmax(jnp.concatenate([logits, null], axis=-1), axis=-1)[..., :-1]  # over slots
        attn = jnp.where(writes[:, None, :, None], attn, 0.0)                           # (B, H, L, S)
        n_tokens = jnp.maximum(jnp.sum(writes, axis=-1), 1) * self.n_heads
        l1 = jnp.sum(attn, axis=(1, 2, 3)) / n_tokens / s
        weights = attn / (jnp.sum(attn, axis=2, keepdims=True) + WEIGHT_EPS)           # over tokens
        update = jnp.einsum("bhls,bhld->bhsd", weights.astype(self.dtype), v.astype(self.dtype),
                            preferred_element_type=jnp.float32).transpose(0, 2, 1, 3).reshape(b, s, w)
        hidden = jax.nn.elu(matmul(update, self.grn_in[...], self.dtype))
        gate = jax.nn.sigmoid(matmul(hidden, self.grn_gate[...], self.dtype) + self.grn_gate_bias[...])
        slots = slots + gate * matmul(hidden, self.grn_value[...], self.dtype)
        pooled = self.halt_norm(jnp.mean(slots, axis=1))
        p = jax.nn.sigmoid(pooled @ self.halt_w[...].astype(jnp.float32) + self.halt_b[...])
        return slots, p, l1

    def _chunk(self, slots, k, v, writes):
        """All ws_max_steps refinement steps on one chunk, mixed with ACT weights."""
        outs, ps, l1s = [], [], []
        for _ in range(self.max_steps):
            slots, p, l1 = self._step(slots, k, v, writes)
            outs.append(slots), ps.append(p), l1s.append(l1)
        w = act_weights(jnp.stack(ps, axis=-1))                                          # (B, N)
        mixed = jnp.einsum("bn,nbsw->bsw", w, jnp.stack(outs))
        steps = jnp.sum(w * jnp.arange(1, self.max_steps + 1, dtype=jnp.float32), axis=-1)
        return mixed, steps, jnp.sum(w * jnp.stack(l1s, axis=-1), axis=-1)

    def update(self, state: jax.Array, h: jax.Array, writes: jax.Array) -> jax.Array:
        """One chunk's write outside the scan (decoding): state (B, S, W) the chunk read, h (B, ws_chunk, D)
        its hidden states entering block ws_layer, writes (B, ws_chunk) bool -> the state the next chunk
        reads (what `write` computes for the same chunk)."""
        b, l, _ = h.shape
        x = self.token_norm(h)
        k = matmul(x, self.w_k[...], self.dtype).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)
        v = matmul(x, self.w_v[...], self.dtype).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = jnp.where(writes[:, None, :, None], k, 0.0)
        v = jnp.where(writes[:, None, :, None], v, 0.0)
        new = self._chunk(state, k, v, writes)[0]
        return jnp.where(jnp.any(writes, axis=-1)[:, None, None], new, state)

    def write(self, h: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """h (B, T, D) float32 -> (states (B, C, S, W): the state each chunk reads, aux arrays for
        the losses and metrics, listed in the module docstring)."""
        b, t, _ = h.shape
        c, l = t // self.chunk, self.chunk
        if c * l != t:
            raise ValueError(f"workspace: sequence length {t} is not a multiple of model.ws_chunk={l}")
        x = self.token_norm(h)
        # keys and values of every token at once, laid out (B, C, H, L, dh) for the per-chunk scan
        k = matmul(x, self.w_k[...], self.dtype).reshape(b, c, l, self.n_heads, -1).transpose(0, 1, 3, 2, 4)
        v = matmul(x, self.w_v[...], self.dtype).reshape(b, c, l, self.n_heads, -1).transpose(0, 1, 3, 2, 4)
        seg = segment_ids.reshape(b, c, l)
        writer = seg[:, :, -1]                                    # the segment that writes chunk c
        owner = jnp.concatenate([writer[:, :1], writer[:, :-1]], axis=1)  # who wrote the incoming state
        restart = writer != owner                                 # a new document: start from the init
        writes = (seg == writer[:, :, None]) & (seg != 0)
        valid = jnp.any(writes, axis=-1)
        k = jnp.where(writes[:, :, None, :, None], k, 0.0)        # non-writing tokens cannot reach the slots
        v = jnp.where(writes[:, :, None, :, None], v, 0.0)
        init = jnp.broadcast_to(self.slots_init[...].astype(jnp.float32), (b, *self.slots_init.shape))

        def body(state, xs):
            k_c, v_c, writes_c, restart_c, valid_c = xs
            start = jnp.where(restart_c[:, None, None], init, state)
            new, steps, l1 = self._chunk(start, k_c, v_c, writes_c)
            new = jnp.where(valid_c[:, None, None], new, start)
            return new, (state, new, steps, l1)

        chunk_major = lambda a: jnp.moveaxis(a, 1, 0)
        xs = tuple(map(chunk_major, (k, v, writes, restart, valid)))
        _, (states, nxt, steps, l1) = jax.lax.scan(body, init, xs)
        states, nxt, steps, l1 = (jnp.moveaxis(a, 0, 1) for a in (states, nxt, steps, l1))
        pred = states + matmul(jax.nn.elu(matmul(self.pred_norm(states), self.pred_in[...], self.dtype)),
                               self.pred_out[...], self.dtype)
        valid_f = valid.astype(jnp.float32)
        aux = {
            "ws_expected_steps": steps,
            "ws_chunk_mask": valid_f,
            "ws_attn_l1": l1,
            "ws_next_pred": pred,
            "ws_next_target": nxt,
            "ws_next_mask": valid_f * (~restart).astype(jnp.float32),
            "ws_answer_query": matmul(self.summary(states), self.answer_proj[...], self.dtype),
        }
        return states, aux

    # -- read and summary ------------------------------------------------------------------

    def read(self, i: int, x: jax.Array, states: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Cross-attention of tokens x (B, T, D) over the slots of their own chunk's state, for the
        i-th entry of cfg.ws_read_layers -> delta (B, T, D) float32 (the caller adds it to the
        residual stream). With `segment_ids` a token whose chunk state belongs to another document
        reads the initial slots instead (packed rows stay isolated)."""
        return self.reads[i](x, states, segment_ids)

    def summary(self, states: jax.Array) -> jax.Array:
        """(B, C, S, W) -> (B, C, W): the mean over slots, the pooled state per chunk."""
        return jnp.mean(states, axis=-2)


def workspace_param_count(cfg: ModelConfig) -> int:
    """The closed-form parameter count of the workspace for `cfg` (0 when it is off)."""
    if not cfg.workspace:
        return 0
    d, w, s = cfg.d_model, cfg.ws_dim, cfg.ws_slots
    write = s * w + d + 3 * d * w + 6 * w * w + 5 * w + 1  # + norms, gate bias, halting unit
    read = d + w + 2 * d * w + 2 * w * w
    return write + len(cfg.ws_read_layers) * read
