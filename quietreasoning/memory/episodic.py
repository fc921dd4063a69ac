"""The episodic memory store: a FAISS index over memory keys plus what each memory holds.

An entry (a memory) is a key vector of width `dim` (e.g. mean-pooled last-layer states), a value
of fixed shape and dtype (hidden states, token ids, ...), the time it was last written
(`created`), the time it was last written or retrieved (`last_used`), the Bayesian surprise that
triggered the write (NaN when not given) and a source string. Entries live in slots 0..capacity-1;
an entry's id is its slot, valid while the entry lives (a freed slot is reused).

Similarity is cosine: keys and queries are L2-normalised and the index scores inner products.
memory.episodic_index picks the index:
  flat   exact search (IndexFlatIP inside IndexIDMap2, so entries are removed by id)
  ivf    IndexIVFFlat, memory.episodic_nlist cells, memory.episodic_nprobe searched per query
  ivfpq  IndexIVFPQ, memory.episodic_pq_m 8-bit sub-quantizers (the key is kept exactly too)
  hnsw   IndexHNSWFlat, memory.hnsw_m links per node, memory.hnsw_ef_search search breadth

Rules, in the order a write applies them:
  expiry    an entry whose `created` is memory.episodic_ttl_days or more before now (the injected
            `clock`) is removed; checked at every write and search.
  dedupe    a key whose cosine with a stored key exceeds memory.episodic_dedupe merges into that
            entry instead of adding one: the key stays, the value and source become the new ones
            (the latest observation replaces the old), `created` and `last_used` become now, and
            the surprise becomes the larger of the two. Candidates come from the index (the
            nearest, as in search), the decision from the exact cosine with the stored key;
            keys of one write that duplicate each other merge the same way, in order (a later key
            merges into the earlier one, or into whatever the earlier one merged into).
            memory.episodic_dedupe = 1 turns dedupe off (no cosine exceeds 1): no lookup at all.
  capacity  beyond memory.episodic_capacity entries the least recently used (smallest
            `last_used`; retrieval counts as use) are evicted, never an entry this write merged into.
Writes are processed in chunks of at most WRITE_CHUNK keys (and at most `capacity`), so a key is
compared with every key of earlier chunks through the index.

Training (ivf, ivfpq). FAISS's k-means wants at least 39 training points per centroid, so the
store searches exactly (a flat index) until it holds train_size = 39 x nlist entries
(39 x max(nlist, 256) for ivfpq, whose sub-quantizers have 256 centroids each); at the first write
that reaches it, it trains the IVF index once on every stored key and moves them into it. A store
whose capacity is below train_size stays exact.

Removal. Flat and IVF indexes remove ids directly. HNSW cannot remove a node from its graph, so
removal there is a tombstone: the node stays (it still routes searches) but a bitmap of live labels
(IDSelectorBitmap) keeps it out of every result; HNSW labels are insertion numbers, never reused.
When tombstones outnumber live entries (and exceed COMPACT_MIN) the graph is rebuilt from the
stored keys of the live entries.

Search. The index proposes candidates (k of them; RERANK x k for ivfpq, whose scores are
approximate), the stored keys score them exactly, and the best k by exact cosine are returned, in
fixed shapes a jitted step takes as input: values (Q, k, *value_shape), scores (Q, k) float32,
mask (Q, k) bool and ids (Q, k) int64; where fewer than k entries are found the rest is padding
(values 0, score 0, id -1, mask False). The store keeps every key exactly (for this rescoring, for
training and for rebuilds), so ivfpq saves search time, not memory.

save(path) writes a complete version `path/v-NNNNNN/` (index, arrays, sources, settings), then
points `path/CURRENT` at it with an atomic rename, then deletes older versions. A save killed at
any moment leaves CURRENT naming a complete version, so `load` gives the previous store or the new
one, never a mix; a save that fails (a full disk) deletes its partial version and raises one line
naming the file, the previous version still current. store.json records each file's size and
sha256, and `load` checks them before reading: a truncated or altered file is one line naming it.
One writer per path; a plain local directory or a gs:// URL (utils/io.py).

A host-side object, not thread-safe; the jitted model step never calls it, it takes the arrays
`search` returns.
"""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
from typing import Callable, NamedTuple

import faiss
import numpy as np
from tqdm import tqdm

from quietreasoning.config import EPISODIC_INDEXES, Config, ConfigError, DataError
from quietreasoning.utils import io

WRITE_CHUNK = 1024
RERANK = 16                    # ivfpq: candidates fetched per result, then scored exactly
MIN_POINTS_PER_CENTROID = 39   # FAISS k-means warns below this many training points per centroid
PQ_CENTROIDS = 256             # 8-bit codes: 256 centroids per sub-quantizer
COMPACT_MIN = 1024             # hnsw: tombstones tolerated before a rebuild is considered
ADD_BATCH = 65536              # keys per index add when rebuilding (the progress bar's step)
SECONDS_PER_DAY = 86400.0
FORMAT = 1                     # the saved layout's version (store.json "format")
_FAR_FUTURE = float("inf")


class WriteCounts(NamedTuple):
    """What one write did: entries added, keys merged into existing entries, entries evicted for
    capacity and entries expired (TTL)."""
    added: int
    merged: int
    evicted: int
    expired: int


class Retrieval(NamedTuple):
    """Top-k search results, padded to fixed shapes (see the module docstring)."""
    values: np.ndarray   # (Q, k, *value_shape)
    scores: np.ndarray   # (Q, k) float32 cosine
    mask: np.ndarray     # (Q, k) bool: a real entry
    ids: np.ndarray      # (Q, k) int64 slot, -1 for padding


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class EpisodicStore:
    def __init__(self, dim: int, *, value_shape: tuple[int, ...] | None = None, value_dtype=np.float32,
                 index: str = "flat", capacity: int = 100_000, ttl_days: float = 30.0, dedupe: float = 0.92,
                 nlist: int = 256, pq_m: int = 32, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128,
                 top_k: int = 8, clock: Callable[[], float] = time.time):
        """`value_shape` None: (dim,). The keyword arguments are the memory.* settings of the same
        meaning (see from_config); `clock` returns seconds (tests inject a fake one)."""
        if index not in EPISODIC_INDEXES:
            raise ConfigError(f"memory.episodic_index={index!r} must be one of {EPISODIC_INDEXES}")
        for name, v in (("model.episodic_dim", dim), ("memory.episodic_capacity", capacity),
                        ("memory.episodic_nlist", nlist), ("memory.episodic_pq_m", pq_m),
                        ("memory.episodic_nprobe", nprobe), ("memory.hnsw_m", hnsw_m),
                        ("memory.hnsw_ef_search", ef_search), ("model.episodic_slots", top_k)):
            if v <= 0:
                raise ConfigError(f"{name}={v} must be positive")
        if not (ttl_days > 0 and 0 < dedupe <= 1):
            raise ConfigError(f"memory.episodic_ttl_days={ttl_days} must be positive and memory.episodic_dedupe="
                              f"{dedupe} a cosine in (0, 1]")
        if index == "ivfpq" and dim % pq_m:
            raise ConfigError(f"memory.episodic_pq_m={pq_m} must divide the key width {dim} (model.episodic_dim)")
        self.dim, self.kind, self.capacity = dim, index, capacity
        self.value_shape = (dim,) if value_shape is None else tuple(value_shape)
        self.value_dtype = np.dtype(value_dtype)
        self.ttl_days, self.dedupe, self.top_k = float(ttl_days), float(dedupe), top_k
        self.nlist, self.pq_m, self.nprobe, self.hnsw_m, self.ef_search = nlist, pq_m, nprobe, hnsw_m, ef_search
        self.clock = clock
        self.train_size = MIN_POINTS_PER_CENTROID * (max(nlist, PQ_CENTROIDS) if index == "ivfpq" else nlist)
        self.trained = index not in ("ivf", "ivfpq")  # trained indexes start exact
        self._allocate(0)
        self._count = 0
        self._next_expiry = _FAR_FUTURE
        self._dead_labels = 0  # hnsw tombstones
        self._index = self._new_index()

    @classmethod
    def from_config(cls, cfg: Config, *, value_shape: tuple[int, ...] | None = None, value_dtype=np.float32,
                    clock: Callable[[], float] = time.time) -> EpisodicStore:
        """The store of cfg.memory with keys of width model.resolved_episodic_dim and top-k
        model.episodic_slots; values default to (key width,) float32."""
        mem = cfg.memory
        return cls(cfg.model.resolved_episodic_dim, value_shape=value_shape, value_dtype=value_dtype,
                   index=mem.episodic_index, capacity=mem.episodic_capacity, ttl_days=mem.episodic_ttl_days,
                   dedupe=mem.episodic_dedupe, nlist=mem.episodic_nlist, pq_m=mem.episodic_pq_m,
                   nprobe=mem.episodic_nprobe, hnsw_m=mem.hnsw_m, ef_search=mem.hnsw_ef_search,
                   top_k=cfg.model.episodic_slots, clock=clock)

    def __len__(self) -> int:
        return self._count

    @property
    def index(self) -> faiss.Index:
        """The FAISS index (read it, do not modify it: the store keeps its ids in step)."""
        return self._index

    # --- storage ------------------------------------------------------------------------------

    def _allocate(self, n: int) -> None:
        """Per-slot arrays for `n` slots, keeping what the first slots hold."""
        old = getattr(self, "_keys", None)
        fields = {"_keys": ((self.dim,), np.float32, 0), "_values": (self.value_shape, self.value_dtype, 0),
                  "_created": ((), np.float64, 0), "_used": ((), np.float64, 0),
                  "_surprise": ((), np.float32, np.nan), "_live": ((), bool, False), "_slot_label": ((), np.int64, -1)}
        for name, (shape, dtype, fill) in fields.items():
            new = np.full((n, *shape), fill, dtype)
            if old is not None:
                kept = getattr(self, name)[:n]
                new[:len(kept)] = kept
            setattr(self, name, new)
        self._sources = (getattr(self, "_sources", []) + [""] * n)[:n]

    def _free_slots(self, n: int) -> np.ndarray:
        """`n` unused slots (lowest first), growing the arrays (doubling, up to capacity) if needed."""
        free = np.flatnonzero(~self._live)[:n]
        if len(free) < n:
            size = len(self._live)
            self._allocate(min(self.capacity, max(size + n - len(free), 2 * size, 1024)))
            free = np.flatnonzero(~self._live)[:n]
        return free

    # --- the index ----------------------------------------------------------------------------

    def _new_index(self) -> faiss.Index:
        """An empty index of the current phase; for hnsw, also empty label maps."""
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "hnsw":
            self._label_slot = np.full(1024, -1, np.int64)
            self._slot_label[:] = -1
            self._dead_labels = 0
            self._set_bitmap(np.zeros(len(self._label_slot) // 8, np.uint8))
            return faiss.IndexHNSWFlat(self.dim, self.hnsw_m, ip)
        if self.kind == "flat" or not self.trained:
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf":
            return faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, ip)
        return faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.pq_m, 8, ip)

    def _configure(self) -> None:
        """Search settings that an index does not save: nprobe, efSearch."""
        if self.trained and self.kind in ("ivf", "ivfpq"):
            self._index.nprobe = self.nprobe
        if self.kind == "hnsw":
            self._params.efSearch = self.ef_search

    def set_search(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Changes how broadly a query searches (ivf/ivfpq cells probed, hnsw candidate list), in
        place: the speed/recall trade-off of a built store."""
        for name, v in (("memory.episodic_nprobe", nprobe), ("memory.hnsw_ef_search", ef_search)):
            if v is not None and v <= 0:
                raise ConfigError(f"{name}={v} must be positive")
        self.nprobe = self.nprobe if nprobe is None else nprobe
        self.ef_search = self.ef_search if ef_search is None else ef_search
        self._configure()

    def _set_bitmap(self, bitmap: np.ndarray) -> None:
        """hnsw: the live-label bitmap (bit i of byte i // 8 set: label i is live) and the search
        parameters that filter by it; the selector points into `bitmap`, which must stay alive."""
        self._bitmap = bitmap
        self._selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        self._params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=self.ef_search)

    def _add(self, slots: np.ndarray) -> None:
        keys = self._keys[slots]
        if self.kind != "hnsw":
            self._index.add_with_ids(keys, slots.astype(np.int64))
            return
        start = self._index.ntotal
        labels = np.arange(start, start + len(slots))
        if len(labels) and labels[-1] >= len(self._label_slot):  # grow the label maps (doubling, bytes of 8)
            size = 8 * -(-max(2 * len(self._label_slot), labels[-1] + 1) // 8)
            self._label_slot = np.concatenate([self._label_slot, np.full(size - len(self._label_slot), -1, np.int64)])
            bitmap = np.zeros((size + 7) // 8, np.uint8)
            bitmap[:len(self._bitmap)] = self._bitmap
            self._set_bitmap(bitmap)
        self._index.add(keys)
        self._label_slot[labels] = slots
        self._slot_label[slots] = labels
        np.bitwise_or.at(self._bitmap, labels >> 3, (1 << (labels & 7)).astype(np.uint8))

    def _remove(self, slots: np.ndarray) -> None:
        if self.kind != "hnsw":
            self._index.remove_ids(slots.astype(np.int64))
        else:  # tombstones: the nodes stay in the graph, out of every result
            labels = self._slot_label[slots]
            np.bitwise_and.at(self._bitmap, labels >> 3, ~(1 << (labels & 7)).astype(np.uint8))
            self._label_slot[labels] = -1
            self._slot_label[slots] = -1
            self._dead_labels += len(slots)
        self._live[slots] = False
        for s in slots:
            self._sources[s] = ""
        self._count -= len(slots)

    def _candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Slots (Q, k) of the index's top-k for normalised queries; -1 where none."""
        if self.kind == "hnsw":
            labels = self._index.search(queries, k, params=self._params)[1]
            return np.where(labels >= 0, self._label_slot[np.maximum(labels, 0)], -1)
        return self._index.search(queries, k)[1]

    def _nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(exact cosines, slots), each (Q, k), best first: the index's candidates rescored with
        the stored keys; slot -1 (cosine -inf) where there are fewer than k."""
        slots = self._candidates(queries, k * (RERANK if self.kind == "ivfpq" else 1))
        cos = np.einsum("qcd,qd->qc", self._keys[np.maximum(slots, 0)], queries)
        cos = np.where(slots >= 0, cos, -np.inf)
        best = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cos, best, 1), np.take_along_axis(slots, best, 1)

    def _rebuild(self) -> None:
        """A fresh index (trained, for ivf/ivfpq) holding every live entry."""
        slots = np.flatnonzero(self._live)
        self._index = self._new_index()
        if self.trained and self.kind in ("ivf", "ivfpq"):
            self._index.train(self._keys[slots])
        self._configure()
        batches = range(0, len(slots), ADD_BATCH)
        for start in tqdm(batches, desc=f"episodic {self.kind} rebuild", disable=len(batches) < 4, leave=False):
            self._add(slots[start:start + ADD_BATCH])

    def _maintain(self) -> None:
        """Trains an ivf/ivfpq store once it holds train_size entries; compacts hnsw tombstones."""
        if not self.trained and self._count >= self.train_size:
            self.trained = True
            self._rebuild()
        elif self.kind == "hnsw" and self._dead_labels > max(self._count, COMPACT_MIN):
            self._rebuild()

    # --- expiry, write, search ----------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Removes the entries written ttl_days or more before `now` (default: the clock); returns
        how many."""
        now = self.clock() if now is None else now
        if now < self._next_expiry:
            return 0
        ttl = self.ttl_days * SECONDS_PER_DAY
        dead = np.flatnonzero(self._live & (self._created + ttl <= now))
        if len(dead):
            self._remove(dead)
            self._maintain()
        self._next_expiry = float(self._created[self._live].min()) + ttl if self._count else _FAR_FUTURE
        return len(dead)

    def write(self, keys, values, *, surprise=None, source: str | list[str] = "") -> WriteCounts:
        """Stores N memories: keys (N, dim), values (N, *value_shape), surprise (N,) or None, one
        source string for all or one per key. Applies expiry, dedupe and capacity (module docstring)."""
        keys = np.asarray(keys, np.float32)
        values = np.asarray(values)
        n = len(keys)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise DataError(f"EpisodicStore.write: keys have shape {keys.shape}; expected (N, {self.dim})")
        if values.shape != (n, *self.value_shape):
            raise DataError(f"EpisodicStore.write: values have shape {values.shape}; expected "
                            f"{(n, *self.value_shape)} (one value of shape {self.value_shape} per key)")
        if not np.can_cast(values.dtype, self.value_dtype, "same_kind"):
            raise DataError(f"EpisodicStore.write: values of dtype {values.dtype} do not fit the store's "
                            f"{self.value_dtype}; convert them or build the store with value_dtype={values.dtype}")
        surprise = np.full(n, np.nan, np.float32) if surprise is None else np.asarray(surprise, np.float32)
        sources = [source] * n if isinstance(source, str) else list(source)
        if surprise.shape != (n,) or len(sources) != n:
            raise DataError(f"EpisodicStore.write: surprise has shape {surprise.shape} and {len(sources)} sources "
                            f"are given for {n} keys; pass one surprise (or None) and one source (or a single string)")
        norms = np.linalg.norm(keys, axis=1)
        if not np.all(np.isfinite(norms) & (norms > 0)):
            bad = int(np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))[0])
            raise DataError(f"EpisodicStore.write: key row {bad} is zero or not finite; a memory key needs a direction")
        keys = keys / norms[:, None]
        now = self.clock()
        expired = self.expire(now)
        added = merged = evicted = 0
        step = min(WRITE_CHUNK, self.capacity)
        chunks = range(0, n, step)
        for start in tqdm(chunks, desc="episodic write", disable=len(chunks) < 16, leave=False):
            part = slice(start, start + step)
            a, m, e = self._write_chunk(keys[part], values[part], surprise[part], sources[part], now)
            added, merged, evicted = added + a, merged + m, evicted + e
        return WriteCounts(added, merged, evicted, expired)

    def _write_chunk(self, keys, values, surprise, sources, now) -> tuple[int, int, int]:
        n = len(keys)
        dest = np.full(n, -1, np.int64)  # the stored slot a key merges into
        leader = np.arange(n)  # the earlier key of this chunk whose entry a key joins (itself: new)
        if self.dedupe < 1.0:
            if self._count:
                cos, nearest = self._nearest(keys, 1)
                hit = cos[:, 0] > self.dedupe
                dest[hit] = nearest[hit, 0]
            # keys of this chunk that duplicate an earlier one (and did not merge into the store)
            gram = np.tril(keys @ keys.T, -1)
            for i in np.flatnonzero((dest < 0) & (gram > self.dedupe).any(axis=1)):
                j = int(np.argmax(gram[i]))
                dest[i], leader[i] = dest[j], leader[j]
        new = np.flatnonzero((dest < 0) & (leader == np.arange(n)))
        merges = n - len(new)
        # evict for room, least recently used first, never a destination of this chunk's merges
        evict = self._count + len(new) - self.capacity
        if evict > 0:
            live = np.flatnonzero(self._live)
            used = self._used[live].copy()
            used[np.isin(live, dest[dest >= 0])] = np.inf
            self._remove(live[np.argpartition(used, evict - 1)[:evict]])
        slots = self._free_slots(len(new))
        dest[new] = slots
        follows = leader != np.arange(n)
        dest[follows] = dest[leader[follows]]  # a leader is new (now has a slot) or merged into the store
        # every key of the chunk now names its entry; the last key per entry gives value and source
        last = n - 1 - np.unique(dest[::-1], return_index=True)[1]
        self._keys[slots] = keys[new]
        self._live[slots] = True
        self._surprise[slots] = np.nan
        self._values[dest[last]] = values[last]
        for i in last:
            self._sources[dest[i]] = sources[i]
        self._created[dest] = now
        self._used[dest] = now
        np.fmax.at(self._surprise, dest, surprise)
        self._count += len(new)
        self._next_expiry = min(self._next_expiry, now + self.ttl_days * SECONDS_PER_DAY)
        self._add(slots)
        self._maintain()
        return len(new), merges, max(evict, 0)

    def search(self, queries, k: int | None = None) -> Retrieval:
        """The top-k (default model.episodic_slots) entries by cosine for each query (Q, dim),
        padded to fixed shapes; retrieved entries count as used (LRU)."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"EpisodicStore.search: queries have shape {queries.shape}; expected (Q, {self.dim})")
        k = self.top_k if k is None else k
        if k <= 0:
            raise DataError(f"EpisodicStore.search: k={k}; ask for at least one entry per query")
        now = self.clock()
        self.expire(now)
        if self._count:
            scores, ids = self._nearest(_normalise(queries), k)
        else:
            scores, ids = np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        mask = ids >= 0
        values = np.zeros((*ids.shape, *self.value_shape), self.value_dtype)
        values[mask] = self._values[ids[mask]]
        self._used[ids[mask]] = now
        return Retrieval(values, np.where(mask, scores, 0.0).astype(np.float32), mask, ids)

    def metadata(self, ids) -> dict[str, np.ndarray]:
        """created, last_used (seconds), surprise and source of live entries `ids` (from search)."""
        ids = np.asarray(ids, np.int64)
        ok = (ids >= 0) & (ids < len(self._live))
        ok[ok] = self._live[ids[ok]]
        if not ok.all():
            raise DataError(f"EpisodicStore.metadata: ids {ids[~ok][:8].tolist()} are not live entries; "
                            "pass ids where the search mask is True")
        return {"created": self._created[ids], "last_used": self._used[ids], "surprise": self._surprise[ids],
                "source": np.array([self._sources[i] for i in ids.ravel()], dtype=object).reshape(ids.shape)}

    # --- save and load ------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"dim": self.dim, "value_shape": list(self.value_shape), "value_dtype": self.value_dtype.str,
                "index": self.kind, "capacity": self.capacity, "ttl_days": self.ttl_days, "dedupe": self.dedupe,
                "nlist": self.nlist, "pq_m": self.pq_m, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search, "top_k": self.top_k}

    def save(self, path) -> None:
        """Writes the store as a new complete version under `path`, then switches path/CURRENT to
        it atomically and deletes the older versions (module docstring)."""
        root = io.path(path)
        with io.write_errors(root, DataError, "save the store to a path that can be created and written"):
            root.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[2:]) for p in root.iterdir() if p.name.startswith("v-") and p.name[2:].isdigit()]
        version = root / f"v-{max(numbers, default=0) + 1:06d}"
        current = root / "CURRENT"
        kept = (f"the previous version {current.read_text().strip()} is still current" if current.exists()
                else "nothing was saved there before")
        fix = f"free space there (or save to another path) and save again; {kept}"
        arrays = {"keys": self._keys, "values": self._values, "created": self._created, "last_used": self._used,
                  "surprise": self._surprise, "live": self._live, "slot_label": self._slot_label}
        if self.kind == "hnsw":
            arrays["label_slot"] = self._label_slot[:self._index.ntotal]
        writers = {"arrays.npz": lambda f: np.savez(f, **arrays),
                   "index.faiss": lambda f: f.write(faiss.serialize_index(self._index).data),
                   "sources.json": lambda f: f.write(json.dumps(self._sources).encode())}
        try:
            files = {}
            with io.write_errors(version, DataError, fix):
                version.mkdir()
            for name, write in writers.items():
                with io.write_errors(version / name, DataError, fix):
                    with (version / name).open("wb") as f:
                        write(f)
                    files[name] = {"bytes": (version / name).stat().length, "sha256": io.sha256(version / name)}
            meta = {"format": FORMAT, **self._settings(), "trained": self.trained, "count": self._count,
                    "ntotal": int(self._index.ntotal), "dead_labels": self._dead_labels, "files": files}
            with io.write_errors(version / "store.json", DataError, fix):
                (version / "store.json").write_text(json.dumps(meta, indent=1))
            with io.write_errors(current, DataError, fix):
                io.atomic_write_text(current, version.name)
        except BaseException:
            with contextlib.suppress(OSError):  # CURRENT still names the previous version: drop this one
                version.rmtree()
            raise
        for p in root.iterdir():  # older versions and what killed saves left behind
            if p.name != version.name and (p.name.startswith("v-") or p.name.startswith(".CURRENT.tmp-")):
                p.rmtree() if p.is_dir() else p.unlink()

    @classmethod
    def load(cls, path, *, clock: Callable[[], float] = time.time) -> EpisodicStore:
        """The store saved at `path` (its CURRENT version), with the settings it was saved with. Each
        file is checked against the size and sha256 store.json records before it is read."""
        root = io.path(path)
        current = root / "CURRENT"
        if not current.exists():
            raise DataError(f"{root}: no saved episodic store (CURRENT is missing); save one with "
                            "EpisodicStore.save(path) or check the path")
        version = root / current.read_text().strip()
        fix = "restore the store from a copy, or build it again and save it"

        def read(name: str, parse):
            p = version / name
            try:
                return parse(p)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{p}: unreadable episodic store file ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:120]}); {fix}") from None

        meta = read("store.json", lambda p: json.loads(p.read_text()))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataError(f"{version / 'store.json'}: format {found} is not {FORMAT}; rebuild the store with this "
                            "version of the code")
        for name, entry in (meta.get("files") or {}).items():  # stores saved before checksums have none
            p = version / name
            if not p.exists():
                raise DataError(f"{p}: missing from the saved episodic store; {fix}")
            size = p.stat().length
            if size != entry["bytes"]:
                raise DataError(f"{p}: {size} bytes but store.json lists {entry['bytes']} (truncated or partly "
                                f"copied); {fix}")
            if io.sha256(p) != entry["sha256"]:
                raise DataError(f"{p}: contents differ from the sha256 in store.json (the file is corrupt); {fix}")
        store = read("store.json", lambda p: cls(
            meta["dim"], value_shape=tuple(meta["value_shape"]), value_dtype=np.dtype(meta["value_dtype"]),
            index=meta["index"], capacity=meta["capacity"], ttl_days=meta["ttl_days"], dedupe=meta["dedupe"],
            nlist=meta["nlist"], pq_m=meta["pq_m"], nprobe=meta["nprobe"], hnsw_m=meta["hnsw_m"],
            ef_search=meta["ef_search"], top_k=meta["top_k"], clock=clock))

        def npz(p):
            with p.open("rb") as f, np.load(f) as z:
                return {name: z[name] for name in z.files}

        arrays = read("arrays.npz", npz)
        sources = read("sources.json", lambda p: json.loads(p.read_text()))
        index = read("index.faiss", lambda p: faiss.deserialize_index(np.frombuffer(p.read_bytes(), np.uint8)))
        store._allocate(len(arrays["live"]))
        for name, attr in (("keys", "_keys"), ("values", "_values"), ("created", "_created"), ("last_used", "_used"),
                           ("surprise", "_surprise"), ("live", "_live"), ("slot_label", "_slot_label")):
            if arrays[name].shape != getattr(store, attr).shape:
                raise DataError(f"{version / 'arrays.npz'}: '{name}' has shape {arrays[name].shape}, expected "
                                f"{getattr(store, attr).shape}; the store is corrupt, save it again")
            setattr(store, attr, arrays[name])
        store._sources = sources
        store._count = int(store._live.sum())
        store.trained = meta["trained"]
        store._index = index
        expected = store._count if meta["index"] != "hnsw" else len(arrays["label_slot"])
        if store._count != meta["count"] or index.ntotal != expected or len(sources) != len(store._live):
            raise DataError(f"{version}: the index holds {index.ntotal} keys and the arrays {store._count} live "
                            f"entries (store.json says {meta['count']}); the store is corrupt, save it again")
        if store.kind == "hnsw":
            label_slot = arrays["label_slot"]
            store._label_slot = label_slot
            bits = np.zeros(8 * ((len(label_slot) + 7) // 8), bool)
            bits[:len(label_slot)] = label_slot >= 0
            store._set_bitmap(np.packbits(bits, bitorder="little"))
            store._dead_labels = meta["dead_labels"]
        store._configure()
        if store._count:
            store._next_expiry = float(store._created[store._live].min()) + store.ttl_days * SECONDS_PER_DAY
        return store
