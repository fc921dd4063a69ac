"""Held-out perplexity, KL divergence from the float model and weight bytes of a trained model
served in float, int8 and int4, with round-to-nearest (RTN) and activation-aware (AWQ) weight
quantisation, all measured in one process.

The model is the tiny preset trained for a few minutes on the embedded corpus through the data
pipeline: the shards are built (python -m quietreasoning.data build) with several per bucket; the
first shard of every bucket (`*-00000`) is held out and the model trains on the rest. Every variant
goes through the whole serving path: export_bundle (AWQ calibrates on serve.awq_calib_batches
batches of the training stream) -> load_bundle -> the loaded model on held-out batches: perplexity,
and the mean KL(float || variant) of the next-token distributions, which shows a deviation long
before perplexity moves. The data, the checkpoint and the bundles stay under --work-dir, so a
rerun reuses them (delete the directory to start over).

    python bench/awq.py                          # builds, trains 200 steps, appends to docs/benchmarks.md
    python bench/awq.py --steps 50 --eval-batches 2 --no-append
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.data.build import build  # noqa: E402
from quietreasoning.data.reader import ShardReader  # noqa: E402
from quietreasoning.data.shards import TOKENIZER  # noqa: E402
from quietreasoning.serve.awq import calibration_batches, empty_trunk  # noqa: E402
from quietreasoning.serve.bundle import export_bundle, load_bundle  # noqa: E402
from quietreasoning.training.train_step import lm_loss  # noqa: E402
from quietreasoning.training.trainer import train  # noqa: E402

VARIANTS = ((None, "float"), (8, "rtn"), (8, "awq"), (4, "rtn"), (4, "awq"))


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(model(batch["inputs"], batch["segment_ids"], batch["positions"]), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, state, batch, reference):
    """(cross-entropy sum, sum of KL(reference || model) per token, tokens) over the loss mask."""
    model = nnx.merge(graphdef, state)
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    _, ce = lm_loss(logits, batch["targets"], batch["loss_mask"], 0.0)
    kl = jnp.sum(jnp.exp(reference) * (reference - jax.nn.log_softmax(logits, axis=-1)), axis=-1)
    return ce, jnp.sum(kl * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def evaluate(model, batches, references) -> tuple[float, float]:
    """(perplexity, mean KL divergence in nats per token from the float model's next-token
    distribution `references`) over the held-out `batches`."""
    graphdef, state = nnx.split(model)
    ce = kl = tokens = 0.0
    for batch, reference in zip(batches, references):
        c, k, n = _scores(graphdef, state, batch, reference)
        ce, kl, tokens = ce + float(c), kl + float(k), tokens + float(n)
    return float(np.exp(ce / tokens)), kl / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--work-dir", default="/tmp/qr_bench_awq")
    p.add_argument("--steps", type=int, default=200, help="training steps (a few minutes for tiny on 2 cores)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for perplexity")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    data = os.path.join(work, "data")
    base = load_config(args.preset, ["data.records_per_shard=300", *args.overrides])
    t0 = time.perf_counter()
    manifest = build(base.data, data, vocab_size=base.model.vocab_size, seed=base.train.seed, progress=False,
                     log=lambda *_: None)
    print(f"data: {manifest['records']:,} documents, {manifest['tokens']:,} tokens ({time.perf_counter() - t0:.0f} s)")

    cfg = load_config(args.preset, [
        "data.records_per_shard=300", "data.source=tfrecord", f"data.pretrain_pattern={data}/*-0000[1-9].tfrecord*",
        f"run.out_dir={work}", "run.name=model", f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
        "checkpoint.async_save=false", *args.overrides])
    t0 = time.perf_counter()
    result = train(cfg, measure_roof=False)
    train_s = time.perf_counter() - t0
    model = empty_trunk(cfg.model)
    nnx.update(model, jax.device_get(result.state["params"]))
    loss = f"final train loss {result.final_loss:.3f}" if result.history else "resumed, nothing to train"
    print(f"model: {result.n_params:,} parameters, {result.final_step} steps ({loss}, {train_s:.0f} s)")

    held_out = ShardReader(f"{data}/*-00000.tfrecord*", cfg.train.seq_len, cfg.train.global_batch, seed=cfg.train.seed)
    eval_batches = [{k: jnp.asarray(v) for k, v in held_out.next_batch().items()} for _ in range(args.eval_batches)]
    eval_tokens = int(sum(b["loss_mask"].sum() for b in eval_batches))
    references = [_log_probs(*nnx.split(model), b) for b in eval_batches]
    calib = calibration_batches(cfg)

    rows, errors = [], {}
    for bits, method in VARIANTS:
        name = "float" if bits is None else f"int{bits} {method.upper()}"
        out = os.path.join(work, "bundles", name.replace(" ", "_"))
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        exported = export_bundle(model, cfg, os.path.join(data, TOKENIZER), out, bits=bits,
                                 calib_batches=calib if method == "awq" else None, method=method)
        export_s = time.perf_counter() - t0
        ppl, kl = evaluate(load_bundle(out).model, eval_batches, references)
        search = exported["report"].get("layers")
        if search:  # the mean relative matmul output error on the calibration rows, AWQ and RTN alike
            errors[bits] = {m: np.mean([r[f"{m}_error"] for r in search]) for m in ("awq", "rtn")}
        size = exported["bytes"]
        rows.append((name, bits, method, ppl, kl, size["quantized"], size["disk"], size["matmul_quantized"], export_s))
        print(f"{name}: perplexity {ppl:.3f}, KL to float {kl:.2e}, weights {size['quantized'] / 1e6:.2f} MB, "
              f"export {export_s:.1f} s", flush=True)

    float_ppl, float_bytes = rows[0][3], rows[0][5]
    srv = cfg.serve
    lines = [f"Model: {args.preset} preset, {result.n_params / 1e6:.1f}M parameters, trained {result.final_step} steps "
             f"on the embedded corpus (first shard of each bucket held out); perplexity and KL(float || variant) "
             f"over {eval_tokens:,} held-out tokens, {cfg.model.compute_dtype} compute. Quantised: the 7 block "
             f"matmuls per layer (group {srv.awq_group}, asymmetric, float32 scales + uint8 zeros); embedding, head "
             f"and norms stay {cfg.model.param_dtype}. AWQ: {srv.awq_calib_batches} calibration batches of the "
             f"training stream, {srv.awq_grid} alphas. Matmul error: mean over the block matmul groups of "
             "||X W - X W_q||^2 / ||X W||^2 on the calibration rows (the quantity AWQ minimises; RTN's on the same "
             "rows).", "",
             "| weights | held-out ppl | vs float | KL to float (nats/token) | matmul error | block matmuls (MB) "
             "| all weights (MB) | vs float | bundle on disk (MB) | export (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, bits, method, ppl, kl, total, disk, matmuls, export_s in rows:
        error = f"{errors[bits][method]:.2e}" if bits in errors else "-"
        lines.append(f"| {name} | {ppl:.3f} | {ppl / float_ppl - 1:+.2%} | {kl:.2e} | {error} | {matmuls / 1e6:.2f} | "
                     f"{total / 1e6:.2f} | {total / float_bytes:.2f}x | {disk / 1e6:.2f} | {export_s:.1f} |")
    kls = {(bits, method): kl for _, bits, method, _, kl, *_ in rows}
    lines += ["", "AWQ against RTN at the same bits (negative: AWQ closer to float): " + "; ".join(
        f"int{bits} matmul error {errors[bits]['awq'] / errors[bits]['rtn'] - 1:+.1%}, "
        f"KL {kls[bits, 'awq'] / kls[bits, 'rtn'] - 1:+.1%}" for bits in sorted(errors, reverse=True)) + "."]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, f"AWQ weight quantisation, {args.preset} preset", "bench/awq.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
