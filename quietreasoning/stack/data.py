"""What the stack reads: text-to-text examples, their tokens, and the training batch order.

An `Example` is one (input, target) pair:
  task     its label: summary | qa | addition (embedded) or samsum | cnndm (local files); the
           encoder reads "<task>: <input>", so one model serves every task
  answers  accepted answers for exact match; empty where the target is scored by ROUGE
  group    what a prior-only baseline may condition on (qa: the relation asked; addition: digits)

Embedded tasks (no download; a pure function of the seed), built on quietreasoning/data/tasks.py:
  summary   a profile of one made-up entity of `tasks.popqa_records`: each of its facts in one of
            two phrasings plus one or two filler sentences, shuffled; the target lists the facts in a
            fixed short form, "<subject>: <fact>; <fact>."
  qa        the same profile and one of its PopQA questions; the target is the record's object,
            matched against possible_answers (open book: the answer is in the input)
  addition  `tasks.addition_document`'s question without its chain of thought, digits least
            significant first: "3 4 + 5 6" -> "8 0 1"
Subjects (and additions) are split into training and held-out sets by the seed, so evaluation
reads entities the model has never seen.

Local data (`data=samsum:DIR` or `cnndm:DIR`): DIR/train.jsonl and DIR/validation.jsonl in the
datasets' usual fields, SAMSum {id, dialogue, summary} and CNN/DailyMail {article, highlights, id}.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from quietreasoning.config import Config, DataError
from quietreasoning.data import tasks
from quietreasoning.stack.config import StackConfig, run_dir
from quietreasoning.utils import io
from quietreasoning.utils.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# prop -> (two document phrasings, the summary's short form); {s} is the subject, {o} the object
PHRASES = {
    "occupation": (("{s} works as a {o}.", "By profession {s} is a {o}."), "{o}"),
    "place of birth": (("{s} was born in {o}.", "{s} comes from the city of {o}."), "born in {o}"),
    "genre": (("{s} belongs to the genre of {o}.", "Critics file {s} under {o}."), "{o}"),
    "father": (("The father of {s} is {o}.", "{o} is the father of {s}."), "father {o}"),
    "mother": (("The mother of {s} is {o}.", "{o} is the mother of {s}."), "mother {o}"),
    "country": (("{s} lies in {o}.", "{s} is a city of {o}."), "in {o}"),
    "capital of": (("{s} is the capital of {o}.", "The government of {o} sits in {s}."), "capital of {o}"),
    "capital": (("The capital of {s} is {o}.", "{s} is governed from {o}."), "capital {o}"),
    "producer": (("{s} was produced by {o}.", "{o} produced {s}."), "produced by {o}"),
    "director": (("{s} was directed by {o}.", "{o} directed {s}."), "directed by {o}"),
    "screenwriter": (("{s} was written for the screen by {o}.", "{o} wrote the script of {s}."), "script by {o}"),
    "composer": (("The music of {s} was composed by {o}.", "{o} composed {s}."), "music by {o}"),
    "author": (("{s} was written by {o}.", "{o} is the author of {s}."), "by {o}"),
    "color": (("{s} is {o} in colour.", "The colour of {s} is {o}."), "{o}"),
    "sport": (("{s} plays {o}.", "{s} competes in {o}."), "plays {o}"),
}
FILLERS = ("About {pop} readers open the page on {s} each month.", "Little else is recorded about {s}.",
           "{s} is named in a few old registers.", "Some sources spell the name of {s} differently.")
ADDITION_DIGITS = (2, 3)
METRIC = {"summary": "rouge", "qa": "em", "addition": "em", "samsum": "rouge", "cnndm": "rouge"}
LOCAL_FIELDS = {"samsum": ("dialogue", "summary"), "cnndm": ("article", "highlights")}
TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    input: str
    target: str
    answers: tuple[str, ...] = ()
    group: str = ""

    @property
    def encoder_text(self) -> str:
        return f"{self.task}: {self.input}"


# ----------------------------------------------------------------------------- embedded tasks

def profile(records: Sequence[dict], rng: np.random.Generator) -> str:
    """One subject's facts (each in a drawn phrasing) and filler sentences, in a drawn order."""
    subject = records[0]["subj"]
    sentences = [PHRASES[r["prop"]][0][int(rng.integers(2))].format(s=subject, o=r["obj"]) for r in records]
    for i in rng.choice(len(FILLERS), int(rng.integers(1, 3)), replace=False):
        sentences.append(FILLERS[int(i)].format(s=subject, pop=records[0]["s_pop"]))
    return " ".join(sentences[int(i)] for i in rng.permutation(len(sentences)))


def summary_of(records: Sequence[dict]) -> str:
    return f"{records[0]['subj']}: " + "; ".join(PHRASES[r["prop"]][1].format(o=r["obj"]) for r in records) + "."


def world_examples(seed: int, people: int, eval_fraction: float, want: Sequence[str]) -> tuple[list, list]:
    """(train, held-out) summary and qa examples over the world `tasks.popqa_records(seed, people)`,
    split by subject."""
    by_subject: dict[int, list[dict]] = collections.defaultdict(list)
    for r in tasks.popqa_records(seed, people):
        by_subject[r["subj_id"]].append(r)
    rng = np.random.default_rng([seed, 0x5354])
    subjects = [by_subject[k] for k in sorted(by_subject)]
    held = set(rng.permutation(len(subjects))[: max(1, int(len(subjects) * eval_fraction))].tolist())
    train, held_out = [], []
    for i in rng.permutation(len(subjects)):
        records = subjects[int(i)]
        doc = profile(records, rng)
        out = held_out if int(i) in held else train
        if "summary" in want:
            out.append(Example("summary", doc, summary_of(records)))
        if "qa" in want:
            for r in records:
                out.append(Example("qa", f"{doc} Question: {r['question']}", r["obj"],
                                   tuple(json.loads(r["possible_answers"])), r["prop"]))
    return train, held_out


def addition_examples(seed: int, count: int, eval_fraction: float) -> tuple[list, list]:
    """(train, held-out) additions of 2-3 digit numbers; no problem appears in both."""
    rng = np.random.default_rng([seed, 0x414444])
    seen: dict[str, Example] = {}
    for _ in range(20 * count):
        if len(seen) == count:
            break
        n = ADDITION_DIGITS[int(rng.integers(len(ADDITION_DIGITS)))]
        parts = dict(tasks.addition_document(rng, n).parts)
        question = parts["question"].removesuffix("||")
        seen.setdefault(question, Example("addition", question, parts["answer"].removeprefix(" #### "),
                                          (parts["answer"].removeprefix(" #### "),), f"{n} digits"))
    problems = list(seen.values())
    n_held = max(1, int(len(problems) * eval_fraction))
    return problems[n_held:], problems[:n_held]


# ----------------------------------------------------------------------------- local files

def local_examples(kind: str, folder: str, split: str, limit: int) -> list[Example]:
    """Up to `limit` examples of DIR/<split>.jsonl (SAMSum or CNN/DailyMail fields)."""
    source, target = LOCAL_FIELDS[kind]
    path = io.path(folder) / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found; data={kind}:DIR needs DIR/train.jsonl and DIR/validation.jsonl with "
                        f"'{source}' and '{target}' fields")
    out = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(Example(kind, str(row[source]).strip(), str(row[target]).strip()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{line_no}: not a {kind} record ({type(e).__name__}: {e}); each line must be "
                                f"a JSON object with '{source}' and '{target}'") from None
    if not out:
        raise DataError(f"{path}: no records; fill it with {kind} jsonl lines")
    return out


def examples(s: StackConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """(training examples in a seeded order, held-out examples: at most `eval_examples` per task)."""
    if s.data_kind == "embedded":
        train, held = [], []
        if set(s.tasks) - {"addition"}:
            train, held = world_examples(seed, s.world, s.eval_fraction, s.tasks)
        if "addition" in s.tasks:
            add_train, add_held = addition_examples(seed, s.additions, s.eval_fraction)
            train, held = train + add_train, held + add_held
        train = [train[int(i)] for i in np.random.default_rng([seed, 0x4F52]).permutation(len(train))]
    else:
        train = local_examples(s.data_kind, s.data_path, "train", s.max_examples)
        held = local_examples(s.data_kind, s.data_path, "validation", s.eval_examples)
    per_task: dict[str, list[Example]] = collections.defaultdict(list)
    for ex in held:
        if len(per_task[ex.task]) < s.eval_examples:
            per_task[ex.task].append(ex)
    return train, [ex for t in per_task.values() for ex in t]


# ----------------------------------------------------------------------------- tokens

def tokenizer_for(s: StackConfig, cfg: Config, train: Sequence[Example], *, create: bool = True) -> Tokenizer:
    """`s.tokenizer` if given; else the run's cached one, else (when `create`) one trained on the
    training text (model.vocab_size tokens) and cached in the run folder."""
    if s.tokenizer:
        tok = load_tokenizer(s.tokenizer)
    else:
        path = run_dir(cfg) / TOKENIZER_FILE
        if path.exists():
            tok = load_tokenizer(str(path))
        elif not create:
            raise DataError(f"{path}: the run's tokenizer is missing, so its checkpoints cannot be read; "
                            "retrain the run (a new run.name) or pass tokenizer=PATH of the one it used")
        else:
            tok = train_tokenizer((f"{ex.encoder_text}\n{ex.target}" for ex in train), cfg.model.vocab_size,
                                  cfg.data.tokenizer_type, seed=cfg.train.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            tok.save(path)
    tok.check_fits(cfg.model.vocab_size, "stack")
    return tok


def encode(tok: Tokenizer, items: Sequence[Example], s: StackConfig) -> dict[str, np.ndarray]:
    """Padded (N, T) int32 arrays (pad id 0):
      enc_tokens    "<task>: <input>", cut to max_input_len; enc_segments 1 on tokens, 0 on padding
      dec_inputs    <bos> y_1 .. y_n    dec_targets  y_1 .. y_n <eos>   (cut to max_target_len)
      dec_mask      1 where a target token is scored (and the decoder input is real), else 0"""
    n, te, td = len(items), s.max_input_len, s.max_target_len
    out = {k: np.zeros((n, te if k.startswith("enc") else td), np.int32)
           for k in ("enc_tokens", "enc_segments", "dec_inputs", "dec_targets", "dec_mask")}
    sources = tok.encode_batch([ex.encoder_text for ex in items])
    targets = tok.encode_batch([ex.target for ex in items])
    for i, (x, y) in enumerate(zip(sources, targets)):
        x = x[:te]
        out["enc_tokens"][i, :len(x)] = x
        out["enc_segments"][i, :len(x)] = 1
        inputs, labels = ([tok.bos_id] + y)[:td], (y + [tok.eos_id])[:td]
        out["dec_inputs"][i, :len(inputs)] = inputs
        out["dec_targets"][i, :len(labels)] = labels
        out["dec_mask"][i, :len(labels)] = 1
    return out


def batch_rows(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Row indices of training batch `step`: the examples in a seeded order, reshuffled each epoch.
    A pure function of (seed, step), so a resumed run reads the batches an uninterrupted one would."""
    rows: list[int] = []
    position = step * batch
    while len(rows) < batch:
        epoch, offset = divmod(position + len(rows), n)
        order = np.random.default_rng([seed, 0x4250, epoch]).permutation(n)
        rows.extend(order[offset: offset + batch - len(rows)].tolist())
    return np.asarray(rows)
