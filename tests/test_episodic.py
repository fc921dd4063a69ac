"""The episodic store (memory/episodic.py): fixed-shape search, dedupe, TTL, LRU capacity, HNSW
tombstones, the IVF training rule, and save/load. A save killed mid-way, a full disk and damaged
files are in tests/faults/test_store_faults.py (which uses `make`, `keys_for` and `write_ids`
from here)."""

import faiss
import numpy as np
import pytest

from helpers import micro_config
from quietreasoning.config import ConfigError, DataError
from quietreasoning.memory.episodic import EpisodicStore

DIM = 32  # random keys in 32-d: cosine above 0.92 between two of them has odds below 1e-12
DAY = 86400.0


class Clock:
    """A settable clock in seconds."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def keys_for(ids, dim=DIM):
    """A fixed random key per integer id (the same in every process)."""
    return np.stack([np.random.default_rng(int(i)).standard_normal(dim) for i in ids]).astype(np.float32)


def make(kind="flat", clock=None, **kw):
    args = dict(value_shape=(2,), value_dtype=np.int32, index=kind, capacity=10_000, nlist=4, pq_m=4, top_k=4,
                clock=clock or Clock())
    args.update(kw)
    return EpisodicStore(DIM, **args)


def write_ids(store, ids, **kw):
    """Writes entries whose value is (id, id)."""
    ids = np.asarray(ids)
    return store.write(keys_for(ids), np.stack([ids, ids], 1).astype(np.int32), **kw)


def near(key, cos, seed=0):
    """A vector whose cosine with `key` is exactly `cos`."""
    key = key / np.linalg.norm(key)
    u = np.random.default_rng([seed, 1]).standard_normal(key.shape)  # not a keys_for() stream
    u -= (u @ key) * key
    return (cos * key + np.sqrt(1 - cos ** 2) * u / np.linalg.norm(u)).astype(np.float32)


@pytest.fixture(scope="module")
def ivfpq_store():
    """An ivfpq store past its training size (39 x 256 keys): trained once for the module."""
    store = make("ivfpq", capacity=20_000, pq_m=2)  # 16-d sub-vectors: FAISS trains these fast
    counts = write_ids(store, np.arange(10_000))
    assert store.trained and counts.added == 10_000
    return store


# --- search ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_pads_to_fixed_shapes_with_a_mask(kind):
    store = make(kind)
    empty = store.search(keys_for([7, 8]), k=5)
    assert empty.values.shape == (2, 5, 2) and not empty.mask.any() and (empty.ids == -1).all()
    write_ids(store, [1, 2, 3])
    r = store.search(keys_for([1, 9]), k=5)
    assert r.values.shape == (2, 5, 2) and r.values.dtype == np.int32
    assert r.scores.shape == r.mask.shape == r.ids.shape == (2, 5) and r.scores.dtype == np.float32
    assert r.mask.sum(axis=1).tolist() == [3, 3]
    assert (r.values[~r.mask] == 0).all() and (r.scores[~r.mask] == 0).all() and (r.ids[~r.mask] == -1).all()
    assert r.values[0, 0].tolist() == [1, 1] and r.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert store.search(keys_for([1])).values.shape == (1, 4, 2)  # k defaults to model.episodic_slots


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_each_stored_key_retrieves_its_own_entry_first(kind):
    store = make(kind)
    write_ids(store, np.arange(400))  # past the ivf training size of 39 x 4
    assert store.trained
    r = store.search(keys_for(np.arange(0, 400, 7)))
    assert (r.values[:, 0, 0] == np.arange(0, 400, 7)).all()
    assert np.allclose(r.scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(r.scores, axis=1) <= 1e-6).all()  # best first


def test_ivfpq_store_retrieves_its_own_entries(ivfpq_store):
    ids = np.arange(0, 10_000, 97)
    r = ivfpq_store.search(keys_for(ids))
    # 2-byte PQ codes rank coarsely; rescoring RERANK x k candidates with the stored keys puts the entry first
    first = r.values[:, 0, 0] == ids
    assert first.mean() >= 0.95 and np.allclose(r.scores[first, 0], 1.0, atol=1e-5)


def test_ivf_searches_exactly_until_its_training_size_then_trains():
    store, exact = make("ivf"), make("flat")
    assert store.train_size == 39 * 4
    write_ids(store, np.arange(155))
    write_ids(exact, np.arange(155))
    assert not store.trained and not isinstance(faiss.downcast_index(store.index), faiss.IndexIVF)
    q = keys_for(np.arange(1000, 1020))
    a, b = store.search(q), exact.search(q)
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores)
    write_ids(store, [155])
    assert store.trained and isinstance(faiss.downcast_index(store.index), faiss.IndexIVFFlat)
    assert store.index.ntotal == 156 and store.index.nprobe == store.nprobe


# --- dedupe, expiry, capacity --------------------------------------------------------------------

def test_a_near_duplicate_merges_into_the_stored_entry():
    clock = Clock()
    store = make(clock=clock)
    key = keys_for([1])[0]
    store.write(key[None], np.array([[1, 1]], np.int32), surprise=[0.5], source="first")
    clock.t += 10
    counts = store.write(near(key, 0.95)[None], np.array([[2, 2]], np.int32), surprise=[0.2], source="second")
    assert (counts.added, counts.merged) == (0, 1) and len(store) == 1
    r = store.search(key[None], k=1)
    assert r.values[0, 0].tolist() == [2, 2]  # the latest value replaces the old one
    assert r.scores[0, 0] == pytest.approx(1.0, abs=1e-5)  # the stored key stays
    meta = store.metadata(r.ids[0])
    assert meta["created"][0] == clock.t and meta["surprise"][0] == pytest.approx(0.5) and meta["source"][0] == "second"
    counts = store.write(near(key, 0.90, seed=1)[None], np.array([[3, 3]], np.int32))  # below 0.92: a new entry
    assert (counts.added, counts.merged) == (1, 0) and len(store) == 2


def test_duplicates_within_one_write_merge_in_order():
    store = make()
    a, b = keys_for([1, 2])
    keys = np.stack([a, b, near(a, 0.97), near(a, 0.96, seed=3)])
    counts = store.write(keys, np.array([[1, 1], [2, 2], [3, 3], [4, 4]], np.int32), source=["a", "b", "c", "d"])
    assert (counts.added, counts.merged) == (2, 2) and len(store) == 2
    r = store.search(a[None], k=1)
    assert r.values[0, 0].tolist() == [4, 4] and store.metadata(r.ids[0])["source"][0] == "d"


def test_dedupe_threshold_one_never_merges():
    store = make(dedupe=1.0)
    counts = write_ids(store, [1, 1, 1])  # the same key three times
    assert (counts.added, counts.merged) == (3, 0) and len(store) == 3


def test_set_search_changes_the_search_breadth_in_place():
    ivf, hnsw = make("ivf"), make("hnsw")
    write_ids(ivf, np.arange(200))
    ivf.set_search(nprobe=3)
    hnsw.set_search(ef_search=17)
    assert ivf.index.nprobe == 3 and hnsw._params.efSearch == 17
    with pytest.raises(ConfigError, match="memory.hnsw_ef_search=0"):
        hnsw.set_search(ef_search=0)


def test_entries_expire_after_the_ttl_unless_rewritten():
    clock = Clock()
    store = make(clock=clock, ttl_days=1.0)
    write_ids(store, [1, 2])
    clock.t += 0.5 * DAY
    write_ids(store, [3])
    store.write(near(keys_for([2])[0], 0.99)[None], np.array([[2, 2]], np.int32))  # refreshes entry 2
    clock.t += 0.5 * DAY + 1
    counts = write_ids(store, [4])
    assert counts.expired == 1 and len(store) == 3  # entry 1 is gone, 2 was rewritten, 3 and 4 are young
    r = store.search(keys_for([1, 2, 3, 4]), k=1)
    assert r.values[1:, 0, 0].tolist() == [2, 3, 4] and r.values[0, 0, 0] != 1
    clock.t += 2 * DAY
    assert not store.search(keys_for([2])).mask.any() and len(store) == 0


def test_capacity_evicts_the_least_recently_used_entry():
    clock = Clock()
    store = make(clock=clock, capacity=3)
    for i in (1, 2, 3):
        clock.t += 1
        write_ids(store, [i])
    clock.t += 1
    store.search(keys_for([1]), k=1)  # reading entry 1 makes entry 2 the least recently used
    clock.t += 1
    counts = write_ids(store, [4])
    assert counts.evicted == 1 and len(store) == 3
    found = store.search(keys_for([1, 2, 3, 4]), k=1).values[:, 0, 0]
    assert found[[0, 2, 3]].tolist() == [1, 3, 4] and found[1] != 2
    write_ids(store, np.arange(10, 20))  # a write larger than the capacity keeps its last key at least
    assert len(store) == 3 and store.search(keys_for([19]), k=1).values[0, 0, 0] == 19


def test_hnsw_removal_hides_tombstones_and_compacts_them():
    clock = Clock()
    store = make("hnsw", clock=clock, ttl_days=1.0, capacity=1500)
    for start in range(0, 1500, 100):  # written a second apart: 0..99 are the least recently used
        clock.t += 1
        write_ids(store, np.arange(start, start + 100))
    clock.t += 0.6 * DAY
    counts = write_ids(store, np.arange(1500, 1600))  # evicts the 100 least recently used: ids 0..99
    assert counts.evicted == 100 and store.index.ntotal == 1600  # tombstones stay in the graph
    r = store.search(keys_for(np.arange(0, 100, 3)), k=4)
    assert r.mask.all() and (r.values[:, :, 0] >= 100).all()
    clock.t += 0.5 * DAY  # ids 100..1499 expire: 1500 tombstones > max(100 live, 1024): rebuilt
    r = store.search(keys_for(np.arange(1500, 1600, 9)), k=4)
    assert len(store) == 100 and store.index.ntotal == 100
    assert (r.values[:, 0, 0] == np.arange(1500, 1600, 9)).all() and (r.values[r.mask][:, 0] >= 1500).all()
    write_ids(store, [5000])
    assert store.search(keys_for([5000]), k=1).values[0, 0, 0] == 5000


# --- save and load -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_load_gives_back_the_saved_store(kind, tmp_path):
    clock = Clock()
    store = make(kind, clock=clock, capacity=300)
    write_ids(store, np.arange(400), surprise=np.linspace(0, 1, 400), source="doc")  # 100 evicted (tombstones in hnsw)
    store.save(tmp_path / "ep")
    loaded = EpisodicStore.load(tmp_path / "ep", clock=clock)
    assert len(loaded) == len(store) == 300 and loaded.trained == store.trained
    q = keys_for(np.arange(50, 450, 5))
    a, b = store.search(q), loaded.search(q)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    meta_a, meta_b = store.metadata(a.ids[a.mask]), loaded.metadata(b.ids[b.mask])
    for name in meta_a:
        assert np.array_equal(meta_a[name], meta_b[name])
    write_ids(loaded, [1000])  # the loaded store keeps working
    assert loaded.search(keys_for([1000]), k=1).values[0, 0, 0] == 1000


def test_ivfpq_store_survives_save_and_load(ivfpq_store, tmp_path):
    ivfpq_store.save(tmp_path / "pq")
    loaded = EpisodicStore.load(tmp_path / "pq", clock=ivfpq_store.clock)
    q = keys_for(np.arange(0, 10_000, 501))
    a, b = ivfpq_store.search(q), loaded.search(q)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores) and loaded.index.nprobe == 16


def test_save_keeps_only_the_current_version(tmp_path):
    store = make()
    write_ids(store, [1])
    store.save(tmp_path / "ep")
    write_ids(store, [2])
    store.save(tmp_path / "ep")
    assert sorted(p.name for p in (tmp_path / "ep").iterdir()) == ["CURRENT", "v-000002"]
    assert len(EpisodicStore.load(tmp_path / "ep")) == 2


# --- configuration and bad input -----------------------------------------------------------------

def test_from_config_reads_the_memory_and_model_keys():
    cfg = micro_config("memory.episodic_index=hnsw", "memory.episodic_capacity=77", "memory.hnsw_ef_search=40",
                       "model.episodic_slots=3", "memory.episodic_ttl_days=2.5")
    store = EpisodicStore.from_config(cfg)
    assert (store.kind, store.capacity, store.ef_search, store.top_k, store.ttl_days) == ("hnsw", 77, 40, 3, 2.5)
    assert store.dim == cfg.model.d_model and store.value_shape == (cfg.model.d_model,)


def test_bad_input_raises_one_line_errors(tmp_path):
    store = make()
    with pytest.raises(DataError, match=r"keys have shape \(3, 5\); expected \(N, 32\)"):
        store.write(np.ones((3, 5)), np.zeros((3, 2)))
    with pytest.raises(DataError, match="values have shape"):
        store.write(keys_for([1]), np.zeros((1, 3)))
    with pytest.raises(DataError, match="do not fit"):
        store.write(keys_for([1]), np.zeros((1, 2), np.float32))
    with pytest.raises(DataError, match="key row 1 is zero"):
        store.write(np.concatenate([keys_for([1]), np.zeros((1, DIM), np.float32)]), np.zeros((2, 2), np.int32))
    with pytest.raises(DataError, match="queries have shape"):
        store.search(np.ones(DIM))
    with pytest.raises(DataError, match="k=0"):
        store.search(keys_for([1]), k=0)
    with pytest.raises(DataError, match="CURRENT is missing"):
        EpisodicStore.load(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="memory.episodic_index"):
        EpisodicStore(DIM, index="lsh")
    with pytest.raises(ConfigError, match="memory.episodic_pq_m=5 must divide"):
        EpisodicStore(DIM, index="ivfpq", pq_m=5)
