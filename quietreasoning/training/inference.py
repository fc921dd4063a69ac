"""Batch decoding over a Trunk: prefill once, then one token per step from a preallocated KV cache
(with SnapKV compression and int8/int4 codes when asked); greedy, temperature and top-p sampling;
prompts of different lengths in one batch.

    generate(model, [[1, 17, 42], [1, 9]], max_new_tokens=16, eos_id=2)  ->  [[...], [...]]
    generate(..., kv=KVSettings(bits=8, keep=0.3))       # SnapKV keeps 30% of the prompt, int8 codes

Terms:
  prompt       the token ids a row starts from (with <bos> if the model was trained with it)
  new tokens   the ids generated after the prompt; a row stops at its first finish token
  finish token `eos_id` or any of `stop_ids`; it ends the row and is not returned
  bucket       the fixed buffer shape one compiled decoder serves: rows = the batch rounded up to a
               power of two; the prompt buffer = the longest prompt rounded up to a power of two (at
               least MIN_LENGTH, a multiple of model.ws_chunk when the workspace is on); prompts of any
               length in a bucket reuse one compilation
  cache        model/trunk.py KVCache: room for the prompt buffer plus max_new_tokens per row (after
               SnapKV: the kept prompt positions plus max_new_tokens), stored as `kv` says
               (memory/kv_cache.py), with the workspace and SSM experts' decode state

Layout: right padding. Row r holds its prompt at positions 0..len_r-1, then padding the attention
never sees. The prefill runs the whole prompt buffer once (`Trunk.extend(fresh=True)`), every row's
cache length is set to its prompt length, and each step feeds every row its last picked token at its
own next position and slot (`Trunk.extend` with one token). Tokens are picked from the logits (argmax
when temperature == 0; else a sample from softmax(logits / temperature), restricted to the smallest set
of tokens whose probability reaches `top_p`). The loop runs inside one jit (a `lax.while_loop` that
ends early once every row has finished).

`recompute=True` runs the simplest correct decoder instead: no cache, the whole buffer through
`Trunk.forward` at every step (the reference the cached decoder is tested against, and the baseline
bench/decode.py times it against).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quietreasoning.memory import kv_cache
from quietreasoning.memory.kv_cache import KVSettings

MIN_LENGTH = 32  # the shortest bucket: shorter prompts share one compilation


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket_shape(n_prompts: int, longest: int, max_new_tokens: int, chunk: int = 1) -> tuple[int, int]:
    """(rows, length) of the buffer for a batch: both rounded up to a power of two, the length at
    least MIN_LENGTH and a multiple of `chunk` (the workspace's chunk, or 1). The cached decoder's
    prompt buffer is bucket_shape(n, longest, 0, chunk); the recomputing one holds the new tokens too."""
    length = max(MIN_LENGTH, next_power_of_two(longest + max_new_tokens))
    return next_power_of_two(n_prompts), -(-length // chunk) * chunk


def pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool) -> jax.Array:
    """The next token of each row from logits (B, V): argmax when `greedy`; else a sample from
    softmax(logits / temperature) over the smallest set of top tokens whose probability reaches top_p
    (top_p >= 1: every token)."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    scaled = logits / temperature
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    inside = (before < top_p) | (top_p >= 1.0)
    floor = jnp.min(jnp.where(inside, ranked, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(scaled >= floor, scaled, -jnp.inf), axis=-1)


def snapkv_compact(model, cache, votes: jax.Array, lengths: jax.Array, kv: KVSettings, room: int):
    """The prefill's unquantised cache -> a SnapKV cache: each layer and kv head keeps its own chosen
    prompt positions (kv_cache.snapkv_select on that layer's votes (n_layers, B, KV, S)), gathered
    into slots [0, kept_b) of a new cache stored as `kv`, with `room` more slots for new tokens. The
    modules' decode state carries over unchanged."""
    plain = KVSettings()
    picked = jax.vmap(lambda v: kv_cache.snapkv_select(v, lengths, kv))(votes)
    index, kept = picked[0], picked[1][0]  # kept depends on the lengths only: the same in every layer
    rows, capacity = lengths.shape[0], index.shape[-1]
    fresh = model.empty_cache(rows, capacity + room, kv)
    n_layers = votes.shape[0]
    stores = []
    for i in range(n_layers):
        keys, values = kv_cache.read(jax.tree.map(lambda a, i=i: a[i], cache.store), plain, model.dtype)
        keys, values = kv_cache.gather_positions(keys, index[i]), kv_cache.gather_positions(values, index[i])
        stores.append(kv_cache.write(jax.tree.map(lambda a, i=i: a[i], fresh.store), keys, values,
                                     jnp.zeros_like(kept), kept, kv))
    valid = jnp.arange(fresh.valid.shape[1])[None, :] < kept[:, None]
    return cache._replace(store=jax.tree.map(lambda *a: jnp.stack(a), *stores), valid=valid, length=kept)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "kv", "on_token"))
def _decode(graphdef, state, tokens, lengths, done, finish_ids, temperature, top_p, key, memory=None,
            memory_mask=None, *, max_new_tokens: int, greedy: bool, kv: KVSettings, on_token=None):
    """Prefill the prompt buffer `tokens` (B, P) (row b's prompt at [0, lengths_b)), then up to
    `max_new_tokens` cached steps; rows with `done` set are left alone. Returns (new tokens
    (B, max_new_tokens), how many each row produced (B,), its finish token included, cache slots each
    row held after the prefill (B,)). `on_token(step, picked (B,), live (B,))`, when given, is called
    on the host after every pick (streaming)."""
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    index = jnp.arange(length)
    positions = jnp.broadcast_to(index, (rows, length))
    valid = index[None, :] < lengths[:, None]
    embeddings = model.embed_tokens(tokens)
    if kv.snapkv:  # prefill into an unquantised cache of the prompt's size, then keep what SnapKV chooses
        window = valid & (index[None, :] >= lengths[:, None] - kv.window)
        h, cache, votes = model.extend(embeddings, positions, valid, model.empty_cache(rows, length), fresh=True,
                                       end=lengths, window=window, memory=memory, memory_mask=memory_mask)
        cache = snapkv_compact(model, cache, votes, lengths, kv, max_new_tokens)
    else:
        cache = model.empty_cache(rows, length + max_new_tokens, kv)
        h, cache = model.extend(embeddings, positions, valid, cache, kv=kv, fresh=True, end=lengths,
                                memory=memory, memory_mask=memory_mask)
    held = cache.length
    logits = model.logits(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0])
    out = jnp.zeros((rows, max_new_tokens), tokens.dtype)

    def keep_going(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(carry):
        step, cache, logits, position, done, out, produced = carry
        picked = pick(logits, jax.random.fold_in(key, step), temperature, top_p, greedy).astype(tokens.dtype)
        live = ~done
        if on_token is not None:
            jax.debug.callback(on_token, step, picked, live, ordered=True)
        out = out.at[:, step].set(jnp.where(live, picked, 0))
        produced = produced + live
        done = done | jnp.isin(picked, finish_ids)
        h, cache = model.extend(model.embed_tokens(picked[:, None]), position[:, None], jnp.ones((rows, 1), bool),
                                cache, kv=kv, memory=memory, memory_mask=memory_mask)
        return step + 1, cache, model.logits(h[:, 0]), position + 1, done, out, produced

    carry = (jnp.zeros((), jnp.int32), cache, logits, lengths, done, out, jnp.zeros((rows,), jnp.int32))
    carry = jax.lax.while_loop(keep_going, one_step, carry)
    return carry[5], carry[6], held


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode_recompute(graphdef, state, tokens, lengths, done, finish_ids, temperature, top_p, key, memory=None,
                      memory_mask=None, *, max_new_tokens: int, greedy: bool):
    """As `_decode`, without a cache: `tokens` (B, L) has room for the new tokens, and every step runs
    `Trunk.forward` over the whole buffer and reads the logits at each row's last token."""
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    index = jnp.arange(length)
    out = jnp.zeros((rows, max_new_tokens), tokens.dtype)
    produced = jnp.zeros((rows,), jnp.int32)

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(carry):
        step, tokens, lengths, done, out, produced = carry
        segment_ids = (index[None, :] < lengths[:, None]).astype(jnp.int32)
        positions = jnp.broadcast_to(index, (rows, length))
        hidden = model.forward(tokens, segment_ids, positions, memory=memory, memory_mask=memory_mask)[0]
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, D)
        picked = pick(model.logits(last), jax.random.fold_in(key, step), temperature, top_p, greedy)
        picked = picked.astype(tokens.dtype)
        live = ~done
        tokens = tokens.at[jnp.arange(rows), lengths].set(jnp.where(live, picked, tokens[jnp.arange(rows), lengths]))
        out = out.at[:, step].set(jnp.where(live, picked, 0))
        produced = produced + live
        lengths = lengths + live
        done = done | jnp.isin(picked, finish_ids)
        return step + 1, tokens, lengths, done, out, produced

    carry = (jnp.zeros((), jnp.int32), tokens, lengths, done, out, produced)
    _, _, _, _, out, produced = jax.lax.while_loop(keep_going, one_step, carry)
    return out, produced


@dataclasses.dataclass
class Decoded:
    """What `decode` returns: the new token ids per prompt (cut before the finish token), the KV
    cache each row held at the end (slots and bytes: memory/kv_cache.store_bytes_per_token), and the
    prompt lengths."""
    new: list[list[int]]
    prompt_lengths: list[int]
    kv_slots: list[int]
    kv_bytes: list[float]


def decode(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | None,
           temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
           pad_id: int = 0, memory=None, memory_mask=None, kv: KVSettings | None = None, recompute: bool = False,
           on_token: Callable | None = None) -> Decoded:
    """Decodes every prompt (see `generate`, which returns only the new tokens). `on_token(step,
    picked, live)` is called on the host after every step with numpy arrays over the bucket's rows
    (the first len(prompts) are the prompts): a streaming hook; cached decoding only."""
    vocab = model.cfg.vocab_size
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be positive")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (1 = no nucleus cut)")
    if recompute and (kv is not None or on_token is not None):
        raise ValueError("generate: recompute=True runs without a cache; drop kv= and on_token=")
    if not prompts:
        return Decoded([], [], [], [])
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; give every prompt at least one token (e.g. <bos>)")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}) (model.vocab_size); "
                             "encode it with the model's tokenizer")
    finish = [t for t in ([eos_id] if eos_id is not None else []) + list(stop_ids)]
    if any(not 0 <= t < vocab for t in finish):
        raise ValueError(f"generate: eos_id/stop_ids {finish} must be token ids in [0, {vocab})")

    cfg = model.cfg
    kv = kv or KVSettings()
    chunk = cfg.ws_chunk if cfg.workspace else 1
    longest = max(len(p) for p in prompts)
    rows, length = bucket_shape(len(prompts), longest, max_new_tokens if recompute else 0, chunk)
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)  # filler rows: one pad token, already done
    done = np.ones((rows,), bool)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
        lengths[r], done[r] = len(p), False
    finish_ids = np.array(finish or [-1], np.int32)  # -1 matches nothing

    if memory is not None:  # filler rows read no memory
        memory = jnp.asarray(memory, jnp.float32)
        if memory.ndim != 3 or len(memory) != len(prompts):
            raise ValueError(f"generate: memory of shape {memory.shape} must be ({len(prompts)}, M, E): one row of "
                             "memory tokens per prompt")
        given = jnp.ones(memory.shape[:2], bool) if memory_mask is None else jnp.asarray(memory_mask, bool)
        memory = jnp.pad(memory, ((0, rows - len(prompts)), (0, 0), (0, 0)))
        memory_mask = jnp.pad(given, ((0, rows - len(prompts)), (0, 0)))
    graphdef, state = nnx.split(model)
    args = (graphdef, state, tokens, lengths, done, finish_ids, jnp.float32(max(temperature, 1e-6)),
            jnp.float32(top_p), jax.random.key(seed), memory, memory_mask)
    if recompute:
        out, produced = _decode_recompute(*args, max_new_tokens=max_new_tokens, greedy=temperature == 0)
        held = lengths
    else:
        host_hook = None if on_token is None else (
            lambda step, picked, live: on_token(int(step), np.asarray(picked), np.asarray(live)))
        out, produced, held = _decode(*args, max_new_tokens=max_new_tokens, greedy=temperature == 0, kv=kv,
                                      on_token=host_hook)
    out, produced, held = np.asarray(out), np.asarray(produced), np.asarray(held)
    per_token = kv_cache.store_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.resolved_head_dim, kv, model.dtype)
    new, slots = [], []
    for r in range(len(prompts)):
        ids = out[r, :produced[r]].tolist()
        cut = next((i for i, t in enumerate(ids) if t in finish), len(ids))
        new.append(ids[:cut])
        slots.append(int(held[r]) + int(produced[r]))
    return Decoded(new, [len(p) for p in prompts], slots, [per_token * n for n in slots])


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | None,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, memory=None, memory_mask=None, kv: KVSettings | None = None,
             recompute: bool = False) -> list[list[int]]:
    """The new token ids of each prompt (a list per prompt, in order), cut before the first finish
    token (`eos_id`, or any of `stop_ids`). Greedy when `temperature` == 0; sampling (with the
    nucleus cut `top_p`) is a pure function of `seed`. `model` is a Trunk. `memory` (len(prompts),
    M, E) and `memory_mask` (len(prompts), M): retrieved memory tokens each prompt's episodic read
    attends to (memory/retrieval.py memory_arrays); None: no retrieval. `kv`: how the KV cache is
    kept (memory/kv_cache.KVSettings; None: unquantised, no SnapKV). `recompute`: the cacheless
    reference decoder."""
    return decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
                  top_p=top_p, stop_ids=stop_ids, seed=seed, pad_id=pad_id, memory=memory, memory_mask=memory_mask,
                  kv=kv, recompute=recompute).new
