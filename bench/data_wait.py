"""Time the training loop waits on its input: a real training run of a preset on TFRecord shards,
with every `next()` of the batch stream timed (target: no step waits on data).

The trainer is run as users run it (`training.trainer.train`); only its batch stream is wrapped:
`train(cfg, stream=...)` takes a factory, and the one here returns the configured stream
(`training.input.batches`, i.e. `ShardBatches` over the shards) with a clock around `next()`.
A step's wait is the time its `next()` held the loop: reading and packing the rows on the host
and placing them on the device. The step time is the trainer's own, from the tokens/s of each
`train.log_every`-step window in metrics.jsonl (those windows end on a device sync, so they are
the real throughput); a step "waited" when its `next()` took more than --threshold of the median.
The first `next()` (TF start-up, opening the shards) is reported apart.

    python bench/data_wait.py                                 # tiny preset, 500 steps, appends
    python bench/data_wait.py --steps 50 --docs 1000 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data.build import build  # noqa: E402
from quietreasoning.training.input import batches  # noqa: E402
from quietreasoning.training.trainer import train  # noqa: E402


class TimedStream:
    """The configured batch stream with the wall time of every `next()` recorded."""

    def __init__(self, inner):
        self.inner = inner
        self.waits: list[float] = []

    def next(self):
        t0 = time.perf_counter()
        batch = self.inner.next()
        self.waits.append(time.perf_counter() - t0)
        return batch

    def position(self):
        return self.inner.position()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=500, help="training steps in the timed run")
    p.add_argument("--docs", type=int, default=4000, help="documents in the embedded shard build")
    p.add_argument("--data-dir", default="", help="build (or reuse) the shards here; default: a temporary folder")
    p.add_argument("--threshold", type=float, default=0.05, help="a wait above this share of the median step counts")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value for the training run")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or os.path.join(tmp, "shards")
        base = load_config(args.preset, [f"data.docs={args.docs}", *args.overrides])
        t0 = time.perf_counter()
        manifest = build(base.data, data_dir, vocab_size=base.model.vocab_size, progress=False, log=lambda *_: None)
        build_s = time.perf_counter() - t0
        # one checkpoint, at the end: a background write must not land inside the timed steps
        cfg = load_config(args.preset, [f"data.docs={args.docs}", "data.source=tfrecord",
                                        f"data.pretrain_pattern={os.path.join(data_dir, '*.tfrecord*')}",
                                        f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
                                        f"run.out_dir={os.path.join(tmp, 'runs')}", *args.overrides])
        streams: list[TimedStream] = []

        def stream(cfg, batch_sharding, position, log=print):
            streams.append(TimedStream(batches(cfg, batch_sharding, position, log)))
            return streams[-1]

        t0 = time.perf_counter()
        result = train(cfg, measure_roof=False, progress=False, stream=stream)
        run_s = time.perf_counter() - t0

    t = cfg.train
    waits = np.asarray(streams[-1].waits)
    first, rest = waits[0], waits[1:]  # the first next() opens the shards and starts TF
    tokens = t.global_batch * t.seq_len
    step_s = np.asarray([tokens / h["tokens_per_s"] for h in result.history if h.get("tokens_per_s")])
    median_step = float(np.median(step_s))
    slow = int(np.sum(rest > args.threshold * median_step))
    load = os.getloadavg()
    lines = [
        f"Run: {args.preset} preset ({result.n_params / 1e6:.1f}M parameters, batch {t.global_batch} x {t.seq_len}), "
        f"{len(waits)} steps on {manifest['records']:,} documents ({manifest['tokens']:,} tokens, "
        f"{len(manifest['shards'])} TFRecord shards, built in {build_s:.0f} s); whole run {run_s:.0f} s with the "
        f"first step's compile and the final checkpoint; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores.", "",
        "| what | value |", "|---|---:|",
        f"| step time, median of {len(step_s)} windows of {t.log_every} steps (trainer's tokens/s) | "
        f"{median_step * 1e3:.0f} ms |",
        f"| first next() (opens the shards, starts TF) | {first * 1e3:.0f} ms |",
        f"| next(), steps 2-{len(waits)}: median / mean / p99 / max | {np.median(rest) * 1e3:.2f} / "
        f"{rest.mean() * 1e3:.2f} / {np.percentile(rest, 99) * 1e3:.2f} / {rest.max() * 1e3:.1f} ms |",
        f"| total wait, steps 2-{len(waits)} | {rest.sum():.2f} s |",
        f"| wait as a share of step time (mean next() / median step) | {rest.mean() / median_step:.2%} |",
        f"| steps whose next() took > {args.threshold:.0%} of the median step "
        f"({args.threshold * median_step * 1e3:.0f} ms) | {slow} of {len(rest)} |",
        f"| median step / median next() (how far the reader is ahead) | {median_step / np.median(rest):,.0f}x |",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        append_section(args.doc, f"Data wait in a training run, {args.preset} preset", "bench/data_wait.py", argv,
                       "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
