"""Data sources and generated tasks: the task formats match the public benchmarks', the mixture
gives each bucket its share deterministically, local files load, and every failure (missing
path, empty bucket, missing text column, no hub) is one fast line naming what to fix."""

import collections
import gzip
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from quietreasoning.config import ConfigError
from quietreasoning.data import sources, tasks
from quietreasoning.data.sources import Document, SourceError, documents
from helpers import micro_config

BENCHMARKS = Path("/work/shared/benchmarks")  # read by tests only, to prove the formats; never trained on
PROSQA_KEYS = ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"]
POPQA_FIELDS = {"id": int, "subj": str, "prop": str, "obj": str, "subj_id": int, "prop_id": int, "obj_id": int,
                "s_aliases": str, "o_aliases": str, "s_uri": str, "o_uri": str, "s_wiki_title": str,
                "o_wiki_title": str, "s_pop": int, "o_pop": int, "question": str, "possible_answers": str}


def data_cfg(*overrides):
    return micro_config(*overrides).data


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------- tasks

def test_multiplication_writes_the_implicit_cot_format():
    # 12 * 34: partial products 048 and 036 (shifted by one), product 0408; digits reversed
    assert "".join(tasks.multiplication_parts([2, 1], [4, 3])) == "2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0"
    q, r, a = tasks.multiplication_parts([5, 6, 3, 2], [7, 4, 3, 4])  # 2365 * 4347, running sums between
    assert (q, a) == ("5 6 3 2 * 7 4 3 4||", " #### " + " ".join(reversed(str(2365 * 4347))))
    assert r.count("(") == 2 and r.count(" + ") == 3


@pytest.mark.parametrize("n", [4, 5, 7])
def test_multiplication_reproduces_benchmark_lines(n):
    path = BENCHMARKS / "multiplication" / f"{n}_by_{n}_valid.txt"
    if not path.exists():
        pytest.skip(f"{path} not on this machine")
    lines = path.read_text().splitlines()[:100]
    for line in lines:
        assert "".join(tasks.multiplication_parts(*tasks.parse_multiplication(line))) == line


def test_addition_shows_each_carry():
    # 95 + 87 = 182, digits reversed
    assert "".join(tasks.addition_parts([5, 9], [7, 8])) == \
        "5 9 + 7 8||5 + 7 + 0 = 2 c 1 , 9 + 8 + 1 = 8 c 1 #### 2 8 1"
    rng = np.random.default_rng(0)
    for _ in range(50):
        doc = tasks.addition_document(rng, 6)
        q = doc.parts[0][1].removesuffix("||").split(" + ")
        a, b = (tasks._value([int(c) for c in s.split()]) for s in q)
        assert doc.parts[2][1] == " #### " + " ".join(str(d) for d in tasks._reversed_digits(a + b, 7))


def _facts(question):
    return set(s.strip() + "." for s in question.rpartition(". Is ")[0].split(". "))


def test_prosqa_examples_are_valid_and_answerable():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        ex = tasks.prosqa_example(rng)
        assert list(ex) == PROSQA_KEYS
        names, facts = ex["idx_to_symbol"], _facts(ex["question"])
        person = names[ex["root"]]
        # the facts are the graph's edges, and the question asks about root, target and neg_target
        rendered = {(f"{names[u]} is a {names[v]}." if names[u][0].isupper() else f"Every {names[u]} is a {names[v]}.")
                    for u, v in ex["edges"]}
        assert rendered == facts and len(ex["edges"]) == len(facts)
        ask = re.search(r"Is (\w+) a (\w+) or (\w+)\?$", ex["question"]).groups()
        assert ask[0] == person and {ask[1], ask[2]} == {names[ex["target"]], names[ex["neg_target"]]}
        assert ex["answer"] == f"{person} is a {names[ex['target']]}."
        # the steps are facts that chain from the person to the target; the answer follows from the facts
        assert all(step in facts for step in ex["steps"])
        assert ex["steps"][0].startswith(f"{person} is a ") and ex["steps"][-1].endswith(f" {names[ex['target']]}.")
        answer, chain = tasks.prosqa_solve(ex["question"])
        assert answer == ex["answer"] and len(chain) == len(ex["steps"])
        lengths.append(len(ex["steps"]))
    assert 3 <= min(lengths) and max(lengths) <= 6 and 3.3 < np.mean(lengths) < 4.3  # ProsQA: 3.8 on average


def test_prosqa_keys_and_solver_match_the_benchmark():
    path = BENCHMARKS / "prosqa" / "prosqa_valid.json"
    if not path.exists():
        pytest.skip(f"{path} not on this machine")
    bench = json.loads(path.read_text())
    assert sorted(bench[0]) == sorted(PROSQA_KEYS)
    ours = tasks.prosqa_example(np.random.default_rng(1))
    for key in PROSQA_KEYS:
        assert type(ours[key]) is type(bench[0][key]), key
    assert all(tasks.prosqa_solve(ex["question"])[0] == ex["answer"] for ex in bench)


def test_prosqa_is_deterministic_and_documents_mark_roles():
    a = [tasks.prosqa_example(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1] != tasks.prosqa_example(np.random.default_rng(8))
    doc = tasks.prosqa_document(np.random.default_rng(7))
    assert [role for role, _ in doc.parts] == ["question", "rationale", "answer"]
    assert doc.parts[2][1] == "### " + a[0]["answer"] and doc.parts[1][1].count("\n") == len(a[0]["steps"])


def test_popqa_records_have_the_published_fields():
    records = tasks.popqa_records(0, n_people=200)
    assert len(records) > 300 and [r["id"] for r in records] == list(range(len(records)))
    for r in records:
        assert {k: type(v) for k, v in r.items()} == POPQA_FIELDS
        answers = json.loads(r["possible_answers"])
        assert isinstance(answers, list) and answers[0] == r["obj"]
        assert isinstance(json.loads(r["s_aliases"]), list) and r["subj"] in r["question"]
        assert r["prop"] in tasks.RELATIONS and r["prop_id"] == tasks.RELATIONS[r["prop"]][0]
    pops = np.array([r["s_pop"] for r in records])
    assert pops.min() >= 1 and pops.max() > 100 * np.median(pops)  # a long tail
    # one consistent world: a capital's country has that capital
    capital = {r["subj"]: r["obj"] for r in records if r["prop"] == "capital"}
    for r in records:
        if r["prop"] == "capital of" and r["obj"] in capital:
            assert capital[r["obj"]] == r["subj"]
    assert tasks.popqa_records(0, n_people=200) == records != tasks.popqa_records(1, n_people=200)


def test_fact_documents_favour_popular_subjects_without_repeats():
    records = tasks.popqa_records(0, n_people=400)
    docs = list(tasks.fact_documents(records, np.random.default_rng(0), 300))
    assert len({d.text for d in docs}) == 300
    assert all([r for r, _ in d.parts] == ["question", "answer"] and d.kind == "facts" for d in docs)
    by_question = {f"Q: {r['question']}\n": r["s_pop"] for r in records}
    chosen = np.median([by_question[d.parts[0][1]] for d in docs])
    assert chosen > np.median([r["s_pop"] for r in records])


# ----------------------------------------------------------------------------- embedded corpus

def test_embedded_mixture_is_split_by_ratio_and_seeded():
    cfg = data_cfg()
    docs = list(documents(cfg, seed=0, docs=400))
    assert collections.Counter(d.bucket for d in docs) == {"prose": 140, "code": 120, "reasoning": 80, "facts": 60}
    assert {d.bucket: d.kind for d in docs} == {"prose": "prose", "code": "code", "reasoning": "reasoning",
                                                "facts": "facts"}
    assert list(documents(cfg, seed=0, docs=400)) == docs
    other = list(documents(cfg, seed=1, docs=400))
    assert other != docs and [d.bucket for d in other] != [d.bucket for d in docs]
    # interleaved: the first tenth already holds every bucket
    assert {d.bucket for d in docs[:40]} == {"prose", "code", "reasoning", "facts"}


def test_mixture_override_and_counts():
    docs = list(documents(data_cfg("data.mixture=[prose=1, code=3]"), seed=0, docs=100))
    assert collections.Counter(d.bucket for d in docs) == {"prose": 25, "code": 75}
    assert sources.bucket_counts({"a": 0.999, "b": 0.001}, 10) == {"a": 10, "b": 1}  # at least one


def test_parts_concatenate_to_text_and_mark_roles():
    for d in documents(data_cfg(), seed=3, docs=200):
        if d.kind in ("reasoning", "facts"):
            assert d.parts and "".join(t for _, t in d.parts) == d.text
            assert {r for r, _ in d.parts} <= set(sources.ROLES) and "answer" in dict(d.parts)
            assert d.kind == "facts" or "rationale" in dict(d.parts)
        else:
            assert d.parts == () and d.spans == (("text", d.text),) and d.text.strip()
    with pytest.raises(ValueError, match="concatenate"):
        Document("b", "reasoning", "abc", (("question", "ab"),))


def test_embedded_corpus_builds_4000_unique_documents_in_seconds():
    t = time.perf_counter()
    docs = list(documents(data_cfg(), seed=0, docs=4000))
    seconds = time.perf_counter() - t
    print(f"embedded corpus, 4000 documents: {seconds:.2f} s")
    assert len(docs) == 4000 and len({d.text for d in docs}) > 3900
    assert max(len(d.text) for d in docs if d.bucket == "code") <= sources.CODE_CAP
    assert seconds < 30


# ----------------------------------------------------------------------------- local corpus

@pytest.fixture
def corpus(tmp_path):
    """A local corpus folder: prose.jsonl, code/*.txt (one document per file), math.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "code").mkdir(parents=True)
    (root / "prose.jsonl").write_text("".join(json.dumps({"text": f"prose number {i}", "id": i}) + "\n"
                                              for i in range(5)))
    for i in range(3):
        (root / "code" / f"f{i}.txt").write_text(f"def f{i}():\n    return {i}\n")
    pq.write_table(pa.table({"text": [f"x^{i} + 1" for i in range(4)]}), root / "math.parquet")
    (root / "README.md").write_text("not a bucket")
    return root


def test_local_corpus_reads_jsonl_txt_and_parquet(corpus):
    docs = list(documents(data_cfg(f"data.corpus=local:{corpus}"), seed=0, docs=9))
    by = collections.defaultdict(list)
    for d in docs:
        by[d.bucket].append(d)
    assert [d.text for d in by["prose"]] == [f"prose number {i}" for i in range(3)]
    assert [d.text for d in by["code"]] == [f"def f{i}():\n    return {i}\n" for i in range(3)]
    assert [d.text for d in by["math"]] == [f"x^{i} + 1" for i in range(3)]
    assert {b: ds[0].kind for b, ds in by.items()} == {"prose": "prose", "code": "code", "math": "math"}
    assert list(documents(data_cfg(f"data.corpus=local:{corpus}"), seed=0, docs=9)) == docs


def test_local_file_and_local_buckets(corpus, tmp_path):
    single = list(documents(data_cfg(f"data.corpus=local:{corpus / 'prose.jsonl'}"), seed=0, docs=4))
    assert [d.bucket for d in single] == ["prose"] * 4
    packed = tmp_path / "notes.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps({"text": "a gzipped note"}) + "\n")
    cfg = data_cfg(f"data.corpus=local:{corpus}", f"data.local_buckets=[notes={packed}]",
                   "data.mixture=[notes=1, math=1]")
    docs = list(documents(cfg, seed=0, docs=2))
    assert sorted((d.bucket, d.kind, d.text) for d in docs) == [("math", "math", "x^0 + 1"),
                                                               ("notes", "prose", "a gzipped note")]


def test_missing_paths_name_the_path_and_key(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(SourceError) as e:
        documents(data_cfg(f"data.corpus=local:{gone}"), seed=0)
    one_line_error(e, str(gone), "data.corpus")
    with pytest.raises(SourceError) as e:
        documents(data_cfg(f"data.local_buckets=[extra={gone}]", "data.mixture=[prose=1, extra=1]"), seed=0)
    one_line_error(e, str(gone), "data.local_buckets", "extra")
    assert isinstance(e.value, ConfigError)  # the CLIs print it as one line


def test_empty_bucket_and_missing_text_column_name_the_file(corpus, tmp_path):
    (corpus / "empty").mkdir()
    with pytest.raises(SourceError) as e:
        documents(data_cfg(f"data.corpus=local:{corpus}"), seed=0, docs=8)
    one_line_error(e, "'empty'", str(corpus / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text field here"}) + "\n")
    with pytest.raises(SourceError) as e:
        documents(data_cfg(f"data.corpus=local:{bad}"), seed=0, docs=1)
    one_line_error(e, str(bad), "'text'")
    with pytest.raises(SourceError) as e:
        documents(data_cfg("data.mixture=[prose=1, poetry=1]"), seed=0, docs=4)
    one_line_error(e, "'poetry'", "data.mixture")


# ----------------------------------------------------------------------------- hub corpus

def test_hub_offline_fails_fast_naming_the_bucket_and_the_local_alternative():
    t = time.perf_counter()
    with pytest.raises(SourceError) as e:  # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
        documents(data_cfg("data.corpus=hub"), seed=0)
    assert time.perf_counter() - t < 5
    one_line_error(e, "hub bucket 'fineweb'", "HuggingFaceFW/fineweb", "unreachable", "local:PATH", "embedded")


def test_hub_unreachable_host_fails_fast(monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    asked = []

    def refuse(address, timeout=None, *args, **kwargs):
        asked.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)  # no real network in tests
    t = time.perf_counter()
    with pytest.raises(SourceError) as e:
        documents(data_cfg("data.corpus=hub", "data.mixture=[openwebmath=1]"), seed=0)
    assert time.perf_counter() - t < 5
    assert asked and all(timeout is not None and timeout <= 5 for _, timeout in asked)
    one_line_error(e, "hub bucket 'openwebmath'", "open-web-math/open-web-math", "local:PATH")
