"""Episodic store search at scale: single-query latency and recall@8 against exact search, per
index type and setting, on the tiny model's own hidden states (target: median <= 2 ms with
recall@8 >= 0.95 at 1M entries).

    python bench/episodic_search.py                                  # 1M entries, appends to docs/benchmarks.md
    python bench/episodic_search.py --entries 100000 --train-steps 10 --no-append

The keys. A SentencePiece tokenizer is trained on the embedded corpus, the tiny preset's trunk
(configs/tiny.yaml) is trained for --train-steps steps on it, and each token position of the
corpus gives one key: the mean of the final-norm hidden states over the last --window tokens of
its row (the seed's "mean-pooled last-layer states"); its value is those token ids. Queries are
keys of held-out documents. Every store is filled through EpisodicStore.write with dedupe off
(memory.episodic_dedupe = 1), so it holds all the entries; build time is that write, including
IVF training and HNSW graph construction.

Measures. Latency: EpisodicStore.search of one query at a time (as serving does), k = 8, median
and 95th percentile. Recall@8: the share of the 8 returned entries whose exact cosine reaches the
exact 8th-best cosine (a tie counts as found), from a brute-force search over all keys. Index
memory: the size of the serialised FAISS index; the store also keeps every key and value
(memory/episodic.py), reported once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# FAISS's OpenMP threads spin while waiting; on a shared machine that slows builds many times over
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data.sources import documents  # noqa: E402
from quietreasoning.memory.episodic import EpisodicStore  # noqa: E402
from quietreasoning.training import sharding  # noqa: E402
from quietreasoning.training.train_step import put_batch, setup  # noqa: E402
from quietreasoning.utils.tokenizer import train_tokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

K = 8
DOCS = 8000  # the embedded corpus's documents (about 11 MB of text)
HELD_OUT = 0.05  # the share of documents that only give queries
FLAT_QUERIES = 50  # exact search reads every key per query: fewer queries time it well enough


def token_rows(cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, query rows) of seq_len tokens: the embedded corpus tokenized with a tokenizer
    trained on it, documents joined with BOS, the last HELD_OUT of the documents kept apart."""
    texts = [d.text for d in documents(cfg.data, seed, docs=DOCS)]
    tok = train_tokenizer(texts, cfg.model.vocab_size, cfg.data.tokenizer_type, seed=seed)
    ids = tok.encode_batch(texts)
    split = int(len(ids) * (1 - HELD_OUT))
    t = cfg.train.seq_len

    def rows(docs):
        stream = np.concatenate([np.array([tok.bos_id, *d], np.int32) for d in docs])
        return stream[:len(stream) // t * t].reshape(-1, t)
    return rows(ids[:split]), rows(ids[split:])


def train(cfg, rows: np.ndarray, steps: int):
    """The tiny trunk trained `steps` steps on `rows` (one device): (graphdef, params, last loss)."""
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    b, t = cfg.train.global_batch, cfg.train.seq_len
    ones = np.ones((b, t), np.int32)
    with jax.set_mesh(mesh):
        state = ts.init()
        loss = float("nan")
        for step in tqdm(range(steps), desc="train tiny trunk"):
            block = rows[(np.arange(b) + step * b) % len(rows)]
            batch = {"inputs": block, "targets": np.concatenate([block[:, 1:], block[:, :1]], 1),
                     "segment_ids": ones, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                     "loss_mask": np.concatenate([ones[:, 1:], 0 * ones[:, :1]], 1),  # no target after the last
                     "answer_mask": 0 * ones}
            state, metrics = ts.step_fn(state, put_batch(batch, ts.batch_sharding))
            loss = float(metrics["loss"])
    return ts.graphdef, jax.device_get(state["params"]), loss


def embed(graphdef, params, rows: np.ndarray, window: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N, d_model) float32, values (N, window) int32): per token, the mean hidden state
    and the token ids of the last `window` tokens of its row."""
    t = rows.shape[1]

    @jax.jit
    def pooled(params, tokens):
        model = nnx.merge(graphdef, params)
        seg = jnp.ones_like(tokens)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        c = jnp.cumsum(model.hidden(tokens, seg, pos), axis=1)
        shifted = jnp.pad(c, ((0, 0), (window, 0), (0, 0)))[:, :t]
        count = jnp.minimum(jnp.arange(1, t + 1), window).astype(jnp.float32)
        return (c - shifted) / count[None, :, None]

    keys = []
    for start in tqdm(range(0, len(rows), batch), desc="embed"):
        block = rows[start:start + batch]
        out = np.asarray(pooled(params, block))
        keys.append(out.reshape(-1, out.shape[-1]))
    padded = np.pad(rows, ((0, 0), (window - 1, 0)))
    values = np.lib.stride_tricks.sliding_window_view(padded, window, axis=1).reshape(-1, window)
    return np.concatenate(keys), values.astype(np.int32)


def exact_kth(keys: np.ndarray, queries: np.ndarray, k: int, block: int = 131072) -> np.ndarray:
    """The exact k-th best cosine of each query over all keys (brute force, blocks of keys)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best = np.full((len(q), k), -np.inf, np.float32)
    for start in tqdm(range(0, len(keys), block), desc="exact search"):
        kb = keys[start:start + block]
        scores = q @ (kb / np.linalg.norm(kb, axis=1, keepdims=True)).T
        top = -np.partition(-scores, k - 1, axis=1)[:, :k]
        best = -np.sort(-np.concatenate([best, top], 1), axis=1)[:, :k]
    return best[:, -1]


def measure(store: EpisodicStore, queries: np.ndarray, kth: np.ndarray) -> dict:
    """Median and p95 single-query latency (ms) and recall@K of `store` on `queries`."""
    for q in queries[:5]:  # warm-up
        store.search(q[None], K)
    times, found = [], []
    for q, t in zip(queries, kth):
        t0 = time.perf_counter()
        r = store.search(q[None], K)
        times.append(time.perf_counter() - t0)
        found.append(np.sum(r.mask[0] & (r.scores[0] >= t - 1e-5)) / K)
    return {"median_ms": 1e3 * float(np.median(times)), "p95_ms": 1e3 * float(np.percentile(times, 95)),
            "recall": float(np.mean(found))}


def build(kind: str, keys: np.ndarray, values: np.ndarray, args) -> tuple[EpisodicStore, float]:
    store = EpisodicStore(keys.shape[1], value_shape=values.shape[1:], value_dtype=np.int32, index=kind,
                          capacity=len(keys), dedupe=1.0, nlist=args.nlist, pq_m=args.pq_m, hnsw_m=args.hnsw_m)
    t0 = time.perf_counter()
    counts = store.write(keys, values, source="bench")
    seconds = time.perf_counter() - t0
    assert counts.added == len(keys) == len(store), counts
    return store, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--train-steps", type=int, default=100,
                   help="tiny trunk training steps before embedding (0: random weights)")
    p.add_argument("--window", type=int, default=16, help="tokens mean-pooled into one key")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq-m", type=int, default=32)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfpq", "hnsw"])
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    args = p.parse_args(argv)

    cfg = load_config("tiny")
    store_rows, query_rows = token_rows(cfg, cfg.train.seed)
    need = -(-args.entries // cfg.train.seq_len)
    if need > len(store_rows):
        raise SystemExit(f"--entries {args.entries}: the embedded corpus gives {len(store_rows) * cfg.train.seq_len} "
                         "token positions; ask for fewer")
    graphdef, params, loss = train(cfg, store_rows, args.train_steps)
    keys, values = embed(graphdef, params, store_rows[:need], args.window)
    keys, values = keys[:args.entries], values[:args.entries]
    rng = np.random.default_rng(0)
    q_all, _ = embed(graphdef, params, query_rows[:-(-args.queries * 4 // cfg.train.seq_len)], args.window)
    queries = q_all[rng.choice(len(q_all), args.queries, replace=False)]
    kth = exact_kth(keys, queries, K)
    print(f"{len(keys):,} keys of width {keys.shape[1]}; tiny trunk after {args.train_steps} steps, loss {loss:.3f}")

    rows = []
    store_bytes = keys.nbytes + values.nbytes  # the copies every store keeps
    for kind in args.kinds:
        store, seconds = build(kind, keys, values, args)
        index_mb = len(faiss.serialize_index(store.index)) / 2 ** 20
        settings = {"flat": [{}], "ivf": [{"nprobe": n} for n in args.nprobe],
                    "ivfpq": [{"nprobe": n} for n in args.nprobe], "hnsw": [{"ef_search": e} for e in args.ef_search]}
        label = {"flat": "flat (exact)", "ivf": f"ivf nlist {args.nlist}",
                 "ivfpq": f"ivfpq nlist {args.nlist} m {args.pq_m}", "hnsw": f"hnsw M {args.hnsw_m}"}[kind]
        n = min(FLAT_QUERIES, len(queries)) if kind == "flat" else len(queries)  # flat scans everything
        for s in settings[kind]:
            store.set_search(**s)
            m = measure(store, queries[:n], kth[:n])
            name = ", ".join(f"{k} {v}" for k, v in s.items()) or "-"
            rows.append((label, name, seconds, m, index_mb))
            print(f"{label} {name}: build {seconds:.1f} s, median {m['median_ms']:.3f} ms, p95 {m['p95_ms']:.3f} ms, "
                  f"recall@{K} {m['recall']:.3f}, index {index_mb:.0f} MB", flush=True)
        del store

    lines = [f"| index | search setting | build (s) | median (ms) | p95 (ms) | recall@{K} | index (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {name} | {sec:.1f} | {m['median_ms']:.3f} | {m['p95_ms']:.3f} | {m['recall']:.3f} | "
              f"{mb:.0f} |" for label, name, sec, m, mb in rows]
    note = (f"{len(keys):,} entries: keys = tiny trunk (configs/tiny.yaml, {args.train_steps} steps on the embedded "
            f"corpus, final loss {loss:.3f}) final-norm states mean-pooled over {args.window} tokens, width "
            f"{keys.shape[1]}; values = those {args.window} token ids; {args.queries} held-out queries, k = {K}. "
            f"The store also holds every key and value: {store_bytes / 2 ** 20:.0f} MB.")
    table = "\n".join(lines)
    print(note)
    print(table)
    if not args.no_append:
        append_section(args.doc, "Episodic store search", "bench/episodic_search.py", argv, f"{note}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
