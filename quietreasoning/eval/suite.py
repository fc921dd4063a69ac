"""The evaluation after the stages (run.py): reasoning, PopQA-format facts and long context, each on
held-out questions, each written under <run_dir>/eval/<name>/ and summarised as a dict.

  reasoning     the latent_distill stage's LatentReasoner on stages.latent_task's test split
                (never trained on): answer-only accuracy at K = 0 .. latent.k_max thoughts, the
                chain-of-thought accuracy, the latent advantage (best K minus K = 0) and rationale
                leakage (eval/reasoning.py)
  popqa         the final model on the held-out facts of the retrieval stage's world
                (training/stages.py fact_world): closed book against reading its retrieved
                memories, accuracy by popularity bucket; the difference is the retrieval gain
  long_context  the final model on RULER-style needle tasks under full, SnapKV and int8 KV caches
                (eval/long_context.py); a model of the tiny plan's budget does not retrieve needles,
                so these scores show the evaluator runs, not a capability
"""

from __future__ import annotations

import json
import time

from quietreasoning.utils import io

LONG_CONTEXT = {"tasks": ("niah_single",), "lengths": (256,), "n": 8, "modes": ("full", "snapkv0.3", "int8")}


def reasoning(sched, tokenizer, out, n: int) -> dict:
    from quietreasoning.data import tasks
    from quietreasoning.eval.reasoning import accuracy_at_k, codi_table, cot_accuracy, leakage
    from quietreasoning.training import sharding
    from quietreasoning.training.stages import latent_examples, stage_model

    stage = sched.stage("latent_distill")
    model = stage_model(stage, sharding.make_mesh(stage.cfg))
    test = latent_examples(stage, "test", n)
    rows = {k: accuracy_at_k(model, tokenizer, test, k) for k in range(stage.cfg.latent.k_max + 1)}
    k_best = max(rows, key=lambda k: (rows[k]["accuracy"], -k))
    cot = cot_accuracy(model, tokenizer, test)
    leak = leakage([r for k, row in rows.items() if k for r in row["texts"]],
                   tasks.rationale_lexicon(stage.cfg.stages.latent_task))
    table = codi_table(rows, k_best, cot, leak)
    io.atomic_write_text(out / "reasoning.md", f"{stage.cfg.stages.latent_task}, {len(test)} held-out questions\n\n"
                         f"{table}\n")
    return {"task": stage.cfg.stages.latent_task, "n": len(test),
            "accuracy_by_k": {str(k): r["accuracy"] for k, r in rows.items()}, "k_best": k_best,
            "cot_accuracy": cot["accuracy"], "latent_advantage": rows[k_best]["accuracy"] - rows[0]["accuracy"],
            "leakage": leak, "table": str(out / "reasoning.md")}


def popqa(sched, tokenizer, out, popqa_path: str = "") -> dict:
    from quietreasoning.eval.popqa import PopQAEvaluator, closed_book, with_memory
    from quietreasoning.training import sharding
    from quietreasoning.training.stages import fact_memory, fact_world, stage_model

    stage = sched.stage("retrieval_supervision")
    mesh = sharding.make_mesh(stage.cfg)
    train_facts, held = fact_world(stage.cfg, popqa_path)
    # the store holds every fact: a held-out question's fact is there, its question was never trained
    memory = fact_memory(sched, stage, tokenizer, train_facts + held, mesh, progress=False)
    model = stage_model(stage, mesh)
    result = PopQAEvaluator(held).compare({"closed book": closed_book(model, tokenizer),
                                           "+ episodic memory": with_memory(model, tokenizer, memory)},
                                          output_dir=out, progress=False)
    closed, memo = result.scores["closed book"], result.scores["+ episodic memory"]
    return {"n": len(held), "closed_book": closed.accuracy, "with_memory": memo.accuracy,
            "retrieval_gain": memo.accuracy - closed.accuracy,
            "by_bucket": {label: {"n": n, "closed_book": a, "with_memory": b}
                          for (label, n, a), (_, _, b) in zip(closed.by_bucket(), memo.by_bucket())},
            "table": result.files.get("table")}


def long_context(sched, tokenizer, out) -> dict:
    from quietreasoning.eval import long_context as lc
    from quietreasoning.training import sharding
    from quietreasoning.training.stages import stage_model

    stage = sched.stage("retrieval_supervision")
    model = stage_model(stage, sharding.make_mesh(stage.cfg))
    instances = [x for task in LONG_CONTEXT["tasks"] for length in LONG_CONTEXT["lengths"]
                 for x in lc.synthetic_instances(task, tokenizer, length, LONG_CONTEXT["n"], stage.cfg.train.seed)]
    result = lc.evaluate(model, tokenizer, instances, stage.cfg.serve, modes=LONG_CONTEXT["modes"], progress=False)
    files = lc.write_outputs(result, out, f"Long-context evaluation of the final model ({len(instances)} prompts)")
    return {"modes": {r["mode"]: {"mean": r["mean"], "kv_bytes_per_token": r["kv_bytes_per_token"]}
                      for r in result["modes"]}, "table": files["table"]}


SUITE = {"reasoning": reasoning, "popqa": popqa, "long_context": long_context}


def evaluate_run(sched, tokenizer, *, popqa_path: str = "", log=print) -> dict:
    """Runs every evaluation whose model the run has (reasoning needs latent_distill, the others
    retrieval_supervision), each into <run_dir>/eval/<name>/, and writes eval/summary.json."""
    n = sched.base.stages.eval_examples
    results = {}
    for name, fn in SUITE.items():
        needs = "latent_distill" if name == "reasoning" else "retrieval_supervision"
        if sched.stage(needs).done() is None:
            log(f"eval {name}: skipped ({needs} is not complete)")
            continue
        out = sched.run_dir / "eval" / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        log(f"eval {name} ...")
        if name == "reasoning":
            results[name] = fn(sched, tokenizer, out, n)
        elif name == "popqa":
            results[name] = fn(sched, tokenizer, out, popqa_path)
        else:
            results[name] = fn(sched, tokenizer, out)
        results[name]["seconds"] = time.perf_counter() - t0
    io.atomic_write_text(sched.run_dir / "eval" / "summary.json", json.dumps(results, indent=1, default=float))
    return results


def headline(results: dict) -> list[tuple[str, str]]:
    """(what, value) lines for the run's final summary."""
    lines = []
    if "reasoning" in results:
        r = results["reasoning"]
        acc = r["accuracy_by_k"]
        lines.append((f"reasoning ({r['task']}, n={r['n']})",
                      f"K=0 {100 * acc['0']:.1f}%, best K={r['k_best']} {100 * acc[str(r['k_best'])]:.1f}%, "
                      f"chain of thought {100 * r['cot_accuracy']:.1f}%, latent advantage "
                      f"{100 * r['latent_advantage']:+.1f} pts"))
    if "popqa" in results:
        p = results["popqa"]
        lines.append((f"PopQA facts (n={p['n']})", f"closed book {100 * p['closed_book']:.1f}%, with memory "
                      f"{100 * p['with_memory']:.1f}%, retrieval gain {100 * p['retrieval_gain']:+.1f} pts"))
    if "long_context" in results:
        m = results["long_context"]["modes"]
        lines.append(("long context (niah_single@256)", ", ".join(f"{k} {100 * v['mean']:.0f}%" for k, v in m.items())))
    return lines

