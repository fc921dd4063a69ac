"""The stage plan: six stages, one after another, each a config of its own, each resumable.

  warmstart_dense_ws     trunk + workspace, language modelling on the pretraining shards
  pkm_adapters           + PKM + adapters; model.pkm_temperature anneals to stages.pkm_temperature_end
  ssm_light              + SSM experts and the router
  latent_distill         think blocks (model/latent.py) trained by latent.recipe on stages.latent_task;
                         the workspace, router and SSM experts sit out (a LatentReasoner runs on the
                         trunk, adapters, PKM and episodic read) and keep their weights for later
  retrieval_supervision  + the episodic read of a fact store (memory/retrieval.py FactMemory); the
                         router's episodic gate learns to open for questions about rare entities
                         (s_pop < stages.retrieval_threshold) and the model to answer from memory
  compress_serve         AWQ weights and the serving bundle (serve/bundle.py)

Stage i's config is the preset with the overrides of stages 0..i (`stages.<name>`, accumulated:
a module switched on stays on), then the command line's, then the runner's own (where its
checkpoints go). Its budget is `stages.tokens[i]`, in steps tokens / (global_batch * seq_len).

What carries over: a stage starts from the parameters of the stages before it, each parameter
from the latest stage that had it (matched by path; a LatentReasoner's trunk counts as the
trunk); a module a stage switches on starts fresh. The optimizer state starts fresh in every stage
(the parameter set and the learning-rate schedule change), and so does the learning-rate warm-up.
The data stream carries on: a language-modelling stage starts where the one before it stopped.

Where things go (`run_dir`): stages/<i>_<name>/ holds a stage's checkpoints and metrics.jsonl,
and done.json once the stage is complete (its last checkpoint, data position, loss, seconds).
Resuming: complete stages are skipped; a stage with checkpoints resumes from its latest one
(the language-modelling and retrieval stages save every checkpoint.every steps, so a kill loses
at most that many steps); latent_distill saves at its end only and reruns from its start.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from quietreasoning.config import STAGES, Config, ConfigError, load_config
from quietreasoning.utils import io

KIND = {"warmstart_dense_ws": "lm", "pkm_adapters": "lm", "ssm_light": "lm", "latent_distill": "latent",
        "retrieval_supervision": "retrieval", "compress_serve": "export"}
# what a LatentReasoner cannot run (model/latent.py): latent_distill switches these off
LATENT_OFF = ("model.workspace=false", "model.router=false", "model.ssm_layers=[]")
DONE = "done.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    name: str
    kind: str            # lm | latent | retrieval | export
    cfg: Config          # what it trains with (latent_distill: the LatentReasoner's view)
    tokens: float
    steps: int           # optimizer steps (0 for compress_serve)
    dir: epath.Path      # <run_dir>/stages/<index>_<name>

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{len(STAGES)} {self.name}"

    @property
    def done_path(self) -> epath.Path:
        return self.dir / DONE

    def done(self) -> dict | None:
        """The stage's completion record, or None while it is not complete."""
        return json.loads(self.done_path.read_text()) if self.done_path.exists() else None


def _segments(stage: Stage, end_temperature: float, pieces: int) -> list[tuple[int, float]]:
    """(end step, PKM temperature) pieces of a stage: pkm_adapters anneals geometrically from its
    model.pkm_temperature to `end_temperature` in `pieces` constant pieces (when it has PKM layers
    and a different end temperature, and `pieces` >= 2); every other stage is one piece (the next
    stage starts at `end_temperature`)."""
    start = stage.cfg.model.pkm_temperature
    if stage.name != "pkm_adapters" or not stage.cfg.model.pkm_layers or math.isclose(start, end_temperature) \
            or pieces < 2 or stage.steps < pieces:
        return [(stage.steps, start)]
    ends = [round(stage.steps * (j + 1) / pieces) for j in range(pieces)]
    return [(end, float(start * (end_temperature / start) ** (j / (pieces - 1)))) for j, end in enumerate(ends)]


class StageScheduler:
    """The plan for one run: every stage's config and budget, from `preset` and `overrides`.

    `only` (stage names) restricts the run to those stages; they still see the configs of the
    stages before them (what their parameters come from). `max_steps` caps every training stage's
    steps (a quick look at the whole plan)."""

    def __init__(self, preset: str, overrides: Sequence[str], run_dir: str | os.PathLike, *,
                 only: Sequence[str] | None = None, max_steps: int | None = None):
        self.preset, self.overrides = preset, list(overrides)
        self.run_dir = io.path(run_dir)
        self.base = load_config(preset, self.overrides)
        plan = self.base.stages
        selected = list(only) if only is not None else list(plan.run)
        unknown = [s for s in selected if s not in STAGES]
        if unknown:
            raise ConfigError(f"--stages: unknown stage '{unknown[0]}'; the stages are {', '.join(STAGES)}")
        if max_steps is not None and max_steps <= 0:
            raise ConfigError(f"--steps {max_steps}: give a positive step count per stage")
        self.stages: list[Stage] = []
        added: list[str] = []
        for i, name in enumerate(STAGES):
            added += list(getattr(plan, name))
            if name == "ssm_light":  # the anneal ended with pkm_adapters: later stages keep its end
                added.append(f"model.pkm_temperature={plan.pkm_temperature_end}")
            own = [f"train.stage={name}", f"run.out_dir={self.run_dir / 'stages'}", f"run.name={i}_{name}",
                   "checkpoint.dir="]
            view = list(LATENT_OFF) if KIND[name] == "latent" else []
            try:
                cfg = load_config(preset, [*added, *view, *self.overrides, *own])
            except ConfigError as e:
                raise ConfigError(f"stages.{name} (with the stages before it and the command line): {e}") from None
            per_step = cfg.train.global_batch * cfg.train.seq_len
            steps = 0 if KIND[name] == "export" else max(1, round(plan.tokens[i] / per_step))
            if max_steps is not None:
                steps = min(steps, max_steps)
            if steps:
                cfg = load_config(preset, [*added, *view, *self.overrides, *own, f"train.steps={steps}"])
            self.stages.append(Stage(i, name, KIND[name], cfg, float(plan.tokens[i]), steps,
                                     self.run_dir / "stages" / f"{i}_{name}"))
        self.selected = [s for s in self.stages if s.name in selected]

    def stage(self, name: str) -> Stage:
        return self.stages[STAGES.index(name)]

    def segments(self, stage: Stage) -> list[tuple[int, float]]:
        return _segments(stage, self.base.stages.pkm_temperature_end, self.base.stages.anneal_segments)

    def stage_config(self, stage: Stage, **model: Any) -> Config:
        """`stage.cfg` with model fields replaced (the PKM temperature of an anneal piece)."""
        return dataclasses.replace(stage.cfg, model=dataclasses.replace(stage.cfg.model, **model)) if model else stage.cfg

    def before(self, stage: Stage) -> list[Stage]:
        """The complete stages before `stage` that trained parameters, latest first."""
        return [s for s in reversed(self.stages[:stage.index]) if s.kind != "export" and s.done()]

    def summary(self) -> list[dict]:
        """One row per stage of the plan: budget, steps, modules on, and whether it is complete."""
        rows = []
        for s in self.stages:
            m = s.cfg.model
            on = [name for name, flag in (("workspace", m.workspace), ("pkm", m.pkm_layers), ("adapters", m.adapters),
                                          ("ssm", m.ssm_layers), ("router", m.router), ("episodic", m.episodic)) if flag]
            rows.append({"stage": s.name, "selected": s in self.selected, "tokens": s.tokens, "steps": s.steps,
                         "on": on, "lr": s.cfg.train.lr, "complete": s.done() is not None})
        return rows


# ----------------------------------------------------------------------------- parameters across stages

def _path_key(path) -> tuple[str, ...]:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    keys = keys[:-1] if keys and keys[-1] == "value" else keys
    return keys[1:] if keys and keys[0] == "trunk" else keys  # a LatentReasoner's trunk is the trunk


def flat_params(params) -> dict[tuple[str, ...], jax.Array]:
    """{path: array} of a parameter tree, the trunk's paths the same whether the tree is a Trunk's
    or a LatentReasoner's."""
    return {_path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def carry_into(params, sources: Sequence[dict[tuple[str, ...], jax.Array]]) -> tuple[Any, dict[str, int]]:
    """`params` (a fresh tree) with every leaf that a source holds at the same path and shape
    replaced by the first such source's array (placed as the fresh leaf is). Returns (tree,
    {"carried": n, "fresh": m})."""
    counts = {"carried": 0, "fresh": 0}

    def take(path, fresh):
        key = _path_key(path)
        for source in sources:
            old = source.get(key)
            if old is not None and old.shape == fresh.shape:
                counts["carried"] += 1
                return jax.device_put(old.astype(fresh.dtype), fresh.sharding)
        counts["fresh"] += 1
        return fresh
    return jax.tree_util.tree_map_with_path(take, params), counts


def _abstract_params(stage: Stage, mesh) -> Any:
    """The stage's parameters as ShapeDtypeStructs with this mesh's shardings (nothing allocated)."""
    from quietreasoning.training import sharding

    if stage.kind == "latent":
        from quietreasoning.model.latent import LatentReasoner

        abstract = nnx.state(nnx.eval_shape(lambda: LatentReasoner(
            stage.cfg.model, stage.cfg.latent.projection_hidden, rngs=nnx.Rngs(0))), nnx.Param)
    else:
        from quietreasoning.training.train_step import abstract_train_state

        abstract = abstract_train_state(stage.cfg)[3]["params"]
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, sharding.shardings(mesh, abstract))


def stage_params(stage: Stage, mesh):
    """The parameters a complete stage ended with, laid out on `mesh`."""
    from quietreasoning.training.checkpoint import load_parameters

    record = stage.done()
    if record is None:
        raise ConfigError(f"{stage.dir}: stage {stage.name} is not complete; run it first (run.py --stages ...)")
    target = _abstract_params(stage, mesh)  # outside the mesh context: eval_shape would shard by name there
    with jax.set_mesh(mesh):
        return load_parameters(record["checkpoint"], target)


def carried_sources(sched: StageScheduler, stage: Stage, mesh) -> list[dict]:
    """The flat parameters of the complete stages before `stage`, latest first."""
    return [flat_params(stage_params(s, mesh)) for s in sched.before(stage)]


def _require_before(sched: StageScheduler, stage: Stage) -> None:
    missing = [s.name for s in sched.stages[:stage.index] if s.kind != "export" and s.steps and not s.done()]
    if missing:
        raise ConfigError(f"stage {stage.name} starts from the stages before it, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not complete in {sched.run_dir}; run "
                          f"--stages {missing[0]}..{stage.name} (or the whole plan)")


def _write_done(stage: Stage, record: dict) -> dict:
    record = {"stage": stage.name, "index": stage.index, "steps": stage.steps, "tokens": stage.tokens, **record}
    if jax.process_index() == 0:  # one writer on a multi-host slice (the run directory is shared)
        io.atomic_write_text(stage.done_path, json.dumps(record, indent=1))
    return record


def _checkpoint_record(cfg: Config) -> dict:
    """{"checkpoint": the latest step directory, "data_position": its data position}."""
    from quietreasoning.training.checkpoint import Checkpointer

    ckpt = Checkpointer(cfg.checkpoint_dir, async_save=False)
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step)
    ckpt.close()
    return {"checkpoint": str(io.path(cfg.checkpoint_dir) / str(step)), "data_position": meta.get("data_position")}


def _final_loss(stage: Stage) -> float | None:
    """The mean logged loss of the stage's last five log records (metrics.jsonl)."""
    losses = [r["loss"] for r in stage_metrics(stage) if "loss" in r]
    return float(np.mean(losses[-5:])) if losses else None


# ----------------------------------------------------------------------------- the language-modelling stages

def run_lm(sched: StageScheduler, stage: Stage, *, progress: bool = True,
           stop_at: int | None = None, stream: Callable | None = None) -> dict | None:
    """Trains a language-modelling stage (and the retrieval stage, with its `stream`) through its
    anneal pieces; returns its done record, or None when `stop_at` (a step) or SIGTERM ended it early."""
    from quietreasoning.training import sharding
    from quietreasoning.training.checkpoint import Checkpointer
    from quietreasoning.training.trainer import train

    _require_before(sched, stage)
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(stage.cfg)
    ckpt = Checkpointer(stage.cfg.checkpoint_dir, async_save=False)
    latest = ckpt.latest_step() or 0
    ckpt.close()
    before = sched.before(stage)
    position = next((s.done().get("data_position") for s in before if s.kind == "lm"), None) \
        if stage.kind == "lm" else None

    # read here, outside the trainer's mesh context; only a stage without checkpoints needs them
    sources = carried_sources(sched, stage, mesh) if not latest else []

    def initial(ts):
        params, counts = carry_into(ts.init()["params"], sources)
        initial.counts = counts
        return ts.state_from_params(params), position
    initial.counts = None

    result = None
    for end, temperature in sched.segments(stage):
        if end <= latest:
            continue
        cfg = sched.stage_config(stage, pkm_temperature=temperature)
        last = end if stop_at is None else min(end, stop_at)
        result = train(cfg, mesh=mesh, progress=progress, stop_at=last, initial=initial, stream=stream,
                       measure_roof=False, desc=stage.label)
        latest = result.final_step
        if (result.preempted or stop_at is not None and latest >= stop_at) and latest < stage.steps:
            return None
    return _write_done(stage, {**_checkpoint_record(stage.cfg), "final_loss": _final_loss(stage),
                               "seconds": time.perf_counter() - t0, "carried": initial.counts,
                               "segments": [[e, t] for e, t in sched.segments(stage)]})


# ----------------------------------------------------------------------------- models of complete stages

def stage_model(stage: Stage, mesh) -> nnx.Module:
    """The model a complete stage ended with: a LatentReasoner for latent_distill, else a Trunk."""
    params = stage_params(stage, mesh)
    if stage.kind == "latent":
        from quietreasoning.model.latent import LatentReasoner

        graphdef = nnx.split(nnx.eval_shape(lambda: LatentReasoner(
            stage.cfg.model, stage.cfg.latent.projection_hidden, rngs=nnx.Rngs(0))))[0]
    else:
        from quietreasoning.training.train_step import abstract_train_state

        graphdef = abstract_train_state(stage.cfg)[0]
    return nnx.merge(graphdef, params)


def _save_params(stage: Stage, params, step: int, meta: dict) -> None:
    from quietreasoning.training.checkpoint import Checkpointer

    ckpt = Checkpointer(stage.cfg.checkpoint_dir, max_to_keep=1, async_save=False)
    ckpt.save(step, {"params": params}, {"stage": stage.name, "step": step, "config": stage.cfg.to_dict(), **meta})
    ckpt.close()


def _write_metrics(stage: Stage, rows: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    stage.dir.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(stage.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- latent_distill

def latent_examples(stage: Stage, split: str, n: int) -> list[dict]:
    from quietreasoning.data import tasks

    return tasks.reasoning_split(stage.cfg.stages.latent_task, split, n, stage.cfg.train.seed)


def run_latent(sched: StageScheduler, stage: Stage, tokenizer, *, progress: bool = True) -> dict:
    """Trains think blocks on stages.latent_task with latent.recipe (training/latent.py): coconut
    runs its curriculum with the steps shared evenly among its stages; codi trains teacher and
    student together; stochastic runs the coconut curriculum for three quarters of the steps,
    then the REINFORCE loop. Saves the LatentReasoner's parameters at the end."""
    from quietreasoning.model.latent import LatentReasoner
    from quietreasoning.training import latent as latent_training
    from quietreasoning.training import sharding

    _require_before(sched, stage)
    t0 = time.perf_counter()
    cfg, lat = stage.cfg, stage.cfg.latent
    mesh = sharding.make_mesh(cfg)
    heads = lat.k_max if lat.recipe == "stochastic" else 0
    model = LatentReasoner(cfg.model, lat.projection_hidden, heads=heads, rngs=nnx.Rngs(cfg.train.seed))
    params, counts = carry_into(nnx.state(model, nnx.Param), carried_sources(sched, stage, mesh))
    nnx.update(model, params)
    batch = cfg.train.global_batch
    examples = latent_examples(stage, "train", min(5000, max(512, stage.steps * batch)))
    encoded = [latent_training.encode(tokenizer, ex) for ex in examples]
    curriculum = latent_training.curriculum(encoded, cfg) if lat.recipe != "codi" else [0]
    rl_steps = stage.steps // 4 if lat.recipe == "stochastic" else 0
    first = stage.steps - rl_steps
    plan = [(c, first // len(curriculum) + (1 if j < first % len(curriculum) else 0))
            for j, c in enumerate(curriculum)]
    plan = [(c, n) for c, n in plan if n]
    coconut = dataclasses.replace(cfg, latent=dataclasses.replace(lat, recipe="coconut")) \
        if lat.recipe == "stochastic" else cfg
    kwargs = dict(bot_id=tokenizer.bot_id, eot_id=tokenizer.eot_id, batch_size=batch, progress=progress)
    history = latent_training.train(model, encoded, coconut, stage_steps=plan, seed=cfg.train.seed, **kwargs)
    if rl_steps:
        history += latent_training.train(model, encoded, cfg, stage_steps=[(curriculum[-1], rl_steps)],
                                         seed=cfg.train.seed + 1, **kwargs)
    _write_metrics(stage, [dict(h, stage=stage.name, curriculum_stage=h.get("stage")) for h in history])
    _save_params(stage, nnx.state(model, nnx.Param), stage.steps, {"curriculum": plan})
    losses = [h["loss"] for h in history]
    return _write_done(stage, {**_checkpoint_record(cfg), "final_loss": float(np.mean(losses[-5:])) if losses else None,
                               "seconds": time.perf_counter() - t0, "carried": counts, "curriculum": plan,
                               "examples": len(encoded), "recipe": lat.recipe})


# ----------------------------------------------------------------------------- retrieval_supervision

def fact_world(cfg: Config, popqa_path: str = "") -> tuple[list[dict], list[dict]]:
    """(training facts, held-out facts) of the PopQA-format world: `popqa_path` (a PopQA jsonl
    file) or the generated world of the data's seed (data/tasks.py popqa_records, whose facts the
    embedded corpus asks about). stages.eval_examples facts, drawn with the seed, are held out:
    the retrieval stage never trains on their questions; the evaluation asks them."""
    from quietreasoning.data import tasks
    from quietreasoning.eval.popqa import load_records

    records = load_records(popqa_path) if popqa_path else tasks.popqa_records(cfg.train.seed)
    n = cfg.stages.eval_examples
    if n >= len(records):
        raise ConfigError(f"stages.eval_examples={n}: the fact world has {len(records)} records; hold out fewer")
    held = set(np.random.default_rng([cfg.train.seed, 0x464]).choice(len(records), n, replace=False).tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def fact_memory(sched: StageScheduler, stage: Stage, tokenizer, records: Sequence[dict], mesh, *,
                progress: bool = True):
    """The FactMemory of `records` (memory/retrieval.py), keyed and valued by the model of the
    stage before `stage` (the encoder is frozen: the retrieval stage's keys never move)."""
    from quietreasoning.memory.retrieval import FactMemory
    from quietreasoning.model.trunk import Trunk

    source = sched.before(stage)[0]
    encoder = Trunk(source.cfg.model, rngs=nnx.Rngs(0))
    params, _ = carry_into(nnx.state(encoder, nnx.Param), [flat_params(stage_params(source, mesh))])
    nnx.update(encoder, params)
    return FactMemory.build(stage.cfg, encoder, tokenizer, records, progress=progress)


class FactStream:
    """Batches of fact questions with their retrieved memories and router targets: batch i is a
    pure function of the seed and i (rows drawn with replacement), so position() is i. Rows are
    '<bos>Q: <question>\\nA: <answer><eos>' (tasks.fact_document), the loss on the answer and
    <eos>; `retrieve` is 1 for a fact whose s_pop is below stages.retrieval_threshold."""

    def __init__(self, cfg: Config, batch_sh, position=None, log=print, *, rows, roles, keys, store, retrieve, eos_id):
        self.cfg, self.batch_sh, self.eos_id = cfg, batch_sh, eos_id
        self.rows, self.roles, self.keys, self.store, self.retrieve = rows, roles, keys, store, retrieve
        self.index = int(position or 0)

    def next(self):
        from quietreasoning.data.shards import ROLES
        from quietreasoning.memory.retrieval import memory_arrays
        from quietreasoning.training.train_step import put_batch

        t = self.cfg.train
        pick = np.random.default_rng([t.seed, 0x5EED, self.index]).integers(0, len(self.rows), t.global_batch)
        self.index += 1
        b = {k: np.zeros((t.global_batch, t.seq_len), np.float32 if k.endswith("mask") else np.int32)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "answer_mask")}
        for r, i in enumerate(pick):
            ids, roles = self.rows[i][:t.seq_len + 1], self.roles[i][:t.seq_len + 1]
            n = len(ids) - 1
            b["inputs"][r, :n], b["targets"][r, :n] = ids[:-1], ids[1:]
            b["segment_ids"][r, :n], b["positions"][r, :n] = 1, np.arange(n)
            predicts_answer = (roles[1:] == ROLES["answer"]) | (ids[1:] == self.eos_id)
            b["loss_mask"][r, :n] = predicts_answer
            b["answer_mask"][r, :n] = roles[:-1] == ROLES["answer"]
        # searched per batch (the rows' memories for the whole set would be k times the store)
        b.update(memory_arrays(self.store.search(self.keys[pick])))
        b["retrieve"] = self.retrieve[pick][:, None].astype(np.float32)
        return put_batch(b, self.batch_sh)

    def position(self) -> int:
        return self.index


def run_retrieval(sched: StageScheduler, stage: Stage, tokenizer, *, popqa: str = "", progress: bool = True,
                  stop_at: int | None = None) -> dict | None:
    """Builds the fact store with the model so far, then trains with the episodic read on: the
    answer loss of every training fact's question given its retrieved memories, and the router's
    episodic gate toward 1[s_pop < stages.retrieval_threshold] (losses.router_retrieval)."""
    from quietreasoning.data import tasks
    from quietreasoning.data.build import encode
    from quietreasoning.training import sharding

    _require_before(sched, stage)
    if not stage.cfg.model.router:
        raise ConfigError("stages.retrieval_supervision: the router supervision needs model.router=true in this "
                          "stage (switch it on in stages.ssm_light or stages.retrieval_supervision)")
    train_facts, _ = fact_world(stage.cfg, popqa)
    mesh = sharding.make_mesh(stage.cfg)
    memory = fact_memory(sched, stage, tokenizer, train_facts, mesh, progress=progress)
    encoded = encode(tokenizer, [tasks.fact_document(r) for r in train_facts])
    longest = max(len(ids) for ids, _ in encoded)
    if longest - 1 > stage.cfg.train.seq_len:
        raise ConfigError(f"train.seq_len={stage.cfg.train.seq_len}: a fact question takes {longest - 1} tokens; "
                          "raise train.seq_len for stages.retrieval_supervision")
    retrieve = np.array([r["s_pop"] < stage.cfg.stages.retrieval_threshold for r in train_facts])
    keys = memory.keys([r["question"] for r in train_facts])
    stream = functools.partial(FactStream, rows=[ids for ids, _ in encoded], roles=[roles for _, roles in encoded],
                               keys=keys, store=memory.store, retrieve=retrieve, eos_id=tokenizer.eos_id)
    record = run_lm(sched, stage, progress=progress, stop_at=stop_at, stream=stream)
    if record is not None:
        record = _write_done(stage, {**record, "facts": len(train_facts), "rare_share": float(retrieve.mean())})
    return record


# ----------------------------------------------------------------------------- compress_serve

def run_export(sched: StageScheduler, stage: Stage, tokenizer_path: str, *, progress: bool = True) -> dict:
    """Exports the last trained stage's model as the serving bundle (serve/bundle.py) with
    serve.awq_bits AWQ weights calibrated on the pretraining stream, into <stage dir>/bundle."""
    from quietreasoning.serve.awq import calibration_batches
    from quietreasoning.serve.bundle import export_bundle
    from quietreasoning.training import sharding

    _require_before(sched, stage)
    t0 = time.perf_counter()
    before = sched.before(stage)
    if not before:
        raise ConfigError("compress_serve: no trained stage to export; run the training stages first")
    source = next((s for s in before if s.kind != "latent"), before[0])
    out = stage.dir / "bundle"
    if not out.exists():  # a bundle is renamed into place complete: one that exists is finished
        cfg = dataclasses.replace(source.cfg, serve=stage.cfg.serve)
        model = stage_model(source, sharding.make_mesh(source.cfg))
        export_bundle(model, cfg, tokenizer_path, out, bits=cfg.serve.awq_bits, calib_batches=calibration_batches(cfg))
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return _write_done(stage, {"bundle": str(out), "source_stage": source.name, "seconds": time.perf_counter() - t0,
                               "manifest": manifest})


# ----------------------------------------------------------------------------- the run's log

def stage_metrics(stage: Stage, offset: int = 0) -> list[dict]:
    """The stage's logged records (its metrics.jsonl, read as utils/telemetry.py reads a log),
    each with "stage" and "global_step" (`offset` + its step); none before the stage logs."""
    from quietreasoning.utils.telemetry import read_metrics

    path = stage.dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    return [dict(row, stage=stage.name, global_step=offset + int(row.get("step", 0))) for row in rows]


def run_metrics(sched: StageScheduler) -> list[dict]:
    """Every stage's records in plan order, steps counted across the whole run."""
    rows, offset = [], 0
    for stage in sched.stages:
        rows += stage_metrics(stage, offset)
        offset += stage.steps
    return rows
