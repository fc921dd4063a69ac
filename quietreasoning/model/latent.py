"""Latent reasoning: the think protocol. A think block is `<bot>`, K latent steps, `<eot>`.

Terms:
  thought        the input embedding of a latent step: the projection of the previous position's
                 last hidden state (final norm applied), fed back instead of a token embedding; it
                 occupies one position and one KV-cache slot, and no token is emitted for it
  projection     `ThoughtProjection`: Linear -> GELU -> Linear -> LayerNorm (the CoDi recipe's
                 2-layer MLP), whose LayerNorm gain starts at the scale of the token embeddings so a
                 thought enters the residual stream at the size a token would
  think block    `<bot>` (a real token), K thoughts, `<eot>` (a real token); language resumes after
                 it. K = 0 is no block at all: nothing is fed, so the model is the bare trunk bit for
                 bit
  K              from the caller (a fixed K, one per row), the controller's default, or (training)
                 the curriculum; the budget head (model/latent_rl.py) picks it per question

`LatentReasoner` is the trunk plus the projection. Everything runs through `Trunk.extend`, so the
thoughts live in the KV cache: a think block costs K one-token steps, not K re-forwards of the
sequence. `generate` decodes a batch of prompts with think blocks where the model emits `<bot>`,
where `force_think_at` asks for one (before the n-th new token; for testing before the model has
learned to emit `<bot>`), and where a prompt ends with `<bot>`. The returned ids are the real
tokens only (`<bot>` and `<eot>` included); the thoughts are not tokens and are not returned.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import named, param
from quietreasoning.model.trunk import KVCache, Trunk
from quietreasoning.training.inference import next_power_of_two


class ThoughtProjection(nnx.Module):
    """(..., D) last hidden state -> (..., D) next input embedding."""

    def __init__(self, cfg: ModelConfig, hidden: int = 0, *, rngs: nnx.Rngs):
        d, h, pdt = cfg.d_model, hidden or cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.w_in = param(rngs, (d, h), ("embed", "mlp"), 1 / np.sqrt(d), pdt)
        self.b_in = named(jnp.zeros((h,), pdt), ("mlp",))
        self.w_out = param(rngs, (h, d), ("mlp", "embed"), 1 / np.sqrt(h), pdt)
        self.b_out = named(jnp.zeros((d,), pdt), ("norm",))
        embed_scale = cfg.init_std if cfg.tie_embeddings else 1.0  # the token embeddings' std (trunk.py)
        self.gain = named(jnp.full((d,), embed_scale, pdt), ("norm",))
        self.bias = named(jnp.zeros((d,), pdt), ("norm",))
        self.eps = cfg.norm_eps

    def __call__(self, h: jax.Array) -> jax.Array:
        f32 = jnp.float32
        y = jnp.einsum("...d,dh->...h", h.astype(self.dtype), self.w_in[...].astype(self.dtype),
                       preferred_element_type=f32) + self.b_in[...].astype(f32)
        y = jnp.einsum("...h,hd->...d", jax.nn.gelu(y).astype(self.dtype), self.w_out[...].astype(self.dtype),
                       preferred_element_type=f32) + self.b_out[...].astype(f32)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.gain[...].astype(f32) + self.bias[...].astype(f32)


class LatentReasoner(nnx.Module):
    """The trunk and its thought projection; with `heads` = K_max, also the stochastic loop's budget
    head (K in [0, K_max] per question) and verifier head (model/latent_rl.py)."""

    def __init__(self, cfg: ModelConfig, projection_hidden: int = 0, *, heads: int = 0, rngs: nnx.Rngs):
        from quietreasoning.model.latent_rl import BudgetHead, VerifierHead

        if cfg.workspace or cfg.router or cfg.ssm_layers:
            raise ValueError("LatentReasoner: think blocks run on the trunk, adapters, PKM and the episodic read; "
                             "switch off model.workspace, model.router and model.ssm_layers for latent reasoning")
        self.cfg = cfg
        self.trunk = Trunk(cfg, rngs=rngs)
        self.project = ThoughtProjection(cfg, projection_hidden, rngs=rngs)
        self.budget = BudgetHead(cfg, heads, rngs=rngs) if heads else None
        self.verifier = VerifierHead(cfg, rngs=rngs) if heads else None


def think(model: LatentReasoner, h_last: jax.Array, positions: jax.Array, cache: KVCache, active: jax.Array,
          noise: jax.Array | None = None, *, inputs: jax.Array | None = None, layers: bool = False) -> dict:
    """Runs the thoughts of a think block after `<bot>`: `active` (B, S) marks which of S latent
    steps each row runs (a row with K_r thoughts has its first K_r set); an inactive step is
    computed but written as invalid, seen by no one, and leaves the row's state unchanged.
    h_last (B, D): the hidden state at `<bot>`; positions (B,): `<bot>`'s position.

    Each step's projection mu = project(h_last) is fed as the thought, plus `noise` (B, S, D) when
    given (the stochastic loop's z = mu + sigma * eps); `inputs` (B, S, D) feeds given thoughts
    instead (scoring a trajectory sampled elsewhere, e.g. under a reference model).

    Returns {h_last, positions, cache (after the block), thoughts (what was fed, (B, S, D)), mus
    (the projections), hidden (each step's output), and with `layers` streams (S, n_layers, B, 1, D)}."""
    b, s_max, d = active.shape[0], active.shape[1], h_last.shape[-1]
    if s_max == 0:
        empty = jnp.zeros((b, 0, d), h_last.dtype)
        result = {"h_last": h_last, "positions": positions, "cache": cache, "thoughts": empty, "mus": empty,
                  "hidden": empty}
        if layers:
            result["streams"] = jnp.zeros((0, model.cfg.n_layers, b, 1, d), h_last.dtype)
        return result

    def step(carry, xs):  # one latent step; a scan, so the program's size does not grow with K
        h_last, positions, cache = carry
        on, extra = xs
        mu = model.project(h_last)
        thought = extra if inputs is not None else mu if noise is None else mu + extra
        pos = positions + on.astype(positions.dtype)
        out = model.trunk.extend(thought[:, None], pos[:, None], on[:, None], cache, layers=layers)
        h, cache = out[0][:, 0], out[1]
        h_last = jnp.where(on[:, None], h, h_last)
        ys = (thought, mu, h) + ((out[2],) if layers else ())
        return (h_last, pos, cache), ys

    given = inputs if inputs is not None else noise if noise is not None else jnp.zeros((b, s_max, d), h_last.dtype)
    (h_last, positions, cache), ys = jax.lax.scan(step, (h_last, positions, cache),
                                                  (active.T, jnp.swapaxes(given, 0, 1)))
    result = {"h_last": h_last, "positions": positions, "cache": cache, "thoughts": jnp.swapaxes(ys[0], 0, 1),
              "mus": jnp.swapaxes(ys[1], 0, 1), "hidden": jnp.swapaxes(ys[2], 0, 1)}
    if layers:
        result["streams"] = ys[3]
    return result


@dataclasses.dataclass(frozen=True)
class ModeController:
    """The think protocol's ids and the K a think block runs when the caller gives none."""
    bot_id: int
    eot_id: int
    default_k: int


# ----------------------------------------------------------------------------- decoding

TOKEN, THOUGHT = 0, 1  # what a row feeds next: a token id or a thought


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "steps", "greedy", "max_blocks"))
def _decode(graphdef, state, tokens, lengths, done, ks, force, finish_ids, bot_id, eot_id, temperature, key, *,
            max_new_tokens: int, steps: int, greedy: bool, max_blocks: int):
    """tokens (B, L) right-padded prompts with `lengths`; ks (B,) thoughts per block; force (B, N) the
    new-token indices before which a block is forced (-1 = none). Returns (new ids (B, N), counts)."""
    model = nnx.merge(graphdef, state)
    trunk = model.trunk
    rows, length = tokens.shape
    cache = trunk.empty_cache(rows, length + steps)
    index = jnp.arange(length)
    valid = index[None, :] < lengths[:, None]
    h, cache = trunk.extend(trunk.embed_tokens(tokens), jnp.broadcast_to(index, (rows, length)), valid, cache)
    h_last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    last_tok = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    positions = lengths - 1
    out = jnp.zeros((rows, max_new_tokens), tokens.dtype)
    zeros = jnp.zeros((rows,), jnp.int32)

    def decide(h_last, fed_tok, fed_mode, left, blocks, n_out, out, done, step):
        """After feeding (fed_tok or a thought) and getting h_last: what each row feeds next."""
        in_block = (fed_mode == THOUGHT) & (left > 0)
        opens = (fed_mode == TOKEN) & (fed_tok == bot_id) & (ks > 0) & (blocks <= max_blocks)
        closes = ((fed_mode == THOUGHT) & (left == 0)) | ((fed_mode == TOKEN) & (fed_tok == bot_id) & (ks > 0) & ~opens)
        speaks = ~in_block & ~opens & ~closes & ~done
        logits = trunk.logits(h_last)
        if greedy:
            picked = jnp.argmax(logits, axis=-1)
        else:
            picked = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature, axis=-1)
        forced = jnp.any(force == n_out[:, None], axis=1) & (ks > 0) & (blocks < max_blocks)
        picked = jnp.where(forced, bot_id, picked).astype(tokens.dtype)
        next_tok = jnp.where(closes, eot_id, picked).astype(tokens.dtype)
        emits = (speaks | closes) & ~done & (n_out < max_new_tokens)
        out = out.at[jnp.arange(rows), jnp.minimum(n_out, max_new_tokens - 1)].set(
            jnp.where(emits, next_tok, out[jnp.arange(rows), jnp.minimum(n_out, max_new_tokens - 1)]))
        n_out = n_out + emits
        done = done | (speaks & jnp.isin(picked, finish_ids)) | (n_out >= max_new_tokens)
        mode = jnp.where(in_block | opens, THOUGHT, TOKEN)
        left = jnp.where(opens, ks, left) - (in_block | opens)
        blocks = blocks + (next_tok == bot_id) * emits
        return next_tok, mode, left, blocks, n_out, out, done

    carry = decide(h_last, last_tok, jnp.full((rows,), TOKEN), zeros, zeros, zeros, out, done, 0)

    def keep_going(c):
        return (c[0] < steps) & ~jnp.all(c[-1][-1])

    def one_step(c):
        step, h_last, positions, cache, (next_tok, mode, left, blocks, n_out, out, done) = c
        live = ~done
        feed = jnp.where((mode == THOUGHT)[:, None], model.project(h_last), trunk.embed_tokens(next_tok))
        pos = positions + live
        h, cache = trunk.extend(feed[:, None], pos[:, None], live[:, None], cache)
        h_last = jnp.where(live[:, None], h[:, 0], h_last)
        state = decide(h_last, next_tok, mode, left, blocks, n_out, out, done, step + 1)
        state = tuple(jnp.where(live, new, old) if new.ndim == 1 else new for new, old in
                      zip(state, (next_tok, mode, left, blocks, n_out, out, done)))
        return step + 1, h_last, pos, cache, state

    c = (jnp.zeros((), jnp.int32), h_last, positions, cache, carry)
    c = jax.lax.while_loop(keep_going, one_step, c)
    _, _, _, _, (_, _, _, _, n_out, out, _) = c
    return out, n_out


def generate(model: LatentReasoner, controller: ModeController, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, eos_id: int | None, k: int | Sequence[int] | None = None,
             temperature: float = 0.0, force_think_at: Sequence[int] = (), max_blocks: int = 1,
             seed: int = 0, pad_id: int = 0) -> list[list[int]]:
    """The new token ids of each prompt, cut before the first `eos_id`. A think block runs K thoughts
    (`k`: one for all rows or one per row; None: controller.default_k) where the prompt ends with
    `<bot>`, where the model emits `<bot>`, and before the n-th new token for n in `force_think_at`;
    at most `max_blocks` blocks per row besides a prompt's own (a later `<bot>` is closed at once).
    K = 0 runs nothing: the decoding is the bare trunk's. Greedy when `temperature` == 0."""
    vocab = model.cfg.vocab_size
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be positive")
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if len(p) == 0 or min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompt {i} must be non-empty token ids in [0, {vocab}) (model.vocab_size)")
    ks = np.full(len(prompts), controller.default_k if k is None else 0, np.int32)
    if k is not None:
        ks[:] = np.asarray(k, np.int32)
    if (ks < 0).any():
        raise ValueError(f"generate: k={k} must be >= 0 thoughts per block")
    rows = next_power_of_two(len(prompts))
    length = max(16, next_power_of_two(max(len(p) for p in prompts)))
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths, done, kk = np.ones(rows, np.int32), np.ones(rows, bool), np.zeros(rows, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)], lengths[r], done[r], kk[r] = p, len(p), False, ks[r]
    force = np.array(sorted(force_think_at) or [-1], np.int32)
    force = np.broadcast_to(force, (rows, len(force)))
    steps = max_new_tokens + int(ks.max()) * (max_blocks + 1)
    steps = next_power_of_two(steps)  # nearby K share one compilation
    finish = np.array([eos_id] if eos_id is not None else [-1], np.int32)
    graphdef, state = nnx.split(model)
    out, n_out = _decode(graphdef, state, tokens, lengths, done, kk, force, finish, controller.bot_id,
                         controller.eot_id, jnp.float32(max(temperature, 1e-6)), jax.random.key(seed),
                         max_new_tokens=max_new_tokens, steps=steps, greedy=temperature == 0, max_blocks=max_blocks)
    out, n_out = np.asarray(out), np.asarray(n_out)
    results = []
    for r in range(len(prompts)):
        new = out[r, :n_out[r]].tolist()
        results.append(new[:new.index(eos_id)] if eos_id in new else new)
    return results
