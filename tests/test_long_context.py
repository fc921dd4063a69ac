"""Long-context evaluation: the RULER-style generators (deterministic, at the stated length and depth,
needles as each task states them), the RULER and LongBench scores on hand-made cases, the LongBench
reader and its errors, and the evaluator end to end on an untrained micro model."""

import json
import math
import re

import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.eval import long_context as lc
from quietreasoning.eval.long_context import LongContextError
from quietreasoning.model.trunk import Trunk
from quietreasoning.utils.tokenizer import train_tokenizer

VOCAB = 400  # the tasks' characters and 256 byte pieces fit, with room for merges
NEEDLE = re.compile(r"One of the secret numbers for (\w+) is (\d+)\.")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(lc.tokenizer_texts(50, 0), VOCAB)


def context_of(x: lc.Instance) -> str:
    """The haystack with its needles: the prompt's middle line."""
    return x.prompt.split("\n")[1]


# ----------------------------------------------------------------------------- generators

def test_generators_are_deterministic_given_the_seed(tokenizer):
    for task in lc.TASKS:
        a = lc.synthetic_instances(task, tokenizer, 256, 3, seed=7)
        b = lc.synthetic_instances(task, tokenizer, 256, 3, seed=7)
        c = lc.synthetic_instances(task, tokenizer, 256, 3, seed=8)
        assert a == b
        assert [x.prompt for x in a] != [x.prompt for x in c]


@pytest.mark.parametrize("length", [256, 600])
def test_prompt_plus_answer_allowance_hits_the_requested_length_within_a_few_tokens(tokenizer, length):
    shortest = min(len(tokenizer.encode(" " + s)) for s in lc.SHORT_FILLER)  # 4 tokens with this small vocabulary
    for task in lc.TASKS:
        for x in lc.synthetic_instances(task, tokenizer, length, 4, seed=0):
            used = len(x.prompt_ids) + x.max_new_tokens
            assert length - 2 * shortest < used <= length, (task, used)
            assert x.prompt_ids[0] == tokenizer.bos_id
            assert list(x.prompt_ids[1:]) == tokenizer.encode(x.prompt)


def test_needle_depths_are_spread_evenly_and_each_needle_sits_at_its_depth(tokenizer):
    xs = lc.synthetic_instances("niah_single", tokenizer, 600, 5, seed=0)
    assert [x.depth for x in xs] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for x in xs:
        context = context_of(x)
        needle = NEEDLE.search(context)
        filler_before = len(context[:needle.start()].strip())
        filler_all = len(context) - len(needle.group(0)) - 1
        assert filler_before / filler_all == pytest.approx(x.depth, abs=0.04)


def test_single_needle_value_appears_in_the_context_exactly_once(tokenizer):
    for x in lc.synthetic_instances("niah_single", tokenizer, 256, 6, seed=1):
        (value,) = x.answers
        assert len(value) == lc.VALUE_DIGITS and value.isdigit()
        assert x.prompt.count(value) == 1
        (key, found), = NEEDLE.findall(x.prompt)
        assert found == value and x.prompt.endswith(f"The secret number for {key} is")


def test_multikey_distractor_needles_hold_other_keys_and_values(tokenizer):
    for x in lc.synthetic_instances("niah_multikey", tokenizer, 256, 6, seed=2):
        needles = NEEDLE.findall(x.prompt)
        keys = [k for k, _ in needles]
        assert len(needles) == lc.KEYS_PER_PROMPT and len(set(keys)) == len(keys)
        asked = re.search(r"The secret number for (\w+) is$", x.prompt).group(1)
        assert [v for k, v in needles if k == asked] == list(x.answers)
        assert all(x.prompt.count(v) == 1 for _, v in needles)


def test_multivalue_needles_give_every_gold_value_to_the_asked_key_in_context_order(tokenizer):
    for x in lc.synthetic_instances("niah_multivalue", tokenizer, 256, 4, seed=3):
        needles = NEEDLE.findall(x.prompt)
        assert len(needles) == lc.VALUES_PER_KEY and len({k for k, _ in needles}) == 1
        assert tuple(v for _, v in needles) == x.answers and len(set(x.answers)) == lc.VALUES_PER_KEY
        assert x.target == " " + ", ".join(x.answers)


def test_variable_tracking_chain_gives_every_gold_variable_the_value(tokenizer):
    for x in lc.synthetic_instances("vt", tokenizer, 256, 4, seed=4):
        value = re.search(r"given the value (\d+) are$", x.prompt).group(1)
        statements = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", x.prompt)
        assert len(statements) == lc.HOPS + 1
        holds = {}
        for name, source in statements:  # in context order, each reads a variable defined before it
            holds[name] = holds[source[4:]] if source.startswith("VAR ") else source
        assert sorted(n for n, v in holds.items() if v == value) == sorted(x.answers)
        assert x.answers[0] == statements[0][0]


def test_too_short_a_length_is_a_one_line_error_naming_the_flag(tokenizer):
    with pytest.raises(LongContextError, match=r"--lengths 40: too short for vt"):
        lc.synthetic_instances("vt", tokenizer, 40, 1, seed=0)
    with pytest.raises(LongContextError, match="unknown task 'niah'"):
        lc.synthetic_instance("niah", tokenizer, 256, 0.5, np.random.default_rng(0))


# ----------------------------------------------------------------------------- scoring

def test_ruler_score_is_the_share_of_gold_strings_found_ignoring_case():
    assert lc.ruler_score("The number is 1234567.", ["1234567"]) == 1.0
    assert lc.ruler_score("it is 1234568", ["1234567"]) == 0.0
    assert lc.ruler_score("1111111, 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert lc.ruler_score("abcde QWERT", ["ABCDE", "QWERT", "ZZZZZ"]) == pytest.approx(2 / 3)


def test_qa_f1_is_token_overlap_of_normalised_text_best_over_answers():
    # normalised: prediction [big, red, dog], gold [red, dog]: precision 2/3, recall 1
    assert lc.qa_f1("The big red dog!", ["a red dog"]) == pytest.approx(0.8)
    assert lc.qa_f1("The big red dog!", ["cat", "big red dog"]) == 1.0
    assert lc.qa_f1("nothing shared", ["a red dog"]) == 0.0
    assert lc.qa_f1("dog dog", ["dog"]) == pytest.approx(2 * 0.5 / 1.5)  # repeats count once per match


# ----------------------------------------------------------------------------- LongBench

def longbench_record(i: int, context: str) -> dict:
    return {"input": "Who wrote the letter?", "context": context, "answers": ["the old baker"], "length": 9,
            "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": f"id{i}"}


def test_longbench_reader_builds_template_prompts_and_cuts_long_contexts_in_the_middle(tmp_path, tokenizer):
    long_context = " ".join(f"Sentence {i} of the story." for i in range(400))
    path = tmp_path / "narrativeqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (longbench_record(0, "The old baker wrote it."),
                                                        longbench_record(1, long_context))) + "\n\n")
    short, cut = (lc.longbench_instance(r, tokenizer, 256) for r in lc.load_longbench(path))
    assert short.prompt == lc.LONGBENCH_TEMPLATE.format(context="The old baker wrote it.",
                                                        input="Who wrote the letter?")
    assert short.metric == "qa_f1" and short.answers == ("the old baker",) and math.isnan(short.depth)
    assert len(cut.prompt_ids) + cut.max_new_tokens <= 256 + 2  # the decoded cut may re-tokenise a little longer
    assert "Sentence 0 of" in cut.prompt and "Sentence 399 of the story." in cut.prompt
    assert "Sentence 200 of" not in cut.prompt
    assert cut.prompt.endswith("Question: Who wrote the letter?\nAnswer:")


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bench.jsonl:2: not valid JSON"),
    (json.dumps({k: v for k, v in longbench_record(1, "x").items() if k != "answers"}),
     r"bench.jsonl:2: missing field 'answers'"),
    (json.dumps({**longbench_record(1, "x"), "answers": "the baker"}), r"bench.jsonl:2: field 'answers' must be"),
])
def test_longbench_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(longbench_record(0, "ctx")) + "\n" + line + "\n")
    with pytest.raises(LongContextError, match=message):
        lc.load_longbench(path)
    with pytest.raises(LongContextError, match="not found"):
        lc.load_longbench(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- the evaluator

def test_evaluator_end_to_end_on_a_bundle_reports_every_mode_and_cell_with_scores_in_unit_interval(tmp_path, tokenizer):
    from quietreasoning.serve.bundle import export_bundle

    cfg = micro_config("model.compute_dtype=float32", f"model.vocab_size={tokenizer.vocab_size}",
                       "serve.snapkv_window=8")
    tokenizer.save(tmp_path / "tok.model")
    export_bundle(Trunk(cfg.model, rngs=nnx.Rngs(0)), cfg, str(tmp_path / "tok.model"), tmp_path / "bundle",
                  bits=None, calib_batches=None)
    bench = tmp_path / "narrativeqa.jsonl"
    bench.write_text(json.dumps(longbench_record(0, "The old baker wrote it. " * 8)) + "\n")
    out = tmp_path / "out"
    assert lc.main(["--bundle", str(tmp_path / "bundle"), "--tasks", "niah_single", "--lengths", "128", "--n", "2",
                    "--longbench", str(bench), "--modes", "full,snapkv0.3+int8", "--output", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["cells"] == ["niah_single@128", "narrativeqa@128"]
    full, tiered = result["modes"]
    assert (full["mode"], tiered["mode"]) == ("full", "snapkv0.3+int8")
    for row in result["modes"]:
        assert set(row["accuracy"]) == set(result["cells"])
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert full["drop_points"] == 0.0 and full["compression"] == 1.0 and full["kept_share"] == 1.0
    assert tiered["kept_share"] < 0.6 and tiered["compression"] > 1 / 0.6  # SnapKV and int8 both shrink it
    assert len(result["instances"]) == 3
    for x in result["instances"]:
        assert set(x["predictions"]) == set(x["scores"]) == {"full", "snapkv0.3+int8"}
        assert all(0.0 <= s <= 1.0 for s in x["scores"].values())
    assert "| snapkv0.3+int8 |" in (out / "tables.md").read_text()
    assert (out / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_a_model_source_is_a_one_line_error(tmp_path, capsys):
    assert lc.main(["--output", str(tmp_path / "out"), "--lengths", "256"]) == 2
    assert "give --bundle DIR, or --checkpoint DIR with --tokenizer PATH" in capsys.readouterr().err
    assert lc.main(["--output", str(tmp_path / "out"), "--lengths", "256,x"]) == 2
    assert lc.main(["--output", str(tmp_path / "out"), "--modes", "full,int3", "--checkpoint", "c",
                    "--tokenizer", "t"]) == 2
    assert "--modes: unknown mode 'int3'" in capsys.readouterr().err
