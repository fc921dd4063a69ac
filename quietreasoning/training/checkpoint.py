"""Orbax checkpoints: the train state (params, optimizer state, step) plus a JSON record of
the stage name, the data position and the resolved config.

Orbax writes each step under a temporary name and renames it when complete, so a finished
checkpoint is never overwritten partially. Restores always go through an abstract target
that carries this run's shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from quietreasoning.config import ConfigError
from quietreasoning.utils import io


class CheckpointError(ConfigError):
    """A checkpoint could not be written (disk full, no permission) or none could be read."""


class Checkpointer:
    """One CheckpointManager for a run directory (local or gs://).

    A save killed half-way leaves only Orbax's temporary directory, which the next start
    removes; `restore_latest` falls back past unreadable checkpoints to the newest readable one.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = io.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step of the last save, until it is known complete

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Saves `step` now (in the background when async); the caller decides when. A failed
        write (this one, or the previous background one) raises CheckpointError naming the path."""
        self._finish_writing()
        with self._write_errors(step):
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True)
        self._writing = step  # complete already unless async

    def _finish_writing(self) -> None:
        """Waits for a background save; its failure is raised here, naming its step."""
        if self._writing is not None:
            with self._write_errors(self._writing):
                self.manager.wait_until_finished()
            self._writing = None

    @contextlib.contextmanager
    def _write_errors(self, failed: int):
        try:
            yield
        except Exception as e:  # Orbax reports a failed write as ValueError, OSError or its own types
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            full = io.disk_full(e)
            kept = [s for s in self.steps() if s != failed]
            raise CheckpointError(
                f"{self.directory / str(failed)}: {'disk full' if full else 'cannot write'} while saving checkpoint "
                f"step {failed} ({type(e).__name__}: {text[:160]}); "
                f"{'free space on that disk' if full else 'check the path and its permissions'} or set checkpoint.dir "
                f"elsewhere, then rerun to resume; complete checkpoints kept: {kept or 'none'}") from None

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; the user needs the path and the choice
            raise CheckpointError(
                f"{self.directory / str(step)}: cannot restore checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); delete that step directory to fall back to the "
                "previous one, or set checkpoint.dir to a fresh directory") from e
        return out.state, dict(out.meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of `step` (stage, data position, resolved config) without the arrays."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:
            raise CheckpointError(f"{self.directory / str(step)}: unreadable checkpoint record ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e

    def restore_latest(self, abstract_state, *, check: Callable[[dict], None] = lambda meta: None,
                       fresh_if_unreadable: bool = False, warn=print):
        """(step, state, meta) of the newest checkpoint that reads back, or None when there is none.

        `check(meta)` runs first on each record and may raise (a checkpoint of another model is
        the user's mistake, not a corrupt file). An unreadable checkpoint is renamed to
        `<step>.unreadable` (kept for inspection, out of the way of new saves) with a warning
        naming it and the one used instead. When checkpoints exist but none reads back this is an
        error, unless `fresh_if_unreadable` (then None: the caller starts fresh, with a warning)."""
        unreadable = []
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
                check(meta)
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                unreadable.append(step)
                warn(f"warning: {e}")
                self._set_aside(step)
                continue
            if unreadable:
                warn(f"warning: {self.directory}: checkpoint step {unreadable[0]} is unreadable; resuming from the "
                     f"previous complete one, step {step} (the unreadable ones are kept as <step>.unreadable)")
            return step, state, meta
        if unreadable and not fresh_if_unreadable:
            raise CheckpointError(
                f"{self.directory}: no checkpoint reads back (steps {sorted(unreadable)}, now renamed "
                "<step>.unreadable); set checkpoint.fresh_if_unreadable=true to start this run from scratch, or "
                "point checkpoint.dir at another copy")
        if unreadable:
            warn(f"warning: {self.directory}: no checkpoint reads back; starting fresh "
                 "(checkpoint.fresh_if_unreadable=true)")
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.unreadable"
            if dst.exists():
                dst = self.directory / f"{step}.unreadable-{int(time.time())}"
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        self._finish_writing()
        self.manager.close()


def load_parameters(path: str, abstract_params):
    """Only the params of a saved train state at `path` (a checkpoint step directory, e.g.
    runs/tiny/checkpoints/300), laid out as `abstract_params`."""
    state_dir = io.path(path) / "state"
    if not state_dir.exists():
        raise ConfigError(
            f"train.load_parameters_path={path}: no 'state' checkpoint there; point it at a step "
            "directory such as runs/<name>/checkpoints/<step>")
    target = {"params": abstract_params}
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as e:
        raise ConfigError(
            f"train.load_parameters_path={path}: cannot load parameters ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); the checkpoint must come from the same model.* sizes") from e
    return restored["params"]
