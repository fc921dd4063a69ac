"""The kNN-LM: the mixed distribution is a distribution, lambda 0 is the LM bit for bit, p_knn of a
hand-made datastore, FAISS stores that search, save and load, and datastores that lower perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import ConfigError, DataError
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.memory.knn_lm import (KNNDatastore, LMOutputs, build_datastore, evaluate_perplexity, interpolate,
                                          knn_log_probs, knn_target_log_probs, values_path)
from quietreasoning.model.router import KNN_MAX_LAMBDA
from quietreasoning.model.trunk import Trunk


def _neighbours(b=2, t=3, k=8, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    distances = np.sort(rng.uniform(0, 5, (b, t, k)).astype(np.float32), axis=-1)
    tokens = rng.integers(0, vocab, (b, t, k)).astype(np.int32)
    lm = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(b, t, vocab)), jnp.float32), axis=-1)
    return distances, tokens, lm


def test_interpolated_distribution_sums_to_one_for_scalar_and_per_position_lambda():
    distances, tokens, lm = _neighbours()
    knn = knn_log_probs(distances, tokens, lm.shape[-1], temperature=1.0)
    np.testing.assert_allclose(np.exp(knn).sum(-1), 1.0, rtol=1e-5)
    per_position = jnp.asarray(np.random.default_rng(1).uniform(0, KNN_MAX_LAMBDA, (2, 3, 1)), jnp.float32)
    for lam in (0.25, 1.0, per_position):
        np.testing.assert_allclose(np.exp(interpolate(lm, knn, lam)).sum(-1), 1.0, rtol=1e-5)


def test_lambda_zero_returns_the_lm_log_probs_exactly():
    distances, tokens, lm = _neighbours()
    knn = knn_log_probs(distances, tokens, lm.shape[-1], temperature=1.0)
    assert np.isneginf(np.asarray(knn)).any()  # tokens no neighbour carries: log p_knn = -inf
    np.testing.assert_array_equal(np.asarray(interpolate(lm, knn, 0.0)), np.asarray(lm))
    np.testing.assert_array_equal(np.asarray(interpolate(lm, knn, jnp.zeros((2, 3, 1)))), np.asarray(lm))
    with pytest.raises(ValueError, match="lambda"):
        interpolate(lm, knn, 1.5)


def test_hand_made_flat_datastore_gives_the_softmax_of_negative_distances_summed_per_token():
    keys = np.array([[0, 0], [1, 0], [0, 2], [10, 10]], np.float32)
    store = KNNDatastore.from_arrays(keys, np.array([5, 7, 5, 9]), "flat")
    distances, tokens = store.search(np.zeros((1, 2), np.float32), k=3)
    np.testing.assert_array_equal(distances, [[0, 1, 4]])
    np.testing.assert_array_equal(tokens, [[5, 7, 5]])
    for temperature in (1.0, 2.0):
        w = np.exp(-np.array([0, 1, 4]) / temperature)
        expected = np.zeros(12)
        expected[5], expected[7] = (w[0] + w[2]) / w.sum(), w[1] / w.sum()
        np.testing.assert_allclose(np.exp(knn_log_probs(distances, tokens, 12, temperature))[0], expected, rtol=1e-6)
        # read at the targets without the vocabulary-wide array: the same numbers, -inf for token 9
        got = knn_target_log_probs(np.repeat(distances, 3, 0), np.repeat(tokens, 3, 0), np.array([5, 7, 9]),
                                   temperature)
        np.testing.assert_allclose(np.exp(got), [expected[5], expected[7], 0.0], rtol=1e-6)


def _clusters(n_per=300, dim=16, n_clusters=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (n_clusters, dim)).astype(np.float32)
    labels = np.repeat(np.arange(n_clusters), n_per)
    return centres[labels] + rng.normal(0, 0.3, (len(labels), dim)).astype(np.float32), labels, centres


def test_ivfpq_search_fills_every_row_with_real_neighbours_even_when_nprobe_cells_are_small():
    keys, labels, centres = _clusters()
    store = KNNDatastore.from_arrays(keys, labels + 100, "ivfpq", nlist=8, pq_m=4, nprobe=1)
    assert store.size == len(keys) and store.kind == "ivfpq"
    # k beyond one cell's population forces the search over every cell for those rows
    distances, tokens = store.search(centres, k=500)
    assert tokens.shape == (8, 500) and np.isfinite(distances).all() and (tokens >= 100).all()
    assert (np.diff(distances, axis=1) >= 0).all()
    np.testing.assert_array_equal(tokens[:, 0], np.arange(8) + 100)  # the nearest is the query's own cluster


def test_save_then_load_round_trips_both_kinds_and_leaves_no_temporary_files(tmp_path):
    keys, labels, centres = _clusters(n_per=40)
    for kind in ("flat", "ivfpq"):
        store = KNNDatastore.from_arrays(keys, labels, kind, nlist=4, pq_m=4, nprobe=2)
        path = str(tmp_path / f"{kind}.index")
        store.save(path)
        loaded = KNNDatastore.load(path)
        assert loaded.kind == kind and loaded.size == store.size
        for a, b in zip(store.search(centres, 10), loaded.search(centres, 10)):
            np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.index", "flat.index.values.npy", "ivfpq.index",
                                                          "ivfpq.index.values.npy"]
    np.save(values_path(str(tmp_path / "flat.index")), np.zeros(3, np.int32))
    with pytest.raises(DataError, match="values of shape"):
        KNNDatastore.load(str(tmp_path / "flat.index"))
    with pytest.raises(DataError, match="not found"):
        KNNDatastore.load(str(tmp_path / "missing.index"))
    (tmp_path / "ivfpq.index.values.npy").write_text("not an array")
    with pytest.raises(DataError, match="not a readable .npy"):
        KNNDatastore.load(str(tmp_path / "ivfpq.index"))


def test_bad_shapes_and_sizes_are_one_line_errors():
    keys, labels, _ = _clusters(n_per=10)
    store = KNNDatastore.from_arrays(keys, labels, "flat")
    with pytest.raises(DataError, match=r"width 16"):
        store.search(np.zeros((2, 8), np.float32), 4)
    with pytest.raises(DataError, match="do not match keys"):
        store.add(keys, labels[:-1])
    with pytest.raises(DataError, match="token ids"):
        store.add(keys, labels.astype(np.float32))
    with pytest.raises(ConfigError, match="does not divide the key width 16"):
        KNNDatastore.create(16, "ivfpq", pq_m=5)
    with pytest.raises(DataError, match="at least 256 keys"):
        KNNDatastore.from_arrays(keys, labels, "ivfpq", nlist=4, pq_m=4)


def _micro_model(*overrides):
    """(the micro model's LMOutputs, batch i of the synthetic language)."""
    cfg = micro_config("model.compute_dtype=float32", *overrides)
    lang = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, seed=0)
    return LMOutputs(Trunk(cfg.model, rngs=nnx.Rngs(0))), lambda i: lang.batch(i, 16, cfg.train.seq_len)


@pytest.fixture(scope="module")
def micro():
    return _micro_model()


def test_datastore_built_on_a_text_lowers_the_perplexity_of_that_text_and_of_held_out_text(micro):
    lm, batch = micro
    store = build_datastore(lm, [batch(i) for i in range(6)], "flat", progress=False)
    assert store.size == sum(int(batch(i)["loss_mask"].sum()) for i in range(6))
    same = evaluate_perplexity(lm, [batch(0)], store, lam=0.25, k=32, temperature=1.0, progress=False)
    assert same.knn < 0.5 * same.lm
    # the synthetic language is first-order Markov: neighbours sharing the current token predict
    # the next one, so text the store never saw gains too
    held = evaluate_perplexity(lm, [batch(1000)], store, lam=0.25, k=32, temperature=1.0, progress=False)
    assert held.knn < held.lm
    alone = evaluate_perplexity(lm, [batch(1000)], lam=0.25, k=32, temperature=1.0, progress=False)
    assert alone.knn is None and alone.lm == held.lm and alone.tokens == held.tokens


def test_ivfpq_datastore_streams_its_training_sample_and_holds_every_position(micro):
    lm, batch = micro
    store = KNNDatastore.create(64, "ivfpq", nlist=16, pq_m=8)
    n_batches = store.train_size // 500 + 2  # more than the training sample: later batches are added directly
    built = build_datastore(lm, (batch(i) for i in range(n_batches)), "ivfpq", nlist=16, pq_m=8, nprobe=4,
                            progress=False)
    assert built.size == sum(int(batch(i)["loss_mask"].sum()) for i in range(n_batches)) > store.train_size
    keys = lm(batch(0))["hidden"][batch(0)["loss_mask"] > 0]
    _, tokens = built.search(keys, 1)
    hit = tokens[:, 0] == batch(0)["targets"][batch(0)["loss_mask"] > 0]
    assert hit.mean() > 0.5  # its own entry (or a twin context) is the nearest, up to PQ error


def test_router_knn_gate_is_one_lambda_per_chunk_in_its_range_and_sets_the_mixture(micro):
    lm, batch = _micro_model("model.workspace=true", "model.router=true", "model.ws_layer=1",
                             "model.ws_read_layers=[1]", "model.ws_chunk=8")
    b = batch(0)
    gate = lm(b)["knn_gate"]
    per_chunk = gate.reshape(16, -1, 8)
    np.testing.assert_array_equal(per_chunk, np.repeat(per_chunk[..., :1], 8, axis=-1))
    assert (gate > 0).all() and (gate < KNN_MAX_LAMBDA).all() and np.unique(gate).size > 1
    store = build_datastore(lm, [b], "flat", progress=False)
    routed = evaluate_perplexity(lm, [b], store, lam=None, k=8, temperature=1.0, progress=False)
    fixed = evaluate_perplexity(lm, [b], store, lam=0.0, k=8, temperature=1.0, progress=False)
    assert fixed.knn == pytest.approx(fixed.lm, rel=1e-6) and routed.knn < fixed.lm
    bare, _ = micro
    with pytest.raises(ConfigError, match="model.router=false"):
        evaluate_perplexity(bare, [b], build_datastore(bare, [b], "flat", progress=False), lam=None, k=8,
                            temperature=1.0, progress=False)
