"""The training loop shared by `train.py` and `run.py`: one config, one stage.

Resume order: this run's latest checkpoint, else `train.load_parameters_path` (parameters
only, fresh optimizer), else a fresh init. Batch `i` of the stream is a pure function of the
seed and `i`, and the checkpoint records the data position, so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
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

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


# model keys a run may change between its checkpoints: they change no parameter (the stage plan
# anneals the PKM temperature in segments of one stage)
RESUMABLE_CHANGES = ("pkm_temperature",)


def _restore_or_init(cfg: Config, ts, ckpt: Checkpointer, initial=None) -> tuple[dict, int, str]:
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.read_meta(latest)["config"]["model"]
        here = json.loads(json.dumps(cfg.to_dict()["model"]))  # as the checkpoint's JSON stored it
        changed = [f"model.{k}={saved.get(k)} there, {v} here" for k, v in here.items()
                   if saved.get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(
                f"{ckpt.directory}: its checkpoints are of another model ({'; '.join(changed)}); "
                "set run.name (or checkpoint.dir) to start a new run, or drop the model overrides")
        state, meta = ckpt.restore(latest, ts.abstract_sharded())
        return state, meta["data_position"], "checkpoint"
    if initial is not None:
        state, position = initial(ts)
        return state, position, "carried"
    if cfg.train.load_parameters_path:
        params = load_parameters(cfg.train.load_parameters_path, ts.abstract_sharded()["params"])
        return ts.state_from_params(params), None, "parameters"
    return ts.init(), None, "init"


def train(cfg: Config, *, mesh: Mesh | None = None, measure_roof: bool = True, progress: bool = True,
          stop_at: int | None = None, initial=None, stream=None, desc: str | None = None) -> TrainResult:
    """Trains `cfg.train.steps` steps (or until `stop_at`, as a preemption would), saving
    checkpoints every `checkpoint.every` steps and at the end.

    The staged runner (training/stages.py) passes `initial(ts) -> (state, data position)`, used
    when this run has no checkpoint yet (the state a stage carries over from the ones before it),
    and `stream(cfg, batch_sharding, position)`, a batch source with next() and position() in
    place of the configured one (input.batches)."""
    mesh = mesh or sharding.make_mesh(cfg)
    t = cfg.train
    ts = setup(cfg, mesh)
    n_devices = mesh.devices.size
    fpt = flops_per_token(cfg.model, t.seq_len)
    roof = machine_roof() if measure_roof else None
    schedule = lr_schedule(t)

    run_dir = io.path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    ckpt = Checkpointer(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.max_to_keep,
                        async_save=cfg.checkpoint.async_save)
    with jax.set_mesh(mesh):
        state, position, resumed_from = _restore_or_init(cfg, ts, ckpt, initial)
        start = int(jax.device_get(state["step"]))
        data = (stream or batches)(cfg, ts.batch_sharding, position, log=tqdm.write)
        history = [h for h in history if h["step"] <= start]
        end = max(start, min(t.steps, stop_at) if stop_at is not None else t.steps)
        lead = jax.process_index() == 0
        bar = tqdm(total=t.steps, initial=start, disable=not (progress and lead), desc=desc or t.stage, unit="step",
                   dynamic_ncols=True)
        window_t0, window_steps = time.perf_counter(), 0
        for step in range(start, end):
            batch = data.next()
            state, metrics = ts.step_fn(state, batch)
            window_steps += 1
            done = step + 1
            if step == start:  # the first step includes compilation: restart the clock after it
                jax.block_until_ready(metrics)
                window_t0, window_steps = time.perf_counter(), 0
            log_now = done % t.log_every == 0 or done == end
            save_now = done % cfg.checkpoint.every == 0 or done == end
            if log_now or save_now:  # a state is checked finite before it is ever saved
                m = jax.device_get(metrics)
                if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                    ckpt.close()
                    raise TrainingDiverged(
                        f"train: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} at step {done}; "
                        f"lower train.lr (now {t.lr}) or raise train.warmup_steps; the last good checkpoint "
                        f"is in {cfg.checkpoint_dir}")
            if log_now:
                dt = time.perf_counter() - window_t0
                record = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                          "lr": float(schedule(done - 1))}
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
                                **({"tok/s": f"{record['tokens_per_s']:.0f}"} if "tokens_per_s" in record else {}),
                                **({"mfu": f"{record['mfu']:.0%}"} if "mfu" in record else {}))
                window_t0, window_steps = time.perf_counter(), 0
            bar.update(1)
            if save_now:
                meta = {"stage": t.stage, "step": done, "data_position": data.position(), "config": cfg.to_dict()}
                ckpt.save(done, state, meta)
        bar.close()
        ckpt.close()
    return TrainResult(state, start, end, resumed_from, history, ts.n_params, fpt, roof, cfg.checkpoint_dir)
