"""Time to the first train step of a preset in a fresh process with no persistent compilation
cache (target for tiny: <= 20 s on 2 cores).

Each run is a new Python process (so nothing is compiled yet and no in-memory cache exists),
started with JAX_COMPILATION_CACHE_DIR removed from its environment and
JAX_ENABLE_COMPILATION_CACHE=false (tests/conftest.py sets a cache directory for test sessions;
it must not leak in), pinned to --cores CPUs. The child times its imports, building the train
state (`train_step.setup` + init on one device, as bench/train_throughput.py does), the first train
step (trace + lower + compile + run) and a second step (run only); first - second is the compile.

    python bench/compile_time.py                  # tiny, 3 fresh processes, appends
    python bench/compile_time.py --runs 1 --no-append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(__file__))


def child(preset: str, overrides: list[str]) -> None:
    """Runs in the fresh process: prints one JSON line of timings."""
    from jax._src import compilation_cache  # the imports are part of what a user waits for
    from train_throughput import StepTimer

    imported = time.perf_counter()
    if compilation_cache.is_persistent_cache_enabled():
        raise SystemExit("compile_time: a persistent compilation cache is enabled in the child; unset "
                         "JAX_COMPILATION_CACHE_DIR / jax_compilation_cache_dir and rerun")
    timer = StepTimer(preset, overrides)  # builds, inits, and runs the first step
    second = timer.step()
    print(json.dumps({"import_s": imported - T0, "first_step_s": timer.compile_s, "second_step_s": second,
                      "to_first_step_s": time.perf_counter() - T0 - second, "cpus": len(os.sched_getaffinity(0))}))


def main(argv=None) -> int:
    from train_throughput import DOC, append_section

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--runs", type=int, default=3, help="fresh processes timed")
    p.add_argument("--cores", type=int, default=2, help="CPUs each process is pinned to")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    if args.child:
        child(args.preset, args.overrides)
        return 0

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    cpus = sorted(os.sched_getaffinity(0))[:args.cores]
    runs = []
    for i in range(args.runs):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", args.preset, *args.overrides]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        if out.returncode:
            sys.exit(f"compile_time: the child process failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}/{args.runs}: {runs[-1]}", flush=True)

    med = lambda k: float(np.median([r[k] for r in runs]))
    load = os.getloadavg()
    lines = [
        f"{args.runs} fresh processes, each pinned to {runs[0]['cpus']} CPU(s), no persistent compilation cache; "
        f"{args.preset} preset on one device; medians (each run: "
        + ", ".join(f"{r['first_step_s']:.1f}" for r in runs) + " s to the first step's end); load average "
        f"at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores.", "",
        "| what | time (s) |", "|---|---:|",
        f"| imports (jax, flax, the package) | {med('import_s'):.1f} |",
        f"| first train step (trace, lower, compile, run) | {med('first_step_s'):.1f} |",
        f"| second train step (run only) | {med('second_step_s'):.2f} |",
        f"| compile: first - second step | {med('first_step_s') - med('second_step_s'):.1f} |",
        f"| process start to the end of the first step (imports, state init, first step) | "
        f"{med('to_first_step_s'):.1f} |",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        append_section(args.doc, f"Compile time, {args.preset} preset", "bench/compile_time.py", argv, "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
