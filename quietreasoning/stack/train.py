"""Training the idea-bottleneck stack, and loading what training wrote.

The train state is {"params": every parameter of the IdeaStack, "opt_state", "step"}. `freeze`
picks the trainable part: none (all), trunks (pooling, compression, middle and expansion only) or
lora (those and the trunks' LoRA/IA3 adapter `stack`). The step differentiates the trainable part
only (frozen parameters get no gradient, no Adam moments, and stay bit-identical); the optimizer
is the project's (training/optimizer.py: AdamW, warm-up + cosine, clipping, decay on matrices)
over train.* of the project config.

Start order, as in the trainer: this run's latest checkpoint, else a fresh init with the trunk
weights of `init_from` (a project checkpoint step directory) copied into both trunks, else a fresh
init. Batch i is a pure function of the seed and i, so a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from quietreasoning.config import Config, ConfigError
from quietreasoning.model.trunk import Trunk
from quietreasoning.stack.config import StackConfig, run_dir, stack_config
from quietreasoning.stack.data import Example, batch_rows, encode, examples, tokenizer_for
from quietreasoning.stack.model import IdeaStack
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer, load_parameters
from quietreasoning.training.optimizer import make_optimizer
from quietreasoning.training.train_step import lm_loss
from quietreasoning.training.trainer import TrainingDiverged
from quietreasoning.utils.io import atomic_write_text
from quietreasoning.utils.tokenizer import Tokenizer

TRUNKS = nnx.Any(nnx.PathContains("encoder"), nnx.PathContains("decoder"))
BATCH_KEYS = ("enc_tokens", "enc_segments", "dec_inputs", "dec_targets", "dec_mask")
WORD_DROPOUT_STREAM = 0x5744  # the word-dropout random stream: folded into the seed, then the step


def trainable_filter(freeze: str):
    """The parameters the optimizer updates under `freeze` (an nnx filter)."""
    if freeze == "none":
        return nnx.Param
    if freeze == "trunks":
        return nnx.All(nnx.Param, nnx.Not(TRUNKS))
    return nnx.All(nnx.Param, nnx.Any(nnx.Not(TRUNKS), nnx.PathContains("adapters")))


@dataclasses.dataclass
class StackSetup:
    """The stack's graph, optimizer, shardings and jitted steps for one (stack, project) config."""
    s: StackConfig
    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    trainable: Any                   # the nnx filter of trainable parameters
    tx: optax.GradientTransformation
    init_fn: Callable
    abstract_state: dict[str, Any]
    state_shardings: dict[str, Any]
    batch_sharding: NamedSharding
    step_fn: Callable

    def init(self, trunk_params=None) -> dict[str, Any]:
        """A fresh train state in its shards; `trunk_params` (a trunk's parameters) go into both trunks."""
        key = jax.random.key(self.cfg.train.seed)
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)(key, trunk_params)

    def abstract_sharded(self) -> dict[str, Any]:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def model(self, params) -> IdeaStack:
        return nnx.merge(self.graphdef, params)

    def put(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.device_put(v, self.batch_sharding) for k, v in arrays.items()}

    def n_params(self, which: str = "all") -> int:
        params = self.abstract_state["params"]
        if which == "trainable":
            params = nnx.split_state(params, self.trainable, ...)[0]
        return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def setup(s: StackConfig, cfg: Config, mesh: Mesh) -> StackSetup:
    if cfg.train.trainable != "all":
        raise ConfigError(f"train.trainable={cfg.train.trainable}: the stack freezes by its own key; use "
                          "freeze=trunks or freeze=lora instead")
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.global_batch % data_parallel:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} rows do not split over mesh data*fsdp="
                          f"{data_parallel}; make it a multiple")
    tx = make_optimizer(cfg.train)
    trainable = trainable_filter(s.freeze)

    def init_fn(key, trunk_params):
        model = IdeaStack(s, cfg.model, rngs=nnx.Rngs(params=key))
        if trunk_params is not None:
            nnx.update(model.encoder, trunk_params)
            nnx.update(model.decoder, trunk_params)
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": tx.init(nnx.split_state(params, trainable, ...)[0]),
                "step": jnp.zeros((), jnp.int32)}

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: IdeaStack(s, cfg.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init_fn, jax.random.key(0), None)
    sharding.check_divisible(abstract, dict(mesh.shape))
    state_shardings = sharding.shardings(mesh, abstract)
    batch_sh = sharding.batch_sharding(mesh)
    z_loss = cfg.train.z_loss

    def loss_fn(train_params, frozen, batch):
        logits = nnx.merge(graphdef, train_params, frozen)(batch)
        mask = batch["dec_mask"].astype(jnp.float32)
        total, ce = lm_loss(logits, batch["dec_targets"], mask, z_loss)
        denom = jnp.maximum(jnp.sum(mask), 1.0)
        return total / denom, ce / denom

    dropout_key = jax.random.fold_in(jax.random.key(cfg.train.seed), WORD_DROPOUT_STREAM)

    def step(state, batch):
        if s.word_dropout > 0:  # decoder inputs after <bos> become <pad> (0), which the decoder never reads else
            key = jax.random.fold_in(dropout_key, state["step"])
            drop = jax.random.bernoulli(key, s.word_dropout, batch["dec_inputs"].shape).at[:, 0].set(False)
            batch = {**batch, "dec_inputs": jnp.where(drop, 0, batch["dec_inputs"])}
        train_params, frozen = nnx.split_state(state["params"], trainable, ...)
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], train_params)
        params = nnx.merge_state(optax.apply_updates(train_params, updates), frozen)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": ce, "grad_norm": optax.tree.norm(grads)}

    step_fn = jax.jit(step, in_shardings=(state_shardings, {k: batch_sh for k in BATCH_KEYS}),
                      out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
    return StackSetup(s, cfg, mesh, graphdef, trainable, tx, init_fn, abstract, state_shardings, batch_sh, step_fn)


def load_trunk(path: str, cfg: Config, mesh: Mesh):
    """The trunk parameters (adapters left out: a project checkpoint has none) of the checkpoint
    step directory `path`, laid out for `mesh`."""
    abstract = jax.eval_shape(lambda: nnx.state(Trunk(cfg.model, rngs=nnx.Rngs(0)),
                                                nnx.All(nnx.Param, nnx.Not(nnx.PathContains("adapters")))))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, sharding.shardings(mesh, abstract))
    try:
        return load_parameters(path, target)
    except ConfigError as e:
        raise ConfigError(f"init_from={path}: {str(e).partition(': ')[2]}") from None


@dataclasses.dataclass
class StackRun:
    """What `train` and `load_run` give: the setup, the parameters and the tokenizer of one run."""
    setup: StackSetup
    params: Any
    tokenizer: Tokenizer
    train: list[Example]
    held_out: list[Example]
    history: list[dict[str, float]]
    start_step: int
    final_step: int

    @property
    def s(self) -> StackConfig:
        return self.setup.s

    def model(self) -> IdeaStack:
        return self.setup.model(self.params)


def _check_same_run(saved: dict[str, Any], s: StackConfig, cfg: Config, where) -> None:
    """A checkpoint of another stack or trunk is an error, not a silent mix."""
    here = json.loads(json.dumps({"stack": s.to_dict(), "model": cfg.to_dict()["model"]}))
    changed = [f"{k}={saved['stack'].get(k)} there, {v} here" for k, v in here["stack"].items()
               if k not in ("trunk", "eval_examples") and saved["stack"].get(k) != v]
    changed += [f"model.{k}={saved['config']['model'].get(k)} there, {v} here" for k, v in here["model"].items()
                if saved["config"]["model"].get(k) != v]
    if changed:
        raise ConfigError(f"{where}: its checkpoints are of another stack ({'; '.join(changed)}); set run.name "
                          "for a new run, or drop those overrides")


def train(s: StackConfig, *, mesh: Mesh | None = None, progress: bool = True, stop_at: int | None = None) -> StackRun:
    """Trains train.steps steps (or until `stop_at`), checkpointing every checkpoint.every steps and
    at the end; metrics go to <run>/metrics.jsonl."""
    cfg = s.project_config()
    t = cfg.train
    mesh = mesh or sharding.make_mesh(cfg)
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    train_set, held_out = examples(s, t.seed)
    tok = tokenizer_for(s, cfg, train_set)
    arrays = encode(tok, train_set, s)
    ts = setup(s, cfg, mesh)
    metrics_path = folder / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    ckpt = Checkpointer(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.max_to_keep,
                        async_save=cfg.checkpoint.async_save)
    with jax.set_mesh(mesh):
        latest = ckpt.latest_step()
        if latest is not None:
            _check_same_run(ckpt.read_meta(latest), s, cfg, ckpt.directory)
            state, _ = ckpt.restore(latest, ts.abstract_sharded())
        else:
            state = ts.init(load_trunk(s.init_from, cfg, mesh) if s.init_from else None)
        start = int(jax.device_get(state["step"]))
        end = max(start, min(t.steps, stop_at) if stop_at is not None else t.steps)
        history = [h for h in history if h["step"] <= start]
        bar = tqdm(total=t.steps, initial=start, disable=not progress, desc="stack", unit="step", dynamic_ncols=True)
        for step in range(start, end):
            rows = batch_rows(len(train_set), t.global_batch, t.seed, step)
            state, metrics = ts.step_fn(state, ts.put({k: v[rows] for k, v in arrays.items()}))
            done = step + 1
            if done % t.log_every == 0 or done == end or done % cfg.checkpoint.every == 0:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(map(math.isfinite, m.values())):
                    ckpt.close()
                    raise TrainingDiverged(f"stack: loss={m['loss']} grad_norm={m['grad_norm']} at step {done}; "
                                           f"lower train.lr (now {t.lr}); the last good checkpoint is in "
                                           f"{cfg.checkpoint_dir}")
                history.append({"step": done, **m})
                atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
                bar.set_postfix(loss=f"{m['loss']:.3f}")
            bar.update(1)
            if done % cfg.checkpoint.every == 0 or done == end:
                ckpt.save(done, state, {"step": done, "stack": s.to_dict(), "config": cfg.to_dict()})
        bar.close()
        ckpt.close()
    return StackRun(ts, state["params"], tok, train_set, held_out, history, start, end)


def load_run(overrides: list[str] | tuple[str, ...] = (), *, mesh: Mesh | None = None) -> StackRun:
    """The latest checkpoint of the run that `overrides` name (run.name, run.out_dir): its recorded
    stack config with `overrides` applied again on top, its parameters and its tokenizer."""
    cfg = stack_config(overrides).project_config()
    ckpt = Checkpointer(cfg.checkpoint_dir, async_save=False)
    latest = ckpt.latest_step()
    if latest is None:
        ckpt.close()
        raise ConfigError(f"{ckpt.directory}: no stack checkpoint; train one first with "
                          "`python -m quietreasoning.stack train` (with the same run.name)")
    saved = ckpt.read_meta(latest)
    ckpt.close()
    s = stack_config(overrides, saved["stack"])
    cfg = s.project_config()
    mesh = mesh or sharding.make_mesh(cfg)
    train_set, held_out = examples(s, cfg.train.seed)
    tok = tokenizer_for(s, cfg, train_set, create=False)
    ts = setup(s, cfg, mesh)
    with jax.set_mesh(mesh):
        params = load_parameters(f"{cfg.checkpoint_dir}/{latest}", ts.abstract_sharded()["params"])
    return StackRun(ts, params, tok, train_set, held_out, [], latest, latest)
