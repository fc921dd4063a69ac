"""Batch decoding over a Trunk: greedy or temperature sampling, prompts of different lengths in
one batch, the simplest correct way (the whole sequence is recomputed at every step).

    generate(model, [[1, 17, 42], [1, 9]], max_new_tokens=16, eos_id=2)  ->  [[...], [...]]

Terms:
  prompt       the token ids a row starts from (with <bos> if the model was trained with it)
  new tokens   the ids generated after the prompt; a row stops at its first finish token
  finish token `eos_id` or any of `stop_ids`; it ends the row and is not returned
  bucket       the fixed buffer shape one compiled decoder serves: rows = the batch rounded up to a
               power of two, length = (longest prompt + max_new_tokens) rounded up to a power of
               two (at least MIN_LENGTH, and a multiple of model.ws_chunk when the workspace is on);
               prompts of any length in a bucket reuse one compilation

Layout: right padding. Row r holds its prompt at positions 0..len_r-1 followed by padding
(segment id 0, which the attention mask keeps apart from the real tokens, segment id 1); every
row is causal, so a row's logits never see its padding or another row. Each step runs the model
over the whole buffer, takes the logits at each row's last real token, picks the next token
(argmax when temperature == 0, else a sample from softmax(logits / temperature)), and writes it
at the row's next position. The loop runs inside one jit (a `lax.while_loop` that ends early
once every row has finished).

`_decode` is the whole device side: a KV-cached decoder (prefill once, then one token per step)
replaces it with the same arguments and results, and `generate` stays as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_LENGTH = 32  # the shortest bucket: shorter prompts share one compilation


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket_shape(n_prompts: int, longest: int, max_new_tokens: int, chunk: int = 1) -> tuple[int, int]:
    """(rows, length) of the buffer for a batch: both rounded up to a power of two, the length at
    least MIN_LENGTH and a multiple of `chunk` (the workspace's chunk, or 1)."""
    length = max(MIN_LENGTH, next_power_of_two(longest + max_new_tokens))
    return next_power_of_two(n_prompts), -(-length // chunk) * chunk


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode(graphdef, state, tokens, lengths, done, finish_ids, temperature, key, memory=None, memory_mask=None, *,
            max_new_tokens: int, greedy: bool):
    """Extends each row of `tokens` (B, L) after its `lengths` (B,) real tokens by up to
    `max_new_tokens`; rows with `done` set are left alone. Returns (new tokens (B, max_new_tokens),
    how many each row produced (B,), its finish token included). `memory` (B, M, E) and
    `memory_mask` (B, M), when given, are every step's episodic-read input (Trunk.forward)."""
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
        logits = model.logits(last)
        if greedy:
            picked = jnp.argmax(logits, axis=-1)
        else:
            picked = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature, axis=-1)
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


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | None,
             temperature: float = 0.0, stop_ids: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
             memory=None, memory_mask=None) -> list[list[int]]:
    """The new token ids of each prompt (a list per prompt, in order), cut before the first finish
    token (`eos_id`, or any of `stop_ids`). Greedy when `temperature` == 0; sampling is a pure
    function of `seed`. `model` is a Trunk: model(tokens, segment_ids, positions) -> logits.
    `memory` (len(prompts), M, E) and `memory_mask` (len(prompts), M): retrieved memory tokens each
    prompt's episodic read attends to (memory/retrieval.py memory_arrays); None: no retrieval."""
    vocab = model.cfg.vocab_size
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be positive")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if not prompts:
        return []
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
    rows, length = bucket_shape(len(prompts), max(len(p) for p in prompts), max_new_tokens,
                                cfg.ws_chunk if cfg.workspace else 1)
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
    out, produced = _decode(graphdef, state, tokens, lengths, done, finish_ids, jnp.float32(max(temperature, 1e-6)),
                            jax.random.key(seed), memory, memory_mask, max_new_tokens=max_new_tokens,
                            greedy=temperature == 0)
    out, produced = np.asarray(out), np.asarray(produced)
    results = []
    for r in range(len(prompts)):
        new = out[r, :produced[r]].tolist()
        cut = next((i for i, t in enumerate(new) if t in finish), len(new))
        results.append(new[:cut])
    return results
