"""Reasoning-task generators: examples per second for each task and split, and how long the
examples are (characters of question + steps + answer, steps per example), beside the shared
benchmark files read the same way. Held-out splits keep a fifth of the questions they draw, so
their cost over train's (measured in the same run) shows what the hash-bucket split costs.

    python bench/reasoning_tasks.py                    # 2000 examples a split, appends to docs/benchmarks.md
    python bench/reasoning_tasks.py -n 200 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import DataError  # noqa: E402
from quietreasoning.data import benchmarks, tasks  # noqa: E402


def sizes(examples: list[dict]) -> tuple[float, float]:
    """(mean characters of question + steps + answer, mean steps) of `examples`."""
    chars = [len(ex["question"]) + sum(map(len, ex["steps"])) + len(ex["answer"]) for ex in examples]
    return float(np.mean(chars)), float(np.mean([len(ex["steps"]) for ex in examples]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000, help="examples per split (default 2000)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    args = p.parse_args(argv)
    lines = ["| task | split | examples/s | time vs train | chars (mean) | steps (mean) | difficulty |",
             "|---|---|---:|---:|---:|---:|---|"]
    for task in tasks.DIFFICULTY:
        rate = {}
        for split in tasks.SPLITS:
            start = time.perf_counter()
            examples = tasks.reasoning_split(task, split, args.n, seed=0)
            rate[split] = args.n / (time.perf_counter() - start)
            chars, steps = sizes(examples)
            knobs = ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in tasks.split_difficulty(task, split).items())
            lines.append(f"| {task} | {split} | {rate[split]:,.0f} | {rate['train'] / rate[split]:.1f}x |"
                         f" {chars:.0f} | {steps:.2f} | {knobs} |")
            print(lines[-1], flush=True)
    for name in benchmarks.BENCHMARKS:
        try:
            chars, steps = sizes(benchmarks.load_benchmark(name))
        except DataError as e:
            print(f"skipped: {e}")
            continue
        lines.append(f"| {name} (shared file) | valid | | | {chars:.0f} | {steps:.2f} | |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, "Reasoning-task generators", "bench/reasoning_tasks.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
