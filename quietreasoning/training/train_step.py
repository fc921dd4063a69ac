"""The train state and the jitted train step.

The NNX module is split once into a graph definition and a state of parameters; the step is
a plain `jax.jit` over that state with explicit in/out shardings (re-walking the module graph
every call costs more than the step on small models).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quietreasoning.config import Config, ConfigError
from quietreasoning.model.trunk import Trunk
from quietreasoning.training import sharding
from quietreasoning.training.losses import module_losses
from quietreasoning.training.optimizer import make_optimizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "answer_mask")
# optional: retrieved memory tokens (B, M, E) and their mask (B, M) for the episodic read (memory/retrieval.py)
MEMORY_KEYS = ("memory", "memory_mask")
# optional: 1 where the row's question should be answered from the episodic store (B, 1), the
# retrieval_supervision stage's router target (training/losses.py retrieval_supervision_loss)
SUPERVISION_KEYS = ("retrieve",)


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float):
    """Sum over masked positions of cross-entropy + z_loss * log(Z)^2, and the masked CE sum."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (logz - target_logit) * mask
    return jnp.sum(ce + z_loss * jnp.square(logz) * mask), jnp.sum(ce)


@dataclasses.dataclass
class TrainSetup:
    """Everything a loop needs: the model's graph, the optimizer, shardings and the step."""
    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    init_fn: Callable[[jax.Array], dict[str, Any]]
    abstract_state: dict[str, Any]   # ShapeDtypeStructs, no shardings
    state_shardings: dict[str, Any]
    batch_sharding: NamedSharding
    step_fn: Callable

    def init(self) -> dict[str, Any]:
        """A fresh train state, created directly in its shards."""
        key = jax.random.key(self.cfg.train.seed)
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)(key)

    def state_from_params(self, params) -> dict[str, Any]:
        """A train state around given (e.g. loaded) params: fresh optimizer, step 0."""
        return jax.jit(lambda p: train_state(p, self.tx), out_shardings=self.state_shardings)(params)

    def abstract_sharded(self) -> dict[str, Any]:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    @property
    def n_params(self) -> int:
        return n_params(self.abstract_state)


def n_params(state) -> int:
    """Exact parameter count of a (possibly abstract) train state."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))


def train_state(params, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The train state's layout: params, a fresh optimizer state, step 0, and the counts of
    skipped updates (`bad_streak` consecutive ones now, `skipped` in all)."""
    counters = {k: jnp.zeros((), jnp.int32) for k in ("step", "bad_streak", "skipped")}  # three buffers: donated apart
    return {"params": params, "opt_state": tx.init(params), **counters}


def abstract_train_state(cfg: Config):
    """(graphdef, tx, init_fn, abstract state): shapes only, nothing allocated."""
    tx = make_optimizer(cfg.train)

    def init_fn(key):
        return train_state(nnx.state(Trunk(cfg.model, rngs=nnx.Rngs(params=key)), nnx.Param), tx)

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Trunk(cfg.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    return graphdef, tx, init_fn, abstract


def setup(cfg: Config, mesh: Mesh) -> TrainSetup:
    graphdef, tx, init_fn, abstract = abstract_train_state(cfg)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % data_parallel:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} / train.grad_accum={cfg.train.grad_accum} = {micro} rows "
            f"per micro-batch do not split over mesh data*fsdp={data_parallel}; make it a multiple")
    sharding.check_divisible(abstract, dict(mesh.shape))
    state_shardings = sharding.shardings(mesh, abstract)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = make_train_step(cfg, graphdef, tx, state_shardings, batch_sh, mesh)
    return TrainSetup(cfg, mesh, graphdef, tx, init_fn, abstract, state_shardings, batch_sh, step_fn)


def make_train_step(cfg: Config, graphdef, tx, state_shardings, batch_sh, mesh: Mesh):
    t = cfg.train
    accum = t.grad_accum

    def loss_fn(params, batch, denom):
        model = nnx.merge(graphdef, params)
        h, aux = model.forward(batch["inputs"], batch["segment_ids"], batch["positions"],
                               memory=batch.get("memory"), memory_mask=batch.get("memory_mask"))
        total, ce = lm_loss(model.logits(h), batch["targets"], batch["loss_mask"], t.z_loss)
        embeddings = jnp.take(model.embed[...], batch["inputs"], axis=0) if "workspace" in aux else None
        extra, metrics = module_losses(aux, batch, cfg, embeddings)
        # the LM sum is over the whole batch; the module terms are means per micro-batch
        return total / denom + extra / accum, (ce, metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params = state["params"]
        denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if accum == 1:
            (_, (ce, extra)), grads = grad_fn(params, batch, denom)
        else:
            # micro-batch m takes rows m, m + accum, ...: every micro-batch spans every device
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                                 batch)

            def body(carry, mb):
                g_acc, ce_acc = carry
                (_, (ce_mb, extra_mb)), g = grad_fn(params, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce_mb), extra_mb

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, ce), extras = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
            extra = jax.tree.map(lambda x: jnp.mean(x, axis=0), extras)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        # a non-finite loss or gradient skips the update (params and optimizer state stay as they
        # were) and is counted; the loop acts on a streak of them (trainer.py)
        finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (optax.apply_updates(params, updates), opt_state), (params, state["opt_state"]))
        bad = 1 - finite.astype(jnp.int32)
        new_state = {"params": kept[0], "opt_state": kept[1], "step": state["step"] + 1,
                     "bad_streak": (state["bad_streak"] + bad) * bad, "skipped": state["skipped"] + bad}
        metrics = {"loss": ce / denom, "grad_norm": grad_norm, **extra}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    # one sharding for every batch entry (rows over the data axes), whichever optional keys are present
    return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def put_batch(batch: dict[str, Any], batch_sh: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from the global host batch: each process places only the shards its own
    devices hold, whatever the mesh layout across hosts."""
    return {k: jax.make_array_from_callback(batch[k].shape, batch_sh, lambda idx, rows=np.asarray(batch[k]): rows[idx])
            for k in (*BATCH_KEYS, *MEMORY_KEYS, *SUPERVISION_KEYS) if k in batch}
