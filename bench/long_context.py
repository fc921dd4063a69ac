"""Long-context retrieval under KV-cache compression, measured: a tiny trunk trained here on the
RULER-style tasks of eval/long_context.py, then answering the evaluation instances under every KV
mode (full, SnapKV 0.5 / 0.3 / 0.2, int8, int4, SnapKV 0.3 + int8) at two lengths (default 256 and
512 tokens: what the budget can teach), one process.

Training. A BPE tokenizer is trained in-process on lc.tokenizer_texts. A model trained on the tasks
alone sits at chance on the answer digits for a thousand steps and more here (one answer per row is
too thin a signal for attention to find the needle), so the run begins with --warmup-copy steps of
the copy task (64 random tokens, then the same 64 again, loss on the second half: the task that forms
induction heads, Olsson et al. 2022), and a quarter of every later batch's rows stay copy rows. The
task rows are fresh instances with uniformly random needle depths, from their own seed stream, never
the evaluation's (the evaluation seeds instances by [seed, task, length]; training by [seed, 1000 +
step]); a row is <bos> prompt answer <eos>, the loss on the answer and <eos> (weight 1) and on the
prompt (--prompt-weight, default 0). Tasks and lengths grow in STAGES (`plan`): niah_single at up to
160 tokens, then with niah_multikey at up to 256, then every task at up to 512; a row's length is
drawn between half its bucket and all of it. AdamW with warm-up and cosine
decay (training/optimizer.py) over as many steps as fit --minutes: four timed steps of every shape
fix the count before the real run (compilation counted once per shape).

Evaluation: eval/long_context.py `evaluate` on --n instances per task and length (seed --seed),
greedy, every mode; the table gives each mode's KV bytes per prompt token (model compute dtype,
SnapKV's kept share applied), compression and memory saving against full KV, the score per task
and length, and the drop in points. Seed targets (SPEC_FACTS): SnapKV <= 3 points at 5-10x
compression with >= 25% memory saved; <= 5 points with the second tier.

    python bench/long_context.py                               # 15 min training, appends to docs/benchmarks.md
    python bench/long_context.py --minutes 2 --n 4 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.eval import long_context as lc  # noqa: E402
from quietreasoning.memory import kv_cache  # noqa: E402
from quietreasoning.training import sharding  # noqa: E402
from quietreasoning.training.train_step import put_batch, setup  # noqa: E402
from quietreasoning.utils import io  # noqa: E402
from quietreasoning.utils.tokenizer import train_tokenizer  # noqa: E402

COPY = (128, 32)  # warm-up rows (tokens, rows): 64 random tokens, then the same 64 again
BUCKETS = ((160, 32), (256, 24), (512, 12))  # task rows (tokens, rows)
STAGES = ((0.35, 0, ("niah_single",)),  # (share of the task steps, bucket, tasks): short and single first
          (0.25, 1, ("niah_single", "niah_multikey")),
          (0.40, 2, None))  # None: every task
COPY_SHARE = 0.25  # of every task batch's rows: copy rows, so the induction heads stay sharp
MODEL = ("model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=256",
         "model.compute_dtype=float32", "train.warmup_steps=50", "train.weight_decay=0.01", "train.lr=3e-3")
IMAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "images", "long_context.png")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "answer_mask")


def put_row(batch: dict, r: int, ids: list[int], weights: list[float]) -> None:
    """Row r of `batch`: `ids` from position 0, a target wherever a next token follows, and the
    loss weight of predicting token i + 1 at weights[i]."""
    n = len(ids)
    batch["inputs"][r, :n] = ids
    batch["targets"][r, :n - 1] = ids[1:]
    batch["segment_ids"][r, :n] = 1
    batch["positions"][r, :n] = np.arange(n)
    batch["loss_mask"][r, :n - 1] = weights


def copy_row(rng: np.random.Generator, vocab: int) -> tuple[list[int], list[float]]:
    """64 random token ids (specials excluded) repeated: the second half is predictable only by copying."""
    half = rng.integers(6, vocab, COPY[0] // 2).tolist()
    return half + half, [0.0] * (len(half) - 1) + [1.0] * len(half)


def task_row(tokenizer, rng: np.random.Generator, tasks, seq_len: int, prompt_weight: float):
    """A fresh instance (random task of `tasks`, length in [seq_len / 2, seq_len], random depth) as
    <bos> prompt answer <eos>: weight 1 on the answer and <eos>, `prompt_weight` on the prompt. A
    task whose template does not fit the drawn length is made at `seq_len` instead."""
    task = tasks[int(rng.integers(len(tasks)))]
    depth = float(rng.uniform())
    try:
        x = lc.synthetic_instance(task, tokenizer, int(rng.integers(seq_len // 2, seq_len + 1)), depth, rng)
    except lc.LongContextError:
        x = lc.synthetic_instance(task, tokenizer, seq_len, depth, rng)
    prompt, answer = list(x.prompt_ids), tokenizer.encode(x.target) + [tokenizer.eos_id]
    return prompt + answer, [prompt_weight] * (len(prompt) - 1) + [1.0] * len(answer)


def plan(steps: int, warmup: int) -> list[tuple[int, int, int]]:
    """Each step's (stage, tokens per row, rows): `warmup` copy steps (stage -1), then the task steps
    shared among STAGES in order."""
    out = [(-1, *COPY)] * min(warmup, steps)
    n = steps - len(out)
    ends = np.cumsum([share for share, _, _ in STAGES]) * n
    for i in range(n):
        stage = min(int(np.searchsorted(ends, i, side="right")), len(STAGES) - 1)
        out.append((stage, *BUCKETS[STAGES[stage][1]]))
    return out


def make_batch(tokenizer, rng: np.random.Generator, stage: int, seq_len: int, rows: int, prompt_weight: float) -> dict:
    """A step's rows: all copy rows in the warm-up (stage -1), else COPY_SHARE of them and the rest
    instances of the stage's tasks."""
    batch = {k: np.zeros((rows, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    copies = rows if stage < 0 else round(COPY_SHARE * rows)
    tasks = lc.TASKS if stage < 0 or STAGES[stage][2] is None else STAGES[stage][2]
    for r in range(rows):
        row = copy_row(rng, tokenizer.vocab_size) if r < copies else task_row(tokenizer, rng, tasks, seq_len,
                                                                             prompt_weight)
        put_row(batch, r, *row)
    return batch


def train(cfg, tokenizer, steps: list[tuple[int, int, int]], seed: int, prompt_weight: float, desc: str = "train",
          progress: bool = True) -> tuple[nnx.Module, list[float], dict]:
    """Trains a fresh Trunk of `cfg` through `steps` (see plan); returns (model, per-step losses,
    {(tokens, rows): [seconds of each step of that shape]})."""
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    losses, times = [], {}
    with jax.set_mesh(mesh):
        state = ts.init()
        bar = tqdm(steps, desc=desc, unit="step", dynamic_ncols=True, disable=not progress)
        for step, (stage, seq_len, rows) in enumerate(bar):
            rng = np.random.default_rng([seed, 1000 + step])
            start = time.perf_counter()
            batch = put_batch(make_batch(tokenizer, rng, stage, seq_len, rows, prompt_weight), ts.batch_sharding)
            state, metrics = ts.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
            times.setdefault((seq_len, rows), []).append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", len=seq_len)
    model = nnx.merge(ts.graphdef, jax.device_get(state["params"]))
    return model, losses, times


def fit_steps(seconds: float, warmup: int, times: dict) -> int:
    """The most steps whose plan takes at most `seconds`, at the median step time of each shape
    (the first step of a shape, its compilation, counted once)."""
    median = {shape: float(np.median(t[1:])) for shape, t in times.items()}
    compile_s = sum(t[0] - median[shape] for shape, t in times.items())

    def cost(n: int) -> float:
        return compile_s + sum(median[(seq_len, rows)] for _, seq_len, rows in plan(n, warmup))
    lo, hi = warmup + 10, warmup + 10
    while cost(hi) < seconds:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid)
    return lo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training time budget (ignored with --steps)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: as many as fit --minutes)")
    p.add_argument("--warmup-copy", type=int, default=200, help="copy-task steps before the task steps")
    p.add_argument("--lengths", default="256,512", help="evaluation lengths (prompt + answer allowance)")
    p.add_argument("--n", type=int, default=24, help="evaluation instances per task and length")
    p.add_argument("--modes", default=",".join(lc.MODES))
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (model.vocab_size)")
    p.add_argument("--prompt-weight", type=float, default=0.0, help="loss weight of prompt tokens (answer: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="also write results.json, tables.md and the plot here")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value after the bench's own (model.*, train.*, serve.*)")
    args = p.parse_args(argv)
    lengths = [int(v) for v in args.lengths.split(",")]
    modes = args.modes.split(",")
    lc.check_modes(modes)
    if max(lengths) > BUCKETS[-1][0]:
        raise SystemExit(f"--lengths {args.lengths}: the model trains on lengths up to {BUCKETS[-1][0]}")
    began = time.perf_counter()

    tokenizer = train_tokenizer(lc.tokenizer_texts(2000, args.seed + 1), args.vocab, seed=args.seed)
    overrides = [*MODEL, f"model.vocab_size={tokenizer.vocab_size}", f"train.seed={args.seed}",
                 f"train.seq_len={BUCKETS[-1][0]}", f"train.global_batch={BUCKETS[-1][1]}"]
    steps = args.steps
    if not steps:  # time 4 steps of every shape (the first one compiles), then fit the budget
        shapes = [(-1, *COPY)] + [(len(STAGES) - 1, *b) for b in BUCKETS]
        probe = load_config("tiny", [*overrides, "train.steps=16", *args.overrides])
        _, _, times = train(probe, tokenizer, [s for s in shapes for _ in range(4)], args.seed + 7,
                            args.prompt_weight, desc="timing")
        steps = fit_steps(args.minutes * 60, args.warmup_copy, times)
        print("seconds per step: " + ", ".join(f"{t}x{r}: {np.median(v[1:]):.2f}" for (t, r), v in times.items())
              + f"; {steps} steps fit {args.minutes:g} minutes", flush=True)
    cfg = load_config("tiny", [*overrides, f"train.steps={steps}", *args.overrides])
    schedule = plan(steps, args.warmup_copy)
    start = time.perf_counter()
    model, losses, _ = train(cfg, tokenizer, schedule, args.seed, args.prompt_weight)
    train_s = time.perf_counter() - start

    instances = [x for task in lc.TASKS for length in lengths
                 for x in lc.synthetic_instances(task, tokenizer, length, args.n, args.seed)]
    start = time.perf_counter()
    result = lc.evaluate(model, tokenizer, instances, cfg.serve, modes=modes, batch_size=args.batch_size)
    eval_s = time.perf_counter() - start
    table = lc.markdown_table(result)
    if args.output:
        print("wrote " + ", ".join(lc.write_outputs(result, args.output).values()))

    rows = {r["mode"]: r for r in result["modes"]}
    full = rows[modes[0]]
    verdicts = []
    if full["mean"] < 0.25:
        verdicts.append(f"not measurable: with full KV the model scores {100 * full['mean']:.1f}% (it did not learn "
                        "to retrieve in this budget), so no drop can show")
    for name, limit in (("snapkv0.3", 3.0), ("snapkv0.2", 3.0), ("snapkv0.3+int8", 5.0)):
        if name in rows:
            r = rows[name]
            met = r["drop_points"] <= limit and 1 - 1 / r["compression"] >= 0.25
            verdict = "n/a" if full["mean"] < 0.25 else "met" if met else "missed"
            verdicts.append(f"{name}: drop {r['drop_points']:+.1f} points at {r['compression']:.1f}x "
                            f"({1 - 1 / r['compression']:.0%} saved; target <= {limit:g} points: {verdict})")
    m, s = cfg.model, cfg.serve
    stages = "; ".join(f"{share:.0%} {', '.join(tasks or ('every task',))} at up to {BUCKETS[b][0]} tokens"
                       for share, b, tasks in STAGES)
    # the 3b preset caches bfloat16: the same modes against a bfloat16 full cache
    bf16 = kv_cache.store_bytes_per_token(m.n_layers, m.n_kv_heads, m.resolved_head_dim, lc.kv_settings(s, 16, 1.0),
                                          jnp.bfloat16)
    against_bf16 = ", ".join(f"{r['mode']} {bf16 / r['kv_bytes_per_token'] if r['bits'] < 16 else r['compression']:.1f}x"
                             for r in result["modes"] if r["mode"] != modes[0])
    body = "\n".join([
        f"Model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv heads, head_dim "
        f"{m.resolved_head_dim}), d_ff {m.d_ff}, {m.compute_dtype}, BPE vocabulary {tokenizer.vocab_size}; "
        f"{steps} steps ({min(args.warmup_copy, steps)} copy-task steps of {COPY[1]} x {COPY[0]} tokens, then task "
        f"batches of {', '.join(f'{r} x {t}' for t, r in BUCKETS)} tokens in stages ({stages}), a quarter of the "
        f"rows copy rows), lr "
        f"{cfg.train.lr:g}, prompt loss weight {args.prompt_weight:g}; trained {train_s / 60:.1f} min, loss of the "
        f"last 50 steps {np.mean(losses[-50:]):.3f}. Evaluation: {args.n} instances per "
        f"task and length (seed {args.seed}, never trained on), greedy, {len(modes)} modes in {eval_s / 60:.1f} "
        f"min; SnapKV window {s.snapkv_window}, kernel {s.snapkv_kernel}; int8/int4 groups of {s.kv_group} tokens. "
        f"Whole run {(time.perf_counter() - began) / 60:.1f} min.",
        "",
        table,
        "",
        f"Compression against a bfloat16 cache (what the 3b preset stores; the float32 model's full cache is "
        f"twice that): {against_bf16}.",
        "",
        "Against the seed targets (compression as measured, against the float32 cache): " + "; ".join(verdicts) + ".",
        "",
        "![long-context accuracy against KV bytes](images/long_context.png)",
    ])
    print(body)
    if not args.no_append:
        io.path(IMAGE).parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write_bytes(IMAGE, lc.plot_png(result))
        append_section(args.doc, "Long context under KV compression (RULER-style tasks)", "bench/long_context.py",
                       argv, "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
