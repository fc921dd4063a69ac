"""Train-step throughput and MFU against the machine's measured matmul roof, in one process.

    python bench/train_throughput.py                 # tiny and small, appends to docs/benchmarks.md
    python bench/train_throughput.py --presets tiny --steps 3 --no-append

The roof is a jitted (2048, 2048) @ (2048, 2048) matmul on one device, median of several runs,
with float32 and with bfloat16 inputs (float32 accumulation both): the faster is the roof,
measured before and after the train steps, and the higher of the two measurements is used.
MFU = model FLOP/s per device / roof. Model FLOPs per token follow the PaLM accounting
(6 x matmul parameters + 12 x layers x heads x head_dim x seq_len), no rematerialisation counted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import numpy as np

from quietreasoning.config import load_config
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.model.trunk import flops_per_token
from quietreasoning.training import sharding
from quietreasoning.training.roofline import matmul_roofs
from quietreasoning.training.train_step import put_batch, setup

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")


def cpu_name() -> str:
    """The CPU model and whether it has native bf16 (which decides the faster roof dtype)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown")
    return f"{name} (avx512_bf16: {'yes' if 'avx512_bf16' in info else 'no'})"


def machine() -> str:
    device = "" if jax.default_backend() == "cpu" else f"{jax.devices()[0].device_kind} on "
    return (f"{device}{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}, "
            f"backend {jax.default_backend()}, {len(jax.devices())} device(s)")


def append_section(doc: str, title: str, script: str, argv, body: str) -> None:
    """Appends `## title (date)` with the command that ran and the machine, then `body`."""
    cmd = f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (f"\n## {title} ({datetime.date.today().isoformat()})\n\n"
               f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \n{body}\n")
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "a") as f:
        f.write(section)
    print(f"appended to {os.path.normpath(doc)}")


def time_train_step(preset: str, steps: int, overrides: list[str]) -> dict:
    cfg = load_config(preset, overrides)
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    t = cfg.train
    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, t.seed)
    batches = [put_batch(data.batch(i, t.global_batch, t.seq_len), ts.batch_sharding) for i in range(steps + 1)]
    with jax.set_mesh(mesh):
        state = ts.init()
        t0 = time.perf_counter()
        state, m = ts.step_fn(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for b in batches[1:]:
            t0 = time.perf_counter()
            state, m = ts.step_fn(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = t.global_batch * t.seq_len
    fpt = flops_per_token(cfg.model, t.seq_len)
    return {"preset": preset, "params": ts.n_params, "tokens_per_step": tokens, "step_s": step_s,
            "compile_s": compile_s, "tokens_per_s": tokens / step_s, "flops_per_s": fpt * tokens / step_s,
            "remat": cfg.model.remat, "dtype": cfg.model.compute_dtype}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per preset (after one compile step)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to the results file")
    p.add_argument("--doc", default=DOC, help="results file to append to (default: docs/benchmarks.md)")
    p.add_argument("--roof-n", type=int, default=2048,
                   help="matmul size for the roof (2048 fills a CPU; an accelerator needs 8192)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every preset")
    args = p.parse_args(argv)

    before = matmul_roofs(args.roof_n)
    rows = [time_train_step(preset, args.steps, args.overrides) for preset in args.presets]
    after = matmul_roofs(args.roof_n)  # the machine is shared: check the roof did not drift during the runs
    roof = max(*before.values(), *after.values())

    header = "| preset | params | tokens/step | step (s) | tokens/s | model GFLOP/s | MFU | compile (s) |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e9:.1f} | {r['flops_per_s'] / roof:.1%} | "
                     f"{r['compile_s']:.1f} |")
    fmt = lambda r: ", ".join(f"{d} {v / 1e9:.0f}" for d, v in r.items())
    roof_line = (f"matmul roof ({args.roof_n}^3, 1 device, GFLOP/s): before {fmt(before)}; after {fmt(after)}; "
                 f"roof used {roof / 1e9:.0f}")
    table = "\n".join(lines)
    print(roof_line)
    print(table)
    if not args.no_append:
        append_section(args.doc, "Train step throughput", "bench/train_throughput.py", argv, f"{roof_line}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
