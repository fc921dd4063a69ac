"""The kNN-LM (Khandelwal et al. 2020, "Generalization through Memorization"): a datastore of
(context -> next token) pairs made by running the model over a corpus, searched at evaluation
and serving time and mixed into the model's next-token distribution.

Terms:
  key         the final-norm hidden state (D,) that the LM head reads at a position: its context
  value       the token that followed that context in the corpus, an id in [0, vocab_size)
  datastore   a FAISS index over the keys (squared L2 distance) plus the int32 values; entry i of
              the index is entry i of the values. Two kinds:
                ivfpq  IVF-PQ: `nlist` coarse cells, keys stored as `pq_m` codes of 8 bits each,
                       `nprobe` cells searched per query (the large stores; trained on a sample)
                flat   exact search over the raw keys (small stores, exact tests)
  neighbours  the k stored entries nearest a query key: squared distances d_j, values v_j
  p_knn(w)    sum of softmax_j(-d_j / temperature) over the neighbours whose value v_j is w
  lambda      the weight of p_knn: p(w) = lambda p_knn(w) + (1 - lambda) p_lm(w); a fixed number,
              or per position the router's `knn` gate (model/router.py, in [0, KNN_MAX_LAMBDA])

The mixture is computed in log space, log p = logaddexp(log lambda + log p_knn, log(1 - lambda)
+ log p_lm): lambda = 0 returns log p_lm exactly, and a token no neighbour carries (log p_knn =
-inf) keeps (1 - lambda) p_lm without ever forming log(0) of a sum.

The datastore is a host-side object (ARCHITECTURE.md: a jitted step never calls FAISS): the
model runs under jax.jit on batches to produce keys and LM log-probabilities, and FAISS searches
them in numpy. Batches are dicts of numpy arrays (B, T) with the train step's names: inputs,
targets, segment_ids, positions, loss_mask; a position is used when its loss_mask is > 0 (its
target continues the same document).

Files: the index at PATH (FAISS's own serialisation) and the values at PATH.values.npy, each
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import io as _io
from typing import Iterable

import faiss
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from quietreasoning.config import ConfigError, DataError, MemoryConfig
from quietreasoning.model.trunk import Trunk
from quietreasoning.utils import io

INDEX_KINDS = ("ivfpq", "flat")
PQ_BITS = 8            # bits per PQ code: 256 centroids per sub-quantizer, pq_m bytes per key
TRAIN_PER_CELL = 64    # training keys per coarse cell (FAISS asks for 39 to 256 per centroid)
ADD_CHUNK = 65536      # keys converted and added per FAISS call


def values_path(path: str) -> str:
    """Where the values of the index at `path` live."""
    return f"{path}.values.npy"


class KNNDatastore:
    """A FAISS index over keys plus the values, entry for entry."""

    def __init__(self, index: faiss.Index, values: np.ndarray | None = None):
        self.index = index
        self._chunks = [] if values is None else [np.asarray(values, np.int32)]

    @classmethod
    def create(cls, dim: int, kind: str = "ivfpq", *, nlist: int = 256, pq_m: int = 16,
               nprobe: int = 8) -> KNNDatastore:
        """An empty datastore for keys of width `dim` (an ivfpq one must be trained before adding)."""
        if kind not in INDEX_KINDS:
            raise ConfigError(f"kNN index kind {kind!r} is not one of {INDEX_KINDS}")
        if kind == "flat":
            return cls(faiss.IndexFlatL2(dim))
        if min(nlist, pq_m, nprobe) <= 0:
            raise ConfigError(f"memory.knn_nlist={nlist}, knn_pq_m={pq_m}, knn_nprobe={nprobe} must all be positive")
        if dim % pq_m:
            raise ConfigError(f"memory.knn_pq_m={pq_m} does not divide the key width {dim}; pick a divisor of {dim}")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_m, PQ_BITS)
        index.nprobe = nprobe
        return cls(index)

    @classmethod
    def from_config(cls, dim: int, mem: MemoryConfig, kind: str = "ivfpq") -> KNNDatastore:
        """An empty datastore with the IVF-PQ sizes of the `memory` config section."""
        return cls.create(dim, kind, nlist=mem.knn_nlist, pq_m=mem.knn_pq_m, nprobe=mem.knn_nprobe)

    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: np.ndarray, kind: str = "ivfpq", *, nlist: int = 256,
                    pq_m: int = 16, nprobe: int = 8, seed: int = 0, progress: bool = False) -> KNNDatastore:
        """A datastore holding `keys` (N, D) -> `values` (N,), trained on a seeded sample of the keys.
        `keys` may be a memory-mapped array: it is read in chunks."""
        if keys.ndim != 2:
            raise DataError(f"keys of shape {keys.shape} must be (N, D): one key per row")
        store = cls.create(keys.shape[1], kind, nlist=nlist, pq_m=pq_m, nprobe=nprobe)
        if not store.is_trained:
            n = len(keys)
            pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, store.train_size), replace=False))
            store.train(keys[pick], progress=progress)
        store.add(keys, values, progress=progress)
        return store

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def size(self) -> int:
        return self.index.ntotal

    @property
    def kind(self) -> str:
        return "flat" if isinstance(self.index, faiss.IndexFlat) else "ivfpq"

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    @property
    def train_size(self) -> int:
        """How many keys training uses: TRAIN_PER_CELL per coarse cell, at least the PQ centroids'."""
        if self.kind == "flat":
            return 0
        return TRAIN_PER_CELL * max(faiss.extract_index_ivf(self.index).nlist, 2 ** PQ_BITS)

    @property
    def values(self) -> np.ndarray:
        """(size,) int32: the next token of each stored key."""
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros((0,), np.int32)]
        return self._chunks[0]

    def train(self, keys: np.ndarray, *, progress: bool = False) -> None:
        """Trains the coarse cells and the PQ codebooks on `keys` (N, D); a flat index needs none."""
        if self.is_trained:
            return
        keys = self._as_keys(keys, "training keys")
        need = max(faiss.extract_index_ivf(self.index).nlist, 2 ** PQ_BITS)
        if len(keys) < need:
            raise DataError(
                f"IVF-PQ training needs at least {need} keys (one per coarse cell and per PQ centroid), got "
                f"{len(keys)}; add keys, lower knn_nlist, or use the flat index")
        bar = tqdm(total=1, desc=f"kNN train on {len(keys):,} keys", unit="index", disable=not progress)
        self.index.train(keys)
        bar.update(1)
        bar.close()

    def add(self, keys: np.ndarray, values: np.ndarray, *, progress: bool = False) -> None:
        """Appends `keys` (N, D) -> `values` (N,) in chunks."""
        values = np.asarray(values)
        if values.ndim != 1 or len(values) != len(keys):
            raise DataError(f"values of shape {values.shape} do not match keys of shape {keys.shape}: "
                            "give one token id per key")
        if values.dtype.kind not in "iu" or (values.size and values.min() < 0):
            raise DataError(f"values must be token ids (non-negative integers), got {values.dtype}; "
                            "store the next token of each key")
        if not self.is_trained:
            raise DataError("the IVF-PQ datastore is not trained; call train() on a sample of keys first")
        bar = tqdm(total=len(keys), desc="kNN add", unit="key", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(keys), ADD_CHUNK):
            chunk = self._as_keys(keys[start:start + ADD_CHUNK], "keys")
            self.index.add(chunk)
            self._chunks.append(values[start:start + ADD_CHUNK].astype(np.int32))
            bar.update(len(chunk))
        bar.close()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances (Q, k') float32, values (Q, k') int32) of the nearest entries, nearest
        first, with k' = min(k, size). A query whose nprobe cells hold fewer than k' entries is
        searched again over every cell, so each row holds k' real neighbours."""
        if self.size == 0:
            raise DataError("the kNN datastore is empty; build it from a corpus before searching")
        queries = self._as_keys(queries, "queries")
        k = min(k, self.size)
        distances, ids = self.index.search(queries, k)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):
            ivf = faiss.extract_index_ivf(self.index)
            nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
            try:
                distances[short], ids[short] = self.index.search(queries[short], k)
            finally:
                ivf.nprobe = nprobe
        return distances, self.values[ids]

    def save(self, path: str) -> None:
        """Writes the values, then the index, each atomically."""
        buffer = _io.BytesIO()
        np.save(buffer, self.values)
        io.atomic_write_bytes(values_path(path), buffer.getvalue())
        io.atomic_write_bytes(path, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: str, *, nprobe: int | None = None) -> KNNDatastore:
        """The datastore saved at `path`; `nprobe` overrides the saved one (ivfpq)."""
        p, vp = io.path(path), io.path(values_path(path))
        for f in (p, vp):
            if not f.exists():
                raise DataError(f"{f}: kNN datastore file not found; build it with "
                                "python -m quietreasoning.tools.build_indices knn --output PATH")
        rebuild = "rebuild it with python -m quietreasoning.tools.build_indices knn"
        try:
            index = faiss.deserialize_index(np.frombuffer(p.read_bytes(), np.uint8))
        except RuntimeError as e:
            raise DataError(f"{path}: not a FAISS index ({str(e).splitlines()[0][:120]}); {rebuild}") from None
        if not isinstance(index, (faiss.IndexFlatL2, faiss.IndexIVFPQ)):
            raise DataError(f"{path}: a {type(index).__name__}, not a kNN datastore (flat L2 or IVF-PQ); {rebuild}")
        try:
            values = np.load(_io.BytesIO(vp.read_bytes()), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{vp}: not a readable .npy ({str(e).splitlines()[0][:120]}); {rebuild}") from None
        if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != index.ntotal:
            raise DataError(f"{vp}: {values.dtype} values of shape {values.shape} do not match the {index.ntotal} "
                            f"keys of {path}; rebuild both together")
        store = cls(index, values)
        if nprobe is not None and store.kind == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = nprobe
        return store

    def _as_keys(self, keys: np.ndarray, what: str) -> np.ndarray:
        keys = np.asarray(keys)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise DataError(f"{what} of shape {keys.shape} do not fit a datastore of width {self.dim}; "
                            f"give (N, {self.dim}) arrays from the same model")
        return np.ascontiguousarray(keys, dtype=np.float32)


# ----------------------------------------------------------------------------- the distribution

def neighbour_log_weights(distances: jax.Array, temperature: float) -> jax.Array:
    """log softmax_j(-d_j / temperature) over the last (neighbour) axis."""
    return jax.nn.log_softmax(-jnp.asarray(distances, jnp.float32) / temperature, axis=-1)


def knn_log_probs(distances: jax.Array, tokens: jax.Array, vocab_size: int, temperature: float) -> jax.Array:
    """log p_knn over the vocabulary: (..., k) neighbours -> (..., vocab_size); -inf where no
    neighbour carries the token."""
    weights = jnp.exp(neighbour_log_weights(distances, temperature))
    lead, k = weights.shape[:-1], weights.shape[-1]
    rows = jnp.arange(weights.size // k)[:, None]
    probs = jnp.zeros((weights.size // k, vocab_size), jnp.float32)
    probs = probs.at[rows, jnp.reshape(tokens, (-1, k))].add(weights.reshape(-1, k))
    return jnp.log(probs).reshape(*lead, vocab_size)


def knn_target_log_probs(distances: jax.Array, tokens: jax.Array, targets: jax.Array,
                         temperature: float) -> jax.Array:
    """log p_knn(target) (...) for neighbours (..., k): knn_log_probs read at the targets, without
    forming the vocabulary-wide array."""
    hit = jnp.asarray(tokens) == jnp.asarray(targets)[..., None]
    log_w = jnp.where(hit, neighbour_log_weights(distances, temperature), -jnp.inf)
    return jax.nn.logsumexp(log_w, axis=-1)


def _check_lambda(lam) -> None:
    if isinstance(lam, (int, float, np.floating)) and not 0 <= lam <= 1:
        raise ValueError(f"kNN-LM lambda={lam} must lie in [0, 1] (the router keeps it in [0, 0.5])")


def interpolate(lm_log_probs: jax.Array, knn_log_probs: jax.Array, lam) -> jax.Array:
    """log(lam p_knn + (1 - lam) p_lm), computed in log space. `lam` broadcasts against the
    log-probabilities: a scalar, or per position ((B, T, 1) against (B, T, V); (B, T) against
    targets' (B, T))."""
    _check_lambda(lam)
    lam = jnp.asarray(lam, jnp.float32)
    return jnp.logaddexp(jnp.log(lam) + knn_log_probs, jnp.log1p(-lam) + lm_log_probs)


# ----------------------------------------------------------------------------- the model side

class LMOutputs:
    """`model` compiled (jax.jit, once) for the kNN-LM: called on a batch, it returns numpy arrays
      hidden    (B, T, D)  the final-norm hidden states: the keys
      log_prob  (B, T)     log p_lm(target)
      knn_gate  (B, T)     the router's kNN lambda for each token (only when the router is on)"""

    def __init__(self, model: Trunk):
        self.cfg = model.cfg
        graphdef, self.state = nnx.split(model)
        chunk = model.cfg.ws_chunk

        def run(state, inputs, targets, segment_ids, positions):
            m = nnx.merge(graphdef, state)
            h, aux = m.forward(inputs, segment_ids, positions)
            log_probs = jax.nn.log_softmax(m.logits(h), axis=-1)
            out = {"hidden": h, "log_prob": jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]}
            if "router" in aux:  # gates are per chunk: each token reads its chunk's
                out["knn_gate"] = jnp.repeat(aux["router"]["gates"]["knn"][..., 0], chunk, axis=1)
            return out
        self._run = jax.jit(run)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [jnp.asarray(batch[k], jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")]
        return jax.device_get(self._run(self.state, *args))


def build_datastore(lm: LMOutputs, batches: Iterable[dict[str, np.ndarray]], kind: str = "ivfpq", *,
                    nlist: int = 256, pq_m: int = 16, nprobe: int = 8, total: int | None = None,
                    progress: bool = True) -> KNNDatastore:
    """The datastore of the model `lm` runs over `batches`: one entry per position with loss_mask > 0. An
    ivfpq store is trained on the first `train_size` keys (shuffled data makes them a fair
    sample), then every key is added; keys are never all held in memory at once."""
    store = KNNDatastore.create(lm.cfg.d_model, kind, nlist=nlist, pq_m=pq_m, nprobe=nprobe)
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        keys, values = (np.concatenate(parts) for parts in zip(*pending))
        store.train(keys, progress=progress)
        store.add(keys, values)
        pending.clear()

    bar = tqdm(batches, total=total, desc="kNN datastore", unit="batch", disable=not progress, dynamic_ncols=True)
    for batch in bar:
        mask = np.asarray(batch["loss_mask"]) > 0
        keys, values = lm(batch)["hidden"][mask], np.asarray(batch["targets"])[mask]
        if store.is_trained and not pending:
            store.add(keys, values)
        else:
            pending.append((keys, values))
            if sum(len(v) for _, v in pending) >= store.train_size:
                flush()
        bar.set_postfix(entries=store.size + sum(len(v) for _, v in pending))
    if pending:
        flush()
    return store


@dataclasses.dataclass(frozen=True)
class Perplexity:
    lm: float           # exp(mean negative log-likelihood) of the model alone
    knn: float | None   # with the datastore interpolated; None when no datastore was given
    tokens: int         # positions scored (loss_mask > 0)


def evaluate_perplexity(lm: LMOutputs, batches: Iterable[dict[str, np.ndarray]],
                        datastore: KNNDatastore | None = None, *, lam: float | None, k: int, temperature: float,
                        total: int | None = None, progress: bool = True) -> Perplexity:
    """Perplexity of the model `lm` runs on `batches`, alone and mixed with `datastore` (k neighbours per
    position, `temperature` on the distances). `lam`: a fixed lambda, or None for the router's
    kNN gate of each token."""
    cfg = lm.cfg
    if datastore is not None:
        if lam is not None:
            _check_lambda(lam)
        if datastore.dim != cfg.d_model:
            raise DataError(f"the kNN datastore has keys of width {datastore.dim} but model.d_model={cfg.d_model}; "
                            "build the datastore with this model")
        if datastore.size and int(datastore.values.max()) >= cfg.vocab_size:
            raise DataError(f"the kNN datastore holds token id {int(datastore.values.max())} >= model.vocab_size="
                            f"{cfg.vocab_size}; build it with this model's tokenizer")
        if lam is None and not cfg.router:
            raise ConfigError("lam=None reads the router's kNN gate, but model.router=false; turn the router on "
                              "or give a fixed lambda")
    nll_lm = nll_knn = 0.0
    count = 0
    bar = tqdm(batches, total=total, desc="perplexity", unit="batch", disable=not progress, dynamic_ncols=True)
    for batch in bar:
        out = lm(batch)
        mask = (np.asarray(batch["loss_mask"]) > 0).reshape(-1)
        lm_lp = out["log_prob"].reshape(-1)
        nll_lm -= float(lm_lp[mask].sum())
        count += int(mask.sum())
        if datastore is not None:  # every position is searched, so the shapes (and the compiled mix) stay fixed
            distances, tokens = datastore.search(out["hidden"].reshape(len(mask), -1), k)
            weight = out["knn_gate"].reshape(-1) if lam is None else np.float32(lam)
            mixed = _mixed_target_log_probs(lm_lp, distances, tokens, np.asarray(batch["targets"]).reshape(-1),
                                            weight, temperature)
            nll_knn -= float(np.asarray(mixed)[mask].sum())
        bar.set_postfix(ppl=f"{np.exp(nll_lm / max(count, 1)):.2f}")
    if count == 0:
        raise DataError("no position to score: every loss_mask is 0; give batches with real targets")
    return Perplexity(float(np.exp(nll_lm / count)), float(np.exp(nll_knn / count)) if datastore is not None else None,
                      count)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _mixed_target_log_probs(lm_log_probs, distances, tokens, targets, lam, temperature):
    return interpolate(lm_log_probs, knn_target_log_probs(distances, tokens, targets, temperature), lam)
