"""`python -m quietreasoning.stack train | eval | interpolate [key=value ...]`

    python -m quietreasoning.stack train                          # embedded tasks, minutes on 2 cores
    python -m quietreasoning.stack train middle=gru latent_dim=128 run.name=gru train.steps=600
    python -m quietreasoning.stack train data=samsum:data/samsum freeze=lora init_from=runs/x/checkpoints/300 \\
        tokenizer=data/x/tokenizer.model
    python -m quietreasoning.stack eval [--pca FILE]               # scores, neighbours, PCA picture
    python -m quietreasoning.stack interpolate --a "TEXT" --b "TEXT" [--task summary] [--steps 5]

Bare keys set the stack (quietreasoning/stack/config.py); dotted keys set its trunks' project
config (model.*, train.*, run.*). eval and interpolate load the latest checkpoint of run.name
with the config it was trained with, the given keys applied on top.
"""

from __future__ import annotations

import argparse
import json
import sys

from quietreasoning import cli


def _train(args) -> int:
    from quietreasoning.stack.config import stack_config
    from quietreasoning.stack.train import train

    s = stack_config(args.overrides)
    run = train(s)
    cfg = run.setup.cfg
    if run.final_step <= run.start_step:
        print(f"nothing to train: {cfg.checkpoint_dir} is at step {run.start_step} and train.steps="
              f"{cfg.train.steps}; raise train.steps to go on, or set run.name for a new run")
        return 0
    loss = f"{run.history[-1]['loss']:.4f}" if run.history else "n/a"
    print(f"trained {run.setup.n_params('trainable'):,} of {run.setup.n_params():,} parameters, steps "
          f"{run.start_step} -> {run.final_step}; final loss {loss}; checkpoints in {cfg.checkpoint_dir}; "
          f"evaluate with: python -m quietreasoning.stack eval run.name={cfg.run.name}")
    return 0


def _eval(args) -> int:
    from quietreasoning.stack.config import run_dir
    from quietreasoning.stack.evaluate import evaluate, markdown
    from quietreasoning.stack.train import load_run
    from quietreasoning.utils.io import atomic_write_text

    run = load_run(args.overrides)
    folder = run_dir(run.setup.cfg)
    pca = args.pca or str(folder / "pca.png")
    result = evaluate(run, pca)
    table = markdown(result)
    atomic_write_text(folder / "eval.json", json.dumps(result, indent=1))
    atomic_write_text(folder / "eval.md", table + "\n")
    print(table)
    print(f"\nstep {run.final_step}; wrote {folder / 'eval.json'}, {folder / 'eval.md'} and {pca}")
    return 0


def _interpolate(args) -> int:
    from quietreasoning.config import ConfigError
    from quietreasoning.stack.data import Example
    from quietreasoning.stack.evaluate import Stack, interpolate
    from quietreasoning.stack.train import load_run

    run = load_run(args.overrides)
    task = args.task or run.held_out[0].task
    if (args.a is None) != (args.b is None):
        raise ConfigError("interpolate: give both --a and --b, or neither (the first two held-out inputs)")
    if args.a is None:
        pair = [ex for ex in run.held_out if ex.task == task][:2]
        if len(pair) < 2:
            raise ConfigError(f"interpolate --task {task}: fewer than two held-out inputs of that task; "
                              "pass --a and --b")
    else:
        pair = [Example(task, args.a, ""), Example(task, args.b, "")]
    print(f"A: {pair[0].encoder_text}\nB: {pair[1].encoder_text}")
    for alpha, text in interpolate(Stack(run), pair[0], pair[1], args.steps):
        print(f"{alpha:4.2f}  {text}")
    return 0


@cli.one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quietreasoning.stack",
                                description="Train and probe the idea-bottleneck stack.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("train", "train (or resume) a stack run"),
                           ("eval", "score the latest checkpoint against lead-N / prior baselines"),
                           ("interpolate", "decode points between two idea vectors")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("overrides", nargs="*", metavar="key=value",
                       help="stack keys (latent_dim=128) or trunk keys (model.n_layers=4, run.name=x)")
    sub.choices["eval"].add_argument("--pca", default="", help="where the PCA PNG goes (default <run>/pca.png)")
    inter = sub.choices["interpolate"]
    inter.add_argument("--a", help="the first input text (without the task prefix)")
    inter.add_argument("--b", help="the second input text")
    inter.add_argument("--task", default="", help="the task prefix the encoder reads (default: the first task)")
    inter.add_argument("--steps", type=int, default=5, help="points from A to B, ends included")
    args = p.parse_args(argv)
    return {"train": _train, "eval": _eval, "interpolate": _interpolate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
