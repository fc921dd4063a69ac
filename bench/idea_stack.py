"""The idea-bottleneck stack on the embedded tasks: train it, then score it against trivial baselines
(ROUGE against lead-1 / lead-3, exact match against the prior answer), probe its idea space
(neighbours of word-dropped inputs, an interpolation path) and draw the idea vectors' PCA.

The picture goes to docs/images/idea_stack_pca.png; the tables, with the training time and CPU
seconds measured in this process, are appended to docs/benchmarks.md.

    python bench/idea_stack.py                                   # the default stack (a new run folder)
    python bench/idea_stack.py --no-append train.steps=50 run.name=quick middle=gru
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

PCA = os.path.join(os.path.dirname(__file__), "..", "docs", "images", "idea_stack_pca.png")


def main(argv=None) -> int:
    from quietreasoning.stack.config import stack_config
    from quietreasoning.stack.evaluate import evaluate, markdown
    from quietreasoning.stack.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-append", action="store_true", help="print only; do not append to the results file")
    p.add_argument("--doc", default=DOC, help="results file to append to (default: docs/benchmarks.md)")
    p.add_argument("--pca", default=PCA, help="where the PCA picture goes")
    p.add_argument("overrides", nargs="*", help="stack keys (latent_dim=128) or trunk keys (train.steps=300)")
    args = p.parse_args(argv)

    s = stack_config(["run.name=stack_bench", *args.overrides])
    wall, cpu = time.perf_counter(), time.process_time()
    run = train(s)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = evaluate(run, args.pca)
    cfg, ts = run.setup.cfg, run.setup
    loss = run.history[-1]["loss"] if run.history else float("nan")
    summary = (f"Stack: latent_dim {s.latent_dim}, prefix_len {s.prefix_len}, pooling {s.pooling}, middle {s.middle} "
               f"x{s.middle_layers}, freeze {s.freeze}; trunks d_model {cfg.model.d_model}, {cfg.model.n_layers} "
               f"layers, vocab {cfg.model.vocab_size}; {ts.n_params('trainable'):,} of {ts.n_params():,} parameters "
               f"trained.  \nTraining: steps {run.start_step} -> {run.final_step}, batch {cfg.train.global_batch}, "
               f"{len(run.train):,} examples; {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU of this process "
               "(the machine is shared); "
               f"final loss {loss:.3f} nats/token.  \nHeld-out: entities (and additions) never seen in training.")
    samples = ["", "| task | target | decoded |", "|---|---|---|"]
    cell = lambda text: " ".join(text.replace("|", "/").split())  # noqa: E731  one table cell
    samples += [f"| {x['task']} | {cell(x['target'])} | {cell(x['prediction'])} |" for x in result["samples"]]
    picture = os.path.relpath(os.path.abspath(args.pca), os.path.dirname(os.path.abspath(args.doc)))
    body = "\n".join([summary, "", markdown(result), *samples, "",
                      f"![idea vectors, PCA]({picture}) (PC1+PC2: {sum(result['pca_explained']):.0%} of variance)"])
    print(body)
    if not args.no_append:
        append_section(args.doc, "Idea-bottleneck stack", "bench/idea_stack.py", argv, "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
