"""`python -m quietreasoning.data build | inspect | verify | tasks`: make TFRecord shards, look
inside them, check them against their manifest, or write a reasoning-task split as jsonl.

    python -m quietreasoning.data build --output-dir data/tiny [--source embedded|hub|local:PATH]
                                        [--docs N] [--vocab-size V] [--config tiny] [data.key=value ...]
    python -m quietreasoning.data inspect data/tiny
    python -m quietreasoning.data verify data/tiny      # every shard present, sized and hashed as listed
    python -m quietreasoning.data tasks --task varassign --split train -n 1000 --seed 0 --output x.jsonl
"""

from __future__ import annotations

import json
import sys

from quietreasoning import cli
from quietreasoning.config import ConfigError, load_config


def _build(args) -> int:
    from quietreasoning.data.build import build

    for flag, value in (("--vocab-size", args.vocab_size), ("--docs", args.docs)):
        if value < 0:
            raise ConfigError(f"{flag} {value}: must be positive (0, the default, takes the config's value)")
    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"data.corpus={args.source}")
    if args.docs:
        overrides.append(f"data.docs={args.docs}")
    cfg = load_config(args.config, overrides)
    vocab = args.vocab_size or cfg.model.vocab_size
    m = build(cfg.data, args.output_dir, vocab_size=vocab, seed=cfg.train.seed, progress=not args.quiet)
    print(f"{args.output_dir}: {m['records']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards, "
          f"vocab {m['vocab_size']} ({m['seconds']:.1f} s); train with: python train.py --config {args.config} "
          f"data.source=tfrecord data.pretrain_pattern='{args.output_dir}/*.tfrecord*'")
    return 0


def _inspect(args) -> int:
    import numpy as np

    from quietreasoning.config import DataError
    from quietreasoning.data.reader import ShardReader
    from quietreasoning.data.shards import TOKENIZER, read_manifest
    from quietreasoning.utils import io
    from quietreasoning.utils.tokenizer import load_tokenizer

    m = read_manifest(args.dir)
    if m is None:
        raise DataError(f"{args.dir}: no manifest.json; build it with `python -m quietreasoning.data build "
                        f"--output-dir {args.dir}`")
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"{args.dir}: {'complete' if m['complete'] else 'INCOMPLETE (rerun the build)'}; "
          f"{m['records']:,} documents, {m['tokens']:,} tokens, {len(m['shards'])} shards, vocab {m['vocab_size']}")
    print(f"{'bucket':<12}{'read':>8}{'kept':>8}{'records':>9}{'tokens':>12}  dropped")
    for name, b in m.get("buckets", {}).items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(b["dropped"].items()) if v) or "-"
        print(f"{name:<12}{b['read']:>8}{b['kept']:>8}{b['records']:>9}{b['tokens']:>12,}  {dropped}")
    if not m["complete"] or args.samples <= 0:
        return 0
    tok = load_tokenizer(str(io.path(args.dir) / m.get("tokenizer", TOKENIZER)))
    reader = ShardReader(str(io.path(args.dir) / "*.tfrecord*"), seq_len=256, rows=1, seed=0)
    shown = 0
    for k, tokens, roles in reader.documents():
        text = tok.decode(tokens[1:-1])
        marked = "" if not roles.any() else f"  [roles: {sorted(set(np.unique(roles).tolist()))}]"
        print(f"--- document {k} ({len(tokens)} tokens){marked}\n{text[:400]}{' ...' if len(text) > 400 else ''}")
        shown += 1
        if shown >= args.samples:
            break
    return 0


def _verify(args) -> int:
    from quietreasoning.data.shards import verify

    m = verify(args.dir)
    print(f"{args.dir}: {len(m['shards'])} shards, {sum(e['records'] for e in m['shards']):,} documents: each present, "
          "of its listed size and sha256")
    return 0


def _tasks(args) -> int:
    from quietreasoning.data.tasks import reasoning_split
    from quietreasoning.utils import io

    examples = reasoning_split(args.task, args.split, args.n, args.seed, progress=not args.quiet)
    io.atomic_write_text(args.output, "".join(json.dumps(ex) + "\n" for ex in examples))
    steps = sum(len(ex["steps"]) for ex in examples) / max(len(examples), 1)
    print(f"{args.output}: {len(examples):,} {args.task} {args.split} examples (seed {args.seed}), "
          f"{steps:.2f} steps each on average")
    return 0


@cli.one_line_errors
def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m quietreasoning.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="clean a corpus, train or load the tokenizer, write shards + manifest.json")
    b.add_argument("--output-dir", required=True, help="where shards, tokenizer.model and manifest.json go (or gs://)")
    b.add_argument("--source", default="", help="embedded | hub | local:PATH (default: data.corpus)")
    b.add_argument("--docs", type=int, default=0, help="documents in the mixture (default: data.docs)")
    b.add_argument("--vocab-size", type=int, default=0, help="tokenizer size (default: model.vocab_size)")
    b.add_argument("--config", default="tiny", help="preset whose data.* and model.vocab_size apply (default: tiny)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. data.docs=500")
    i = sub.add_parser("inspect", help="per-bucket statistics and a few decoded documents")
    i.add_argument("dir")
    i.add_argument("--samples", type=int, default=3, help="documents to decode (default 3)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    v = sub.add_parser("verify", help="check every shard against manifest.json: present, size, sha256; exit 2 "
                                      "naming the first that fails")
    v.add_argument("dir")
    t = sub.add_parser("tasks", help="write a reasoning-task split as jsonl: task, question, steps, answer, difficulty")
    t.add_argument("--task", required=True, help="addition | multiplication | prosqa | prontoqa | varassign")
    t.add_argument("--split", default="train", help="train | test | ood (default train)")
    t.add_argument("-n", type=int, default=1000, help="examples (default 1000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output", required=True, help="the .jsonl file to write (or gs://)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return {"build": _build, "inspect": _inspect, "verify": _verify, "tasks": _tasks}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
