"""What `train.py` and `run.py` share: argument parsing, config loading, one-line errors."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import threading

from quietreasoning.config import Config, ConfigError, load_config


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: a bad flag or a missing argument is one line on
    stderr ("error: PROG: what; see PROG --help") and exit code 2, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--config", default=default_config,
                   help=f"preset name or YAML path, applied over configs/base.yaml (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides applied last, e.g. model.d_model=256 train.steps=100")
    add_distributed_flags(p)
    return p


DISTRIBUTED_TIMEOUT = 300  # seconds a process waits for all the others to join


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """The multi-process flags: on a TPU VM slice `run.distributed=true` finds the other hosts by
    itself; elsewhere (several GPU hosts, CPU processes) name the coordinator and each process."""
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0, the same for every process, e.g. 10.0.0.1:8476")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's number, 0..N-1")
    g.add_argument("--distributed-timeout", type=float, default=DISTRIBUTED_TIMEOUT, metavar="S",
                   help=f"seconds to wait for every process to join before giving up (default {DISTRIBUTED_TIMEOUT})")


def load(args: argparse.Namespace) -> Config:
    """The config; with the multi-process flags, or `run.distributed=true` (a TPU VM slice, found
    automatically), also joins the other processes before JAX touches a device."""
    cfg = load_config(args.config, args.overrides)
    flags = {f: getattr(args, f, None) for f in ("coordinator", "num_processes", "process_id")}
    timeout = getattr(args, "distributed_timeout", DISTRIBUTED_TIMEOUT)
    if any(v is not None for v in flags.values()):
        join_processes(flags["coordinator"], flags["num_processes"], flags["process_id"], timeout)
    elif cfg.run.distributed:
        join_processes(None, None, None, timeout)
    return cfg


def join_processes(coordinator: str | None, num_processes: int | None, process_id: int | None,
                   timeout: float = DISTRIBUTED_TIMEOUT) -> None:
    """`jax.distributed.initialize`, explicit (all three given) or auto-detected (none given: TPU
    VM, Slurm, Open MPI). A process whose peers do not all join within `timeout` seconds prints one
    line and exits with code 2; JAX itself would abort with a stack trace, from a C++ thread no
    Python `except` can reach, so a watchdog thread ends the process first."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if 0 < len(missing) < 3:
        raise ConfigError(f"{', '.join(missing)} missing: pass --coordinator HOST:PORT, --num-processes N and "
                          "--process-id I together (or none of them, with run.distributed=true on a TPU VM)")
    if not (timeout > 0 and math.isfinite(timeout)):  # nan would fire the watchdog at once
        raise ConfigError(f"--distributed-timeout {timeout:g}: must be a positive number of seconds")
    if not missing:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator {coordinator}: expected HOST:PORT, e.g. 10.0.0.1:8476")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} --num-processes {num_processes}: need N >= 1 and "
                              "0 <= I < N, one distinct I per process")
    where = f"--coordinator {coordinator}" if coordinator else "the auto-detected coordinator"
    settled, joined = threading.Lock(), []

    def give_up() -> None:
        with settled:
            if joined:  # initialize returned just as the timer fired
                return
            print(f"error: {where}: not all {num_processes or 'the'} processes joined within "
                  f"--distributed-timeout {timeout:g} s; start every process with the same --coordinator and "
                  "--num-processes and its own --process-id, check that the port is reachable, or raise "
                  "--distributed-timeout", file=sys.stderr, flush=True)
            os._exit(2)  # the main thread is blocked inside JAX's connect: nothing else can stop it cleanly

    import jax

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline comes later, so the watchdog's one line always comes first
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout) + 30)
    except ValueError as e:
        if not missing:
            raise
        raise ConfigError(f"run.distributed=true but no TPU VM slice or other cluster was detected ({e}); pass "
                          "--coordinator HOST:PORT --num-processes N --process-id I, or set run.distributed=false"
                          ) from None
    finally:
        with settled:
            joined.append(True)
        watchdog.cancel()


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
