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


class StepTimer:
    """One preset (with overrides) built, initialised and compiled on one device; `step()` runs and
    times one train step. Several timers can live in one process, so variants are timed in turns."""

    def __init__(self, preset: str, overrides: list[str], n_batches: int = 4):
        cfg = load_config(preset, overrides)
        self.cfg, self.preset = cfg, preset
        self.mesh = sharding.make_mesh(cfg, jax.devices()[:1])
        self.ts = setup(cfg, self.mesh)
        t = cfg.train
        data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, t.seed)
        self.batches = [put_batch(data.batch(i, t.global_batch, t.seq_len), self.ts.batch_sharding)
                        for i in range(n_batches)]
        self.times: list[float] = []
        self.calls = 0
        with jax.set_mesh(self.mesh):
            self.state = self.ts.init()
        self.compile_s = self._run()

    def _run(self) -> float:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            self.state, m = self.ts.step_fn(self.state, batch)
            jax.block_until_ready(m)
            return time.perf_counter() - t0

    def step(self) -> float:
        self.times.append(self._run())
        return self.times[-1]

    def result(self) -> dict:
        t = self.cfg.train
        step_s = float(np.median(self.times))
        tokens = t.global_batch * t.seq_len
        fpt = flops_per_token(self.cfg.model, t.seq_len)
        return {"preset": self.preset, "params": self.ts.n_params, "tokens_per_step": tokens, "step_s": step_s,
                "compile_s": self.compile_s, "tokens_per_s": tokens / step_s, "flops_per_s": fpt * tokens / step_s,
                "remat": self.cfg.model.remat, "dtype": self.cfg.model.compute_dtype}


def time_train_step(preset: str, steps: int, overrides: list[str]) -> dict:
    """Median time of `steps` train steps after the compile step."""
    timer = StepTimer(preset, overrides, n_batches=steps + 1)
    for _ in range(steps):
        timer.step()
    return timer.result()


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
