"""build_indices: each subcommand on micro inputs, run in-process; bad input is one line and exit 2."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import MICRO, micro_config
from quietreasoning.memory.episodic import EpisodicStore
from quietreasoning.memory.knn_lm import KNNDatastore
from quietreasoning.memory.pkm import load_values, quantize_rows
from quietreasoning.model.trunk import Trunk
from quietreasoning.tools.build_indices import load_model, main
from quietreasoning.training.checkpoint import Checkpointer
from quietreasoning.utils.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKM = ["model.pkm_layers=[1]", "model.pkm_slots=64", "model.pkm_topk=4", "model.pkm_key_dim=16",
       "model.pkm_value_dim=16"]


def _clusters(tmp_path, n_per=300, dim=16, n_clusters=8):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (n_clusters, dim)).astype(np.float32)
    labels = np.repeat(np.arange(n_clusters), n_per)
    keys = centres[labels] + rng.normal(0, 0.3, (len(labels), dim)).astype(np.float32)
    np.save(tmp_path / "K.npy", keys)
    np.save(tmp_path / "V.npy", labels + 10)
    return keys, labels + 10, centres


def test_seed_knn_command_round_trips_and_the_written_index_returns_the_right_neighbours(tmp_path):
    keys, values, centres = _clusters(tmp_path)
    out = str(tmp_path / "artifacts" / "knn.index")
    argv = ["knn", "--keys", str(tmp_path / "K.npy"), "--values", str(tmp_path / "V.npy"), "--output", out,
            "--dim", "16", "--nlist", "8", "--pq-m", "4", "--nprobe", "2", *MICRO]
    assert main(argv) == 0
    store = KNNDatastore.load(out)
    assert (store.kind, store.size, store.dim) == ("ivfpq", len(keys), 16)
    _, found = store.search(centres, k=50)
    np.testing.assert_array_equal(found, np.repeat(np.arange(10, 18)[:, None], 50, axis=1))
    # the exact index: each stored key finds itself first, with its own value
    assert main([*argv[:5], "--output", out, "--index", "flat", *MICRO]) == 0
    distances, found = KNNDatastore.load(out).search(keys[::50], k=1)
    np.testing.assert_array_equal(distances[:, 0], 0.0)
    np.testing.assert_array_equal(found[:, 0], values[::50])


@pytest.mark.parametrize("case, message", [
    ("count", "2399 values for the 2400 keys"),
    ("dim", "keys have width 16 but --dim 32"),
    ("float_values", "values must be int token ids"),
    ("int_keys", "keys must be a float (N, D) array"),
    ("vocab", "outside model.vocab_size=256"),
    ("missing", "keys file not found"),
    ("neither", "give either --keys"),
])
def test_knn_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, capsys, case, message):
    keys, values, _ = _clusters(tmp_path, n_per=300)
    k, v, extra = tmp_path / "K.npy", tmp_path / "V.npy", []
    if case == "count":
        np.save(v, values[:-1])
    elif case == "dim":
        extra = ["--dim", "32"]
    elif case == "float_values":
        np.save(v, values.astype(np.float32))
    elif case == "int_keys":
        np.save(k, keys.astype(np.int32))
    elif case == "vocab":
        np.save(v, values + 300)
    elif case == "missing":
        k = tmp_path / "nope.npy"
    argv = ["knn", "--output", str(tmp_path / "knn.index"), *extra, *MICRO]
    if case != "neither":
        argv += ["--keys", str(k), "--values", str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err
    assert not (tmp_path / "knn.index").exists()


def test_bad_input_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    np.save(tmp_path / "V.npy", np.arange(4))
    proc = subprocess.run(
        [sys.executable, "-m", "quietreasoning.tools.build_indices", "knn", "--keys", "missing.npy", "--values",
         "V.npy", "--output", "knn.index"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: missing.npy: keys file not found; give an existing .npy file")


def test_pkm_fresh_table_is_int8_rows_with_scales_of_the_models_init_and_passes_check(tmp_path, capsys):
    path = str(tmp_path / "artifacts" / "pkm_values.npy")
    assert main(["pkm", "--path", path, "--slots", "1024", "--dim", "16", "--seed", "3"]) == 0
    q, scales = load_values(path)
    assert q.shape == (1024, 16) and q.dtype == np.int8 and scales.shape == (1024,)
    rows = q.astype(np.float32) * scales[:, None]
    assert abs(rows.std() - 1 / np.sqrt(16)) < 0.01  # the model's value init: normal, std 1/sqrt(d_v)
    again = str(tmp_path / "again.npy")
    assert main(["pkm", "--path", again, "--slots", "1024", "--dim", "16", "--seed", "3"]) == 0
    np.testing.assert_array_equal(load_values(again)[0], q)
    capsys.readouterr()
    assert main(["pkm", "--path", path, "--check", "model.pkm_slots=1024", "model.pkm_value_dim=16"]) == 0
    assert "1,024 x 16 int8" in capsys.readouterr().out
    # the tiny preset's table is 4096 x 64: this file does not fit it
    assert main(["pkm", "--path", path, "--check"]) == 2
    assert "1024 x 16 but 4096 x 64 is wanted" in capsys.readouterr().err
    np.save(path, np.zeros((1024, 16), np.float32))
    assert main(["pkm", "--path", path, "--check", "--slots", "1024", "--dim", "16"]) == 2
    assert "must be int8 rows" in capsys.readouterr().err
    assert main(["pkm", "--path", path, "--slots", "1000"]) == 2
    assert "must be a perfect square" in capsys.readouterr().err


def test_pkm_export_from_a_checkpoint_writes_that_models_table(tmp_path, capsys):
    cfg = micro_config(*PKM)
    model = Trunk(cfg.model, rngs=nnx.Rngs(7))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(3, {"params": nnx.state(model, nnx.Param), "step": jnp.int32(3)}, {"stage": "test"})
    ckpt.close()
    path = str(tmp_path / "pkm.npy")
    assert main(["pkm", "--path", path, "--checkpoint", str(tmp_path / "ckpt" / "3"), *MICRO, *PKM]) == 0
    q, scales = load_values(path)
    want_q, want_scales = quantize_rows(model.pkm[0].slot_values[...])
    np.testing.assert_array_equal(q, np.asarray(want_q))
    np.testing.assert_array_equal(scales, np.asarray(want_scales))
    # the same checkpoint loads as a whole model for the corpus commands
    loaded = load_model(cfg, str(tmp_path / "ckpt" / "3"))
    for a, b in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert main(["pkm", "--path", path, "--checkpoint", str(tmp_path / "ckpt" / "3"), *MICRO]) == 2
    assert "model.pkm_layers is empty" in capsys.readouterr().err


DOCS = ["The heron waits by the river.", "Seven bridges cross the town.", "A kettle sings when hot.",
        "Maps are drawn from surveys of the land, measured step by step and line by line, " * 3,
        "Winter brings snow to hills."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tokenizer = train_tokenizer([" ".join(DOCS)] * 40 + DOCS, vocab_size=300)
    tokenizer.save(root / "tokenizer.model")
    with open(root / "notes.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    ids = [np.array([tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]) for d in DOCS]
    args = ["--corpus", str(root / "notes.jsonl"), "--tokenizer", str(root / "tokenizer.model"), *MICRO,
            f"model.vocab_size={tokenizer.vocab_size}"]
    return args, ids


def test_episodic_store_holds_one_mean_pooled_last_layer_state_per_document(tmp_path, corpus):
    args, ids = corpus
    assert len(ids[3]) > 32 >= max(len(i) for i in ids[:3])  # one document spans several windows of train.seq_len
    out = str(tmp_path / "episodic")
    assert main(["episodic", "--output", out, "--batch", "4", *args]) == 0
    store = EpisodicStore.load(out)
    assert len(store) == len(DOCS)
    cfg = micro_config(args[-1])
    model = load_model(cfg, "")  # the same init the command drew from train.seed
    doc = ids[1]
    hidden = nnx.jit(lambda m, *a: m.hidden(*a))(model, doc[None], np.ones((1, len(doc)), np.int32),
                                                 np.arange(len(doc))[None])
    pooled = np.asarray(hidden[0]).mean(axis=0)
    found = store.search(pooled[None], k=1)
    assert found.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(found.values[0, 0], pooled, rtol=1e-4, atol=1e-5)
    assert store.metadata(found.ids[0])["source"][0] == "notes#1"


def test_corpus_commands_check_the_corpus_and_tokenizer_before_building_a_model(tmp_path, corpus, capsys):
    args, _ = corpus
    no_tokenizer = [a for a in args if "tokenizer" not in a]
    assert main(["episodic", "--output", str(tmp_path / "e"), *no_tokenizer]) == 2
    assert "no tokenizer; pass --tokenizer PATH" in capsys.readouterr().err
    assert main(["knn", "--output", str(tmp_path / "k"), *args, "model.vocab_size=512"]) == 2
    assert "model.vocab_size=512 but the tokenizer" in capsys.readouterr().err
    missing = ["--corpus", str(tmp_path / "none.jsonl"), *args[2:]]
    assert main(["episodic", "--output", str(tmp_path / "e"), *missing]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "k").exists()


def test_knn_from_a_corpus_stores_every_position_that_has_a_next_token(tmp_path, corpus):
    args, ids = corpus
    out = str(tmp_path / "knn.index")
    assert main(["knn", "--output", out, "--index", "flat", *args]) == 0
    store = KNNDatastore.load(out)
    assert store.size == sum(len(i) - 1 for i in ids) and store.dim == 64
    # the values are the documents' tokens after their <bos>, each position's next token
    assert sorted(set(store.values.tolist())) == sorted(set(np.concatenate([i[1:] for i in ids]).tolist()))
