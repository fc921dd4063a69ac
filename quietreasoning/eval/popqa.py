"""PopQA evaluation: accuracy against entity popularity, for one system or several side by side.

PopQA (Mallen et al. 2023, "When Not to Trust Language Models";
https://huggingface.co/datasets/akariasai/PopQA) asks one templated question per (subject,
relation, object) fact and records the subject's popularity `s_pop` (monthly Wikipedia page
views). Its finding: closed-book accuracy drops for less popular subjects, and retrieval helps
most in that long tail. This module measures the same thing, on the real set or on the synthetic long-tail
world of data/tasks.py (made-up entities, so a model knows only what it was trained on).

Terms:
  record        one PopQA jsonl line with the published FIELDS; `possible_answers` is a list of
                gold strings, JSON-encoded as in the real set (a plain list is accepted too)
  normalised    SQuAD-style: lowercase, punctuation removed (every Unicode punctuation character),
                the articles a/an/the removed, whitespace collapsed to single spaces
  accuracy      the reported metric, PopQA's: correct when some normalised gold answer appears in
                the normalised prediction as a run of whole words. PopQA's own script tests raw
                substrings (answer, lowercased or capitalised, inside the prediction); ours
                normalises both sides and requires word boundaries, so "red" is not found in "bored"
  exact match   the normalised prediction equals some normalised gold answer (reported beside it)
  bucket        a popularity band of s_pop cut at `edges` (default DECADES: <10, 10-100, ...,
                >=100k, i.e. bands of log10 s_pop); tables and plots show the non-empty ones
  system        a name and a predict function: list of questions -> list of answer strings, one
                per question. `compare({name: predict_fn, ...})` scores several on the same
                records; a memory-augmented system is one more dict entry

Closed-book evaluation of a trained model prompts exactly as the training documents begin
(tasks.fact_document): <bos>, the tokens of 'Q: <question>\\n', then the tokens of 'A:'. The space
after 'A:' is left for the model to produce: SentencePiece attaches a space to the word after it,
so the training tokens of 'A: <answer>' start with those of 'A:', not of 'A: '. The answer is
the decoded continuation up to <eos> or the first newline, stripped.

The memory systems prompt the same way: `with_memory` gives the model's episodic read the top-k
facts a FactMemory (memory/retrieval.py) retrieves for the question; `with_knn` mixes a kNN-LM
datastore (memory/knn_lm.py) into every answer token, with or without that read.
bench/popqa_memory.py trains and compares all three on the synthetic world.

    python -m quietreasoning.eval.popqa generate --output facts.jsonl --seed 0
    python -m quietreasoning.eval.popqa evaluate --records facts.jsonl --tokenizer data/tiny/tokenizer.model \\
        --checkpoint runs/tiny/checkpoints [--config tiny model.vocab_size=2048 ...] [--limit 500]

`generate --seed S` rebuilds the world a data build with seed S drew its fact documents from
(sources.py's facts bucket calls tasks.popqa_records(S) with the default --people).
"""

from __future__ import annotations

import collections
import dataclasses
import io as _io
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from quietreasoning import cli
from quietreasoning.config import Config, DataError
from quietreasoning.data import tasks
from quietreasoning.utils import io

# PopQA's published record fields (the dataset card)
FIELDS = ("id", "subj", "prop", "obj", "subj_id", "prop_id", "obj_id", "s_wiki_title", "o_wiki_title", "s_uri",
          "o_uri", "s_aliases", "o_aliases", "s_pop", "o_pop", "question", "possible_answers")
DECADES = (10, 100, 1_000, 10_000, 100_000)  # default bucket edges on s_pop

PredictFn = Callable[[list[str]], list[str]]


class PopQAError(DataError):
    """A bad PopQA file, record or evaluation request, phrased as one line naming the file, line or
    field and the fix."""


# ----------------------------------------------------------------------------- scoring

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, Unicode punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The normalised prediction equals some normalised gold answer."""
    pred = normalize_answer(prediction)
    return any(pred == a for a in map(normalize_answer, answers) if a)


def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    """Some normalised gold answer appears in the normalised prediction as whole words (PopQA's
    accuracy, normalised)."""
    pred = f" {normalize_answer(prediction)} "
    return any(f" {a} " in pred for a in map(normalize_answer, answers) if a)


def possible_answers(record: Mapping) -> list[str]:
    """The gold answers of a record: its `possible_answers`, a JSON-encoded list or a list."""
    value = record["possible_answers"]
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError("possible_answers must be a list of strings")
    return value


# ----------------------------------------------------------------------------- records

def check_record(record, where: str) -> dict:
    """`record` if it has every PopQA field, readable gold answers and a numeric s_pop; else a
    PopQAError naming `where` (file:line or records[i]) and the field."""
    if not isinstance(record, dict):
        raise PopQAError(f"{where}: a PopQA record is a JSON object, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise PopQAError(f"{where}: missing field '{missing[0]}'; a PopQA record needs {', '.join(FIELDS)}")
    try:
        possible_answers(record)
    except ValueError:
        raise PopQAError(f"{where}: field 'possible_answers' must be a list of strings or its JSON encoding, "
                         f"got {str(record['possible_answers'])[:80]!r}") from None
    s_pop = record["s_pop"]
    if isinstance(s_pop, bool) or not isinstance(s_pop, (int, float)) or not s_pop >= 0:
        raise PopQAError(f"{where}: field 's_pop' must be a page-view count >= 0, got {s_pop!r}")
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise PopQAError(f"{where}: field 'question' must be a non-empty string")
    return record


def load_records(path: str | os.PathLike) -> list[dict]:
    """The records of a PopQA jsonl file (local or gs://), each checked."""
    return io.read_jsonl(path, check_record, PopQAError, "a PopQA jsonl file",
                         "give a jsonl file, e.g. one written by `python -m quietreasoning.eval.popqa generate "
                         "--output facts.jsonl`")


def bucket_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """Labels of the len(edges) + 1 popularity buckets: '<10', '10-100', ..., '>=100k'."""
    def short(x: float) -> str:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if x >= div:
                return f"{x / div:g}{suffix}"
        return f"{x:g}"
    inner = [f"{short(a)}-{short(b)}" for a, b in zip(edges, edges[1:])]
    return (f"<{short(edges[0])}", *inner, f">={short(edges[-1])}")


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class Scores:
    """One system's results on an evaluator's records (arrays are per record, in order)."""
    system: str
    predictions: list[str]
    correct: np.ndarray  # bool: accuracy (a gold answer found in the prediction)
    exact: np.ndarray    # bool: exact match
    bucket: np.ndarray   # int: popularity bucket index
    labels: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def exact_match(self) -> float:
        return float(self.exact.mean())

    def by_bucket(self) -> list[tuple[str, int, float]]:
        """(label, records, accuracy) of each non-empty popularity bucket, least popular first."""
        out = []
        for b, label in enumerate(self.labels):
            hit = self.bucket == b
            if hit.any():
                out.append((label, int(hit.sum()), float(self.correct[hit].mean())))
        return out


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `compare` made: each system's scores, the markdown table, and the files it wrote."""
    scores: dict[str, Scores]
    table: str
    files: dict[str, str]  # kind (table, plot, predictions) -> path; empty without an output_dir


def markdown_table(scores: Sequence[Scores]) -> str:
    """Rows: systems; columns: accuracy and exact match overall, then accuracy per popularity
    bucket; each header carries its record count."""
    first = scores[0]
    buckets = first.by_bucket()
    head = ["system", f"accuracy (n={len(first.correct)})", "exact match"]
    head += [f"s_pop {label} (n={n})" for label, n, _ in buckets]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in scores:
        cells = [s.system, f"{s.accuracy:.1%}", f"{s.exact_match:.1%}"] + [f"{acc:.1%}" for _, _, acc in s.by_bucket()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_png(scores: Sequence[Scores], title: str = "PopQA accuracy by subject popularity") -> bytes:
    """A PNG of accuracy per popularity bucket, one line per system (matplotlib, no display)."""
    from matplotlib.figure import Figure  # imported here: only plotting needs it

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for s in scores:
        rows = s.by_bucket()
        ax.plot(range(len(rows)), [100 * acc for _, _, acc in rows], marker="o", label=s.system)
    rows = scores[0].by_bucket()
    ax.set_xticks(range(len(rows)), [f"{label}\nn={n}" for label, n, _ in rows])
    ax.set_xlabel("subject popularity s_pop (monthly page views)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the evaluator

class PopQAEvaluator:
    """Scores systems on a fixed set of PopQA records: a jsonl path or a list of records.

    `limit` keeps a seeded random sample of that many records (in file order), so a quick run
    still spans every popularity bucket."""

    def __init__(self, records: str | os.PathLike | Sequence[dict], *, edges: Sequence[float] = DECADES,
                 limit: int | None = None, seed: int = 0):
        if isinstance(records, (str, os.PathLike)):
            self.source = str(records)
            records = load_records(records)
        else:
            self.source = "records"
            records = [check_record(r, f"records[{i}]") for i, r in enumerate(records)]
            if not records:
                raise PopQAError("records: no records to evaluate; pass a non-empty list or a jsonl path")
        edges = tuple(float(e) for e in edges)
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise PopQAError(f"edges={edges}: bucket edges must be a non-empty increasing list of s_pop values")
        if limit is not None:
            if limit <= 0:
                raise PopQAError(f"limit={limit}: keep at least one record (or no limit)")
            if limit < len(records):
                keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
                records = [records[i] for i in keep]
        self.records = records
        self.edges = edges
        self.labels = bucket_labels(edges)
        self.answers = [possible_answers(r) for r in records]
        self.bucket = np.searchsorted(np.array(edges), np.array([r["s_pop"] for r in records], float), side="right")

    @property
    def questions(self) -> list[str]:
        return [r["question"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def score(self, system: str, predictions: Sequence[str]) -> Scores:
        """Scores one answer string per record, in record order."""
        if len(predictions) != len(self.records):
            raise PopQAError(f"system '{system}': {len(predictions)} predictions for {len(self.records)} records; "
                             "a predict function returns one answer per question")
        predictions = [str(p) for p in predictions]
        correct = np.array([contains_match(p, a) for p, a in zip(predictions, self.answers)], bool)
        exact = np.array([exact_match(p, a) for p, a in zip(predictions, self.answers)], bool)
        return Scores(system, predictions, correct, exact, self.bucket, self.labels)

    def evaluate(self, system: str, predict: PredictFn, *, batch_size: int = 64, progress: bool = True) -> Scores:
        """Asks `predict` for answers, `batch_size` questions at a time, and scores them."""
        questions, predictions = self.questions, []
        with tqdm(total=len(questions), desc=f"popqa {system}", unit="q", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(questions), batch_size):
                batch = questions[start:start + batch_size]
                answers = list(predict(batch))
                if len(answers) != len(batch):
                    raise PopQAError(f"system '{system}': {len(answers)} answers for {len(batch)} questions; "
                                     "a predict function returns one answer per question")
                predictions += answers
                bar.update(len(batch))
        return self.score(system, predictions)

    def compare(self, systems: Mapping[str, PredictFn], *, output_dir: str | os.PathLike | None = None,
                batch_size: int = 64, progress: bool = True) -> Comparison:
        """Evaluates every system on the same records. With `output_dir`, writes popqa.md (the
        table), popqa.png (accuracy against popularity) and popqa_predictions.jsonl (each record's
        answers and scores per system), each renamed into place when complete."""
        if not systems:
            raise PopQAError("compare: no systems; pass {name: predict_fn}")
        scores = {name: self.evaluate(name, fn, batch_size=batch_size, progress=progress)
                  for name, fn in systems.items()}
        table = markdown_table(list(scores.values()))
        files: dict[str, str] = {}
        if output_dir is not None:
            out = io.path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            files = {"table": str(out / "popqa.md"), "plot": str(out / "popqa.png"),
                     "predictions": str(out / "popqa_predictions.jsonl")}
            io.atomic_write_text(files["table"], f"PopQA on {self.source} ({len(self)} records)\n\n{table}\n")
            io.atomic_write_bytes(files["plot"], plot_png(list(scores.values())))
            io.atomic_write_text(files["predictions"], "".join(
                json.dumps({"id": r["id"], "question": r["question"], "possible_answers": a, "s_pop": r["s_pop"],
                            "bucket": self.labels[b],
                            **{name: {"prediction": s.predictions[i], "correct": bool(s.correct[i]),
                                      "exact": bool(s.exact[i])} for name, s in scores.items()}}) + "\n"
                for i, (r, a, b) in enumerate(zip(self.records, self.answers, self.bucket))))
        return Comparison(scores, table, files)


# ----------------------------------------------------------------------------- a trained model, closed book

def prompt_ids(tokenizer, question: str) -> list[int]:
    """<bos> 'Q: <question>\\n' 'A:', tokenised as the training documents are (part by part)."""
    marker = tasks.FACT_ANSWER.format("").rstrip()
    return [tokenizer.bos_id, *tokenizer.encode(tasks.FACT_QUESTION.format(question)), *tokenizer.encode(marker)]


def answer_text(text: str) -> str:
    """A decoded continuation as an answer: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def closed_book(model, tokenizer, *, max_new_tokens: int = 16) -> PredictFn:
    """The predict function of `model` (a Trunk) answering from its weights alone, greedily."""
    from quietreasoning.training.inference import generate  # imported here: jax is needed only to run a model

    def predict(questions: list[str]) -> list[str]:
        new = generate(model, [prompt_ids(tokenizer, q) for q in questions], max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id)
        return [answer_text(tokenizer.decode(ids)) for ids in new]
    return predict


# ----------------------------------------------------------------------------- with memory: episodic read, kNN-LM

def with_memory(model, tokenizer, memory, *, max_new_tokens: int = 16) -> PredictFn:
    """The predict function of `model` (a Trunk with model.episodic on) reading retrieved facts:
    each question retrieves its top-k facts from `memory` (a memory/retrieval.py FactMemory), whose
    stored states become the memory tokens of its episodic read, and it answers greedily as
    `closed_book` does."""
    from quietreasoning.memory.retrieval import memory_arrays
    from quietreasoning.training.inference import generate

    def predict(questions: list[str]) -> list[str]:
        inputs = memory_arrays(memory.retrieve(questions))
        new = generate(model, [prompt_ids(tokenizer, q) for q in questions], max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, memory=inputs["memory"], memory_mask=inputs["memory_mask"])
        return [answer_text(tokenizer.decode(ids)) for ids in new]
    return predict


def with_knn(model, tokenizer, datastore, *, memory=None, lam: float = 0.25, k: int = 32, temperature: float = 1.0,
             max_new_tokens: int = 16) -> PredictFn:
    """The predict function of `model` with the kNN-LM (memory/knn_lm.py) mixed into every answer
    token: p = lam p_knn + (1 - lam) p_lm, p_knn from the `k` nearest entries of `datastore` to the
    final-norm hidden state at the row's last token, `temperature` on their squared distances;
    greedy. With `memory` (a FactMemory) the model also reads retrieved facts, as in `with_memory`.

    The datastore is searched on the host (FAISS) between decode steps, so each step is one jitted
    forward over the (rows, bucket length) buffer, recomputed in full (training/inference.py's
    recompute decoder; the KV-cached one keeps its loop on the device)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from quietreasoning.memory.knn_lm import interpolate, knn_log_probs
    from quietreasoning.memory.retrieval import memory_arrays
    from quietreasoning.training.inference import bucket_shape

    if not 0 <= lam <= 1:
        raise PopQAError(f"with_knn: lam={lam} must lie in [0, 1]")
    if datastore.dim != model.cfg.d_model:
        raise PopQAError(f"with_knn: the datastore's keys have width {datastore.dim} but model.d_model="
                         f"{model.cfg.d_model}; build it with this model")
    vocab = model.cfg.vocab_size
    graphdef, params = nnx.split(model)

    @jax.jit
    def last_position(params, tokens, lengths, memory, memory_mask):
        """(hidden state (B, D), LM log-probabilities (B, V)) at each row's last real token."""
        m = nnx.merge(graphdef, params)
        index = jnp.arange(tokens.shape[1])
        segment_ids = (index[None, :] < lengths[:, None]).astype(jnp.int32)
        positions = jnp.broadcast_to(index, tokens.shape)
        hidden = m.forward(tokens, segment_ids, positions, memory=memory, memory_mask=memory_mask)[0]
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return last, jax.nn.log_softmax(m.logits(last), axis=-1)

    @jax.jit
    def mixed_argmax(lm_log_probs, distances, tokens):
        return jnp.argmax(interpolate(lm_log_probs, knn_log_probs(distances, tokens, vocab, temperature), lam), -1)

    def predict(questions: list[str]) -> list[str]:
        prompts = [prompt_ids(tokenizer, q) for q in questions]
        inputs = {"memory": None, "memory_mask": None}
        if memory is not None:
            inputs = memory_arrays(memory.retrieve(questions))
        _, length = bucket_shape(1, max(len(p) for p in prompts), max_new_tokens)
        tokens = np.zeros((len(prompts), length), np.int32)
        lengths = np.array([len(p) for p in prompts], np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        new: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        for _ in range(max_new_tokens):
            hidden, lm_log_probs = last_position(params, tokens, lengths, inputs["memory"], inputs["memory_mask"])
            distances, neighbours = datastore.search(np.asarray(hidden), k)
            picked = np.asarray(mixed_argmax(lm_log_probs, distances, neighbours))
            for r in np.flatnonzero(~done):
                if picked[r] == tokenizer.eos_id:
                    done[r] = True
                else:
                    new[r].append(int(picked[r]))
                    tokens[r, lengths[r]] = picked[r]
                    lengths[r] += 1
            if done.all():
                break
        return [answer_text(tokenizer.decode(ids)) for ids in new]
    return predict


def checkpoint_step_dir(checkpoint: str | os.PathLike):
    """A step directory (holding 'state') as given, or the latest step of a checkpoint directory."""
    p = io.path(checkpoint)
    if (p / "state").exists():
        return p
    steps = []
    if p.is_dir():
        steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").exists())
    if not steps:
        raise PopQAError(f"--checkpoint {checkpoint}: no checkpoint there; give a run's checkpoint directory "
                         "(runs/<name>/checkpoints) or one of its steps (runs/<name>/checkpoints/300)")
    return p / str(steps[-1])


def load_model(cfg: Config, checkpoint: str | os.PathLike):
    """The Trunk of `cfg.model` holding the parameters saved at `checkpoint` (see
    checkpoint_step_dir), laid out on the config's mesh. The checkpoint's recorded model config
    must equal `cfg.model`."""
    import jax
    from flax import nnx

    from quietreasoning.training import sharding
    from quietreasoning.training.checkpoint import Checkpointer, load_parameters
    from quietreasoning.training.train_step import abstract_train_state

    step_dir = checkpoint_step_dir(checkpoint)
    if (step_dir / "meta").exists():
        ckpt = Checkpointer(str(step_dir.parent), async_save=False)
        saved = ckpt.read_meta(int(step_dir.name))["config"]["model"]
        ckpt.close()
        here = json.loads(json.dumps(cfg.to_dict()["model"]))  # as the checkpoint's JSON stored it
        changed = [f"model.{k}={saved.get(k)} there, {v} here" for k, v in here.items() if saved.get(k) != v]
        if changed:
            raise PopQAError(f"{step_dir}: the checkpoint holds another model ({'; '.join(changed)}); pass the "
                             "training run's --config and model.* overrides")
    mesh = sharding.make_mesh(cfg)
    graphdef, _, _, abstract = abstract_train_state(cfg)
    params = abstract["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, sharding.shardings(mesh, params))
    with jax.set_mesh(mesh):
        loaded = load_parameters(str(step_dir), target)
    return nnx.merge(graphdef, loaded)


# ----------------------------------------------------------------------------- command line

def _generate(args) -> int:
    if args.people <= 0:
        raise PopQAError(f"--people {args.people}: the world needs at least one person")
    records = tasks.popqa_records(args.seed, n_people=args.people)
    io.path(args.output).parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(args.output, "".join(json.dumps(r) + "\n" for r in records))
    evaluator = PopQAEvaluator(records)
    counts = collections.Counter(evaluator.labels[b] for b in evaluator.bucket)
    spread = ", ".join(f"{label}: {counts[label]}" for label in evaluator.labels if counts[label])
    print(f"wrote {len(records)} PopQA records (seed {args.seed}, {args.people} people) to {args.output}; "
          f"records per s_pop bucket: {spread}")
    return 0


def _evaluate(args) -> int:
    from quietreasoning.utils.tokenizer import load_tokenizer

    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise PopQAError("--max-new-tokens and --batch-size must be positive")
    cfg = cli.load(args)
    evaluator = PopQAEvaluator(args.records, limit=args.limit)
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.check_fits(cfg.model.vocab_size, f"--tokenizer {args.tokenizer}")
    model = load_model(cfg, args.checkpoint)
    result = evaluator.compare({"closed-book": closed_book(model, tokenizer, max_new_tokens=args.max_new_tokens)},
                               output_dir=args.output_dir, batch_size=args.batch_size)
    print(result.table)
    print("wrote " + ", ".join(result.files.values()))
    return 0


@cli.one_line_errors
def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m quietreasoning.eval.popqa", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the synthetic long-tail entity-facts set in PopQA format")
    g.add_argument("--output", required=True, help="jsonl file to write")
    g.add_argument("--seed", type=int, default=0, help="the world's seed (a data build's seed reproduces its facts)")
    g.add_argument("--people", type=int, default=1200, help="people in the world (other entities scale with it)")
    e = sub.add_parser("evaluate", help="closed-book accuracy of a trained model, by popularity bucket")
    e.add_argument("--records", required=True, help="PopQA jsonl (real or generated)")
    e.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints (latest step) or one step directory")
    e.add_argument("--tokenizer", required=True, help="the SentencePiece model the training data was built with")
    e.add_argument("--config", default="tiny", help="preset name or YAML path of the trained model (default: tiny)")
    e.add_argument("overrides", nargs="*", metavar="section.key=value", help="the training run's overrides")
    e.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of this many records")
    e.add_argument("--output-dir", default="popqa_eval", help="where popqa.md, popqa.png and predictions go")
    e.add_argument("--batch-size", type=int, default=32, help="questions decoded together")
    e.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens")
    args = p.parse_args(argv)
    return _generate(args) if args.command == "generate" else _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
