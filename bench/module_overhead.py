"""Train-step time of a preset with each model module on, and all on, as a ratio to the bare
trunk measured in the same process (target: all on <= 1.3x).

    python bench/module_overhead.py                    # small preset, appends to docs/benchmarks.md
    python bench/module_overhead.py --preset tiny --steps 3 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section, time_train_step  # noqa: E402

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
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one compile step)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = p.parse_args(argv)
    rows = []
    for name, extra in VARIANTS.items():
        r = time_train_step(args.preset, args.steps, [*args.overrides, *extra])
        rows.append((name, r))
        print(f"{name}: {r['step_s']:.4f} s/step, {r['params'] / 1e6:.1f}M params", flush=True)
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
