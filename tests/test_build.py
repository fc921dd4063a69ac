"""The data build end to end: the embedded corpus into shards with a plausible manifest, injected
duplicates and non-English text dropped and counted, reruns that skip finished work, and
training (and resuming) from the shards."""

import json
import time

import jax
import numpy as np
import pytest

from helpers import MICRO, micro_config
from quietreasoning.config import DataError, load_config
from quietreasoning.data.__main__ import main as data_main
from quietreasoning.data.build import build
from quietreasoning.data.shards import read_manifest
from quietreasoning.training.trainer import train

VOCAB = 512
MICRO_CLI = [*MICRO, "train.steps=1"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    cfg = load_config("tiny", ["data.docs=400", "data.records_per_shard=60"])
    t = time.perf_counter()
    manifest = build(cfg.data, str(out), vocab_size=VOCAB, progress=False, log=lambda *_: None)
    return out, manifest, time.perf_counter() - t


def test_the_embedded_corpus_builds_shards_a_tokenizer_and_a_plausible_manifest(embedded):
    out, m, seconds = embedded
    assert m["complete"] and m["vocab_size"] == VOCAB and (out / "tokenizer.model").exists()
    assert set(m["buckets"]) == {"prose", "code", "reasoning", "facts"}
    for name, b in m["buckets"].items():
        assert b["read"] == b["kept"] + sum(b["dropped"].values()), name
        assert b["kept"] == b["records"] > 0 and b["tokens"] > b["records"] * 4
    assert sum(b["read"] for b in m["buckets"].values()) == 400
    assert m["records"] == sum(s["records"] for s in m["shards"]) and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert not list(out.glob(".*tmp*"))
    assert seconds < 120


def test_inspect_prints_bucket_statistics_and_decoded_documents(embedded, capsys):
    out, _, _ = embedded
    assert data_main(["inspect", str(out), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "reasoning" in text and text.count("--- document") == 2


def test_a_rerun_skips_a_complete_build_and_refuses_other_settings(embedded):
    out, m, _ = embedded
    cfg = load_config("tiny", ["data.docs=400", "data.records_per_shard=60"])
    said = []
    assert build(cfg.data, str(out), vocab_size=VOCAB, progress=False, log=said.append) == m
    assert "already complete" in said[0]
    other = load_config("tiny", ["data.docs=300", "data.records_per_shard=60"])
    with pytest.raises(DataError, match="other settings.*docs: 400 -> 300"):
        build(other.data, str(out), vocab_size=VOCAB, progress=False)


def test_an_interrupted_build_rewrites_only_what_is_missing(tmp_path, embedded):
    src, m, _ = embedded
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = m["shards"][-1]["path"]
    (tmp_path / victim).unlink()
    manifest = read_manifest(tmp_path)
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    kept = {s["path"]: (tmp_path / s["path"]).stat().st_mtime_ns for s in m["shards"] if s["path"] != victim}
    cfg = load_config("tiny", ["data.docs=400", "data.records_per_shard=60"])
    again = build(cfg.data, str(tmp_path), vocab_size=VOCAB, progress=False, log=lambda *_: None)
    assert again["complete"] and [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    assert all((tmp_path / p).stat().st_mtime_ns == t for p, t in kept.items())


def test_injected_duplicates_and_non_english_prose_are_dropped_and_counted(tmp_path):
    from quietreasoning.data.clean import Cleaner
    from quietreasoning.data.sources import documents

    base_cfg = load_config("tiny", ["data.mixture=[prose=1]", "data.docs=120"])
    english = [d.text for d in documents(base_cfg.data, seed=0) if len(d.text.split()) > 150][:30]
    french = [f"Les habitants du quartier numéro {i} ont demandé au conseil municipal une nouvelle bibliothèque, "
              "davantage de pistes cyclables, un marché couvert ouvert le dimanche matin et des horaires plus "
              "longs pour la piscine pendant les vacances scolaires." for i in range(5)]
    words = english[5].split()
    words[len(words) // 2] = "zebra"
    injected = [english[3], english[7], " ".join(words)] + french
    baseline = Cleaner.from_config(base_cfg.data, 0)
    list(baseline.filter(_docs(english)))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in english + injected))
    cfg = load_config("tiny", [f"data.corpus=local:{tmp_path / 'src'}", f"data.docs={len(english) + len(injected)}"])
    m = build(cfg.data, str(tmp_path / "out"), vocab_size=VOCAB, progress=False, log=lambda *_: None)
    prose, before = m["buckets"]["prose"], baseline.stats["prose"]
    assert prose["read"] == len(english) + len(injected)
    dropped = {k: prose["dropped"][k] - before["dropped"][k] for k in prose["dropped"]}
    assert dropped["exact_duplicate"] == 2 and dropped["near_duplicate"] == 1 and dropped["language"] == 5
    assert prose["kept"] == before["kept"] == prose["records"]


def _docs(texts):
    from quietreasoning.data.sources import Document
    return [Document("prose", "prose", t) for t in texts]


def test_bad_sources_fail_with_one_line_and_leave_nothing_half_written(tmp_path):
    cfg = load_config("tiny", [f"data.corpus=local:{tmp_path / 'missing'}"])
    with pytest.raises(DataError) as info:
        build(cfg.data, str(tmp_path / "out"), vocab_size=VOCAB, progress=False)
    assert "\n" not in str(info.value) and "missing" in str(info.value)
    assert not list((tmp_path / "out").glob("*.tfrecord*"))


def test_training_reads_the_shards_and_resumes_on_the_same_batches(embedded, tmp_path):
    out, _, _ = embedded
    data = ["data.source=tfrecord", f"data.pretrain_pattern={out}/*.tfrecord*", f"model.vocab_size={VOCAB}",
            "checkpoint.every=2", "train.steps=4"]
    straight = train(micro_config(*data, out_dir=tmp_path / "a"), measure_roof=False, progress=False)
    cut = micro_config(*data, out_dir=tmp_path / "b")
    train(cut, measure_roof=False, progress=False, stop_at=2)
    resumed = train(cut, measure_roof=False, progress=False)
    assert resumed.resumed_from == "checkpoint" and resumed.start_step == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state["params"])),
                    jax.tree.leaves(jax.device_get(straight.state["params"]))):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(straight.final_loss)


def test_a_model_vocabulary_that_differs_from_the_shards_is_refused_at_start(embedded, tmp_path):
    out, _, _ = embedded
    cfg = micro_config("data.source=tfrecord", f"data.pretrain_pattern={out}/*.tfrecord*", out_dir=tmp_path)
    with pytest.raises(DataError, match=f"{VOCAB}-token vocabulary but model.vocab_size=256"):
        train(cfg, measure_roof=False, progress=False)


def test_train_cli_pretrain_pattern_that_matches_nothing_is_one_line_and_exit_2(run_cli, tmp_path):
    proc = run_cli("train.py", "--pretrain-pattern", str(tmp_path / "none" / "*.tfrecord*"), *MICRO_CLI)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.pretrain_pattern=")
    assert "matches no files" in proc.stderr
