"""Data throughput: ingest (read + clean + tokenize + write) in MB/s per core, and the packed
reader's tokens/s against what the small preset's train step consumes (target >= 20x).

    python bench/data_throughput.py                       # appends to docs/benchmarks.md
    python bench/data_throughput.py --docs 1000 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section, time_train_step  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data.build import build  # noqa: E402
from quietreasoning.data.reader import ShardReader  # noqa: E402
from quietreasoning.data.sources import documents  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4000, help="documents in the embedded build")
    p.add_argument("--batches", type=int, default=200, help="reader batches timed (small preset shape)")
    p.add_argument("--train-steps", type=int, default=2, help="timed small-preset train steps (0: skip)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    args = p.parse_args(argv)

    small = load_config("small", [f"data.docs={args.docs}"])
    text_mb = sum(len(d.text.encode()) for d in documents(small.data, seed=0)) / 1e6
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        m = build(small.data, out, vocab_size=small.model.vocab_size, progress=False, log=lambda *_: None)
        ingest_s = time.perf_counter() - t0
        t = small.train
        reader = ShardReader(os.path.join(out, "*.tfrecord*"), t.seq_len, t.global_batch, seed=0)
        reader.next_batch()  # TF start-up
        t0 = time.perf_counter()
        for _ in range(args.batches):
            reader.next_batch()
        reader_tok_s = args.batches * t.global_batch * t.seq_len / (time.perf_counter() - t0)
    cores = os.cpu_count() or 1
    rows = [f"| ingest, embedded corpus ({args.docs} docs, {text_mb:.1f} MB text, {m['tokens']:,} tokens, "
            f"vocab {m['vocab_size']}) | {ingest_s:.1f} s | {text_mb / ingest_s / cores:.2f} MB/s per core |",
            f"| reader, small preset batches ({t.global_batch} x {t.seq_len}) | {args.batches} batches | "
            f"{reader_tok_s:,.0f} tokens/s |"]
    if args.train_steps:
        step = time_train_step("small", args.train_steps, [])
        rows.append(f"| small preset train step (consumes) | {step['step_s']:.2f} s/step | "
                    f"{step['tokens_per_s']:,.0f} tokens/s |")
        rows.append(f"| reader / train step | | {reader_tok_s / step['tokens_per_s']:,.0f}x |")
    table = "\n".join(["| what | size / time | rate |", "|---|---:|---:|", *rows])
    print(table)
    if not args.no_append:
        append_section(args.doc, "Data throughput", "bench/data_throughput.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
