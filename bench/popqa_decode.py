"""Closed-book PopQA decoding cost: questions/s and new tokens/s of `training/inference.generate`
(KV-cached: one prefill, then one-token steps) at a few batch sizes, one device, in one process.

The prompts are real: synthetic PopQA questions (data/tasks.py) in the training documents' form,
tokenised by a BPE tokenizer trained on the facts with the preset's vocabulary. The model is
freshly initialised (decoding cost does not depend on what it knows); every row decodes exactly
--new-tokens tokens (no <eos> stop), so the token counts are exact. Each batch size is compiled
first, then timed in turns with the others; its time is the median of its turns.

Reference in the same turns: one jitted forward over the same buffer (hidden states at every
position, logits at each row's last token), which is what one step of the recomputing decoder
costs at best; "step / forward" well below 1 is what the KV cache saves (bench/decode.py compares
the two decoders directly).

    python bench/popqa_decode.py                        # tiny preset, appends to docs/benchmarks.md
    python bench/popqa_decode.py --batches 1 8 --turns 2 --no-append
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

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data import tasks  # noqa: E402
from quietreasoning.eval.popqa import prompt_ids  # noqa: E402
from quietreasoning.model.trunk import Trunk  # noqa: E402
from quietreasoning.training.inference import bucket_shape, generate  # noqa: E402
from quietreasoning.utils.tokenizer import train_tokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="questions decoded together")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per question")
    p.add_argument("--turns", type=int, default=3, help="timed calls per batch size (after one compile call)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)

    cfg = load_config(args.preset, args.overrides)
    records = tasks.popqa_records(0)
    tokenizer = train_tokenizer([tasks.fact_document(r).text for r in records], cfg.model.vocab_size)
    prompts = [prompt_ids(tokenizer, r["question"]) for r in records]
    lengths = [len(x) for x in prompts]
    print(f"{len(prompts)} prompts, {np.mean(lengths):.1f} tokens on average (max {max(lengths)})", flush=True)

    with jax.default_device(jax.devices()[0]):
        model = Trunk(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        rng = np.random.default_rng(0)
        picks = {b: [[prompts[i] for i in rng.choice(len(prompts), b, replace=False)] for _ in range(args.turns + 1)]
                 for b in args.batches}

        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, tokens, lengths):
            m = nnx.merge(graphdef, state)
            index = jnp.arange(tokens.shape[1])
            segment_ids = (index[None] < lengths[:, None]).astype(jnp.int32)
            hidden = m.hidden(tokens, segment_ids, jnp.broadcast_to(index, tokens.shape))
            return m.logits(jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0])

        def buffer(batch):
            rows, length = bucket_shape(len(batch), max(len(x) for x in batch), args.new_tokens)
            tokens = np.zeros((rows, length), np.int32)
            for r, x in enumerate(batch):
                tokens[r, :len(x)] = x
            return tokens, np.array([len(x) for x in batch] + [1] * (rows - len(batch)), np.int32)

        def run(batch):
            t0 = time.perf_counter()
            out = generate(model, batch, max_new_tokens=args.new_tokens, eos_id=None)
            assert all(len(o) == args.new_tokens for o in out)
            return time.perf_counter() - t0

        def run_forward(batch, repeats=5):
            tokens, lengths = buffer(batch)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                forward(state, tokens, lengths).block_until_ready()
                times.append(time.perf_counter() - t0)
            return float(np.median(times))

        compile_s = {}
        for b in args.batches:
            compile_s[b] = run(picks[b][0])
            run_forward(picks[b][0], repeats=1)
            print(f"batch {b}: first call (compiles) {compile_s[b]:.1f} s", flush=True)
        times: dict[int, list[float]] = {b: [] for b in args.batches}
        forward_times: dict[int, list[float]] = {b: [] for b in args.batches}
        for turn in range(1, args.turns + 1):
            for b in args.batches:
                times[b].append(run(picks[b][turn]))
                forward_times[b].append(run_forward(picks[b][turn]))
                print(f"turn {turn}/{args.turns} batch {b}: {times[b][-1]:.3f} s, forward "
                      f"{1000 * forward_times[b][-1]:.1f} ms", flush=True)

    lines = [f"Model: {args.preset} preset, {sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 1e6:.1f}M "
             f"parameters, {cfg.model.compute_dtype} compute; {args.new_tokens} new tokens per question; "
             f"prompts {np.mean(lengths):.1f} tokens on average.", "",
             "| batch | buffer (rows x length) | first call (s) | batch (s) | step (ms) | forward (ms) "
             "| step / forward | questions/s | new tokens/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in args.batches:
        rows, length = bucket_shape(b, max(len(x) for x in picks[b][1]), args.new_tokens)
        t, fwd = float(np.median(times[b])), float(np.median(forward_times[b]))
        step = t / args.new_tokens
        lines.append(f"| {b} | {rows} x {length} | {compile_s[b]:.1f} | {t:.3f} | {1000 * step:.1f} | "
                     f"{1000 * fwd:.1f} | {step / fwd:.2f} | {b / t:.1f} | {b * args.new_tokens / t:,.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, f"PopQA closed-book decoding, {args.preset} preset", "bench/popqa_decode.py", argv,
                       "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
