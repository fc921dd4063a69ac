"""The training loop shared by `train.py` and `run.py`: one config, one stage.

Resume order: this run's latest checkpoint, else `train.load_parameters_path` (parameters
only, fresh optimizer), else a fresh init. Batch `i` of the stream is a pure function of the
seed and `i`, and the checkpoint records the data position, so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from quietreasoning.config import Config, ConfigError
from quietreasoning.model.trunk import flops_per_token
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer, load_parameters
from quietreasoning.training.optimizer import lr_schedule
from quietreasoning.training.roofline import machine_roof
from quietreasoning.training.input import batches
from quietreasoning.training.train_step import setup
from quietreasoning.utils import io
from quietreasoning.utils.io import atomic_write_text


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stopped being finite."""


@dataclasses.dataclass
class TrainResult:
    state: dict[str, Any]
    start_step: int
    final_step: int
    resumed_from: str           # "checkpoint", "parameters", "carried" (the staged runner's) or "init"
    history: list[dict[str, float]]
    n_params: int
    flops_per_token: float
    roof_flops: float | None
    checkpoint_dir: str
    preempted: bool = False     # SIGTERM ended it early, after saving its last step

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


# model keys a run may change between its checkpoints: they change no parameter (the stage plan
# anneals the PKM temperature in segments of one stage)
RESUMABLE_CHANGES = ("pkm_temperature",)


_SIGTERM = threading.Event()  # process-wide: a runner's context and the trainer's inside it share it


class Preemption:
    """SIGTERM (a TPU VM's preemption notice, `kill`, a scheduler's stop) asks the loop to save
    the current step and return. One process: a signal handler sets a flag. Several processes:
    JAX's preemption service, which hears the signal on any host and names one step at which all
    of them stop together (multihost_utils.reached_preemption_sync_point). Contexts nest: the
    staged runner holds one around its stages, each training run one around its loop."""

    def __init__(self):
        self._previous = None
        self.multi = jax.process_count() > 1

    def __enter__(self) -> "Preemption":
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
        return self

    @property
    def requested(self) -> bool:
        return _SIGTERM.is_set()

    def reached(self, step: int) -> bool:
        """Whether to save at `step` and stop (in step with every other process)."""
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return _SIGTERM.is_set()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_same_model(cfg: Config, ckpt: Checkpointer):
    """The check every checkpoint's record passes before it is restored: the same model (a
    checkpoint of another one is the user's choice of directory, not a corrupt file)."""
    here = json.loads(json.dumps(cfg.to_dict()))  # as the checkpoint's JSON stored it

    def check(meta: dict) -> None:
        saved = meta["config"]
        changed = [f"model.{k}={saved['model'].get(k)} there, {v} here" for k, v in here["model"].items()
                   if saved["model"].get(k) != v and k not in RESUMABLE_CHANGES]
        if saved["train"].get("trainable") != here["train"]["trainable"]:  # another optimizer state
            changed.append(f"train.trainable={saved['train'].get('trainable')} there, {here['train']['trainable']} here")
        if changed:
            raise ConfigError(
                f"{ckpt.directory}: its checkpoints are of another model ({'; '.join(changed)}); "
                "set run.name (or checkpoint.dir) to start a new run, or drop the model overrides")
    return check


def _restore_or_init(cfg: Config, ts, ckpt: Checkpointer, initial=None, log=print) -> tuple[dict, Any, str]:
    found = ckpt.restore_latest(ts.abstract_sharded(), check=_check_same_model(cfg, ckpt),
                                fresh_if_unreadable=cfg.checkpoint.fresh_if_unreadable, warn=log)
    if found is not None:
        _, state, meta = found
        return state, meta["data_position"], "checkpoint"
    if initial is not None:
        state, position = initial(ts)
        return state, position, "carried"
    if cfg.train.load_parameters_path:
        params = load_parameters(cfg.train.load_parameters_path, ts.abstract_sharded()["params"])
        return ts.state_from_params(params), None, "parameters"
    return ts.init(), None, "init"


def _lr_scale(ckpt: Checkpointer) -> float:
    """The learning-rate scale earlier rollbacks left in the newest checkpoint's record (1 if none)."""
    latest = ckpt.latest_step()
    if latest is None:
        return 1.0
    try:
        return float(ckpt.read_meta(latest).get("lr_scale", 1.0))
    except ConfigError:  # an unreadable record: restore_latest says so and falls back
        return 1.0


def _stop_or_roll_back(cfg: Config, run_cfg: Config, m: dict, streak: int, step: int, rollbacks: int,
                       back: int | None, desc: str) -> None:
    """After `train.max_bad_steps` non-finite steps in a row: raise TrainingDiverged when rollbacks
    are off or used up, else say where the run goes back to and at which learning rate."""
    t = cfg.train
    if not t.rollback_lr_scale or rollbacks > t.max_rollbacks:
        raise TrainingDiverged(
            f"train: {streak} steps in a row with a non-finite loss or gradient, the last at step {step} "
            f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}; {rollbacks - 1} rollbacks so far); "
            f"lower train.lr (now {run_cfg.train.lr:g}) or raise train.warmup_steps; the last good checkpoint "
            f"is in {cfg.checkpoint_dir}")
    tqdm.write(f"warning: {desc}: {streak} steps in a row with a non-finite loss or gradient up to step {step}; "
               f"rolling back to {'the start of the run' if back is None else f'checkpoint step {back}'} with "
               f"train.lr {run_cfg.train.lr * t.rollback_lr_scale:g} (rollback {rollbacks} of {t.max_rollbacks})")


def train(cfg: Config, *, mesh: Mesh | None = None, measure_roof: bool = True, progress: bool = True,
          stop_at: int | None = None, initial=None, stream=None, desc: str | None = None) -> TrainResult:
    """Trains `cfg.train.steps` steps (or until `stop_at`, as a preemption would), saving
    checkpoints every `checkpoint.every` steps and at the end.

    The staged runner (training/stages.py) passes `initial(ts) -> (state, data position)`, used
    when this run has no checkpoint yet (the state a stage carries over from the ones before it),
    and `stream(cfg, batch_sharding, position)`, a batch source with next() and position() in
    place of the configured one (input.batches).

    Faults: SIGTERM saves the current step and returns (`preempted`); a step whose loss or
    gradient is not finite is skipped inside the jitted step and counted, and after
    `train.max_bad_steps` in a row the run goes back to its last checkpoint with the learning
    rate times `train.rollback_lr_scale` (at most `train.max_rollbacks` times), else stops with
    TrainingDiverged; an unreadable checkpoint falls back to the previous one (checkpoint.py)."""
    mesh = mesh or sharding.make_mesh(cfg)
    t = cfg.train
    n_devices = mesh.devices.size
    fpt = flops_per_token(cfg.model, t.seq_len)
    roof = machine_roof() if measure_roof else None
    lead = jax.process_index() == 0

    run_dir = io.path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    ckpt = Checkpointer(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.max_to_keep,
                        async_save=cfg.checkpoint.async_save)
    lr_scale, rollbacks, preempted = _lr_scale(ckpt), 0, False
    with Preemption() as preemption:
        while True:  # once, plus once per rollback
            run_cfg = cfg if lr_scale == 1.0 else dataclasses.replace(
                cfg, train=dataclasses.replace(t, lr=t.lr * lr_scale))
            ts = setup(run_cfg, mesh)
            schedule = lr_schedule(run_cfg.train)
            rolled_back = False
            with jax.set_mesh(mesh):  # entered after setup: its abstract model keeps logical axis names
                state, position, resumed_from = _restore_or_init(run_cfg, ts, ckpt, initial, log=tqdm.write)
                start = int(jax.device_get(state["step"]))
                if resumed_from == "checkpoint" and lead:
                    tqdm.write(f"{desc or t.stage}: resuming from checkpoint step {start} in {ckpt.directory}")
                data = (stream or batches)(run_cfg, ts.batch_sharding, position, log=tqdm.write)
                history = [h for h in history if h["step"] <= start]
                end = max(start, min(t.steps, stop_at) if stop_at is not None else t.steps)
                with tqdm(total=t.steps, initial=start, disable=not (progress and lead), desc=desc or t.stage,
                          unit="step", dynamic_ncols=True) as bar:
                    window_t0, window_steps = time.perf_counter(), 0
                    for step in range(start, end):
                        state, metrics = ts.step_fn(state, data.next())
                        window_steps += 1
                        done = step + 1
                        if step == start:  # the first step includes compilation: restart the clock after it
                            jax.block_until_ready(metrics)
                            window_t0, window_steps = time.perf_counter(), 0
                        preempted = preemption.reached(done)
                        log_now = done % t.log_every == 0 or done == end or preempted
                        save_now = done % cfg.checkpoint.every == 0 or done == end or preempted
                        if log_now or save_now:
                            m = jax.device_get(metrics)
                            streak, skipped = (int(v) for v in jax.device_get((state["bad_streak"], state["skipped"])))
                            if streak and streak >= t.max_bad_steps:
                                ckpt.close()  # a save in flight completes: it is where the rollback goes
                                rollbacks += 1
                                lr_scale *= t.rollback_lr_scale
                                _stop_or_roll_back(cfg, run_cfg, m, streak, done, rollbacks, ckpt.latest_step(),
                                                   desc or t.stage)
                                ckpt = Checkpointer(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.max_to_keep,
                                                    async_save=cfg.checkpoint.async_save)
                                rolled_back = True
                                break
                        if log_now:
                            dt = time.perf_counter() - window_t0
                            record = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                                      "lr": float(schedule(done - 1)), "skipped_steps": skipped}
                            # the modules' terms and usage (halting average, router gates, histograms as lists)
                            record.update({k: (float(v) if v.ndim == 0 else [round(float(x), 4) for x in v.ravel()])
                                           for k, v in m.items() if k not in record})
                            if window_steps and dt > 0:
                                tok_s = window_steps * t.global_batch * t.seq_len / dt
                                tflops_dev = fpt * tok_s / n_devices / 1e12
                                record.update(tokens_per_s=tok_s, tflops_per_device=tflops_dev)
                                if roof:
                                    record["mfu"] = tflops_dev * 1e12 / roof
                            history.append(record)
                            if lead:  # the whole log so far, renamed into place: a preemption loses nothing logged
                                atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
                            bar.set_postfix(loss=f"{record['loss']:.3f}",
                                            **({"tok/s": f"{record['tokens_per_s']:.0f}"} if "tokens_per_s" in record
                                               else {}),
                                            **({"mfu": f"{record['mfu']:.0%}"} if "mfu" in record else {}),
                                            **({"skipped": skipped} if skipped else {}))
                            window_t0, window_steps = time.perf_counter(), 0
                        bar.update(1)
                        if save_now:
                            meta = {"stage": t.stage, "step": done, "data_position": data.position(),
                                    "config": cfg.to_dict(), "lr_scale": lr_scale}
                            ckpt.save(done, state, meta)
                        if preempted:
                            end = done
                            if lead and done < t.steps:
                                tqdm.write(f"{desc or t.stage}: SIGTERM: saved checkpoint step {done} in "
                                           f"{ckpt.directory}; rerun the same command to resume")
                            break
            if not rolled_back:
                break
        ckpt.close()
    return TrainResult(state, start, end, resumed_from, history, ts.n_params, fpt, roof, cfg.checkpoint_dir,
                       preempted)
