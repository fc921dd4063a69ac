"""The minimal trainer: one config, one stage, the synthetic stream or TFRecord shards; progress
bar and checkpoints.

    python train.py --config configs/tiny.yaml train.steps=100
    python train.py --pretrain-pattern "data/tiny/*.tfrecord*" model.vocab_size=1024
    python train.py --config configs/3b.yaml --dry-run --json
"""

from __future__ import annotations

import json
import sys

from quietreasoning import cli
from quietreasoning.config import ConfigError


@cli.one_line_errors
def main(argv=None) -> int:
    p = cli.parser("Train one stage of the Quiet Reasoning trunk.", "tiny")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameter count, FLOPs/token, mesh and bytes per device; allocate nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    p.add_argument("--devices", type=int, default=0,
                   help="with --dry-run: plan for this many devices (default: the mesh's fixed product, else local)")
    p.add_argument("--pretrain-pattern", default="",
                   help='train on TFRecord shards, e.g. "data/tiny/*.tfrecord*" (sets data.source=tfrecord)')
    args = p.parse_args(argv)
    if args.devices < 0:
        raise ConfigError(f"--devices {args.devices}: must be positive (0, the default: the mesh's fixed product, "
                          "else the local devices)")
    if args.pretrain_pattern:
        args.overrides = ["data.source=tfrecord", f"data.pretrain_pattern={args.pretrain_pattern}", *args.overrides]
    cfg = cli.load(args)
    if args.dry_run:
        import jax

        from quietreasoning.training.plan import plan
        report = plan(cfg, args.devices or cfg.mesh.fixed_devices or jax.device_count())
        if args.json:
            print(json.dumps(report))
        else:
            for k, v in report.items():
                print(f"{k:>28}: {v:,}" if isinstance(v, (int, float)) else f"{k:>28}: {v}")
        return 0

    from quietreasoning.training.trainer import train
    result = train(cfg)
    if result.preempted and result.final_step < cfg.train.steps:  # the trainer said where it saved
        return 0
    if cli.said_nothing_to_train(result, cfg):
        return 0
    print(f"trained {result.n_params:,} parameters, steps {result.start_step} -> {result.final_step} "
          f"(start: {result.resumed_from}); final loss {result.final_loss:.4f}; "
          f"checkpoints in {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
