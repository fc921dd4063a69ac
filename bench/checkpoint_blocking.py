"""How long a checkpoint save holds the training loop, against one train step of the same state
(target: an async save blocks for <= 5% of a step).

One process builds a preset's train state (parameters, AdamW moments, step; one device), compiles
its train step and times --steps steps. Then, --saves times: `Checkpointer.save` with async on
(the blocking part: the time until `save` returns, which is what the trainer's loop waits for;
the previous save has finished, as it has when checkpoint.every spans many steps), one train
step while the write runs in the background, and the rest of that write; then the same number
of sync saves (the whole write blocks) for contrast. Every save is preceded by a sync on the
state, so only the save's own time is counted. Median of each.

    python bench/checkpoint_blocking.py                       # small preset, appends
    python bench/checkpoint_blocking.py --preset tiny --steps 2 --saves 2 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, StepTimer, append_section  # noqa: E402

from quietreasoning.training.checkpoint import Checkpointer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=3, help="timed train steps before the saves (after the compile step)")
    p.add_argument("--saves", type=int, default=3, help="async saves, and sync saves, timed")
    p.add_argument("--dir", default="", help="checkpoint folder (default: a temporary one on this machine's disk)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)

    timer = StepTimer(args.preset, args.overrides)
    print(f"compiled in {timer.compile_s:.1f} s", flush=True)
    for i in range(args.steps):
        print(f"step {i + 1}/{args.steps}: {timer.step():.2f} s", flush=True)
    step_s = float(np.median(timer.times))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(timer.state))

    blocking, during, background, sync = [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        meta = lambda step: {"stage": "bench", "step": step, "config": timer.cfg.to_dict()}
        ckpt = Checkpointer(os.path.join(tmp, "async"), max_to_keep=2, async_save=True)
        for i in range(args.saves):
            jax.block_until_ready(timer.state)
            t0 = time.perf_counter()
            ckpt.save(timer.calls, timer.state, meta(timer.calls))
            blocking.append(time.perf_counter() - t0)
            during.append(timer.step())  # the step the loop runs next, while the write goes on (step_s is taken)
            t0 = time.perf_counter()
            ckpt.manager.wait_until_finished()
            background.append(time.perf_counter() - t0)
            print(f"async save {i + 1}: blocked {blocking[-1]:.3f} s, next step {during[-1]:.2f} s, "
                  f"write still running after it {background[-1]:.2f} s", flush=True)
        ckpt.close()
        ckpt = Checkpointer(os.path.join(tmp, "sync"), max_to_keep=2, async_save=False)
        for i in range(args.saves):
            jax.block_until_ready(timer.state)
            t0 = time.perf_counter()
            ckpt.save(timer.calls + i, timer.state, meta(timer.calls + i))
            sync.append(time.perf_counter() - t0)
            print(f"sync save {i + 1}: {sync[-1]:.2f} s", flush=True)
        ckpt.close()

    med = lambda xs: float(np.median(xs))
    m, t = timer.cfg.model, timer.cfg.train
    load = os.getloadavg()
    lines = [
        f"State: {args.preset} preset ({timer.ts.n_params / 1e6:.1f}M parameters, d_model {m.d_model}, {m.n_layers} "
        f"layers, batch {t.global_batch} x {t.seq_len}); train state (parameters + AdamW moments + step) "
        f"{state_bytes / 2**20:,.0f} MiB on one device; checkpoints on the local disk; medians of {args.steps} steps "
        f"and {args.saves} saves of each kind; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"on {os.cpu_count()} cores.", "",
        "| what | time (s) | vs one step |", "|---|---:|---:|",
        f"| train step (median) | {step_s:.3f} | 1.00x |",
        f"| async save: blocks the loop | {med(blocking):.3f} | {med(blocking) / step_s:.2%} |",
        f"| train step while the async write runs | {med(during):.3f} | {med(during) / step_s:.2f}x |",
        f"| async write still running after that step | {med(background):.3f} | {med(background) / step_s:.2f}x |",
        f"| sync save: blocks the loop | {med(sync):.3f} | {med(sync) / step_s:.2%} |",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        append_section(args.doc, f"Checkpoint save blocking, {args.preset} preset", "bench/checkpoint_blocking.py",
                       argv, "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
