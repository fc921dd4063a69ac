"""Orbax checkpoints: the train state (params, optimizer state, step) plus a JSON record of
the stage name, the data position and the resolved config.

Orbax writes each step under a temporary name and renames it when complete, so a finished
checkpoint is never overwritten partially. Restores always go through an abstract target
that carries this run's shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from quietreasoning.config import ConfigError
from quietreasoning.utils import io


class Checkpointer:
    """One CheckpointManager for a run directory (local or gs://)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = io.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Saves `step` now (in the background when async); the caller decides when."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; the user needs the path and the choice
            raise ConfigError(
                f"{self.directory / str(step)}: cannot restore checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); delete that step directory to fall back to the previous one, "
                "or set checkpoint.dir to a fresh directory") from e
        return out.state, dict(out.meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of `step` (stage, data position, resolved config) without the arrays."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
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
