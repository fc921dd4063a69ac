"""The end-to-end entry point: data -> tokenizer -> six stages -> evaluation -> serving bundle.

With no arguments it runs the tiny preset on the embedded corpus (no download) on the CPU: builds
TFRecord shards and a SentencePiece tokenizer, runs warmstart_dense_ws, pkm_adapters, ssm_light,
latent_distill, retrieval_supervision and compress_serve (training/stages.py), evaluates the
result (eval/suite.py), and prints a summary with the paths. Rerun the same command and it
resumes: complete stages are skipped, a killed stage continues from its last checkpoint.

    python run.py                                   # the tiny plan, all six stages
    python run.py --stages warmstart_dense_ws..ssm_light --steps 20
    python run.py --config configs/3b.yaml --tpu-topology 4x4x4 --dry-run
    python run.py --auto-pull --pull-docs 200000 --output-dir gs://bucket/runs/3b --config configs/3b.yaml
"""

from __future__ import annotations

import json
import sys
import time

from quietreasoning import cli
from quietreasoning.config import STAGES, ConfigError


def parse_stages(text: str) -> list[str]:
    """'a,b', 'first..last' (names or 1-based numbers) or a mix, as stage names in plan order."""
    def one(token: str) -> int:
        token = token.strip()
        if token.isdigit() and 1 <= int(token) <= len(STAGES):
            return int(token) - 1
        if token in STAGES:
            return STAGES.index(token)
        raise ConfigError(f"--stages {text}: unknown stage '{token}'; use names ({', '.join(STAGES)}), numbers "
                          f"1-{len(STAGES)}, commas and first..last ranges")
    picked: set[int] = set()
    for part in text.split(","):
        if ".." in part:
            a, b = (one(x) for x in part.split("..", 1))
            if a > b:
                raise ConfigError(f"--stages {text}: the range {part} runs backwards; write first..last")
            picked.update(range(a, b + 1))
        elif part.strip():
            picked.add(one(part))
    if not picked:
        raise ConfigError(f"--stages {text!r}: name at least one stage")
    return [STAGES[i] for i in sorted(picked)]


def parse_args(argv=None):
    p = cli.parser("Run Quiet Reasoning end to end: data, tokenizer, six stages, evaluation, serving bundle.",
                   "tiny")
    p.add_argument("--output-dir", default="", help="the run directory (default: <run.out_dir>/<run.name>, local or gs://)")
    p.add_argument("--stages", default="", help="a subset or range of the plan, e.g. 1..3 or latent_distill,compress_serve "
                   "(default: stages.run)")
    p.add_argument("--steps", type=int, default=0, help="cap every training stage at this many steps (a quick look)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and, with --tpu-topology, what it costs "
                   "at scale) and allocate nothing")
    p.add_argument("--tpu-topology", default="", help="with --dry-run: plan for this TPU slice, e.g. 4x4x4 (v4) or v5p:2x2x4")
    p.add_argument("--mfu", type=float, default=0.4, help="with --tpu-topology: the MFU the time estimate assumes")
    p.add_argument("--auto-pull", action="store_true", help="build the data from the hub corpus (data.corpus=hub) "
                   "instead of the embedded one")
    p.add_argument("--pull-docs", type=int, default=0, help="documents to pull and build (data.docs)")
    p.add_argument("--pretrain-pattern", default="", help="train on these existing shards instead of building, e.g. "
                   "'data/tiny/*.tfrecord*' (their tokenizer.model beside them)")
    p.add_argument("--tokenizer", default="", help="a SentencePiece model (path or hub name) to use instead of training one")
    p.add_argument("--train-tokenizer", action="store_true", help="train a tokenizer on the mixture even when the "
                   "config names one (data.tokenizer)")
    p.add_argument("--popqa", default="", help="a PopQA jsonl file for retrieval supervision and the fact evaluation "
                   "(default: the generated world)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after the stages")
    p.add_argument("--wandb-project", default="", help="log to this wandb project online (a key must be set); "
                   "otherwise wandb runs offline")
    p.add_argument("--wandb-entity", default="")
    p.add_argument("--wandb-tags", default="", help="comma-separated")
    p.add_argument("--wandb-run", default="", help="wandb run name (default: the run directory's name)")
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags


def data_overrides(args, run_dir) -> list[str]:
    """The data.* overrides the flags imply: where the shards are and how they are built."""
    out = []
    if args.auto_pull:
        out.append("data.corpus=hub")
    if args.pull_docs:
        out.append(f"data.docs={args.pull_docs}")
    if args.tokenizer:
        out.append(f"data.tokenizer={args.tokenizer}")
    elif args.train_tokenizer:
        out.append("data.tokenizer=")
    pattern = args.pretrain_pattern or str(run_dir / "data" / "*.tfrecord*")
    return [*out, "data.source=tfrecord", f"data.pretrain_pattern={pattern}"]


def print_plan(sched) -> None:
    print(f"{'stage':<24}{'tokens':>12}{'steps':>8}{'lr':>10}  on")
    for row in sched.summary():
        mark = "" if row["selected"] else "  (not run)"
        done = "  [complete]" if row["complete"] else ""
        print(f"{row['stage']:<24}{row['tokens']:>12,.0f}{row['steps']:>8}{row['lr']:>10.2g}  "
              f"{', '.join(row['on']) or '-'}{mark}{done}")


@cli.one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    base = cli.load(args)
    from quietreasoning.utils import io

    run_dir = io.path(args.output_dir or f"{base.run.out_dir}/{base.run.name}")
    only = parse_stages(args.stages) if args.stages else None
    from quietreasoning.training.stages import StageScheduler

    sched = StageScheduler(args.config, [*data_overrides(args, run_dir), *args.overrides], run_dir, only=only,
                           max_steps=args.steps or None)
    if args.dry_run:
        print(f"Quiet Reasoning plan ({args.config}) -> {run_dir}")
        print_plan(sched)
        if args.tpu_topology:
            from quietreasoning.training.plan import check_fits, format_scale_plan, scale_plan

            report = scale_plan(sched.base, args.tpu_topology, args.mfu)
            print(format_scale_plan(report))
            check_fits(report)
        return 0

    import jax

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    say(f"Quiet Reasoning: the '{args.config}' plan -> {run_dir}")
    print_plan(sched) if lead else None
    data_dir = run_dir / "data"
    first = sched.stages[0].cfg
    if not args.pretrain_pattern:
        from quietreasoning.data.build import build

        m = build(first.data, str(data_dir), vocab_size=first.model.vocab_size, seed=first.train.seed, log=say)
        say(f"data: {m['records']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards ({data_dir})")
        tokenizer_path = str(data_dir / "tokenizer.model")
    else:
        tokenizer_path = args.tokenizer or str(io.path(args.pretrain_pattern).parent / "tokenizer.model")
    from quietreasoning.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.check_fits(first.model.vocab_size, f"tokenizer {tokenizer_path}")

    from quietreasoning.training import stages as st
    from quietreasoning.utils.telemetry import Telemetry

    telemetry = Telemetry(run_dir, config=sched.base.to_dict(), wandb_project=args.wandb_project,
                          wandb_entity=args.wandb_entity, wandb_tags=tuple(t for t in args.wandb_tags.split(",") if t),
                          wandb_run=args.wandb_run or run_dir.name, lead=lead)
    from quietreasoning.training.trainer import Preemption

    with Preemption() as preemption:  # SIGTERM: the running stage saves its step; the run stops, exit 0
        for stage in sched.selected:
            record = stage.done()
            if record is not None:
                say(f"[{stage.label}] complete ({stage.done_path}); skipped")
                continue
            if stage.kind == "lm":
                record = st.run_lm(sched, stage, progress=lead)
            elif stage.kind == "latent":
                record = st.run_latent(sched, stage, tokenizer, progress=lead)
            elif stage.kind == "retrieval":
                record = st.run_retrieval(sched, stage, tokenizer, popqa=args.popqa, progress=lead)
            else:
                record = st.run_export(sched, stage, tokenizer_path, progress=lead)
            telemetry.set_stage(stage.name)
            for row in st.stage_metrics(stage):
                telemetry.log(row)
            if record is not None:
                loss = f", loss {record['final_loss']:.3f}" if record.get("final_loss") is not None else ""
                say(f"[{stage.label}] done in {record['seconds']:.0f} s{loss}")
            if preemption.requested:
                where = "after it" if record is not None else "mid-stage, its last step saved"
                say(f"[{stage.label}] SIGTERM: stopped {where}; rerun the same command to resume")
                telemetry.close()
                return 0

    results = {}
    if not args.no_eval:
        from quietreasoning.eval.suite import evaluate_run

        results = evaluate_run(sched, tokenizer, popqa_path=args.popqa, log=say) if lead else {}
    summary = {"run_dir": str(run_dir), "config": args.config, "seconds": time.perf_counter() - began,
               "stages": [{"stage": s.name, **(s.done() or {})} for s in sched.stages], "eval": results}
    if lead:
        from quietreasoning.utils.telemetry import plot_run

        plots = plot_run(st.run_metrics(sched), results, run_dir / "plots")
        summary["plots"] = {k: v for k, v in plots.items() if k != "skipped"}
        io.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        # after the file above: the telemetry merges its summary into it (and into wandb's)
        telemetry.summary({"seconds": summary["seconds"], **{f"eval/{k}": v for k, v in flat_eval(results).items()}})
        print_summary(summary, results)
    telemetry.close()
    return 0


def flat_eval(results: dict) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{name}/{k}"] = v
    return out


def print_summary(summary: dict, results: dict) -> None:
    from quietreasoning.eval.suite import headline

    print(f"\nQuiet Reasoning run finished in {summary['seconds'] / 60:.1f} min: {summary['run_dir']}")
    print(f"{'stage':<24}{'steps':>7}{'loss':>8}{'seconds':>9}  output")
    for s in summary["stages"]:
        if "seconds" not in s:
            continue
        loss = f"{s['final_loss']:.3f}" if s.get("final_loss") is not None else "-"
        print(f"{s['stage']:<24}{s.get('steps', 0):>7}{loss:>8}{s['seconds']:>9.0f}  {s.get('bundle') or s.get('checkpoint', '')}")
    for what, value in headline(results):
        print(f"{what}: {value}")
    for name, path in summary.get("plots", {}).items():
        print(f"plot {name}: {path}")
    print(f"summary: {summary['run_dir']}/summary.json")


if __name__ == "__main__":
    sys.exit(main())
