"""Evaluating the stack: task scores against trivial baselines, and how its idea space behaves.

Task scores, on held-out examples, greedy decoding:
  rouge  ROUGE-1/2/L F1 x 100 (the rouge-score package, Porter stemming) of the decoded text
         against the target; baselines lead-1 and lead-3, the input's first sentences
  em     exact match x 100 against any accepted answer, after lowercasing and dropping punctuation
         and repeated spaces; the baseline is the prior, the most common training target among
         examples of the same group (the relation asked, the digit count), chosen without reading
Idea space (z_in, the compressed pooled encoder state):
  neighbours     each held-out input with a share of its words dropped is encoded and looked up
                 among the idea vectors of all held-out inputs (FAISS exact inner product on unit
                 vectors, i.e. cosine): recall@1 and @5 of its own source (chance: 1/N, 5/N), and
                 the share of the 5 nearest other inputs that have its task
  interpolation  the decoding of (1 - a) z_A + a z_B for a = 0, 1/4, ..., 1
  pca            the idea vectors on their two principal axes, coloured by task (a PNG)
"""

from __future__ import annotations

import collections
import functools
import os
import re
import string
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from quietreasoning.stack.data import METRIC, Example, encode
from quietreasoning.stack.train import StackRun

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


def lead(text: str, n: int) -> str:
    """The first `n` sentences (or lines: a dialogue's turns) of `text`."""
    return " ".join([p for p in _SENTENCE_END.split(text.strip()) if p][:n])


def normalize_answer(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def _padded(n: int, batch: int) -> list[np.ndarray]:
    """Row indices in chunks of `batch`, the last one filled up by repeating its first row."""
    chunks = []
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        chunks.append(np.concatenate([rows, np.full(batch - len(rows), rows[0])]))
    return chunks


@functools.cache
def jitted(graphdef: nnx.GraphDef, length: int, bos_id: int):
    """(encode(params, tokens, segments), generate(params, z)) jitted once per model graph and
    decoding length, so every Stack of one model shares their compilations."""
    encode_fn = jax.jit(lambda p, tokens, segs: nnx.merge(graphdef, p).encode(tokens, segs))
    generate_fn = jax.jit(lambda p, z: nnx.merge(graphdef, p).generate(z, length, bos_id))
    return encode_fn, generate_fn


class Stack:
    """A trained stack's jitted encode and greedy decode over host text."""

    def __init__(self, run: StackRun):
        self.run = run
        self.batch = run.setup.cfg.train.global_batch
        self._encode, self._generate = jitted(run.setup.graphdef, run.s.max_target_len, run.tokenizer.bos_id)

    def ideas(self, items: Sequence[Example]) -> np.ndarray:
        """Idea vectors z_in (N, latent_dim) of the examples' encoder texts."""
        arrays = encode(self.run.tokenizer, items, self.run.s)
        out = []
        with jax.set_mesh(self.run.setup.mesh):
            for rows in _padded(len(items), self.batch):
                b = self.run.setup.put({k: arrays[k][rows] for k in ("enc_tokens", "enc_segments")})
                out.append(np.asarray(self._encode(self.run.params, b["enc_tokens"], b["enc_segments"])))
        return np.concatenate(out)[: len(items)]

    def decode(self, z: np.ndarray) -> list[str]:
        """Greedy decodings of idea vectors (N, latent_dim), cut at <eos>."""
        tok, texts = self.run.tokenizer, []
        with jax.set_mesh(self.run.setup.mesh):
            for rows in _padded(len(z), self.batch):
                ids = np.asarray(self._generate(self.run.params, self.run.setup.put({"z": z[rows]})["z"]))
                for row in ids[: len(z) - len(texts)]:
                    row = row.tolist()
                    texts.append(tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))
        return texts

    def predict(self, items: Sequence[Example]) -> list[str]:
        return self.decode(self.ideas(items))


# ----------------------------------------------------------------------------- task scores

def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = collections.Counter()
    for pred, ref in zip(predictions, references):
        for k, v in scorer.score(ref, pred).items():
            totals[k] += v.fmeasure
    return {k: 100.0 * totals[k] / max(len(references), 1) for k in ROUGE_TYPES}


def exact_match(predictions: Sequence[str], items: Sequence[Example]) -> float:
    hits = [normalize_answer(p) in {normalize_answer(a) for a in ex.answers or (ex.target,)}
            for p, ex in zip(predictions, items)]
    return 100.0 * float(np.mean(hits)) if hits else 0.0


def prior_answers(train: Sequence[Example]) -> dict[tuple[str, str], str]:
    """(task, group) -> the most common training target: the baseline that does not read."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for ex in train:
        counts[ex.task, ex.group][ex.target] += 1
    return {k: c.most_common(1)[0][0] for k, c in counts.items()}


def task_scores(stack: Stack, items: Sequence[Example]) -> tuple[list[dict], list[str]]:
    """One row per task and system ({task, system, n, metric: value, ...}), and the predictions."""
    predictions = stack.predict(items)
    prior = prior_answers(stack.run.train)
    rows = []
    for task in dict.fromkeys(ex.task for ex in items):
        idx = [i for i, ex in enumerate(items) if ex.task == task]
        sub, preds = [items[i] for i in idx], [predictions[i] for i in idx]
        if METRIC[task] == "rouge":
            refs = [ex.target for ex in sub]
            rows.append({"task": task, "system": "stack", "n": len(sub), **rouge(preds, refs)})
            for n in (1, 3):
                rows.append({"task": task, "system": f"lead-{n}", "n": len(sub),
                             **rouge([lead(ex.input, n) for ex in sub], refs)})
        else:
            rows.append({"task": task, "system": "stack", "n": len(sub), "em": exact_match(preds, sub)})
            guesses = [prior.get((ex.task, ex.group), "") for ex in sub]
            rows.append({"task": task, "system": "prior", "n": len(sub), "em": exact_match(guesses, sub)})
    return rows, predictions


# ----------------------------------------------------------------------------- idea space

def drop_words(text: str, share: float, rng: np.random.Generator) -> str:
    """`text` with about `share` of its words removed (at least one kept)."""
    words = text.split()
    keep = rng.random(len(words)) >= share
    keep[int(rng.integers(len(words)))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def neighbours(stack: Stack, items: Sequence[Example], share: float = 0.15, seed: int = 0) -> dict[str, float]:
    """recall@1 / @5 of each input's source among all inputs from a word-dropped copy, and the
    same-task share of each input's 5 nearest other inputs."""
    import faiss

    rng = np.random.default_rng(seed)
    z = stack.ideas(items).astype(np.float32)
    noisy = [Example(ex.task, drop_words(ex.input, share, rng), ex.target) for ex in items]
    q = stack.ideas(noisy).astype(np.float32)
    faiss.normalize_L2(z)
    faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(z)
    k = min(5, len(items))
    _, found = index.search(q, k)
    truth = np.arange(len(items))[:, None]
    _, near = index.search(z, min(k + 1, len(items)))
    tasks = np.array([ex.task for ex in items])
    others = [row[row != i][:k] for i, row in enumerate(near)]
    same = [np.mean(tasks[o] == tasks[i]) for i, o in enumerate(others) if len(o)]
    return {"n": len(items), "recall@1": float(np.mean(found[:, :1] == truth)),
            "recall@5": float(np.mean(np.any(found == truth, axis=1))),
            "same_task@5": float(np.mean(same)) if same else 1.0,
            "chance@1": 1.0 / len(items)}


def interpolate(stack: Stack, a: Example, b: Example, steps: int = 5) -> list[tuple[float, str]]:
    """(alpha, decoding of (1 - alpha) z_a + alpha z_b) for `steps` alphas from 0 to 1."""
    za, zb = stack.ideas([a, b])
    alphas = np.linspace(0.0, 1.0, steps)
    z = np.stack([(1.0 - t) * za + t * zb for t in alphas]).astype(np.float32)
    return list(zip(alphas.tolist(), stack.decode(z)))


def pca_plot(z: np.ndarray, labels: Sequence[str], path: str, title: str = "idea vectors") -> list[float]:
    """Scatter of `z` on its two principal axes coloured by label, written to `path` (PNG);
    returns the share of variance the two axes explain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quietreasoning.utils import io

    centred = z - z.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    explained = (sv[:2] ** 2 / np.sum(sv ** 2)).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label in dict.fromkeys(labels):
        pick = np.array([lab == label for lab in labels])
        ax.scatter(xy[pick, 0], xy[pick, 1], s=9, alpha=0.7, label=label)
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    ax.set_title(title)
    ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    dst = io.path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"  # written, then renamed over `path`
    fig.savefig(str(tmp), format="png")
    plt.close(fig)
    tmp.replace(dst)
    return explained


# ----------------------------------------------------------------------------- report

def evaluate(run: StackRun, pca_path: str) -> dict:
    """Everything above on the run's held-out examples: {"scores", "samples", "neighbours",
    "interpolation" (between the first two held-out inputs of the first task), "pca_explained"}."""
    stack, items = Stack(run), run.held_out
    rows, predictions = task_scores(stack, items)
    first = [ex for ex in items if ex.task == items[0].task]
    path = interpolate(stack, first[0], first[1]) if len(first) > 1 else []
    samples = [{"task": ex.task, "input": ex.encoder_text, "target": ex.target, "prediction": p}
               for ex, p in list(zip(items, predictions))[:: max(1, len(items) // 6)]]
    explained = pca_plot(stack.ideas(items), [ex.task for ex in items], pca_path,
                         f"idea vectors of {len(items)} held-out inputs")
    return {"scores": rows, "samples": samples, "neighbours": neighbours(stack, items), "interpolation": path,
            "interpolation_ends": [first[0].encoder_text, first[1].encoder_text] if path else [],
            "pca_explained": explained}


def markdown(result: dict) -> str:
    """The score table, the neighbour figures and the interpolation path as markdown."""
    rows, near, path = result["scores"], result["neighbours"], result["interpolation"]
    out = ["| task | system | n | ROUGE-1 | ROUGE-2 | ROUGE-L | EM |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "" for k in (*ROUGE_TYPES, "em")]
        out.append(f"| {r['task']} | {r['system']} | {r['n']} | " + " | ".join(cells) + " |")
    out += ["", "| idea space | value |", "|---|---:|",
            f"| recall@1 of the source from a word-dropped copy (chance {near['chance@1']:.3f}) | "
            f"{near['recall@1']:.3f} |",
            f"| recall@5 | {near['recall@5']:.3f} |",
            f"| same task among the 5 nearest other inputs | {near['same_task@5']:.3f} |"]
    if path:
        a_text, b_text = (text if len(text) <= 160 else text[:157] + "..." for text in result["interpolation_ends"])
        out += ["", f"A: `{a_text}`  ", f"B: `{b_text}`", "",
                "| alpha | decoding of (1 - alpha) z_A + alpha z_B |", "|---:|---|"]
        out += [f"| {a:.2f} | {' '.join(text.replace('|', '/').split())} |" for a, text in path]
    return "\n".join(out)
