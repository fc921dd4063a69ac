"""Fact retrieval for the episodic read: an EpisodicStore holding every fact of a PopQA-format
world, searched by question, and the memory arrays the trunk's forward takes.

Terms:
  fact            one PopQA record (subj, prop, obj); its statement is the text
                  `fact_statement(record)`, '<subj> | <prop> | <obj>'
  encoder         a frozen Trunk (e.g. a trained closed-book model) whose final-norm hidden states
                  make both the keys and the values of the store
  key             key(question) = the mean, over the tokens of <bos> + 'Q: <question>\\n'
                  (tasks.FACT_QUESTION, how a PopQA prompt begins), of the encoder's final-norm
                  hidden states. A fact is stored under the key of its record's question; a query
                  is the key of the question asked. Cosine similarity, top-k (model.episodic_slots)
  value           stored hidden states, one row per position p of the statement's tokens
                  t_0 .. t_n = <bos> statement <eos>, p < n: row p = [the encoder's final-norm
                  hidden state at t_p ; the encoder's input embedding of t_{p+1}], a (context,
                  next token) pair as a kNN-LM stores it (memory/knn_lm.py), width 2 d_model. Rows
                  are cut or zero-padded to `value_len`: (value_len, 2 d_model) float32. A padding
                  row is all zeros; a real row never is (its state half is RMS-normalised)
  memory tokens   a question's k retrieved values laid end to end: memory (k * value_len,
                  2 d_model) and memory_mask (k * value_len,), True at the real rows of real
                  entries (`memory_arrays`); the reader attends to them (memory/episodic_read.py)

Why rows pair a context with the next token: a reader answering 'A:' must find the row whose
context matches its question (the state half) and take the token that follows there (the
embedding half), which the state alone carries only when the encoder already knows the fact; for
a rare fact it does not, and that is the fact retrieval must rescue.

Settings from the config: the index kind, capacity and search breadth of `memory.*`, k =
model.episodic_slots; model.episodic_dim must be twice the encoder's d_model (the row width; the
keys have the encoder's d_model). Dedupe is off (memory.episodic_dedupe is not used): every fact
is a distinct record, and questions about different subjects can be close in the encoder's space,
so a merge would lose a fact. The store is a host-side object; the jitted step only takes the
arrays `memory_arrays` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from quietreasoning.config import Config, ConfigError, DataError
from quietreasoning.data import tasks
from quietreasoning.memory.episodic import EpisodicStore, Retrieval
from quietreasoning.model.trunk import Trunk

MIN_BUCKET = 16   # shortest padded length of a batch of texts (fewer compilations)


def fact_statement(record: dict) -> str:
    """A fact as a statement: '<subj> | <prop> | <obj>'."""
    return f"{record['subj']} | {record['prop']} | {record['obj']}"


def _power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def final_states(graphdef, params, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Final-norm hidden states (N, L, D) of right-padded rows `tokens` (N, L) holding `lengths` (N,)
    real tokens, each row its own causal sequence; zero at padding."""
    model = nnx.merge(graphdef, params)
    index = jnp.arange(tokens.shape[1])
    valid = index[None, :] < lengths[:, None]
    hidden, _ = model.forward(tokens, valid.astype(jnp.int32), jnp.broadcast_to(index, tokens.shape))
    return hidden * valid[..., None]


def encode_rows(graphdef, params, rows: Sequence[Sequence[int]], *, batch_size: int = 256,
                progress: bool = False) -> list[np.ndarray]:
    """Per token-id row, the model's final-norm hidden states (len(row), D) float32. Batches are
    padded to a power of two of rows and of length, so a few compilations serve any rows."""
    out = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="encode", unit="batch", disable=not progress or len(starts) < 4, leave=False):
        part = rows[start:start + batch_size]
        length = max(MIN_BUCKET, _power_of_two(max(len(r) for r in part)))
        tokens = np.zeros((_power_of_two(len(part)), length), np.int32)
        lengths = np.zeros(len(tokens), np.int32)
        for i, r in enumerate(part):
            tokens[i, :len(r)], lengths[i] = r, len(r)
        states = np.asarray(final_states(graphdef, params, tokens, lengths))
        out += [states[i, :len(r)] for i, r in enumerate(part)]
    return out


def memory_arrays(found: Retrieval) -> dict[str, np.ndarray]:
    """A search's values (Q, k, value_len, D) and mask (Q, k) as the trunk's memory inputs:
    {"memory": (Q, k value_len, D) float32, "memory_mask": (Q, k value_len) bool}."""
    q, k, length, d = found.values.shape
    real = np.any(found.values != 0, axis=-1) & found.mask[..., None]
    return {"memory": found.values.reshape(q, k * length, d), "memory_mask": real.reshape(q, k * length)}


class FactMemory:
    """The facts of a world in an EpisodicStore, keyed and valued by a frozen encoder (module docstring)."""

    def __init__(self, store: EpisodicStore, tokenizer, encoder: Trunk):
        self.store, self.tokenizer = store, tokenizer
        self.value_len = store.value_shape[0]
        self._graphdef, self._params = nnx.split(encoder)

    @classmethod
    def build(cls, cfg: Config, encoder: Trunk, tokenizer, records: Sequence[dict], *, value_len: int | None = None,
              batch_size: int = 256, progress: bool = True) -> FactMemory:
        """A store of every record's statement rows under the key of its question (memory.*
        settings, dedupe off, top-k model.episodic_slots). `value_len` None: the longest
        statement's row count; a longer statement keeps its first `value_len` rows."""
        width = 2 * encoder.cfg.d_model
        if cfg.model.resolved_episodic_dim != width:
            raise ConfigError(f"model.episodic_dim={cfg.model.episodic_dim}: a memory row is an encoder state and a "
                              f"token embedding, width 2 x {encoder.cfg.d_model}; set model.episodic_dim={width}")
        if not records:
            raise DataError("FactMemory.build: no records; pass the world's facts")
        if len(records) > cfg.memory.episodic_capacity:
            raise ConfigError(f"memory.episodic_capacity={cfg.memory.episodic_capacity} is below the {len(records)} "
                              "facts; raise it so no fact is evicted")
        statements = [[tokenizer.bos_id, *tokenizer.encode(fact_statement(r)), tokenizer.eos_id] for r in records]
        value_len = max(map(len, statements)) - 1 if value_len is None else value_len
        if value_len <= 0:
            raise ConfigError(f"value_len={value_len}: a stored fact needs at least one token")
        mem = cfg.memory
        store = EpisodicStore(encoder.cfg.d_model, value_shape=(value_len, width), value_dtype=np.float32,
                              index=mem.episodic_index, capacity=mem.episodic_capacity, ttl_days=mem.episodic_ttl_days,
                              dedupe=1.0, nlist=mem.episodic_nlist, pq_m=mem.episodic_pq_m, nprobe=mem.episodic_nprobe,
                              hnsw_m=mem.hnsw_m, ef_search=mem.hnsw_ef_search, top_k=cfg.model.episodic_slots)
        memory = cls(store, tokenizer, encoder)
        values = np.zeros((len(records), value_len, width), np.float32)
        states = encode_rows(memory._graphdef, memory._params, statements, batch_size=batch_size, progress=progress)
        table = np.asarray(encoder.embed[...], np.float32)
        for i, (ids, s) in enumerate(zip(statements, states)):
            rows = np.concatenate([s[:-1], table[ids[1:]]], axis=1)[:value_len]
            values[i, :len(rows)] = rows
        keys = memory.keys([r["question"] for r in records], batch_size=batch_size, progress=progress)
        store.write(keys, values, source=[str(r["id"]) for r in records])
        return memory

    def keys(self, questions: Sequence[str], *, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """(Q, d_model) float32: the key of each question (the mean of its encoder states)."""
        if not questions:
            raise DataError("FactMemory.keys: no questions; pass at least one")
        rows = [[self.tokenizer.bos_id, *self.tokenizer.encode(tasks.FACT_QUESTION.format(q))] for q in questions]
        states = encode_rows(self._graphdef, self._params, rows, batch_size=batch_size, progress=progress)
        return np.stack([s.mean(axis=0) for s in states])

    def retrieve(self, questions: Sequence[str], k: int | None = None, *, batch_size: int = 256) -> Retrieval:
        """The top-k facts (default model.episodic_slots) for each question: values (Q, k,
        value_len, 2 d_model) float32 rows, scores (Q, k) cosine, mask (Q, k), ids (Q, k)."""
        return self.store.search(self.keys(questions, batch_size=batch_size), k)
