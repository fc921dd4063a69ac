"""Reasoning tasks for the latent trainer: every split is a pure function of its seed, every answer
is what an independent solver (written here, not the generator's code) gets from the question,
the steps are the solver's chain, test and ood never repeat a train question, ood is harder,
the shared benchmark files load in the same format, and bad names fail in one line."""

import collections
import json
import operator
import re
from pathlib import Path

import numpy as np
import pytest

from quietreasoning.config import ConfigError, DataError
from quietreasoning.data import benchmarks, tasks
from quietreasoning.data.__main__ import main as data_main

TASKS = ("addition", "multiplication", "prosqa", "prontoqa", "varassign")
BENCHMARKS = Path(benchmarks.BENCHMARKS_DIR)


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ----------------------------------------------------------------------------- independent solvers

def reversed_number(text: str) -> int:
    """'3 2 1' (least significant digit first) -> 123."""
    return int("".join(reversed(text.split())))


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def run_program(question: str) -> tuple[dict[str, int], str, dict[str, str]]:
    """(values, queried variable, what each variable reads) of 'a=3; b=a+2; b?'."""
    *statements, query = question.split("; ")
    values, reads = {}, {}
    for statement in statements:
        m = re.fullmatch(r"([a-z])=(?:(\d+)|([a-z])([+*-])(\d+))", statement)
        assert m, statement
        name, constant, source, op, k = m.groups()
        assert name not in values, f"{name} assigned twice"
        if constant is not None:
            values[name] = int(constant)
        else:
            values[name] = OPS[op](values[source], int(k))  # KeyError if read before assigned
            reads[name] = source
    return values, query.removesuffix("?"), reads


def prontoqa_solve(question: str) -> tuple[str, list[str]]:
    """(True/False, the derived facts in order) by forward chaining from the person's fact."""
    body, _, asked = question.partition(" True or false: ")
    isa, props, start = collections.defaultdict(list), collections.defaultdict(list), None
    for sentence in re.findall(r"[^.]+\.", body):
        sentence = sentence.strip()
        if m := re.fullmatch(r"Every (\w+) is a (\w+)\.", sentence):
            isa[m[1]].append(m[2])
        elif m := re.fullmatch(r"Every (\w+) is (not )?(\w+)\.", sentence):
            props[m[1]].append((m[3], m[2] is None))
        elif m := re.fullmatch(r"([A-Z]\w+) is a (\w+)\.", sentence):
            assert start is None, "two facts about people"
            person, start = m[1], m[2]
        else:
            raise AssertionError(sentence)
    m = re.fullmatch(r"(\w+) is (not )?(\w+)\.", asked)
    assert m and m[1] == person, asked
    prop, asked_positive = m[3], m[2] is None
    # every concept the person reaches, with the concept it was reached from
    parent, queue = {start: None}, collections.deque([start])
    while queue:
        c = queue.popleft()
        for d in isa[c]:
            if d not in parent:
                parent[d] = c
                queue.append(d)
    holders = [(c, value) for c in parent for p, value in props[c] if p == prop]
    assert len({value for _, value in holders}) == 1, f"derivable both ways or not at all: {holders}"
    concept, value = holders[0]
    chain = []
    while concept is not None:
        chain.append(concept)
        concept = parent[concept]
    facts = [f"{person} is a {c}." for c in reversed(chain[:-1])]
    facts.append(f"{person} is {'' if value else 'not '}{prop}.")
    return ("True" if value == asked_positive else "False"), facts


def assert_prosqa_chain(ex: dict) -> None:
    """The answer is the option the person reaches (breadth-first search over the question's facts),
    and the steps are a shortest chain of the question's facts from the person to it."""
    answer, chain = tasks.prosqa_solve(ex["question"])
    assert answer == ex["answer"] and len(ex["steps"]) == len(chain)
    facts = {s.strip() + "." for s in ex["question"].rpartition(". Is ")[0].split(". ")}
    subject = answer.split(" is a ")[0]
    for step in ex["steps"]:
        assert step in facts and step.removeprefix("Every ").startswith(f"{subject} is a "), (step, subject)
        subject = step.removesuffix(".").split(" is a ")[1]
    assert answer.endswith(f" {subject}.")


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_the_same_split_and_a_prefix_for_fewer(task):
    a = tasks.reasoning_split(task, "train", 20, seed=3)
    assert a == tasks.reasoning_split(task, "train", 20, seed=3)
    assert a[:8] == tasks.reasoning_split(task, "train", 8, seed=3)
    assert a != tasks.reasoning_split(task, "train", 20, seed=4)
    assert json.loads(json.dumps(a)) == a  # plain JSON types only
    for ex in a:
        assert list(ex) == ["task", "question", "steps", "answer", "difficulty"] and ex["task"] == task
        assert ex["steps"] and all(isinstance(s, str) and s.strip() for s in ex["steps"]) and ex["answer"]


# ----------------------------------------------------------------------------- answers and steps

def test_varassign_answers_and_steps_match_an_interpreter():
    for ex in tasks.reasoning_split("varassign", "train", 150, 0) + tasks.reasoning_split("varassign", "ood", 50, 0):
        values, query, reads = run_program(ex["question"])
        d = ex["difficulty"]
        assert len(values) == d["hops"] + 1 + d["distractors"]
        assert ex["answer"] == str(values[query]) and all(0 <= v < d["values"] for v in values.values())
        path = [query]  # the variables the query depends on, back to a constant
        while path[-1] in reads:
            path.append(reads[path[-1]])
        assert ex["steps"] == [f"{x}={values[x]}" for x in reversed(path[:-1])]
        assert len(ex["steps"]) == d["hops"]


def test_prontoqa_answers_and_steps_match_forward_chaining():
    examples = tasks.reasoning_split("prontoqa", "train", 150, 0) + tasks.reasoning_split("prontoqa", "ood", 50, 0)
    for ex in examples:
        answer, facts = prontoqa_solve(ex["question"])
        assert (ex["answer"], ex["steps"]) == (answer, facts)
        assert len(ex["steps"]) == ex["difficulty"]["hops"]
    assert 0.4 < np.mean([ex["answer"] == "True" for ex in examples]) < 0.6


def test_addition_answers_are_sums_and_steps_carry():
    for ex in tasks.reasoning_split("addition", "train", 150, 0) + tasks.reasoning_split("addition", "ood", 50, 0):
        a, b = ex["question"].split(" + ")
        assert len(a.split()) == len(b.split()) == ex["difficulty"]["digits"] == len(ex["steps"])
        assert reversed_number(ex["answer"]) == reversed_number(a) + reversed_number(b)
        carry = 0
        for x, y, step in zip(a.split(), b.split(), ex["steps"]):
            s = int(x) + int(y) + carry
            assert step == f"{x} + {y} + {carry} = {s % 10} c {s // 10}"
            carry = s // 10


def test_multiplication_and_prosqa_answers_are_right():
    for ex in tasks.reasoning_split("multiplication", "train", 100, 0):
        a, b = ex["question"].split(" * ")
        assert reversed_number(ex["answer"]) == reversed_number(a) * reversed_number(b)
        assert len(ex["steps"]) == ex["difficulty"]["digits"]
    for ex in tasks.reasoning_split("prosqa", "train", 60, 0):
        assert_prosqa_chain(ex)
        assert len(ex["steps"]) == ex["difficulty"]["hops"]


# ----------------------------------------------------------------------------- splits

@pytest.mark.parametrize("task", TASKS)
def test_test_and_ood_never_repeat_a_train_question(task):
    train = [ex["question"] for ex in tasks.reasoning_split(task, "train", 300, 0)]
    test = [ex["question"] for ex in tasks.reasoning_split(task, "test", 100, 1)]
    ood = [ex["question"] for ex in tasks.reasoning_split(task, "ood", 50, 2)]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test) and not set(train) & set(ood)
    assert not any(map(tasks.is_held_out, train)) and all(map(tasks.is_held_out, test + ood))


@pytest.mark.parametrize("task", TASKS)
def test_ood_is_harder_than_train(task):
    train, ood = (tasks.reasoning_split(task, split, 60, 0) for split in ("train", "ood"))
    knob = "digits" if task in ("addition", "multiplication") else "hops"
    assert min(ex["difficulty"][knob] for ex in ood) > max(ex["difficulty"][knob] for ex in train)
    assert np.mean([len(ex["steps"]) for ex in ood]) > np.mean([len(ex["steps"]) for ex in train])


def test_default_splits_cover_the_issue_targets_and_stay_short():
    # held-out 4-digit addition; >= 3-hop variable assignment; ProsQA 3-5 hops
    for split in ("train", "test"):
        assert 4 in {ex["difficulty"]["digits"] for ex in tasks.reasoning_split("addition", split, 100, 0)}
    assert {3, 4} <= {ex["difficulty"]["hops"] for ex in tasks.reasoning_split("varassign", "test", 100, 0)}
    assert {ex["difficulty"]["hops"] for ex in tasks.reasoning_split("prosqa", "train", 60, 0)} == {3, 4, 5}
    for task in ("addition", "multiplication", "prontoqa", "varassign"):
        sizes = [len(ex["question"]) + sum(map(len, ex["steps"])) + len(ex["answer"])
                 for ex in tasks.reasoning_split(task, "train", 200, 0)]
        assert np.mean(sizes) < 200, (task, np.mean(sizes))


def test_difficulty_knobs_can_be_pinned():
    rng = np.random.default_rng(0)
    ex = tasks.reasoning_example("varassign", rng, hops=7, distractors=(5,), values=100)
    assert ex["difficulty"] == {"hops": 7, "distractors": 5, "values": 100} and len(ex["steps"]) == 7
    assert tasks.reasoning_example("prontoqa", rng, hops=6)["difficulty"]["hops"] == 6
    a, b = tasks.reasoning_example("addition", rng, digits=8)["question"].split(" + ")
    assert len(a.split()) == len(b.split()) == 8


# ----------------------------------------------------------------------------- rationale lexicon

@pytest.mark.parametrize("task", TASKS)
def test_rationale_lexicon_never_occurs_in_questions_or_answers(task):
    lexicon = tasks.rationale_lexicon(task)
    fresh = tasks.reasoning_split(task, "train", 200, seed=7) + tasks.reasoning_split(task, "ood", 50, seed=7)
    assert not lexicon & {t for ex in fresh for t in (ex["question"] + " " + ex["answer"]).split()}
    expected = {"addition": {"=", "c"}, "multiplication": {"(", ")"}, "varassign": {"a=0", "z=9"}}
    assert expected.get(task, set()) <= lexicon
    if task in ("prosqa", "prontoqa"):  # their steps restate the question's facts
        assert lexicon == frozenset()


# ----------------------------------------------------------------------------- shared benchmarks

@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_benchmark_readers_load_the_shared_files(name):
    if not (BENCHMARKS / benchmarks.BENCHMARKS[name]).exists():
        pytest.skip(f"{benchmarks.BENCHMARKS[name]} not on this machine")
    examples = benchmarks.load_benchmark(name)
    assert len(examples) == (300 if name == "prosqa" else 1000)
    for ex in examples:
        assert list(ex) == ["task", "question", "steps", "answer", "difficulty"] and ex["steps"]
    if name == "prosqa":
        for ex in examples:
            assert_prosqa_chain(ex)
    else:
        n = int(name[-1])
        for ex in examples[:50]:
            a, b = ex["question"].split(" * ")
            assert reversed_number(ex["answer"]) == reversed_number(a) * reversed_number(b)
            assert len(ex["steps"]) == n and ex["difficulty"] == {"digits": n}
    rows = benchmarks.published_results(name)
    assert rows and all(r.benchmark == name and 0 <= r.accuracy <= 100 and r.source for r in rows)


def test_benchmark_reader_names_a_missing_or_malformed_file(tmp_path):
    with pytest.raises(DataError) as e:
        benchmarks.load_benchmark("prosqa", root=str(tmp_path))
    one_line(e, "prosqa_valid.json", "not found")
    (tmp_path / "prosqa").mkdir()
    (tmp_path / "prosqa" / "prosqa_valid.json").write_text('[{"question": "Q?", "answer": "A."}]')
    with pytest.raises(DataError) as e:
        benchmarks.load_benchmark("prosqa", root=str(tmp_path))
    one_line(e, "example 0", "steps")
    (tmp_path / "multiplication").mkdir()
    (tmp_path / "multiplication" / "4_by_4_valid.txt").write_text("1 2 3 4 * 1 2 3 4||1 + 2 #### 9 9 9 9 9 9 9 9\n")
    with pytest.raises(DataError) as e:
        benchmarks.load_benchmark("multiplication-4x4", root=str(tmp_path))
    one_line(e, "4_by_4_valid.txt", "line 1")
    with pytest.raises(ConfigError) as e:
        benchmarks.load_benchmark("gsm8k")
    one_line(e, "gsm8k", "prosqa")


# ----------------------------------------------------------------------------- CLI and bad names

def test_cli_writes_the_split_as_jsonl(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    argv = ["tasks", "--task", "varassign", "--split", "test", "-n", "40", "--seed", "5", "--output", str(out),
            "--quiet"]
    assert data_main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == tasks.reasoning_split("varassign", "test", 40, 5)
    assert str(out) in capsys.readouterr().out and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("args, needles", [
    (["--task", "varasign"], ["varasign", "varassign"]),
    (["--task", "addition", "--split", "dev"], ["dev", "train, test, ood"]),
    (["--task", "addition", "-n", "-1"], ["n=-1"]),
])
def test_bad_task_or_split_is_one_clear_line(tmp_path, capsys, args, needles):
    assert data_main(["tasks", *args, "--output", str(tmp_path / "x.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and all(n in err for n in needles), err
    assert not (tmp_path / "x.jsonl").exists()


def test_bad_difficulty_is_one_clear_line():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError) as e:
        tasks.reasoning_example("varassign", rng, hopz=3)
    one_line(e, "hopz", "hops, distractors, values")
    with pytest.raises(ConfigError) as e:
        tasks.reasoning_example("varassign", rng, hops=20, distractors=10)
    one_line(e, "varassign", "26")
    with pytest.raises(ConfigError) as e:
        tasks.reasoning_example("prontoqa", rng, hops=0)
    one_line(e, "prontoqa", "hops >= 1")
    with pytest.raises(ConfigError) as e:
        tasks.reasoning_example("addition", rng, digits=0)
    one_line(e, "digits=0")


def test_asking_for_more_distinct_questions_than_exist_is_one_clear_line(monkeypatch):
    # one-digit additions: 81 questions in all, about a fifth of them held out
    monkeypatch.setitem(tasks.DIFFICULTY, "addition", {"train": {"digits": (1,)}, "ood": {"digits": (2,)}})
    assert len(tasks.reasoning_split("addition", "train", 50, 0)) == 50
    with pytest.raises(ConfigError) as e:
        tasks.reasoning_split("addition", "train", 81, 0)
    one_line(e, "addition/train", "distinct questions", "n=81")
