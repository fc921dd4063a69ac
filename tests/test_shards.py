"""TFRecord shards and the packed reader: every token in order, per-host shares that partition the
data, a saved position that resumes exactly. Corrupt, truncated and missing shards and manifests,
and a full disk, are in tests/faults/test_data_faults.py (which builds its shards with
`make_shards` and `reader` from here)."""

import itertools
import json
import time

import numpy as np
import pytest

from quietreasoning.config import DataError
from quietreasoning.data.reader import ShardReader, cursors, round_robin
from quietreasoning.data.shards import ShardWriter, read_manifest, write_manifest
from quietreasoning.utils.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def make_shards(directory, n_docs=60, per_shard=7, buckets=("prose", "code"), seed=0, compression=""):
    """Documents of distinct, recognisable tokens: doc d is [1, 1000 + d, ..., 2] of varying length."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory, per_shard, compression)
    docs = []
    for d in range(n_docs):
        body = np.full(rng.integers(3, 40), 1000 + d)
        tokens = np.concatenate([[1], body, [2]]).astype(np.int64)
        roles = None
        if d % 5 == 0:  # a reasoning-style document: question, rationale, answer
            roles = np.zeros(len(tokens), np.int64)
            third = len(tokens) // 3
            roles[1:third], roles[third:2 * third], roles[2 * third:-1] = 1, 2, 3
        writer.add(buckets[d % len(buckets)], tokens, roles)
        docs.append(tokens)
    shards = writer.close()
    write_manifest(directory, {"complete": True, "vocab_size": 4096, "shards": shards,
                               "records": n_docs, "tokens": int(sum(map(len, docs)))})
    return docs


def first_epoch(r):
    """The documents of epoch 0 (the stream itself goes on forever)."""
    return list(itertools.takewhile(lambda d: r.epoch == 0 and d[0] < sum(r.counts), r.documents()))


def reader(directory, **kw):
    args = dict(seq_len=31, rows=4, seed=0)
    args.update(kw)
    return ShardReader(str(directory / "*.tfrecord*"), **args)


# --- the round-robin schedule -------------------------------------------------------------------

def test_cursors_invert_the_round_robin_schedule():
    counts = [3, 0, 5, 1, 4]
    order = list(round_robin(counts, [0] * len(counts)))
    assert len(order) == sum(counts)
    for k in range(len(order) + 1):
        taken = cursors(counts, k)
        assert taken == [order[:k].count(j) for j in range(len(counts))]
        assert list(round_robin(counts, taken)) == order[k:]


# --- packing --------------------------------------------------------------------------------------

def test_packing_keeps_every_token_in_order_with_segments_positions_and_masks(tmp_path):
    docs = make_shards(tmp_path)
    r = reader(tmp_path)
    stream = [t for _, toks, _ in itertools.islice(r.documents(), 200) for t in toks][: 4 * 32 * 6]
    rows = []
    for _ in range(6):
        b = r.next_batch()
        for i in range(4):
            rows.append(np.concatenate([b["inputs"][i], b["targets"][i][-1:]]))
            seg, pos, mask = b["segment_ids"][i], b["positions"][i], b["loss_mask"][i]
            starts = np.flatnonzero(np.diff(seg)) + 1
            assert (seg >= 1).all() and (pos[starts] == 0).all() and pos[0] == 0
            assert (mask[starts - 1] == 0).all()  # no target crosses into the next document
            assert (b["targets"][i][:-1] == b["inputs"][i][1:]).all()
    # rows are the document stream cut into seq_len + 1 pieces, nothing lost or repeated
    assert np.concatenate(rows).tolist() == stream
    assert sum(map(len, docs)) == read_manifest(tmp_path)["tokens"]


def test_rationale_targets_are_down_weighted_and_answers_marked(tmp_path):
    make_shards(tmp_path)
    b = reader(tmp_path, rationale_weight=0.25, rows=32).next_batch()
    weights = set(np.unique(b["loss_mask"]).tolist())
    assert weights == {0.0, 0.25, 1.0}
    assert b["answer_mask"].sum() > 0


# --- the saved position --------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 4, 9])
def test_restoring_a_position_yields_exactly_the_batches_an_uninterrupted_run_reads(tmp_path, cut):
    make_shards(tmp_path)
    whole = reader(tmp_path)
    expected = [whole.next_batch() for _ in range(cut + 14)]  # an epoch is about 11 batches
    first = reader(tmp_path)
    for _ in range(cut):
        first.next_batch()
    position = first.position()
    resumed = reader(tmp_path)
    resumed.restore(json.loads(json.dumps(position.tolist())))  # as a checkpoint stores it
    for want in expected[cut:]:
        got = resumed.next_batch()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.epoch >= 1  # the test did cross into the second epoch


def test_epochs_visit_files_in_a_seeded_order(tmp_path):
    make_shards(tmp_path)
    one = reader(tmp_path, seed=0)
    assert not np.array_equal(one._order(0), one._order(1)) or len(one.files) < 3
    other = reader(tmp_path, seed=5)
    docs = lambda rd: [int(t[1]) for _, t, _ in first_epoch(rd)]
    assert docs(one) != docs(other) and sorted(docs(one)) == sorted(docs(other))


# --- hosts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_shard,hosts", [(7, 2), (7, 3), (100, 2)])
def test_hosts_read_disjoint_shares_that_cover_every_document(tmp_path, per_shard, hosts):
    """File sharding when there are enough shards; record sharding (every hosts-th document) when not."""
    docs = make_shards(tmp_path, per_shard=per_shard)
    seen = []
    for p in range(hosts):
        r = reader(tmp_path, process_index=p, process_count=hosts)
        seen.append([int(t[1]) for _, t, _ in first_epoch(r)])
    flat = sorted(x for share in seen for x in share)
    assert flat == sorted(int(d[1]) for d in docs)
    assert all(share for share in seen)


# --- patterns and compression -------------------------------------------------------------------------

def test_a_pattern_that_matches_nothing_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        reader(tmp_path / "nothing")


def test_gzip_shards_read_the_same_documents(tmp_path):
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir(), gz.mkdir()
    make_shards(plain)
    make_shards(gz, compression="GZIP")
    assert all(p.name.endswith(".tfrecord.gz") for p in gz.glob("*.tfrecord*"))
    a, b = reader(plain).next_batch(), reader(gz).next_batch()
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


# --- the tokenizer -----------------------------------------------------------------------------------

TEXTS = ["def add(a, b):\n    return a + b  # two spaces\n\n", "The quick brown fox jumps over the lazy dog. " * 3,
         "Every wumpus is a zorpus. Is Tom a zorpus? Yes.", "12 * 34 = 408\n\tindented\n"] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


def test_the_tokenizer_round_trips_text_exactly_with_the_think_symbols(tokenizer):
    for text in [*TEXTS[:4], "<bot>x<eot> after", "unseen: ünïcødé ✓ 漢字"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.bot_id, tokenizer.eot_id) == (0, 1, 2, 4, 5)
    assert tokenizer.encode("<bot>") == [4]
    assert tokenizer.vocab_size == 400


def test_a_saved_tokenizer_loads_identically(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.model")
    again = load_tokenizer(str(tmp_path / "t.model"))
    assert again.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0]) and again.vocab_size == 400


def test_a_vocab_mismatch_is_an_error_naming_both_sizes(tokenizer):
    with pytest.raises(DataError, match="model.vocab_size=512 but the tokenizer .* has 400 tokens"):
        tokenizer.check_fits(512, "configs/tiny.yaml")


def test_a_tokenizer_without_the_think_symbols_gets_them_appended(tokenizer):
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model, vocab_size=310,
                                   byte_fallback=True, minloglevel=2)
    tok = Tokenizer(model.getvalue(), "plain")
    assert (tok.bot_id, tok.eot_id, tok.vocab_size) == (310, 311, 312)
    ids = tok.encode("a<bot>b<eot>c")
    assert 310 in ids and 311 in ids and tok.decode(ids) == "a<bot>b<eot>c"


def test_missing_tokenizer_paths_and_offline_hub_names_fail_fast(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    t = time.perf_counter()
    with pytest.raises(DataError, match="mistralai/Mistral-7B-v0.1.*offline.*local tokenizer.model"):
        load_tokenizer("mistralai/Mistral-7B-v0.1")
    assert time.perf_counter() - t < 5
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(DataError, match="at least"):
        train_tokenizer(TEXTS, 100)
