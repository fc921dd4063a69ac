"""The modules inside the trunk together: off means the bare trunk bit for bit, causality with every
module on, gradients reach every parameter that is on, the closed-form count, and a tiny model
that trains with everything on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import load_config
from quietreasoning.memory.pkm import pkm_param_count
from quietreasoning.model.trunk import Trunk, param_count, trunk_param_count
from quietreasoning.training.losses import module_losses
from quietreasoning.training.train_step import abstract_train_state, lm_loss

ALL_ON = ["model.n_layers=3", "model.workspace=true", "model.router=true", "model.ws_layer=1",
          "model.ws_read_layers=[1,2]", "model.ws_chunk=8", "model.ws_slots=4", "model.ws_dim=32",
          "model.ssm_layers=[1,2]", "model.ssm_state=8", "model.adapters=[general,math]", "model.lora_rank=2",
          "model.router_hidden=16", "model.compute_dtype=float32"]
OFF_EACH = {
    "workspace": ["model.workspace=false", "model.router=false"],
    "ssm": ["model.ssm_layers=[]"],
    "adapters": ["model.adapters=[]"],
    "router": ["model.router=false"],
}


def inputs(b=2, t=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(2, 256, (b, t)), jnp.int32)
    segs = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], b, 0), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(20), np.arange(12)])[None].repeat(b, 0), jnp.int32)
    return tokens, segs, pos


def build(*overrides):
    cfg = micro_config(*ALL_ON, *overrides)
    return cfg, Trunk(cfg.model, rngs=nnx.Rngs(0))


def copy_shared(src: Trunk, dst: Trunk) -> None:
    """Gives `dst` the values of every parameter it shares (same path and shape) with `src`."""
    shared = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    flat = [(path, shared[path] if path in shared and shared[path].shape == v.shape else v)
            for path, v in nnx.to_flat_state(nnx.state(dst, nnx.Param))]
    nnx.update(dst, nnx.from_flat_state(flat))


def silence(model: Trunk) -> None:
    """Zeroes each module's output path (SSM out-projections, workspace read outputs, LoRA B;
    IA3 starts at one): the modules still run, but add exactly nothing."""
    def quiet(path):
        return (path[0] == "ssm" and path[-1] == "out") or (path[0] == "workspace" and path[-1] == "w_o") \
            or ("lora" in path and path[-1] == "b")
    flat = [(p, v.replace(jnp.zeros(v.shape, v.dtype)) if quiet(p) else v)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nnx.update(model, nnx.from_flat_state(flat))


def n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_with_every_module_off_the_logits_are_the_bare_trunks_exactly():
    tokens, segs, pos = inputs()
    bare_cfg = micro_config("model.n_layers=3", "model.compute_dtype=float32")
    bare = Trunk(bare_cfg.model, rngs=nnx.Rngs(0))
    _, off = build(*[o for v in OFF_EACH.values() for o in v])
    copy_shared(bare, off)
    assert n_params(off) == trunk_param_count(bare_cfg.model) == param_count(off.cfg)
    np.testing.assert_array_equal(np.asarray(off(tokens, segs, pos)), np.asarray(bare(tokens, segs, pos)))


@pytest.mark.parametrize("module", list(OFF_EACH))
def test_a_switched_off_module_is_not_built_and_a_silent_one_changes_nothing(module):
    """Off removes exactly the module's parameters (the closed-form count agrees); a module whose
    output path is zero leaves the logits bit-identical to the model without it; on and trained,
    it does change them."""
    tokens, segs, pos = inputs()
    on_cfg, on = build()
    off_cfg, off = build(*OFF_EACH[module])
    copy_shared(on, off)
    assert n_params(off) == param_count(off_cfg.model) < n_params(on) == param_count(on_cfg.model)
    with_module = np.asarray(on(tokens, segs, pos))
    silence(on)
    silence(off)
    if module != "router":  # router off means fixed gates (1 for experts, uniform adapters): not a zero path
        # a silenced module is still computed: XLA compiles another program around it, whose fusions
        # may round the unchanged stream differently by an ulp (off itself is exact: the test above)
        np.testing.assert_allclose(np.asarray(on(tokens, segs, pos)), np.asarray(off(tokens, segs, pos)),
                                   rtol=0, atol=1e-6)
    assert not np.allclose(with_module, np.asarray(off(tokens, segs, pos)))


def test_causal_with_every_module_on():
    """Changing tokens from position t on never changes the logits before t (workspace, router,
    SSM experts and adapters all on; cuts inside and at chunk edges)."""
    _, model = build()
    tokens, _, _ = inputs(t=32)
    segs = jnp.ones_like(tokens)
    pos = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    fwd = jax.jit(lambda tok: model(tok, segs, pos))
    base = np.asarray(fwd(tokens))
    for t in (3, 8, 13, 24):
        changed = tokens.at[:, t:].set((tokens[:, t:] * 7 + 3) % 250 + 2)
        out = np.asarray(fwd(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])


def test_gradients_reach_every_parameter_that_is_on():
    cfg, model = build()
    # non-zero LoRA B so the adapters' A matrices see a gradient too
    state = nnx.state(model, nnx.Param)
    flat = [(p, v.replace(jnp.full(v.shape, 0.01, v.dtype)) if p[-1] == "b" and "lora" in p else v)
            for p, v in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(flat))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens, segs, pos = inputs()
    answer = jnp.zeros(tokens.shape).at[:, 16:20].set(1.0)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": segs, "positions": pos,
             "loss_mask": jnp.ones(tokens.shape), "answer_mask": answer}

    def loss(p):
        m = nnx.merge(graphdef, p)
        h, aux = m.forward(batch["inputs"], segs, pos)
        lm, _ = lm_loss(m.logits(h), batch["targets"], batch["loss_mask"], 1e-4)
        extra, _ = module_losses(aux, batch, cfg, jnp.take(m.embed[...], tokens, axis=0))
        return lm / tokens.size + extra

    grads = jax.grad(loss)(params)
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]
    assert not dead, f"no gradient reaches {dead}"


def test_the_3b_dry_run_counts_every_module():
    cfg = load_config("3b")
    _, _, _, abstract = abstract_train_state(cfg)
    counted = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    assert counted == param_count(cfg.model)
    extra = counted - trunk_param_count(cfg.model) - pkm_param_count(cfg.model)  # PKM: tests/test_pkm.py
    assert 1.0e8 < extra < 2.5e8  # workspace ~48M, two SSM experts ~38M, adapters ~60M, router


def test_the_tiny_model_trains_with_every_module_on_and_logs_halting_and_router_usage(tmp_path):
    from quietreasoning.training.trainer import train
    cfg = micro_config(*ALL_ON, "train.steps=40", "train.log_every=10", "train.lr=3e-3", out_dir=tmp_path)
    result = train(cfg, measure_roof=False, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] - 0.5
    assert 1.0 <= last["ws_halting_avg"] <= cfg.model.ws_max_steps
    assert 0.0 < last["router_ssm_mean"] < 1.0 and sum(last["router_ssm_hist"]) > 0
    assert len(last["router_adapters_usage"]) == 2 and abs(sum(last["router_adapters_usage"]) - 1) < 1e-3
