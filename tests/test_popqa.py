"""PopQA evaluation and batch decoding: scoring rules, the record format and its errors, popularity
buckets, the synthetic long-tail set, prompts that match the training documents, greedy decoding
equal to argmax by hand, and the CLI end to end on a micro checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.data import tasks
from quietreasoning.data.build import encode
from quietreasoning.eval import popqa
from quietreasoning.eval.popqa import PopQAError, PopQAEvaluator
from quietreasoning.model.trunk import Trunk
from quietreasoning.training import inference
from quietreasoning.training.inference import generate
from quietreasoning.utils.tokenizer import train_tokenizer

VOCAB = 320  # a byte-fallback tokenizer of the facts' characters fits; the micro model's vocabulary matches it

# a record in the published layout (string-encoded lists, Wikidata URIs)
REAL = {"id": 4222362, "subj": "George Rankin", "prop": "occupation", "obj": "politician", "subj_id": 1850297,
        "prop_id": 22, "obj_id": 2834605, "s_wiki_title": "George Rankin", "o_wiki_title": "Politician",
        "s_uri": "http://www.wikidata.org/entity/Q5543720", "o_uri": "http://www.wikidata.org/entity/Q82955",
        "s_aliases": "[\"George James Rankin\"]", "o_aliases": "[\"political leader\", \"polit.\"]",
        "s_pop": 142, "o_pop": 25692, "question": "What is George Rankin's occupation?",
        "possible_answers": "[\"politician\", \"political leader\", \"polit.\"]"}


def record(i: int, s_pop: int, answer: str) -> dict:
    return {**REAL, "id": i, "s_pop": s_pop, "question": f"What is entity {i}'s occupation?", "obj": answer,
            "possible_answers": [answer]}


@pytest.fixture(scope="module")
def model():
    cfg = micro_config("model.compute_dtype=float32", f"model.vocab_size={VOCAB}")
    return Trunk(cfg.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def world():
    """A small synthetic world, and a tokenizer trained on its fact documents."""
    records = tasks.popqa_records(0, n_people=60)
    docs = [tasks.fact_document(r) for r in records]
    return records, train_tokenizer([d.text for d in docs], VOCAB)


# ----------------------------------------------------------------------------- scoring

def test_normalisation_lowercases_and_drops_punctuation_articles_and_extra_spaces():
    assert popqa.normalize_answer("  The Beatles!  ") == "beatles"
    assert popqa.normalize_answer("A  Tale of\tTwo Cities.") == "tale of two cities"
    assert popqa.normalize_answer("U.S. “Open”—an event") == "us openan event"
    assert popqa.normalize_answer("Theodore") == "theodore"  # articles only as whole words


def test_accuracy_needs_the_answer_as_whole_words_and_exact_match_needs_equality():
    assert popqa.contains_match("He is a Political Leader, mostly.", ["politician", "political leader"])
    assert not popqa.contains_match("bored", ["red"])
    assert popqa.exact_match("the Red.", ["red"]) and not popqa.exact_match("red or blue", ["red"])
    assert not popqa.contains_match("anything", ["The"])  # an answer that normalises to nothing never matches


def test_a_real_format_record_with_string_encoded_answers_is_read(tmp_path):
    path = tmp_path / "popqa.jsonl"
    path.write_text(json.dumps(REAL) + "\n\n")
    ev = PopQAEvaluator(path)
    assert ev.answers == [["politician", "political leader", "polit."]] and ev.questions == [REAL["question"]]
    assert ev.labels[ev.bucket[0]] == "100-1k"
    scores = ev.score("x", ["He was a polit"])
    assert scores.correct.tolist() == [True] and scores.exact.tolist() == [False]
    assert ev.score("x", ["Polit."]).exact.tolist() == [True]


def test_an_oracle_for_half_the_records_scores_the_expected_accuracy_per_bucket():
    pops = [5, 7, 50, 60, 70, 80, 5000, 200_000]
    records = [record(i, p, f"answer{i}") for i, p in enumerate(pops)]
    right = {0, 2, 3, 6}
    by_question = {r["question"]: (f"answer{r['id']}" if r["id"] in right else "no idea") for r in records}
    ev = PopQAEvaluator(records)
    scores = ev.evaluate("oracle", lambda qs: [by_question[q] for q in qs], batch_size=3, progress=False)
    assert scores.accuracy == 0.5 and scores.exact_match == 0.5
    assert scores.by_bucket() == [("<10", 2, 0.5), ("10-100", 4, 0.5), ("1k-10k", 1, 1.0), (">=100k", 1, 0.0)]
    table = popqa.markdown_table([scores]).splitlines()
    assert table[0] == ("| system | accuracy (n=8) | exact match | s_pop <10 (n=2) | s_pop 10-100 (n=4) | "
                        "s_pop 1k-10k (n=1) | s_pop >=100k (n=1) |")
    assert table[2] == "| oracle | 50.0% | 50.0% | 50.0% | 50.0% | 100.0% | 0.0% |"


def test_compare_scores_every_system_and_writes_table_plot_and_predictions(tmp_path):
    records = [record(i, 10 ** (i % 4), f"answer{i}") for i in range(12)]
    answers = {r["question"]: r["obj"] for r in records}
    systems = {"closed-book": lambda qs: ["?" for _ in qs], "+ oracle": lambda qs: [answers[q] for q in qs]}
    result = PopQAEvaluator(records).compare(systems, output_dir=tmp_path / "out", progress=False)
    assert [s.accuracy for s in result.scores.values()] == [0.0, 1.0]
    assert [line.split(" | ")[0] for line in result.table.splitlines()[2:]] == ["| closed-book", "| + oracle"]
    assert (tmp_path / "out" / "popqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.table in (tmp_path / "out" / "popqa.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "out" / "popqa_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[1]["+ oracle"] == {"prediction": "answer1", "correct": True, "exact": True}
    with pytest.raises(PopQAError, match="system 'short': 1 answers for 12 questions"):
        PopQAEvaluator(records).compare({"short": lambda qs: ["x"]}, progress=False, batch_size=64)


# ----------------------------------------------------------------------------- records and their errors

def test_a_missing_field_is_one_error_naming_the_file_line_and_field(tmp_path):
    path = tmp_path / "facts.jsonl"
    broken = {k: v for k, v in REAL.items() if k != "s_pop"}
    path.write_text(json.dumps(REAL) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(PopQAError, match=r"facts.jsonl:2: missing field 's_pop'; a PopQA record needs id, subj"):
        PopQAEvaluator(path)
    path.write_text(json.dumps(REAL) + "\n{oops\n")
    with pytest.raises(PopQAError, match=r"facts.jsonl:2: not valid JSON"):
        PopQAEvaluator(path)
    with pytest.raises(PopQAError, match=r"records\[0\]: field 'possible_answers' must be a list of strings"):
        PopQAEvaluator([{**REAL, "possible_answers": "politician"}])
    with pytest.raises(PopQAError, match="missing.jsonl: file not found; give a jsonl file"):
        PopQAEvaluator(tmp_path / "missing.jsonl")


def test_generate_cli_writes_a_deterministic_long_tailed_set_of_valid_records(tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    assert popqa.main(["generate", "--output", str(a), "--seed", "3", "--people", "150"]) == 0
    assert "PopQA records (seed 3, 150 people)" in capsys.readouterr().out
    popqa.main(["generate", "--output", str(b), "--seed", "3", "--people", "150"])
    popqa.main(["generate", "--output", str(c), "--seed", "4", "--people", "150"])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    records = popqa.load_records(a)  # every line a valid PopQA record
    assert records == tasks.popqa_records(3, n_people=150)
    pops = np.array([r["s_pop"] for r in records])
    assert pops.max() > 100 * np.median(pops)  # a long tail
    ev = PopQAEvaluator(a)
    counts = np.bincount(ev.bucket, minlength=len(ev.labels))
    assert counts[1:4].sum() > 0.7 * len(ev) and counts[4:].sum() < 0.1 * len(ev)  # most in the middle, few at the top


# ----------------------------------------------------------------------------- prompts and decoding

def test_the_prompt_tokens_are_how_every_training_document_begins(world):
    records, tokenizer = world
    for r in records:
        ids, _ = encode(tokenizer, [tasks.fact_document(r)])[0]
        prompt = popqa.prompt_ids(tokenizer, r["question"])
        assert ids[:len(prompt)].tolist() == prompt and len(ids) > len(prompt) + 1


def _argmax_by_hand(model, prompt, steps):
    """One unpadded sequence at a time: run the model on it, append the argmax of the last logits."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, jnp.ones_like(x), jnp.arange(x.shape[1])[None]))
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(forward(state, jnp.array([seq]))[0, -1])))
    return seq[len(prompt):]


def test_greedy_generate_equals_step_by_step_argmax_for_prompts_of_different_lengths(model):
    prompts = [[1, 200, 17], [1, 5, 9, 33]]
    out = generate(model, prompts, max_new_tokens=3, eos_id=None)
    assert out == [_argmax_by_hand(model, p, 3) for p in prompts]


def test_a_row_stops_before_its_first_eos_or_stop_token(model):
    prompts = [[1, 5, 9, 33, 7, 101, 64], [1, 200]]
    full = generate(model, prompts, max_new_tokens=3, eos_id=None)
    cut = generate(model, prompts, max_new_tokens=3, eos_id=full[0][2])
    assert cut[0] == full[0][:full[0].index(full[0][2])]
    stopped = generate(model, prompts, max_new_tokens=3, eos_id=None, stop_ids=[full[1][1]])
    assert stopped[1] == full[1][:full[1].index(full[1][1])] and stopped[0] == full[0][:len(stopped[0])]


def test_prompts_of_one_bucket_share_one_compilation_and_sampling_follows_the_seed(model):
    assert inference.bucket_shape(3, 5, 6) == (4, 32) and inference.bucket_shape(5, 40, 16) == (8, 64)
    assert inference.bucket_shape(1, 5, 6, chunk=48) == (1, 48)
    first = generate(model, [[1, 2, 3]], max_new_tokens=3, eos_id=None, temperature=1.0, seed=1)
    size = inference._decode._cache_size()
    again = generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=3, eos_id=None, temperature=1.0, seed=1)
    assert inference._decode._cache_size() == size and len(again[0]) == 3
    assert generate(model, [[1, 2, 3]], max_new_tokens=3, eos_id=None, temperature=1.0, seed=1) == first
    samples = {tuple(generate(model, [[1, 2, 3]], max_new_tokens=3, eos_id=None, temperature=2.0, seed=s)[0])
               for s in range(4)}
    assert len(samples) > 1


def test_bad_generate_arguments_are_one_line_errors(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2, eos_id=2)
    with pytest.raises(ValueError, match=rf"prompt 0 has token ids outside \[0, {VOCAB}\)"):
        generate(model, [[1, VOCAB]], max_new_tokens=2, eos_id=2)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be positive"):
        generate(model, [[1]], max_new_tokens=0, eos_id=2)


def test_closed_book_answers_are_the_decoded_continuation_of_the_training_prompt(model, world):
    records, tokenizer = world
    questions = [r["question"] for r in records[:3]]
    predict = popqa.closed_book(model, tokenizer, max_new_tokens=3)
    expected = [popqa.answer_text(tokenizer.decode(ids)) for ids in generate(
        model, [popqa.prompt_ids(tokenizer, q) for q in questions], max_new_tokens=3, eos_id=tokenizer.eos_id)]
    assert predict(questions) == expected


# ----------------------------------------------------------------------------- evaluate, end to end

def test_evaluate_cli_runs_on_a_micro_checkpoint_and_refuses_a_mismatched_config(tmp_path, model, world, capsys):
    # the checkpoint layout the trainer writes (training/checkpoint.py), holding the fixture model's parameters
    from helpers import MICRO
    from quietreasoning.training.checkpoint import Checkpointer

    _, tokenizer = world
    tokenizer.save(tmp_path / "tokenizer.model")
    overrides = [*MICRO, "model.compute_dtype=float32", f"model.vocab_size={VOCAB}"]
    cfg = micro_config(*overrides, out_dir=tmp_path / "runs")
    ckpt = Checkpointer(cfg.checkpoint_dir, async_save=False)
    ckpt.save(7, {"params": nnx.state(model, nnx.Param)}, {"stage": "train", "step": 7, "config": cfg.to_dict()})
    ckpt.close()
    facts = tmp_path / "facts.jsonl"
    popqa.main(["generate", "--output", str(facts), "--people", "30"])
    base = ["evaluate", "--records", str(facts), "--tokenizer", str(tmp_path / "tokenizer.model"),
            "--checkpoint", cfg.checkpoint_dir, "--limit", "6", "--max-new-tokens", "3",
            "--output-dir", str(tmp_path / "eval"), "--config", "tiny", *overrides]
    assert popqa.main(base) == 0
    out = capsys.readouterr().out
    assert "| closed-book |" in out and "accuracy (n=6)" in out
    lines = [json.loads(x) for x in (tmp_path / "eval" / "popqa_predictions.jsonl").read_text().splitlines()]
    # the answers are the fixture model's own, through the saved and restored parameters
    assert [x["closed-book"]["prediction"] for x in lines] == popqa.closed_book(model, tokenizer, max_new_tokens=3)(
        [x["question"] for x in lines])

    assert popqa.main([*base, "model.d_ff=64"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/7: the checkpoint holds another model (model.d_ff=128 there, 64 here)" in err
    bad = [str(tmp_path / "nowhere") if arg == cfg.checkpoint_dir else arg for arg in base]
    assert popqa.main(bad) == 2
    assert "nowhere: no checkpoint there" in capsys.readouterr().err
