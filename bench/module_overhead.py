"""Train-step time of a preset with each model module on, and all on, as a ratio to the bare
trunk measured in the same process (target: all on <= 1.3x).

Every variant is built and compiled first; then the timed steps go round the variants in turns
(bare, workspace, ..., all on, bare, ...), so a shared machine's slow minutes hit every variant
alike instead of whichever ran last. Each variant's time is the median of its turns.

    python bench/module_overhead.py                    # small preset, appends to docs/benchmarks.md
    python bench/module_overhead.py --preset tiny --steps 3 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, StepTimer, append_section  # noqa: E402

# module sizes for the small preset (12 layers): written after block 6, read at 6 and 9, two experts
WORKSPACE = ["model.workspace=true", "model.ws_layer=6", "model.ws_read_layers=[6,9]", "model.ws_chunk=64",
             "model.ws_slots=16", "model.ws_dim=128"]
VARIANTS = {
    "bare trunk": [],
    "+ workspace": WORKSPACE,
    "+ SSM experts (2)": ["model.ssm_layers=[6,9]"],
    "+ adapters (3, LoRA r8 + IA3)": ["model.adapters=[general,math,code]", "model.lora_rank=8"],
    "+ workspace + router": [*WORKSPACE, "model.router=true"],
    "all on": [*WORKSPACE, "model.router=true", "model.ssm_layers=[6,9]", "model.adapters=[general,math,code]",
               "model.lora_rank=8"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=5, help="timed turns per variant (after one compile step)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = p.parse_args(argv)
    timers = {}
    for name, extra in VARIANTS.items():
        timers[name] = StepTimer(args.preset, [*args.overrides, *extra])
        print(f"{name}: compiled in {timers[name].compile_s:.1f} s", flush=True)
    for turn in range(args.steps):
        for name, timer in timers.items():
            print(f"turn {turn + 1}/{args.steps} {name}: {timer.step():.4f} s", flush=True)
    rows = [(name, timer.result()) for name, timer in timers.items()]
    base = rows[0][1]["step_s"]
    lines = ["| variant | params | step (s) | vs bare |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['params'] / 1e6:.1f}M | {r['step_s']:.4f} | {r['step_s'] / base:.2f}x |" for n, r in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, f"Module overhead, {args.preset} preset", "bench/module_overhead.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
