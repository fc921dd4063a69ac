"""Decoding cost with and without the KV cache, and what each cache setting holds per token.

For each context length (prompt + new tokens), one batch of random prompts decodes exactly
--new-tokens tokens (no <eos> stop) with `training/inference.decode`:
  recompute   no cache: `Trunk.forward` over the whole buffer at every step (the reference decoder)
  cache       prefill once, then one-token steps from an unquantised cache (the compute dtype)
  int8, int4  the same with int8 / int4 codes (memory/kv_cache.py: keys per channel, values per token)
  snapkv      SnapKV keeping --keep of the prompt positions per head (window from the config), and
              snapkv+int8, its second compression tier
Each mode is also timed decoding one token (prefill + one step); the difference, over the
--new-tokens - 1 further steps, is the per-token step time without the prefill (the speed of
decoding itself, which the whole call hides when the prefill dominates).
Every mode is compiled by one untimed call, then all modes are timed in turns (the machine is
shared; ratios within one run are what to read); a mode's time is the median of its turns. The
model is freshly initialised (the cost of decoding does not depend on what the model knows).
KV bytes per token come from `kv_cache.store_bytes_per_token` (codes and scales; the unquantised
newest key group excluded), and "held" is the bytes one row's cache holds at the end.

    python bench/decode.py                                   # tiny preset, 512 and 2048, appends
    python bench/decode.py --contexts 512 --turns 2 --no-append
    python bench/decode.py --contexts 2048 --modes cache int8 --no-append   # skip the slow recompute
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.memory.kv_cache import KVSettings, store_bytes_per_token  # noqa: E402
from quietreasoning.model.trunk import Trunk  # noqa: E402
from quietreasoning.training.inference import decode  # noqa: E402


def modes(cfg, keep: float) -> dict[str, dict]:
    base = KVSettings.from_config(cfg.serve)
    plain = KVSettings(group=base.group, window=base.window, kernel=base.kernel)
    return {
        "recompute": {"recompute": True},
        "cache": {"kv": plain},
        "int8": {"kv": KVSettings(bits=8, group=base.group)},
        "int4": {"kv": KVSettings(bits=4, group=base.group)},
        f"snapkv {keep:g}": {"kv": KVSettings(keep=keep, group=base.group, window=base.window, kernel=base.kernel)},
        f"snapkv {keep:g} + int8": {"kv": KVSettings(bits=8, keep=keep, group=base.group, window=base.window,
                                                     kernel=base.kernel)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="prompt + new tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.3, help="SnapKV share of prompt positions kept")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=None,
                   help="modes to time (default: all): recompute, cache, int8, int4, 'snapkv K', 'snapkv K + int8'")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)

    cfg = load_config(args.preset, args.overrides)
    m = cfg.model
    rng = np.random.default_rng(0)
    table = modes(cfg, args.keep)
    if args.modes:
        unknown = [name for name in args.modes if name not in table]
        if unknown:
            p.error(f"--modes {unknown}: not a mode; choose from {list(table)}")
        table = {name: how for name, how in table.items() if name in args.modes}
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the step time is measured over the tokens after the first)")
    model = Trunk(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    prompts = {c: rng.integers(4, m.vocab_size, (args.batch, c - args.new_tokens)).tolist() for c in args.contexts}

    def run(context, name, new=args.new_tokens):
        t0 = time.perf_counter()
        out = decode(model, prompts[context], max_new_tokens=new, eos_id=None, **table[name])
        assert all(len(x) == new for x in out.new)
        return time.perf_counter() - t0, out

    held = {}
    for c in args.contexts:
        for name in table:
            seconds, out = run(c, name)
            held[c, name] = out.kv_bytes[0] if name != "recompute" else None
            run(c, name, 1)
            print(f"context {c} {name}: first call (compiles) {seconds:.1f} s", flush=True)
    times = {(c, name): [] for c in args.contexts for name in table}
    one = {(c, name): [] for c in args.contexts for name in table}
    for turn in range(args.turns):
        for c in args.contexts:
            for name in table:
                times[c, name].append(run(c, name)[0])
                one[c, name].append(run(c, name, 1)[0])
        print(f"turn {turn + 1}/{args.turns} done", flush=True)

    unquantised = store_bytes_per_token(m.n_layers, m.n_kv_heads, m.resolved_head_dim, KVSettings(), m.compute_dtype)
    lines = [f"Model: {args.preset} preset ({m.d_model} wide, {m.n_layers} layers, {m.n_kv_heads} kv heads of "
             f"{m.resolved_head_dim}), {m.compute_dtype} compute, batch {args.batch}, {args.new_tokens} new tokens "
             f"per row after a prompt of context - {args.new_tokens} tokens; median of {args.turns} turns.", "",
             "| context | mode | call (s) | new tokens/s | vs recompute | prefill + 1 token (s) | step (ms) "
             "| step vs cache | KV bytes/token | vs unquantised | held per row (KiB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    step = {k: (float(np.median(times[k])) - float(np.median(one[k]))) / (args.new_tokens - 1) for k in times}
    for c in args.contexts:
        base = float(np.median(times[c, "recompute"])) if "recompute" in table else None
        for name, how in table.items():
            t = float(np.median(times[c, name]))
            vs_recompute = f"{base / t:.1f}x" if base else "-"
            vs_cache = f"{step[c, name] / step[c, 'cache']:.2f}x" if "cache" in table else "-"
            kv = how.get("kv")
            if kv is None:
                per_token = "-"
                share = "-"
                kib = "-"
            else:
                bytes_now = held[c, name] / c  # per token of context: SnapKV holds fewer tokens than it saw
                per_token = f"{bytes_now:,.0f}"
                share = f"{bytes_now / unquantised:.2f}"
                kib = f"{held[c, name] / 1024:,.0f}"
            lines.append(f"| {c} | {name} | {t:.2f} | {args.batch * args.new_tokens / t:,.1f} | {vs_recompute} "
                         f"| {float(np.median(one[c, name])):.2f} | {step[c, name] * 1e3:.1f} | {vs_cache} "
                         f"| {per_token} | {share} | {kib} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        append_section(args.doc, f"Decoding with the KV cache, {args.preset} preset", "bench/decode.py", argv,
                       "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
