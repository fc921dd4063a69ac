"""Long-context evaluation: RULER-style synthetic retrieval tasks made at chosen lengths and LongBench
QA records, answered by one model under several KV-cache modes (full, SnapKV, int8 / int4 codes).

The synthetic tasks follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"); the wording of every template here is this project's own:
  niah_single      one needle 'One of the secret numbers for <key> is <value>.' in a haystack; the
                   question asks for the key's number
  niah_multikey    the same, plus distractor needles that give numbers to other keys
  niah_multivalue  several needles give the same key different numbers; all of them are asked for
  vt               variable tracking: 'VAR QWERT = 12345.' then 'VAR ASDFG = VAR QWERT.' and so on,
                   a chain of HOPS assignments among the filler; the answer is every variable
                   holding the value, the chain's first one included

Terms:
  haystack     the filler: plain sentences of FILLER repeated in order (RULER's "noise" haystack),
               with a few short ones at the end to fill the budget closely
  key, value   a needle's key is a word of KEYS; its value a 7-digit number (RULER's sizes)
  depth        where the asked needle sits: at depth d it follows round(d * F) of the haystack's F
               sentences, so a share d of the filler comes before it (0 = the start of the context,
               1 = the end). The n instances of a (task, length) have depths spread evenly over
               [0, 1]; other needles go to uniformly random depths (vt: the chain's later
               assignments at sorted random depths after the first)
  length       the sequence budget in tokens, RULER's convention: the prompt (<bos> included) plus
               the task's answer allowance (ANSWER_TOKENS) add up to `length`, or fall short of it by
               a few tokens (the filler comes in whole sentences: fewer than twice the tokens of the
               shortest one)
  prompt       header, '\\n', context, '\\n', question ending in the answer's lead-in ('... is'),
               so a trained model's continuation is the answer itself; tokenised after <bos>
  RULER score  the share of an instance's gold strings found in the prediction (case-insensitive
               substring, RULER's string_match_all); partial credit on multi-value and vt
  QA F1        LongBench's metric for QA (Bai et al. 2023, "LongBench"): token-level F1 between the
               normalised prediction and a normalised gold answer (popqa.normalize_answer), the
               best over the gold answers
  mode         how the KV cache is kept while decoding (MODES): full, SnapKV keeping a share of the
               prompt positions (memory/kv_cache.py; window and kernel from cfg.serve), int8 or int4
               codes, or SnapKV and int8 together (the second compression tier)
  KV bytes per token  what the cache holds after prefill per prompt token, across all layers:
               kv_cache.store_bytes_per_token in the model's compute dtype, times the share of the
               prompt positions SnapKV keeps (kv_cache.snapkv_capacity(prompt length) / prompt
               length), averaged over the instances
  drop         full-KV accuracy minus a mode's, in points, on the mean over every (task, length) cell

LongBench records are read from a local jsonl file (no download), one record per line with the
published fields LONGBENCH_FIELDS. Prompt (LONGBENCH_TEMPLATE): the context, then the question,
then 'Answer:'. A context longer than the budget is cut in the middle, keeping its first and last
halves of the allowed tokens (LongBench's own truncation).

    python -m quietreasoning.eval.long_context --checkpoint runs/tiny/checkpoints --tokenizer tok.model \\
        --config tiny [model.d_model=128 ...] --tasks niah_single,vt --lengths 512,1024 --n 50 \\
        [--longbench narrativeqa.jsonl] --output runs/long_context
    python -m quietreasoning.eval.long_context --bundle exported/ --output runs/long_context

The output directory receives results.json (every cell and instance per mode), tables.md and
long_context.png (accuracy against KV bytes per token, one line per task).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io as _io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from quietreasoning import cli
from quietreasoning.config import DataError
from quietreasoning.eval.popqa import answer_text, normalize_answer
from quietreasoning.utils import io

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
ANSWER_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "vt": 48}
KEYS_PER_PROMPT = 4   # niah_multikey: the asked key and three distractors (RULER's multikey_1)
VALUES_PER_KEY = 4    # niah_multivalue
HOPS = 4              # vt: assignments after the first, so 5 variables hold the value (RULER's default)
VALUE_DIGITS = 7
VT_DIGITS = 5
NAME_LETTERS = 5      # vt variable names: 5 uppercase letters (RULER's)

FILLER = ("The river runs past the old mill.", "A cold wind comes down from the hills.",
          "The baker opens his shop at dawn.", "Children play in the green park.",
          "The clock in the square strikes noon.", "Rain falls softly on the roof.",
          "Boats rest in the quiet harbour.", "The road winds up to the farm.")
SHORT_FILLER = ("All went well.", "So it goes.", "Here we are.", "Yes.", "No.")  # to fill the budget closely

KEYS = ("apple", "anchor", "badger", "basket", "beacon", "bottle", "bridge", "candle", "canyon", "carpet",
        "castle", "cherry", "circle", "copper", "cotton", "dragon", "engine", "falcon", "feather", "forest",
        "garden", "ginger", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder",
        "lantern", "lemon", "marble", "meadow", "mirror", "monkey", "needle", "orange", "oyster", "paddle",
        "parrot", "pepper", "pillow", "planet", "pocket", "puzzle", "rabbit", "ribbon", "rocket", "saddle",
        "salmon", "silver", "spider", "spoon", "tiger", "tomato", "tunnel", "turtle", "velvet", "violin",
        "wagon", "walnut", "window", "winter")

NIAH_HEADER = "Some secret numbers are hidden in the text below. Remember them: you will be asked about them."
NEEDLE = "One of the secret numbers for {key} is {value}."
QUESTION_ONE = "What is the secret number for {key}? The secret number for {key} is"
QUESTION_ALL = "What are all the secret numbers for {key}? The secret numbers for {key} are"
VT_HEADER = "Variables are given values in the text below. Follow every chain of assignments."
VT_FIRST = "VAR {name} = {value}."
VT_COPY = "VAR {name} = VAR {source}."
VT_QUESTION = "Which variables are given the value {value}? The variables given the value {value} are"

LONGBENCH_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
LONGBENCH_TEMPLATE = "Read the text and answer the question in a few words.\n\n{context}\n\nQuestion: {input}\nAnswer:"
LONGBENCH_ANSWER_TOKENS = 32

# name -> (kv bits, SnapKV keep); group, window and kernel come from cfg.serve
MODES = {"full": (16, 1.0), "snapkv0.5": (16, 0.5), "snapkv0.3": (16, 0.3), "snapkv0.2": (16, 0.2),
         "int8": (8, 1.0), "int4": (4, 1.0), "snapkv0.3+int8": (8, 0.3)}


class LongContextError(DataError):
    """A bad LongBench file or record, or an impossible evaluation request, phrased as one line
    naming the file, line, field or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Instance:
    """One prompt to answer: its text and token ids, the gold strings, and how to score them."""
    id: str
    task: str                  # a TASKS name, or the LongBench record's dataset
    length: int                # the sequence budget it was made for (prompt + answer allowance)
    depth: float               # of the asked needle in [0, 1]; nan for LongBench
    prompt: str                # the text after <bos>
    prompt_ids: tuple[int, ...]  # <bos> + the prompt's tokens
    answers: tuple[str, ...]
    max_new_tokens: int
    metric: str                # "ruler" | "qa_f1"

    @property
    def target(self) -> str:
        """The continuation a trained model should write: see `target_text`."""
        return target_text(self.task, self.answers)


def target_text(task: str, answers: Sequence[str]) -> str:
    """The answer as a continuation of the prompt: a space (it follows the lead-in), then the gold
    strings, vt's names separated by spaces, numbers by ', ' (a LongBench record: its first answer)."""
    if task not in TASKS:
        return " " + answers[0]
    return " " + (" " if task == "vt" else ", ").join(answers)


# ----------------------------------------------------------------------------- scoring

def ruler_score(prediction: str, answers: Sequence[str]) -> float:
    """The share of the gold strings that appear in the prediction, ignoring case (RULER)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's QA F1: token overlap of the normalised prediction with each normalised gold
    answer, the best over the answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


METRICS = {"ruler": ruler_score, "qa_f1": qa_f1}


# ----------------------------------------------------------------------------- the synthetic tasks

def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _fill(tokenizer, budget: int, start: int) -> list[str]:
    """Filler sentences whose tokens (each after a space) add up to at most `budget`: FILLER in order
    from `start`, then the longest sentence that still fits (short ones at the last), while one does."""
    cost = {s: _count(tokenizer, " " + s) for s in FILLER + SHORT_FILLER}
    sentences, left, i = [], budget, start
    while cost[FILLER[i % len(FILLER)]] <= left:
        sentences.append(FILLER[i % len(FILLER)])
        left -= cost[sentences[-1]]
        i += 1
    while fits := [s for s in FILLER + SHORT_FILLER if cost[s] <= left]:
        sentences.append(max(fits, key=cost.get))
        left -= cost[sentences[-1]]
    return sentences


def _place(filler: list[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """The filler with each needle (depth, sentence) inserted after round(depth * F) sentences;
    needles at the same point keep their given order."""
    at = collections.defaultdict(list)
    for depth, sentence in needles:
        at[round(depth * len(filler))].append(sentence)
    out = []
    for i in range(len(filler) + 1):
        out += at[i]
        if i < len(filler):
            out.append(filler[i])
    return out


def _variable_names(rng: np.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, NAME_LETTERS))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def _numbers(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        v = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        if v not in values:
            values.append(v)
    return values


def _needles(task: str, depth: float, rng: np.random.Generator):
    """(header, [(depth, needle sentence)], question, gold answers) of one instance of `task`."""
    if task == "vt":
        names = _variable_names(rng, HOPS + 1)
        value = _numbers(rng, 1, VT_DIGITS)[0]
        later = np.sort(rng.uniform(depth, 1.0, HOPS))
        chain = [(depth, VT_FIRST.format(name=names[0], value=value))]
        chain += [(float(d), VT_COPY.format(name=b, source=a)) for d, a, b in zip(later, names, names[1:])]
        return VT_HEADER, chain, VT_QUESTION.format(value=value), tuple(names)
    n_keys = KEYS_PER_PROMPT if task == "niah_multikey" else 1
    n_values = VALUES_PER_KEY if task == "niah_multivalue" else 1
    keys = [KEYS[i] for i in rng.choice(len(KEYS), n_keys, replace=False)]
    values = _numbers(rng, n_keys * n_values, VALUE_DIGITS)
    asked = [(depth, NEEDLE.format(key=keys[0], value=values[0]))]
    asked += [(float(rng.uniform()), NEEDLE.format(key=keys[0], value=v)) for v in values[1:n_values]]
    others = [(float(rng.uniform()), NEEDLE.format(key=k, value=v)) for k, v in zip(keys[1:], values[n_values:])]
    # the gold values in the order they appear (a stable sort keeps ties in the order given)
    gold = tuple(v for _, v in sorted(zip((d for d, _ in asked), values[:n_values]), key=lambda x: x[0]))
    question = (QUESTION_ALL if task == "niah_multivalue" else QUESTION_ONE).format(key=keys[0])
    needles = sorted(asked + others, key=lambda x: x[0])
    return NIAH_HEADER, needles, question, gold


def tokenizer_texts(count: int, seed: int) -> list[str]:
    """Texts that hold every task's vocabulary in proportion, to train a tokenizer on: `count`
    instances per task, each with one pass of the filler sentences as its haystack and its answer."""
    rng = np.random.default_rng([seed, len(TASKS)])
    texts = []
    for task in TASKS:
        for _ in range(count):
            header, needles, question, answers = _needles(task, float(rng.uniform()), rng)
            haystack = " ".join(_place(list(FILLER + SHORT_FILLER), needles))
            texts.append(f"{header}\n{haystack}\n{question}{target_text(task, answers)}")
    return texts


def check_task(task: str) -> None:
    if task not in TASKS:
        raise LongContextError(f"--tasks: unknown task {task!r}; choose from {', '.join(TASKS)}")


def synthetic_instance(task: str, tokenizer, length: int, depth: float, rng: np.random.Generator,
                       name: str = "") -> Instance:
    """One instance of `task` whose prompt plus ANSWER_TOKENS[task] fill `length` tokens, the asked
    needle at `depth`; all randomness from `rng`."""
    check_task(task)
    header, needles, question, answers = _needles(task, depth, rng)
    start = int(rng.integers(len(FILLER)))

    def prompt(filler: list[str]) -> str:
        return f"{header}\n{' '.join(_place(filler, needles))}\n{question}"

    target = length - ANSWER_TOKENS[task] - 1  # <bos>
    bare = _count(tokenizer, prompt([]))
    if bare + min(_count(tokenizer, " " + s) for s in SHORT_FILLER) > target:
        need = bare + ANSWER_TOKENS[task] + 1
        raise LongContextError(f"--lengths {length}: too short for {task}: its template, needles and answer "
                               f"allowance take {need} tokens and leave no room for a haystack; use lengths of at "
                               f"least {2 * need} (a haystack as long as the rest)")
    budget = target - bare
    while True:  # the parts' tokens can miss the whole's by a few at the seams: shrink the budget by the excess
        filler = _fill(tokenizer, budget, start)
        text = prompt(filler)
        ids = tokenizer.encode(text)
        if len(ids) <= target or not filler:
            break
        budget -= len(ids) - target
    return Instance(name or f"{task}-{length}", task, length, float(depth), text, (tokenizer.bos_id, *ids),
                    answers, ANSWER_TOKENS[task], "ruler")


def synthetic_instances(task: str, tokenizer, length: int, n: int, seed: int) -> list[Instance]:
    """`n` instances of `task` at `length`, the asked needle's depth spread evenly over [0, 1]; a
    pure function of (task, length, n, seed) and the tokenizer."""
    if n <= 0:
        raise LongContextError(f"--n {n}: make at least one instance per task and length")
    check_task(task)
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    depths = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])
    return [synthetic_instance(task, tokenizer, length, float(d), rng, f"{task}-{length}-{i}")
            for i, d in enumerate(depths)]


# ----------------------------------------------------------------------------- LongBench

def check_longbench_record(record, where: str) -> dict:
    """`record` if it has every LongBench field with a string context and question and a list of
    string answers; else a LongContextError naming `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise LongContextError(f"{where}: a LongBench record is a JSON object, got {type(record).__name__}")
    missing = [f for f in LONGBENCH_FIELDS if f not in record]
    if missing:
        raise LongContextError(f"{where}: missing field '{missing[0]}'; a LongBench record needs "
                               f"{', '.join(LONGBENCH_FIELDS)}")
    for field in ("input", "context"):
        if not isinstance(record[field], str):
            raise LongContextError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise LongContextError(f"{where}: field 'answers' must be a non-empty list of non-empty strings, "
                               f"got {str(answers)[:80]!r}")
    return record


def load_longbench(path: str | os.PathLike) -> list[dict]:
    """The records of a LongBench jsonl file (local or gs://), each checked."""
    return io.read_jsonl(path, check_longbench_record, LongContextError, "a LongBench jsonl file",
                         "give a local jsonl file of one dataset (e.g. LongBench's data/narrativeqa.jsonl)")


def longbench_instance(record: Mapping, tokenizer, length: int) -> Instance:
    """The record as a prompt of LONGBENCH_TEMPLATE within `length` (answer allowance included):
    a longer context keeps its first and last halves of the tokens that fit."""
    budget = length - LONGBENCH_ANSWER_TOKENS - 1 - _count(tokenizer, LONGBENCH_TEMPLATE.format(context="", **{
        "input": record["input"]}))
    if budget <= 0:
        raise LongContextError(f"--lengths {length}: too short for LongBench record {record['_id']}: its question "
                               "and template alone fill it; use a longer length")
    context = tokenizer.encode(record["context"])
    if len(context) > budget:
        context = context[:budget // 2] + context[len(context) - (budget - budget // 2):]
    text = LONGBENCH_TEMPLATE.format(context=tokenizer.decode(context), input=record["input"])
    return Instance(f"{record['dataset']}-{record['_id']}-{length}", str(record["dataset"]), length, math.nan, text,
                    (tokenizer.bos_id, *tokenizer.encode(text)), tuple(record["answers"]), LONGBENCH_ANSWER_TOKENS,
                    "qa_f1")


# ----------------------------------------------------------------------------- the evaluation

def kv_settings(serve, bits: int, keep: float):
    """The KVSettings of cfg.serve (`serve`) with `bits` and SnapKV `keep` set."""
    from quietreasoning.memory.kv_cache import KVSettings

    return dataclasses.replace(KVSettings.from_config(serve), bits=bits, keep=keep)


def kv_bytes_per_token(model_cfg, kv, prompt_lengths: Sequence[int]) -> tuple[float, float]:
    """(KV bytes per prompt token after prefill, the mean share of prompt positions kept) for
    prompts of `prompt_lengths` under `kv` (see the module docstring)."""
    import jax.numpy as jnp

    from quietreasoning.memory import kv_cache

    per_token = kv_cache.store_bytes_per_token(model_cfg.n_layers, model_cfg.n_kv_heads,
                                               model_cfg.resolved_head_dim, kv, jnp.dtype(model_cfg.compute_dtype))
    share = float(np.mean([kv_cache.snapkv_capacity(n, kv) / n for n in prompt_lengths]))
    return per_token * share, share


def predict(model, tokenizer, instances: Sequence[Instance], kv, *, batch_size: int = 8,
            desc: str = "decode", progress: bool = True) -> list[str]:
    """Greedy answers of `model` (a Trunk) to `instances` under KV settings `kv`: each decoded
    continuation up to its first newline, stripped. Instances are batched by answer allowance and
    prompt length (fewer decoder shapes); the answers come back in the given order."""
    from quietreasoning.training.inference import generate  # imported here: jax only to run a model

    order = sorted(range(len(instances)), key=lambda i: (instances[i].max_new_tokens, len(instances[i].prompt_ids)))
    answers = [""] * len(instances)
    with tqdm(total=len(instances), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        i = 0
        while i < len(order):
            allowance = instances[order[i]].max_new_tokens
            batch = [j for j in order[i:i + batch_size] if instances[j].max_new_tokens == allowance]
            new = generate(model, [list(instances[j].prompt_ids) for j in batch], max_new_tokens=allowance,
                           eos_id=tokenizer.eos_id, kv=kv)
            for j, ids in zip(batch, new):
                answers[j] = answer_text(tokenizer.decode(ids))
            i += len(batch)
            bar.update(len(batch))
    return answers


def cells(instances: Sequence[Instance]) -> list[tuple[str, int]]:
    """The (task, length) cells of `instances`, in first-seen order."""
    return list(dict.fromkeys((x.task, x.length) for x in instances))


def check_modes(modes: Sequence[str]) -> None:
    """A LongContextError unless `modes` is a non-empty list of MODES names."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise LongContextError(f"--modes: unknown mode {unknown[0] if unknown else '(none)'!r}; choose from "
                               f"{', '.join(MODES)}")


def evaluate(model, tokenizer, instances: Sequence[Instance], serve, *, modes: Sequence[str] = tuple(MODES),
             batch_size: int = 8, progress: bool = True) -> dict:
    """Answers every instance under each mode of MODES named in `modes` (cfg.serve `serve` gives the
    group, window and kernel) and scores them. Returns a JSON-ready dict:
      cells      ["task@length", ...]
      modes      per mode: bits, keep, kv_bytes_per_token, kept_share, compression (full bytes over
                 this mode's), accuracy {cell: mean score}, mean (over cells), drop_points (against
                 the first mode, full KV by default)
      instances  per instance: id, task, length, depth, answers, and per mode its prediction and score
    """
    check_modes(modes)
    if not instances:
        raise LongContextError("evaluate: no instances; give at least one task and length")
    keys = cells(instances)
    names = [f"{task}@{length}" for task, length in keys]
    lengths = [len(x.prompt_ids) for x in instances]
    rows, per_instance = [], [{"id": x.id, "task": x.task, "length": x.length,
                               "depth": None if math.isnan(x.depth) else x.depth, "answers": list(x.answers),
                               "predictions": {}, "scores": {}} for x in instances]
    for mode in modes:
        bits, keep = MODES[mode]
        kv = kv_settings(serve, bits, keep)
        texts = predict(model, tokenizer, instances, kv, batch_size=batch_size, desc=mode, progress=progress)
        scores = [METRICS[x.metric](t, x.answers) for x, t in zip(instances, texts)]
        for row, t, s in zip(per_instance, texts, scores):
            row["predictions"][mode], row["scores"][mode] = t, s
        accuracy = {name: float(np.mean([s for x, s in zip(instances, scores) if (x.task, x.length) == key]))
                    for name, key in zip(names, keys)}
        per_token, share = kv_bytes_per_token(model.cfg, kv, lengths)
        rows.append({"mode": mode, "bits": bits, "keep": keep, "kv_bytes_per_token": per_token, "kept_share": share,
                     "accuracy": accuracy, "mean": float(np.mean(list(accuracy.values())))})
    for row in rows:
        row["compression"] = rows[0]["kv_bytes_per_token"] / row["kv_bytes_per_token"]
        row["drop_points"] = 100 * (rows[0]["mean"] - row["mean"])
    return {"cells": names, "modes": rows, "instances": per_instance, "compute_dtype": model.cfg.compute_dtype}


# ----------------------------------------------------------------------------- tables and plot

def markdown_table(result: dict) -> str:
    """Rows: modes; columns: KV bytes per token, compression and memory saving against the first
    mode, score per task@length cell, mean, drop in points."""
    head = ["mode", f"KV bytes/token ({result['compute_dtype']})", "compression", "memory saved",
            *result["cells"], "mean", "drop (pts)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in result["modes"]:
        cells_ = [row["mode"], f"{row['kv_bytes_per_token']:,.0f}", f"{row['compression']:.2f}x",
                  f"{1 - 1 / row['compression']:.0%}", *(f"{100 * row['accuracy'][c]:.1f}" for c in result["cells"]),
                  f"{100 * row['mean']:.1f}", f"{row['drop_points']:+.1f}"]
        lines.append("| " + " | ".join(cells_) + " |")
    n = collections.Counter(f"{x['task']}@{x['length']}" for x in result["instances"])
    counts = ", ".join(f"{c}: {n[c]}" for c in result["cells"])
    return "\n".join(lines) + f"\n\nScores in % (RULER string match; LongBench QA F1). Instances per cell: {counts}."


def plot_png(result: dict, title: str = "Long-context accuracy against KV-cache size") -> bytes:
    """A PNG of each task's score (mean over its lengths) against KV bytes per token: per task a
    solid line through the SnapKV modes and a dashed one through the quantised ones (both from the
    full cache), modes of both as squares, every mode labelled (matplotlib, no display)."""
    from matplotlib.figure import Figure  # imported here: only plotting needs it

    fig = Figure(figsize=(7, 4.4), dpi=120)
    ax = fig.subplots()
    modes = sorted(result["modes"], key=lambda r: r["kv_bytes_per_token"])
    tasks = list(dict.fromkeys(c.split("@")[0] for c in result["cells"]))
    # two families, each a line from the full cache down: SnapKV keep ratios (unquantised) and KV
    # bits (nothing dropped); a mode of both (SnapKV + int8) is a lone marker
    families = (("SnapKV", "-", lambda r: r["bits"] == 16), ("int8/int4", "--", lambda r: r["keep"] == 1.0))
    for n, task in enumerate(tasks):
        mine = [c for c in result["cells"] if c.split("@")[0] == task]
        score = {r["mode"]: 100 * np.mean([r["accuracy"][c] for c in mine]) for r in modes}
        color = f"C{n}"
        for family, style, member in families:
            rows = [r for r in modes if member(r)]
            ax.plot([r["kv_bytes_per_token"] for r in rows], [score[r["mode"]] for r in rows], style, marker="o",
                    color=color, label=f"{task} ({family})")
        lone = [r for r in modes if not any(member(r) for _, _, member in families)]
        ax.plot([r["kv_bytes_per_token"] for r in lone], [score[r["mode"]] for r in lone], "s", color=color)
    for r in modes:
        ax.annotate(r["mode"], (r["kv_bytes_per_token"], 100 * r["mean"]), fontsize=6, rotation=30,
                    textcoords="offset points", xytext=(2, 4))
    ax.set_xscale("log")
    ax.set_xlabel(f"KV bytes per prompt token after prefill ({result['compute_dtype']} model, all layers)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(result: dict, output: str | os.PathLike, header: str = "") -> dict[str, str]:
    """results.json, tables.md and long_context.png under `output`, each renamed into place when
    complete; returns {kind: path}."""
    out = io.path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": str(out / "results.json"), "table": str(out / "tables.md"),
             "plot": str(out / "long_context.png")}
    io.atomic_write_text(files["results"], json.dumps(result, indent=1))
    io.atomic_write_text(files["table"], (header + "\n\n" if header else "") + markdown_table(result) + "\n")
    io.atomic_write_bytes(files["plot"], plot_png(result))
    return files


# ----------------------------------------------------------------------------- command line

def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise LongContextError(f"{flag} {text}: give positive integers separated by commas, e.g. 512,1024")
    return values


def _load(args):
    """(model, cfg, tokenizer) from --bundle (its own tokenizer unless --tokenizer is given), or from
    --checkpoint with --config, overrides and --tokenizer."""
    from quietreasoning.utils.tokenizer import load_tokenizer

    if args.bundle:
        from quietreasoning.serve.bundle import load_bundle

        if args.overrides:
            raise LongContextError(f"--bundle {args.bundle}: a bundle carries its own config; the overrides "
                                   f"({' '.join(args.overrides)}) apply to --checkpoint only: drop them")
        bundle = load_bundle(args.bundle)
        model, cfg, tokenizer = bundle.model, bundle.cfg, bundle.tokenizer
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        elif tokenizer is None:
            raise LongContextError(f"--bundle {args.bundle}: the bundle holds no tokenizer.model; pass --tokenizer "
                                   "PATH (the SentencePiece model it was trained with)")
    else:
        if not args.checkpoint or not args.tokenizer:
            raise LongContextError("give --bundle DIR, or --checkpoint DIR with --tokenizer PATH (and the training "
                                   "run's --config and overrides)")
        from quietreasoning.eval.popqa import load_model

        cfg = cli.load(args)
        model, tokenizer = load_model(cfg, args.checkpoint), load_tokenizer(args.tokenizer)
    tokenizer.check_fits(cfg.model.vocab_size, f"--tokenizer {args.tokenizer or args.bundle}")
    return model, cfg, tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m quietreasoning.eval.long_context", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="", help="an exported serving bundle (model, config and tokenizer)")
    p.add_argument("--checkpoint", default="", help="runs/<name>/checkpoints (latest step) or one step directory")
    p.add_argument("--tokenizer", default="", help="the SentencePiece model the checkpoint was trained with")
    p.add_argument("--config", default="tiny", help="preset name or YAML path of the trained model (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="the training run's overrides")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="512,1024", help="sequence budgets in tokens (prompt + answer allowance)")
    p.add_argument("--n", type=int, default=50, help="instances per task and length (and LongBench records)")
    p.add_argument("--longbench", default="", help="a local LongBench jsonl file (e.g. narrativeqa.jsonl)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}; the first is "
                   "the baseline the drop is measured from")
    p.add_argument("--seed", type=int, default=0, help="the synthetic instances' seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--output", required=True, help="where results.json, tables.md and long_context.png go")
    return p.parse_args(argv)


@cli.one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    for task in tasks:
        check_task(task)
    lengths = _ints("--lengths", args.lengths)
    modes = [m for m in args.modes.split(",") if m]
    check_modes(modes)
    if args.batch_size <= 0 or args.n <= 0:
        raise LongContextError(f"--batch-size {args.batch_size} and --n {args.n} must be positive")
    records = load_longbench(args.longbench)[:args.n] if args.longbench else []
    model, cfg, tokenizer = _load(args)
    instances = [x for task in tasks for length in lengths
                 for x in synthetic_instances(task, tokenizer, length, args.n, args.seed)]
    instances += [longbench_instance(r, tokenizer, length) for length in lengths for r in records]
    result = evaluate(model, tokenizer, instances, cfg.serve, modes=modes, batch_size=args.batch_size)
    files = write_outputs(result, args.output, f"Long-context evaluation ({len(instances)} prompts)")
    print(markdown_table(result))
    print("wrote " + ", ".join(files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
