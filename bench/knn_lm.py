"""The kNN-LM datastore on a preset's model: build time, bytes per entry, search latency, IVF-PQ
recall against the exact (flat) index, and held-out perplexity with and without the kNN-LM, all
measured in one process.

Keys are the model's final-norm hidden states over batches of the synthetic language (the model
as initialised from train.seed: the language is first-order Markov, so contexts that share the
current token predict alike even before training); held-out text is other batches of it.
Recall@k is the fraction of the k entries an index returns that lie within the exact k-th nearest
distance (counting by distance, not by id: many contexts repeat, and ties are not misses).

    python bench/knn_lm.py                             # tiny preset, appends to docs/benchmarks.md
    python bench/knn_lm.py --batches 8 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

import faiss  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data.synthetic import SyntheticLanguage  # noqa: E402
from quietreasoning.memory.knn_lm import KNNDatastore, LMOutputs, evaluate_perplexity  # noqa: E402
from quietreasoning.model.trunk import Trunk  # noqa: E402

HELD_OUT = 10**6  # batch indices from here on are never stored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batches", type=int, default=24, help="synthetic batches whose positions fill the datastore")
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches (queries and perplexity)")
    p.add_argument("--lam", type=float, default=0.25, help="fixed kNN-LM lambda (Khandelwal et al.: 0.25)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    mem, t = cfg.memory, cfg.train
    lm = LMOutputs(Trunk(cfg.model, rngs=nnx.Rngs(params=jax.random.key(t.seed))))
    language = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, t.seed)
    batch = lambda i: language.batch(i, t.global_batch, t.seq_len)  # noqa: E731

    lm(batch(0))  # compile outside the clock
    start = time.perf_counter()
    keys, values = [], []
    for i in range(args.batches):
        b = batch(i)
        mask = b["loss_mask"] > 0
        keys.append(lm(b)["hidden"][mask])
        values.append(b["targets"][mask])
    keys, values = np.concatenate(keys), np.concatenate(values)
    forward_s = time.perf_counter() - start
    print(f"{len(keys):,} keys of width {keys.shape[1]} in {forward_s:.1f} s", flush=True)

    held = [batch(HELD_OUT + i) for i in range(args.eval_batches)]
    queries = np.concatenate([lm(b)["hidden"][b["loss_mask"] > 0] for b in held])
    stores = {}
    for kind in ("flat", "ivfpq"):
        start = time.perf_counter()
        stores[kind] = KNNDatastore.from_arrays(keys, values, kind, nlist=mem.knn_nlist, pq_m=mem.knn_pq_m,
                                                nprobe=mem.knn_nprobe, seed=t.seed)
        stores[kind + "_build_s"] = time.perf_counter() - start
    distance = lambda ids: np.square(keys[ids] - queries[:, None]).sum(-1)  # noqa: E731 (the same arithmetic for all)
    kth = distance(stores["flat"].index.search(queries, mem.knn_k)[1]).max(axis=1, keepdims=True)
    base = evaluate_perplexity(lm, held, lam=args.lam, k=mem.knn_k, temperature=mem.knn_temperature, progress=False)

    rows = []
    ivf = faiss.extract_index_ivf(stores["ivfpq"].index)
    for kind, nprobe in [("flat", None), ("ivfpq", 1), ("ivfpq", mem.knn_nprobe), ("ivfpq", 4 * mem.knn_nprobe)]:
        store = stores[kind]
        if nprobe:
            ivf.nprobe = nprobe
        store.search(queries[:64], mem.knn_k)  # warm
        times = []
        for _ in range(3):  # the median of three: the machine is shared
            start = time.perf_counter()
            store.search(queries, mem.knn_k)
            times.append(time.perf_counter() - start)
        search_ms = float(np.median(times)) * 1e6 / len(queries)
        _, found = store.index.search(queries, mem.knn_k)
        recall = float(np.mean(distance(found) <= kth))
        ppl = evaluate_perplexity(lm, held, store, lam=args.lam, k=mem.knn_k, temperature=mem.knn_temperature,
                                  progress=False)
        size = faiss.serialize_index(store.index).nbytes / store.size
        name = kind if nprobe is None else f"ivfpq nprobe {nprobe}"
        rows.append((name, store.size, stores[kind + "_build_s"], size, search_ms, recall, ppl.knn))
        print(f"{name}: {search_ms:.1f} ms / 1k queries, recall@{mem.knn_k} {recall:.3f}, ppl {ppl.knn:.2f}",
              flush=True)

    lines = [f"{args.preset} model (d_model {cfg.model.d_model}, vocab {cfg.model.vocab_size}, untrained), "
             f"{len(keys):,} keys from {args.batches} synthetic batches ({len(keys) / forward_s:,.0f} keys/s "
             f"through the model); {len(queries):,} held-out queries; k {mem.knn_k}, temperature "
             f"{mem.knn_temperature}, lambda {args.lam}, IVF-PQ nlist {mem.knn_nlist} x {mem.knn_pq_m} bytes. "
             f"Held-out perplexity of the LM alone: {base.lm:.2f}.", "",
             f"| index | entries | build (s) | bytes / entry | search (ms / 1k queries) | recall@{mem.knn_k} vs flat "
             "| held-out ppl with kNN-LM |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {size:,} | {build:.2f} | {b:.0f} | {ms:.1f} | {r:.3f} | {ppl:.2f} |"
              for n, size, build, b, ms, r, ppl in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, f"kNN-LM datastore, {args.preset} preset", "bench/knn_lm.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
