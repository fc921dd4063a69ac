"""What `train.py` and `run.py` share: argument parsing, config loading, one-line errors."""

from __future__ import annotations

import argparse
import functools
import sys

from quietreasoning.config import Config, ConfigError, load_config


def parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config,
                   help=f"preset name or YAML path, applied over configs/base.yaml (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides applied last, e.g. model.d_model=256 train.steps=100")
    return p


def load(args: argparse.Namespace) -> Config:
    """The config; on a multi-host slice (`run.distributed=true`) also joins the other hosts."""
    cfg = load_config(args.config, args.overrides)
    if cfg.run.distributed:
        import jax
        jax.distributed.initialize()
    return cfg


def said_nothing_to_train(result, cfg: Config) -> bool:
    """Says so when a resumed run was already at (or past) `train.steps`."""
    if result.final_step > result.start_step:
        return False
    print(f"nothing to train: the checkpoint in {result.checkpoint_dir} is at step {result.start_step} and "
          f"train.steps={cfg.train.steps}; raise train.steps to go on, or set run.name for a new run")
    return True


def one_line_errors(main):
    """Turns the errors a user can fix into one line on stderr and an exit code (2 for bad
    input, 1 for a diverged run), instead of a traceback."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            # imported here: the trainer pulls in jax and Orbax, which a config error never needs
            from quietreasoning.training.trainer import TrainingDiverged
            if not isinstance(e, TrainingDiverged):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapped
