"""PopQA with memory, measured: closed-book against + PKM + episodic and + kNN-LM on the synthetic
long-tail world (data/tasks.py popqa_records), tiny models trained here with the same budget, one
process.

The world and its split. `--people` sets the world's size; `--eval` of its facts, drawn at
random (seeded), are held out: their questions never appear as QA in training. Every other fact
is a training QA document (tasks.fact_document: 'Q: <question>\\nA: <obj>').

The training text. Each fact, held-out or not, also appears as a statement ('<subj> | <prop> |
<obj>', memory/retrieval.py fact_statement) n times, n ~ Poisson(min(CAP, sqrt(s_pop) / SCALE)):
about 0.4 times for a subject with 10 monthly views, 4 for 1,000, CAP for the most popular. So
rare facts are seen rarely or never, as PopQA's long tail is on the web. Each document (QA or
statement) has a row of its own, so a row's memory belongs to it alone; the rows are reshuffled
every epoch (seeded), and both variants see the same batches in the same order.

The variants (the same budget: steps, batch, learning-rate schedule, seed):
  closed-book        the trunk alone (memory modules off)
  + PKM + episodic   a PKM layer after block --pkm-layer and the episodic read before block
                     --episodic-layer (memory/episodic_read.py); every row carries as memory the
                     top-k facts the store returns for its fact's key (the key the fact is stored
                     under, the one its question makes)
Retrieval (memory/retrieval.py FactMemory): an EpisodicStore (flat, exact) holding every fact
under the key of its question, the mean-pooled final-norm hidden states of '<bos>Q: <question>\\n';
its value is one row per statement token, (that token's final-norm state, the embedding of the
token after it). Keys and values come from a frozen encoder: the closed-book model after its
training. A question retrieves its top-k (model.episodic_slots) facts, whose rows are its
memory tokens. How often the asked fact is retrieved is reported.

Evaluation: PopQAEvaluator on the held-out questions, greedy answers; accuracy overall and by
s_pop bucket for closed-book, + PKM + episodic, + kNN (kNN-LM interpolation on top of
+ PKM + episodic: a fixed lambda, Khandelwal et al.'s 0.25, no router; k and temperature from
memory.knn_*; an IVF-PQ datastore of memory.knn_* sizes holding the memory model's final-norm
states at every trained position of the training text, each row read once with its memory, next
token as value), and, as a diagnostic, the memory model with retrieval off. Nothing is tuned on
the held-out questions.

    python bench/popqa_memory.py                       # appends to docs/benchmarks.md, docs/images/popqa_memory.png
    python bench/popqa_memory.py --steps 100 --people 200 --eval 100 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS threads spin otherwise on a shared machine

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data import tasks  # noqa: E402
from quietreasoning.data.build import encode  # noqa: E402
from quietreasoning.eval import popqa  # noqa: E402
from quietreasoning.memory.knn_lm import KNNDatastore  # noqa: E402
from quietreasoning.memory.retrieval import FactMemory, fact_statement, memory_arrays  # noqa: E402
from quietreasoning.training import sharding  # noqa: E402
from quietreasoning.training.train_step import put_batch, setup  # noqa: E402
from quietreasoning.utils import io  # noqa: E402
from quietreasoning.utils.tokenizer import train_tokenizer  # noqa: E402

SCALE, CAP = 8.0, 24.0  # statement repeats: Poisson(min(CAP, sqrt(s_pop) / SCALE))
LAMBDA = 0.25           # kNN-LM weight (Khandelwal et al. 2020 on Wikitext-103)
D_MODEL = 128
IMAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "images", "popqa_memory.png")


# ----------------------------------------------------------------------------- the training text

def place(docs: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
    """One document (token ids, <bos> ... <eos>) per row, right-padded: positions from 0, a target
    wherever the next token is in the same document."""
    batch = {k: np.zeros((len(docs), seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions",
                                                                  "loss_mask", "answer_mask")}
    for r, ids in enumerate(docs):
        n = len(ids)
        batch["inputs"][r, :n] = ids
        batch["targets"][r, :n - 1] = ids[1:]
        batch["segment_ids"][r, :n] = 1
        batch["positions"][r, :n] = np.arange(n)
        batch["loss_mask"][r, :n - 1] = 1
    return batch


def batch_order(n_docs: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """The rows of each step: the documents reshuffled every epoch (seeded), cut into batches."""
    rng = np.random.default_rng([seed, 1])
    order: list[np.ndarray] = []
    while len(order) < steps:
        perm = rng.permutation(n_docs)
        order += [perm[i:i + batch] for i in range(0, n_docs - batch + 1, batch)]
    return order[:steps]


# ----------------------------------------------------------------------------- training

def train_variant(cfg, name: str, docs: list[list[int]], facts: np.ndarray,
                  retrieved=None) -> tuple[nnx.Module, float, float]:
    """Trains one variant on the documents `docs` (facts[i]: the fact document i is about);
    `retrieved(facts)` gives rows the memory arrays of their facts (the memory model). Returns (the
    trained Trunk, seconds, mean loss of the last 50 steps)."""
    t = cfg.train
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    losses = []
    with jax.set_mesh(mesh):
        state = ts.init()
        start = time.perf_counter()
        bar = tqdm(batch_order(len(docs), t.global_batch, t.steps, t.seed), desc=f"train {name}", unit="step",
                   dynamic_ncols=True)
        for rows in bar:
            batch = place([docs[i] for i in rows], t.seq_len)
            if retrieved is not None:
                batch.update(retrieved(facts[rows]))
            batch = put_batch(batch, ts.batch_sharding)
            state, metrics = ts.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        seconds = time.perf_counter() - start
    model = nnx.merge(ts.graphdef, jax.device_get(state["params"]))
    return model, seconds, float(np.mean(losses[-50:]))


def knn_datastore(cfg, model, docs: list[list[int]], facts: np.ndarray, retrieved, rows: int = 64) -> KNNDatastore:
    """The memory model's final-norm states at every trained position of the training text (each
    document once, with its memory), next token as value; IVF-PQ of memory.knn_*."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def hidden(params, batch):
        m = nnx.merge(graphdef, params)
        return m.forward(batch["inputs"], batch["segment_ids"], batch["positions"], memory=batch["memory"],
                         memory_mask=batch["memory_mask"])[0]

    keys, values = [], []
    for start in tqdm(range(0, len(docs), rows), desc="kNN keys", unit="batch"):
        part = np.arange(start, min(start + rows, len(docs)))
        batch = {**place([docs[i] for i in part], cfg.train.seq_len), **retrieved(facts[part])}
        h = np.asarray(hidden(params, batch))
        mask = batch["loss_mask"] > 0
        keys.append(h[mask])
        values.append(batch["targets"][mask])
    mem = cfg.memory
    return KNNDatastore.from_arrays(np.concatenate(keys), np.concatenate(values), "ivfpq", nlist=mem.knn_nlist,
                                    pq_m=mem.knn_pq_m, nprobe=mem.knn_nprobe, seed=cfg.train.seed, progress=True)


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=400, help="people in the world (other entities scale with it)")
    p.add_argument("--eval", type=int, default=300, help="facts held out: their questions are the evaluation")
    p.add_argument("--steps", type=int, default=800, help="train steps per variant")
    p.add_argument("--vocab", type=int, default=1024, help="SentencePiece BPE vocabulary (model.vocab_size)")
    p.add_argument("--value-len", type=int, default=None, help="memory rows kept per retrieved fact (default: all)")
    p.add_argument("--pkm-layer", type=int, default=2, help="the PKM read follows this block")
    p.add_argument("--episodic-layer", type=int, default=2, help="the episodic read precedes this block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value for both variants (after the bench's own)")
    args = p.parse_args(argv)

    began = time.perf_counter()
    # the world, the split, the training text
    records = tasks.popqa_records(args.seed, n_people=args.people)
    rng = np.random.default_rng([args.seed, 2])
    if not 0 < args.eval < len(records):
        raise SystemExit(f"--eval {args.eval}: hold out between 1 and {len(records) - 1} of the {len(records)} facts")
    held = set(rng.choice(len(records), args.eval, replace=False).tolist())
    eval_records = [r for i, r in enumerate(records) if i in held]
    train_records = [r for i, r in enumerate(records) if i not in held]
    repeats = rng.poisson(np.minimum(CAP, np.sqrt([r["s_pop"] for r in records]) / SCALE))
    statements = [fact_statement(r) for r, n in zip(records, repeats) for _ in range(n)]
    qa_docs = [tasks.fact_document(r) for r in train_records]
    tokenizer = train_tokenizer(statements + [d.text for d in qa_docs], args.vocab, seed=args.seed)

    base = [f"model.vocab_size={tokenizer.vocab_size}", f"model.d_model={D_MODEL}", "model.n_layers=4",
            "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=384", "model.compute_dtype=float32",
            "train.seq_len=32", "train.global_batch=32", f"train.steps={args.steps}", "train.lr=3e-3",
            "train.warmup_steps=50", f"train.seed={args.seed}", "model.episodic_slots=4"]
    # a memory row is an encoder state and a token embedding: twice d_model wide
    memory_on = [f"model.pkm_layers=[{args.pkm_layer}]", "model.episodic=true",
                 f"model.episodic_layer={args.episodic_layer}", f"model.episodic_dim={2 * D_MODEL}"]
    cfg_closed = load_config("tiny", [*base, *args.overrides])
    cfg_memory = load_config("tiny", [*base, *memory_on, *args.overrides])
    seq_len = cfg_closed.train.seq_len

    # one document per row: the QA documents of the training facts, then every statement repeat
    train_index = [i for i in range(len(records)) if i not in held]
    docs = [ids.tolist() for ids, _ in encode(tokenizer, qa_docs)]
    docs += [[tokenizer.bos_id, *tokenizer.encode(s), tokenizer.eos_id] for s in statements]
    facts = np.array(train_index + [i for i, n in enumerate(repeats) for _ in range(n)])
    longest = max(map(len, docs))
    if longest > seq_len:
        raise SystemExit(f"a training document has {longest} tokens, more than train.seq_len={seq_len}; raise it")
    print(f"world: {len(records)} facts ({len(train_records)} train QA, {len(eval_records)} held out); "
          f"{len(statements)} statements ({int((repeats == 0).sum())} facts never stated); "
          f"vocab {tokenizer.vocab_size}", flush=True)

    # closed-book, then the retriever it makes, then the memory model; a row's memory is the top-k
    # the store returns for its fact's key (the key of the fact's question, under which it is stored)
    closed, closed_s, closed_loss = train_variant(cfg_closed, "closed-book", docs, facts)
    memory = FactMemory.build(cfg_memory, closed, tokenizer, records, value_len=args.value_len)
    by_fact = memory_arrays(memory.retrieve([r["question"] for r in records]))

    def retrieved(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in by_fact.items()}
    reader, memory_s, memory_loss = train_variant(cfg_memory, "+PKM+episodic", docs, facts, retrieved)

    # how often retrieval finds the asked fact
    asked = memory.retrieve([r["question"] for r in eval_records])
    sources = memory.store.metadata(np.maximum(asked.ids, 0))["source"]
    own = (sources == np.array([str(r["id"]) for r in eval_records])[:, None]) & asked.mask
    recall1, recallk = float(own[:, 0].mean()), float(own.any(axis=1).mean())

    start = time.perf_counter()
    datastore = knn_datastore(cfg_memory, reader, docs, facts, retrieved)
    knn_s = time.perf_counter() - start

    mem = cfg_memory.memory
    systems = {
        "closed-book": popqa.closed_book(closed, tokenizer, max_new_tokens=args.max_new_tokens),
        "+PKM+episodic": popqa.with_memory(reader, tokenizer, memory, max_new_tokens=args.max_new_tokens),
        "+PKM+episodic+kNN": popqa.with_knn(reader, tokenizer, datastore, memory=memory, lam=LAMBDA, k=mem.knn_k,
                                            temperature=mem.knn_temperature, max_new_tokens=args.max_new_tokens),
        "(+PKM+episodic model, no retrieval)": popqa.closed_book(reader, tokenizer,
                                                                 max_new_tokens=args.max_new_tokens),
    }
    evaluator = popqa.PopQAEvaluator(eval_records)
    start = time.perf_counter()
    result = evaluator.compare(systems)
    eval_s = time.perf_counter() - start
    acc = {name: s.accuracy for name, s in result.scores.items()}
    gain_mem = 100 * (acc["+PKM+episodic"] - acc["closed-book"])
    gain_knn = 100 * (acc["+PKM+episodic+kNN"] - acc["closed-book"])

    m = cfg_memory.model
    lines = [
        f"World: `tasks.popqa_records(seed={args.seed}, n_people={args.people})`, {len(records)} facts; "
        f"{len(eval_records)} held out (their questions never trained as QA), {len(train_records)} trained as QA. "
        f"Training text: {len(statements)} statements, fact f repeated Poisson(min({CAP:g}, sqrt(s_pop) / {SCALE:g})) "
        f"times ({int((repeats == 0).sum())} facts never stated). BPE vocabulary {tokenizer.vocab_size}.",
        "",
        f"Models: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, float32; "
        f"{args.steps} steps of {cfg_memory.train.global_batch} x {seq_len} tokens each, lr "
        f"{cfg_memory.train.lr:g}, same batches for both. +PKM+episodic: PKM ({m.pkm_slots} slots, {m.pkm_heads} "
        f"heads, top-{m.pkm_topk}) after block {args.pkm_layer}, episodic read before block {m.episodic_layer}, "
        f"top-{m.episodic_slots} facts x {memory.value_len} rows as memory. Train time: closed-book "
        f"{closed_s:.0f} s (final loss {closed_loss:.3f}), +PKM+episodic {memory_s:.0f} s (final loss "
        f"{memory_loss:.3f}).",
        "",
        f"Retrieval: flat EpisodicStore of all {len(records)} facts, keyed by the closed-book model's mean-pooled "
        f"final-norm states of the question, valued by its rows over the statement (each token's final-norm state "
        f"and the embedding of the next token; memory/retrieval.py); the held-out question's own fact is ranked "
        f"first for "
        f"{recall1:.1%} and is in the top-{m.episodic_slots} for {recallk:.1%}. kNN-LM: {datastore.size:,} entries "
        f"(IVF-PQ nlist {mem.knn_nlist}, {mem.knn_pq_m} bytes, nprobe {mem.knn_nprobe}; built in {knn_s:.0f} s), "
        f"k {mem.knn_k}, temperature {mem.knn_temperature:g}, lambda {LAMBDA} fixed. Evaluation of all systems: "
        f"{eval_s:.0f} s; whole run {time.perf_counter() - began:.0f} s.",
        "",
        result.table,
        "",
        "The last row is a diagnostic, not a system: the +PKM+episodic model answering with retrieval off.",
        "",
        f"Gains over closed-book: +PKM+episodic {gain_mem:+.1f} points (target >= +10: "
        f"{'met' if gain_mem >= 10 else 'missed'}), +kNN {gain_knn:+.1f} points (target >= +12: "
        f"{'met' if gain_knn >= 12 else 'missed'}).",
        "",
        "![PopQA accuracy by popularity](images/popqa_memory.png)",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        os.makedirs(os.path.dirname(os.path.abspath(IMAGE)), exist_ok=True)
        io.atomic_write_bytes(IMAGE, popqa.plot_png(list(result.scores.values()),
                                                    "Synthetic PopQA: held-out questions by subject popularity"))
        append_section(args.doc, "PopQA with memory, synthetic long-tail world", "bench/popqa_memory.py", argv,
                       "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
