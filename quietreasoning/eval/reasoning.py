"""Reasoning evaluation: train a small model on a generated task with a latent recipe, then measure
what the thoughts buy.

    python -m quietreasoning.eval.reasoning --task varassign --recipe coconut|codi|stochastic --minutes 20 \\
        --output runs/reasoning/varassign [--config tiny] [model.d_model=192 latent.k_max=4 ...]

Measured on the task's held-out `test` split (and with --n-ood on `ood`, harder, at K = 0, the
best K and chain of thought):
  accuracy at K    the answer after `question <bot> [K thoughts] <eot>` (greedy) equals the gold
                   answer exactly; K = 0 is the empty block `<bot><eot>`, the same model answering
                   at once
  CoT accuracy     the model writes its own chain of thought after the question (no think block)
                   and the answer after it; for the coconut recipe this is the stage-0 model (the
                   chain-of-thought teacher the curriculum starts from)
  latent advantage accuracy at the best K minus accuracy at K = 0
  helped / hurt    questions right at the best K and wrong at K = 0, and the reverse
  questions/s      answered per second in each mode (the same batch size for all; compilation
                   excluded by a warm-up call)
  leakage          the share of whitespace tokens of the answer-only generations that belong to the
                   task's rationale lexicon (data/tasks.rationale_lexicon); "n/a" where the lexicon
                   is empty
Tables: a CoDi-style one (reasoning vs none: accuracy, throughput, helped/hurt), accuracy by
difficulty slice, a Coconut-style one (accuracy after each curriculum stage, in that stage's own
mode), and for prosqa / multiplication our accuracy on the shared public validation sets
(data/benchmarks.py; never trained on) beside the published rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from quietreasoning import cli
from quietreasoning.config import ConfigError, load_config

STOCHASTIC_SHARE = 0.25  # of the training steps, for the REINFORCE loop after the curriculum
MODEL_DEFAULTS = ("model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                  "model.d_ff=384", "model.compute_dtype=float32", "train.lr=1e-3", "train.warmup_steps=100",
                  "train.weight_decay=0.01")


def answer_of(text: str) -> str:
    """The answer in a generated continuation: what follows the last '### ', up to a newline."""
    if "### " in text:
        text = text.rsplit("### ", 1)[1]
    return text.split("\n", 1)[0].strip()


def _decode_new(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in (tokenizer.bot_id, tokenizer.eot_id)])


def _answers(model, tokenizer, examples: Sequence[dict], prompts: list[list[int]], k, *, max_new_tokens: int,
             batch_size: int = 64) -> dict:
    """Greedy decoding of `prompts` in batches with `k` thoughts per block (an int, or one per
    prompt), scored against the examples' answers: {accuracy, correct, texts, questions_per_s}."""
    from quietreasoning.model.latent import ModeController, generate

    ctl = ModeController(tokenizer.bot_id, tokenizer.eot_id, 0)
    ks = np.broadcast_to(np.asarray(k), (len(prompts),))
    texts: list[str] = []
    # warm-up: the first call compiles; questions/s should count decoding only
    generate(model, ctl, prompts[:batch_size], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
             k=ks[:batch_size].tolist())
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        new = generate(model, ctl, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       k=ks[i:i + batch_size].tolist())
        texts.extend(_decode_new(tokenizer, ids) for ids in new)
    seconds = time.perf_counter() - t0
    correct = [answer_of(t) == str(ex["answer"]).strip() for t, ex in zip(texts, examples)]
    return {"accuracy": float(np.mean(correct)), "correct": correct, "texts": texts,
            "questions_per_s": len(examples) / seconds}


def _prompt(tokenizer, example: dict, tail: Sequence[int] = ()) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(example["question"] + "\n"), *tail]


def accuracy_at_k(model, tokenizer, examples: Sequence[dict], k: int, *, max_new_tokens: int = 24) -> dict:
    """Answer-only decoding after a think block of `k` thoughts; see the module docstring."""
    tail = [tokenizer.bot_id] if k else [tokenizer.bot_id, tokenizer.eot_id]
    result = _answers(model, tokenizer, examples, [_prompt(tokenizer, ex, tail) for ex in examples], k,
                      max_new_tokens=max_new_tokens)
    return dict(result, k=k)


def cot_accuracy(model, tokenizer, examples: Sequence[dict], *, max_new_tokens: int = 96) -> dict:
    """The model writes its chain of thought, then the answer (no think block)."""
    return _answers(model, tokenizer, examples, [_prompt(tokenizer, ex) for ex in examples], 0,
                    max_new_tokens=max_new_tokens)


def stage_accuracy(model, tokenizer, examples: Sequence[dict], k: int, *, max_new_tokens: int = 96) -> float:
    """Accuracy in a curriculum stage's own mode: k thoughts, then whatever steps remain and the
    answer (k = 0: plain chain of thought)."""
    if k == 0:
        return cot_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)["accuracy"]
    return accuracy_at_k(model, tokenizer, examples, k, max_new_tokens=max_new_tokens)["accuracy"]


def budget_accuracy(model, tokenizer, examples: Sequence[dict], *, max_new_tokens: int = 24) -> dict:
    """Answer-only decoding with K picked per question by the budget head (its most likely K)."""
    import jax.numpy as jnp

    prompts = [_prompt(tokenizer, ex, [tokenizer.bot_id]) for ex in examples]
    ks = []
    for p in prompts:  # the question state at <bot>, as the trainer's budget head saw it
        n = len(p)
        h = model.trunk.hidden(jnp.asarray([p]), jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
        ks.append(int(jnp.argmax(model.budget(h[:, -1]), axis=-1)[0]))
    # K = 0 is no block at all in generate: close the opened one as the trainer did (<bot><eot>)
    prompts = [p + [tokenizer.eot_id] if k == 0 else p for p, k in zip(prompts, ks)]
    result = _answers(model, tokenizer, examples, prompts, ks, max_new_tokens=max_new_tokens)
    return dict(result, mean_k=float(np.mean(ks)))


def leakage(texts: Sequence[str], lexicon: frozenset[str]) -> float | None:
    """Share of whitespace tokens in `texts` that are in `lexicon` (None when the lexicon is empty)."""
    if not lexicon:
        return None
    words = [w for t in texts for w in t.split()]
    return sum(w in lexicon for w in words) / max(len(words), 1)


def codi_table(rows: dict[int, dict], k_best: int, cot: dict | None, leak: float | None) -> str:
    base, best = rows[0], rows[k_best]
    helped = sum(b and not a for a, b in zip(base["correct"], best["correct"]))
    hurt = sum(a and not b for a, b in zip(base["correct"], best["correct"]))
    lines = ["| mode | accuracy | questions/s | helped | hurt |", "|---|---|---|---|---|",
             f"| no reasoning (K=0) | {100 * base['accuracy']:.1f}% | {base['questions_per_s']:.1f} | | |",
             f"| latent (K={k_best}) | {100 * best['accuracy']:.1f}% | {best['questions_per_s']:.1f} | {helped} | {hurt} |"]
    if cot is not None:
        lines.append(f"| chain of thought (teacher) | {100 * cot['accuracy']:.1f}% | {cot['questions_per_s']:.1f} | | |")
    lines.append("")
    lines.append("| K | " + " | ".join(str(k) for k in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    lines.append("| accuracy | " + " | ".join(f"{100 * r['accuracy']:.1f}%" for r in rows.values()) + " |")
    lines.append("")
    lines.append(f"Latent advantage: {100 * (best['accuracy'] - base['accuracy']):+.1f} points; rationale leakage: "
                 + ("n/a (empty lexicon)" if leak is None else f"{100 * leak:.2f}%"))
    return "\n".join(lines)


SHARED_SETS = {"prosqa": ("prosqa",), "multiplication": ("multiplication-4x4", "multiplication-5x5")}


def published_table(name: str, latent: float, cot: float, k_best: int) -> str:
    """Our accuracy on a shared validation set beside the published rows for it (with sources)."""
    from quietreasoning.data.benchmarks import published_results

    lines = [f"| {name} | method | model | accuracy | source |", "|---|---|---|---|---|",
             f"| ours | latent (K={k_best}) | this run | {100 * latent:.1f}% | measured here |",
             f"| ours | chain of thought | this run | {100 * cot:.1f}% | measured here |"]
    lines += [f"| published | {r.method} | {r.model} | {r.accuracy:.1f}% | {r.source} |" for r in published_results(name)]
    return "\n".join(lines)


def stage_table(stages: Sequence[tuple[int, int, float]]) -> str:
    lines = ["| stage | thoughts | accuracy (own mode) |", "|---|---|---|"]
    lines += [f"| {c} | {k} | {100 * acc:.1f}% |" for c, k, acc in stages]
    return "\n".join(lines)


def plot_png(rows: dict[int, dict], cot: dict | None, title: str) -> bytes:
    import io as _io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ks = list(rows)
    ax.plot(ks, [100 * rows[k]["accuracy"] for k in ks], marker="o", label="latent, K thoughts")
    if cot is not None:
        ax.axhline(100 * cot["accuracy"], color="gray", ls="--", label="chain of thought")
    ax.set_xlabel("K (latent steps)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(args) -> dict:
    import jax
    from flax import nnx

    from quietreasoning.data import tasks
    from quietreasoning.model.latent import LatentReasoner
    from quietreasoning.training import latent as latent_training
    from quietreasoning.utils import io
    from quietreasoning.utils.tokenizer import train_tokenizer

    train_set = tasks.reasoning_split(args.task, "train", args.n_train, args.seed, progress=True)
    test_set = tasks.reasoning_split(args.task, "test", args.n_test, args.seed)
    texts = [ex["question"] + "\n" + "\n".join(ex["steps"]) + "\n### " + ex["answer"] for ex in train_set[:5000]]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    overrides = [*MODEL_DEFAULTS, f"model.vocab_size={tokenizer.vocab_size}", f"latent.recipe={args.recipe}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    encoded = [latent_training.encode(tokenizer, ex) for ex in train_set]
    heads = cfg.latent.k_max if args.recipe == "stochastic" else 0

    def fresh_model():
        return LatentReasoner(cfg.model, cfg.latent.projection_hidden, heads=heads, rngs=nnx.Rngs(cfg.train.seed))

    model = fresh_model()
    # stochastic: the Coconut curriculum first, then the REINFORCE loop for STOCHASTIC_SHARE of the steps
    first = dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, recipe="coconut")) \
        if args.recipe == "stochastic" else cfg
    stages = latent_training.curriculum(encoded, cfg) if args.recipe != "codi" else [0]
    # a first timing run fixes how many steps fit in the time budget
    per_stage = max(1, args.steps // len(stages)) if args.steps else None
    stage_results: list[tuple[int, int, float]] = []
    cot_teacher: dict = {}
    probe = test_set[:args.stage_eval]

    def on_stage_end(stage: int, m) -> None:
        k = stage * cfg.latent.thoughts_per_step
        if args.recipe != "codi" and stage == 0:
            cot_teacher.update(cot_accuracy(m, tokenizer, test_set))
            stage_results.append((stage, k, cot_teacher["accuracy"]))
        elif args.recipe != "codi":
            stage_results.append((stage, k, stage_accuracy(m, tokenizer, probe, k)))

    if per_stage is None:  # a time budget: measure a few steps of the heaviest stage, then share the rest
        timing = latent_training.train(model, encoded, cfg, bot_id=tokenizer.bot_id, eot_id=tokenizer.eot_id,
                                       stage_steps=[(stages[-1], 20)], batch_size=args.batch_size,
                                       seed=args.seed + 1, progress=False)
        seconds = (timing[-1]["seconds"] - timing[0]["seconds"]) / 10  # steps 11-20: compiled already
        per_stage = max(20, int(args.minutes * 60 * 0.8 / seconds / len(stages)))
        model = fresh_model()
    plan = [(c, per_stage) for c in stages]
    rl_steps = 0
    if args.recipe == "stochastic":
        rl_steps = max(10, int(STOCHASTIC_SHARE * per_stage * len(stages)))
        plan = [(c, max(1, int(per_stage * (1 - STOCHASTIC_SHARE)))) for c in stages]
    t0 = time.perf_counter()
    history = latent_training.train(model, encoded, first, bot_id=tokenizer.bot_id, eot_id=tokenizer.eot_id,
                                    stage_steps=plan, batch_size=args.batch_size, seed=args.seed,
                                    on_stage_end=on_stage_end)
    if rl_steps:
        history += latent_training.train(model, encoded, cfg, bot_id=tokenizer.bot_id, eot_id=tokenizer.eot_id,
                                         stage_steps=[(stages[-1], rl_steps)], batch_size=args.batch_size,
                                         seed=args.seed + 2)
        plan.append(("stochastic", rl_steps))
    train_seconds = time.perf_counter() - t0
    rows = {k: accuracy_at_k(model, tokenizer, test_set, k) for k in range(0, cfg.latent.k_max + 1)}
    k_best = max(rows, key=lambda k: (rows[k]["accuracy"], -k))
    cot = cot_teacher or cot_accuracy(model, tokenizer, test_set)
    leak = leakage([r for k, row in rows.items() if k for r in row["texts"]], tasks.rationale_lexicon(args.task))
    budget = budget_accuracy(model, tokenizer, test_set) if heads else None
    knob = next(iter(test_set[0]["difficulty"])) if test_set and test_set[0].get("difficulty") else None
    by_difficulty = {}
    if knob is not None:  # accuracy per value of the task's first knob (digits, hops)
        for value in sorted({ex["difficulty"][knob] for ex in test_set}):
            idx = [i for i, ex in enumerate(test_set) if ex["difficulty"][knob] == value]
            by_difficulty[f"{knob}={value}"] = {
                "n": len(idx), "k0": float(np.mean([rows[0]["correct"][i] for i in idx])),
                "latent": float(np.mean([rows[k_best]["correct"][i] for i in idx])),
                "cot": float(np.mean([cot["correct"][i] for i in idx]))}
    result = {
        "budget": None if budget is None else {"accuracy": budget["accuracy"], "mean_k": budget["mean_k"],
                                               "questions_per_s": budget["questions_per_s"]},
        "history": history, "by_difficulty": by_difficulty,
        "task": args.task, "recipe": args.recipe, "train_examples": len(train_set), "test_examples": len(test_set),
        "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "train_seconds": train_seconds, "steps": sum(s for _, s in plan), "batch_size": args.batch_size,
        "accuracy_by_k": {k: r["accuracy"] for k, r in rows.items()}, "k_best": k_best,
        "cot_accuracy": cot["accuracy"], "latent_advantage": rows[k_best]["accuracy"] - rows[0]["accuracy"],
        "latent_vs_cot": rows[k_best]["accuracy"] / max(cot["accuracy"], 1e-9), "leakage": leak,
        "questions_per_s": {"k0": rows[0]["questions_per_s"], "best": rows[k_best]["questions_per_s"],
                            "cot": cot["questions_per_s"]},
        "stages": stage_results, "final_loss": history[-1]["loss"] if history else None,
        "samples": [{"question": ex["question"], "answer": ex["answer"], "latent": rows[k_best]["texts"][i],
                     "cot": cot["texts"][i]} for i, ex in enumerate(test_set[:5])],
    }
    tables = codi_table(rows, k_best, cot, leak)
    if budget is not None:
        tables += (f"\n\nBudget head: accuracy {100 * budget['accuracy']:.1f}% at mean K {budget['mean_k']:.2f} "
                   f"({budget['questions_per_s']:.1f} questions/s)")
    if by_difficulty:
        tables += "\n\n| held-out slice | n | K=0 | latent (K=%d) | chain of thought |\n|---|---|---|---|---|\n" % k_best
        tables += "\n".join(f"| {name} | {d['n']} | {100 * d['k0']:.1f}% | {100 * d['latent']:.1f}% | "
                             f"{100 * d['cot']:.1f}% |" for name, d in by_difficulty.items())
    if stage_results:
        tables += "\n\n" + stage_table(stage_results)
    if args.n_ood:
        ood = tasks.reasoning_split(args.task, "ood", args.n_ood, args.seed)
        result["ood"] = {"n": len(ood), "k0": accuracy_at_k(model, tokenizer, ood, 0)["accuracy"],
                         "latent": accuracy_at_k(model, tokenizer, ood, k_best, max_new_tokens=48)["accuracy"],
                         "cot": cot_accuracy(model, tokenizer, ood, max_new_tokens=160)["accuracy"]}
        o = result["ood"]
        tables += (f"\n\nOut of distribution ({args.task} ood split, n={o['n']}): K=0 {100 * o['k0']:.1f}%, "
                   f"latent (K={k_best}) {100 * o['latent']:.1f}%, chain of thought {100 * o['cot']:.1f}%")
    from quietreasoning.data.benchmarks import load_benchmark
    for name in SHARED_SETS.get(args.task, ()):  # the public validation sets in the same format: evaluation only
        shared = load_benchmark(name)[:args.n_test]
        latent_acc = accuracy_at_k(model, tokenizer, shared, k_best, max_new_tokens=48)["accuracy"]
        cot_acc = cot_accuracy(model, tokenizer, shared, max_new_tokens=160)["accuracy"]
        result.setdefault("shared", {})[name] = {"latent": latent_acc, "cot": cot_acc, "n": len(shared)}
        tables += "\n\n" + published_table(name, latent_acc, cot_acc, k_best)
    out = io.path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_bytes(out / "results.json", json.dumps(result, indent=1).encode())
    io.atomic_write_bytes(out / "tables.md", (tables + "\n").encode())
    io.atomic_write_bytes(out / "accuracy_by_k.png",
                          plot_png(rows, cot, f"{args.task}, {args.recipe}: held-out accuracy by K"))
    result["tables"] = tables
    return result


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m quietreasoning.eval.reasoning", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, help="addition | prosqa | prontoqa | varassign | multiplication")
    p.add_argument("--recipe", default="coconut", choices=("coconut", "codi", "stochastic"),
                   help="stochastic: the coconut curriculum, then the REINFORCE loop for the last quarter")
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget (ignored with --steps)")
    p.add_argument("--steps", type=int, default=0, help="training steps in all (0: fit --minutes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-ood", type=int, default=0, help="also score this many questions of the harder ood split")
    p.add_argument("--stage-eval", type=int, default=200, help="test questions scored after each stage")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="tiny")
    p.add_argument("--output", required=True)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (model.*, train.*, latent.*)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Bad sizes and a bad config are one-line errors before the task data and the tokenizer are made
    (they take a while); `run` loads the config again with the tokenizer's size."""
    for flag in ("n_train", "n_test", "batch_size", "vocab_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    for flag in ("steps", "n_ood", "stage_eval"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must not be negative")
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ConfigError(f"--minutes {args.minutes}: must be a positive number of minutes")
    load_config(args.config, [*MODEL_DEFAULTS, f"latent.recipe={args.recipe}", *args.overrides])
    for item in args.overrides:
        if item.strip().startswith("model.vocab_size="):  # the tokenizer trained here sets it
            raise ConfigError(f"{item}: the model's vocabulary is the tokenizer's; set its size with --vocab-size")


@cli.one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    result = run(args)
    print(result["tables"])
    print(f"wrote {args.output}/results.json, tables.md, accuracy_by_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
