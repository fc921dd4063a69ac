"""The adapter bank: switched off or fresh it changes nothing, merging equals the one-hot adapter,
gates select adapters, trainable=adapters freezes the base, names / counts / gradients are right.

Eager initialisation compiles a random sampler per shape, which dominates tests this small: the
models here are built abstractly and filled with numpy parameters (the real initialisation of an
adapter bank is checked on its own).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import load_config
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.model.adapters import AdapterBank, adapter_param_count, merge
from quietreasoning.model.trunk import Trunk, attention_mask, param_count
from quietreasoning.training import sharding
from quietreasoning.training.optimizer import make_optimizer
from quietreasoning.training.train_step import put_batch, setup

F32 = "model.compute_dtype=float32"
NAMES = ("general", "math", "code")
ADAPTERS = "model.adapters=[general,math,code]"


def _names(path) -> list:
    return [getattr(k, "key", None) for k in path]


def _is_adapter(path) -> bool:
    return "adapters" in _names(path)


def _without_adapters(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _without_adapters(v) for k, v in tree.items() if k != "adapters"}


def _trunk(cfg, params) -> Trunk:
    """A trunk for `cfg` holding `params` (no random initialisation)."""
    model = nnx.eval_shape(lambda: Trunk(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, params)
    return model


def _logits(model, tokens, seg, pos, gates=None):
    """Trunk.__call__ with adapter gates (B, T, A) passed to every block."""
    x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.float32)
    mask = attention_mask(seg)
    for block in model.blocks:
        x = block(x, pos, mask, gates)
    return np.asarray(model.logits(model.final_norm(x)))


def _call(model, tokens, seg, pos):
    return np.asarray(model(tokens, seg, pos))


def _inputs(cfg, b=2, t=16):
    tokens = jax.random.randint(jax.random.key(7), (b, t), 0, cfg.vocab_size)
    seg = jnp.array([[1] * 10 + [2] * (t - 10), [1] * t])[:b]  # two packed documents in row 0
    pos = jnp.where(seg == 1, jnp.arange(t), jnp.arange(t) - 10)
    return tokens, seg, pos


def _one_hot(i, tokens):
    return jnp.broadcast_to(jax.nn.one_hot(i, len(NAMES)), (*tokens.shape, len(NAMES)))


@pytest.fixture(scope="module")
def bank():
    """(model cfg, fresh params, training-like params) of a 3-adapter micro trunk. Fresh: random
    base and LoRA A, B = 0, IA3 and norm scales 1. Training-like: B and IA3 random as well."""
    cfg = micro_config(F32, ADAPTERS).model
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Trunk(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(0)
    normal = lambda mean, std, x: jnp.asarray(rng.normal(mean, std, x.shape), jnp.float32)

    def fresh(path, x):
        names = _names(path)
        if names[-1] == "b":
            return jnp.zeros(x.shape)
        if names[-1] == "scale" or "ia3" in names:
            return jnp.ones(x.shape)
        return normal(0.0, 1.0 if names[-1] == "embed" else 0.02, x)

    def trained(path, x):
        names = _names(path)
        if names[-1] == "b":
            return normal(0.0, 0.05, x)
        return normal(1.0, 0.2, x) if "ia3" in names else x

    init = jax.tree_util.tree_map_with_path(fresh, abstract)
    return cfg, init, jax.tree_util.tree_map_with_path(trained, init)


def test_switched_off_adapters_and_fresh_adapters_change_nothing(bank):
    cfg, fresh, _ = bank
    bare_cfg = micro_config(F32).model
    bare = nnx.eval_shape(lambda: Trunk(bare_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(bare, nnx.Param)
    assert all(block.adapters is None for block in bare.blocks)
    assert not any(_is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])
    assert sum(x.size for x in jax.tree.leaves(state)) == param_count(bare_cfg)
    assert adapter_param_count(bare_cfg) == 0
    with pytest.raises(ValueError, match="at least one"):
        AdapterBank(bare_cfg, rngs=nnx.Rngs(0))

    real = nnx.to_pure_dict(nnx.state(AdapterBank(cfg, rngs=nnx.Rngs(0)), nnx.Param))  # the real initialisation
    for path, x in jax.tree_util.tree_flatten_with_path(real)[0]:
        names, x = _names(path), np.asarray(x)
        expected = 0.0 if names[-1] == "b" else 1.0 if "ia3" in names else None
        assert np.all(x == expected) if expected is not None else 0 < x.std() < 0.1, names

    tokens, seg, pos = _inputs(cfg)
    expected = _call(_trunk(bare_cfg, _without_adapters(fresh)), tokens, seg, pos)
    adapted = _trunk(cfg, fresh)
    np.testing.assert_array_equal(_call(adapted, tokens, seg, pos), expected)
    np.testing.assert_array_equal(_logits(adapted, tokens, seg, pos, _one_hot(1, tokens)), expected)


def test_merge_equals_the_adapter_selected_by_a_fixed_gate(bank):
    cfg, _, trained = bank
    bare_cfg = micro_config(F32).model
    model = _trunk(cfg, trained)
    state = nnx.state(model, nnx.Param)
    tokens, seg, pos = _inputs(cfg)
    outputs = []
    for select in ("general", "math", "code", (0.2, 0.5, 0.3)):
        weights = jax.nn.one_hot(NAMES.index(select), 3) if isinstance(select, str) else jnp.asarray(select)
        adapted = _logits(model, tokens, seg, pos, jnp.broadcast_to(weights, (*tokens.shape, 3)))
        merged = _trunk(bare_cfg, merge(state, cfg, select))
        np.testing.assert_allclose(_call(merged, tokens, seg, pos), adapted, rtol=1e-5, atol=1e-5)
        outputs.append(adapted)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the adapters really differ
    # a pure dict merges too, into a bare trunk's layout
    assert jax.tree.structure(merge(trained, cfg, "math")) == jax.tree.structure(_without_adapters(trained))
    with pytest.raises(ValueError, match="not in model.adapters"):
        merge(state, cfg, "poetry")
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge(state, cfg, (0.5, 0.5))


def test_gates_select_and_mix_adapters(bank):
    cfg, _, trained = bank
    model = _trunk(cfg, trained)
    tokens, seg, pos = _inputs(cfg)
    # no gates = the uniform mixture
    uniform = jnp.full((*tokens.shape, 3), 1 / 3)
    np.testing.assert_allclose(_call(model, tokens, seg, pos), _logits(model, tokens, seg, pos, uniform),
                               rtol=1e-6, atol=1e-6)
    # a one-hot gate on `math` equals a trunk that has only math's adapter
    i = NAMES.index("math")
    only = jax.tree_util.tree_map_with_path(lambda p, x: x[i:i + 1] if _is_adapter(p) else x, trained)
    single = _trunk(micro_config(F32, "model.adapters=[math]").model, only)
    np.testing.assert_allclose(_logits(model, tokens, seg, pos, _one_hot(i, tokens)),
                               _call(single, tokens, seg, pos), rtol=1e-6, atol=1e-6)
    # per-token gates weight each adapter's update token by token
    adapters = model.blocks[0].adapters
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
    gates = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 16, 3)), axis=-1)
    for target in ("wq", "w_up"):
        mixed = adapters.delta(target, x, gates)
        parts = sum(gates[..., a, None] * adapters.delta(target, x, _one_hot(a, x[..., 0])) for a in range(3))
        np.testing.assert_allclose(np.asarray(mixed), np.asarray(parts), rtol=1e-5, atol=1e-6)


def test_a_train_step_with_trainable_adapters_moves_every_adapter_and_nothing_else(bank):
    # no weight decay: a parameter moves only if its gradient is non-zero
    model_cfg, _, trained = bank
    cfg = micro_config(F32, ADAPTERS, "train.trainable=adapters", "train.weight_decay=0", "mesh.data=1")
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
    params = nnx.state(_trunk(model_cfg, trained), nnx.Param)
    with jax.set_mesh(mesh):
        state = ts.state_from_params(params)
        for i in range(2):  # step 0 has learning rate 0 (warm-up)
            batch = put_batch(data.batch(i, cfg.train.global_batch, cfg.train.seq_len), ts.batch_sharding)
            state, _ = ts.step_fn(state, batch)
        state = jax.device_get(state)
    after = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state["params"]))[0]
    for (path, new), old in zip(after, jax.tree.leaves(trained)):
        moved = np.any(np.asarray(new) != np.asarray(old), axis=tuple(range(1, new.ndim)))
        if _is_adapter(path):  # the gradient reached every tensor of every adapter
            assert moved.all(), (jax.tree_util.keystr(path), moved)
        else:
            assert not moved.any(), jax.tree_util.keystr(path)
    # Adam moments exist for the adapters only
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moments == 2 * adapter_param_count(cfg.model)


def test_the_optimizer_freezes_all_but_the_adapters_and_does_not_decay_ia3():
    params = {"w": jnp.ones((4, 4)), "norm": jnp.ones((4,)),
              "adapters": {"lora": {"a": jnp.ones((2, 4, 2))}, "ia3": {"k": jnp.ones((2, 4))}}}
    train = dataclasses.replace(micro_config().train, warmup_steps=0, weight_decay=0.1)

    def moved(trainable, grad):
        tx = make_optimizer(dataclasses.replace(train, trainable=trainable))
        state = tx.init(params)
        updates, _ = jax.jit(tx.update)(jax.tree.map(lambda p: jnp.full_like(p, grad), params), state, params)
        flat = jax.tree_util.tree_flatten_with_path(updates)[0]
        n_moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
        return {jax.tree_util.keystr(p).split("'")[-2]: bool(jnp.any(u != 0)) for p, u in flat}, n_moments

    assert moved("all", 1.0) == ({"w": True, "norm": True, "a": True, "k": True}, 2 * 44)
    assert moved("adapters", 1.0) == ({"w": False, "norm": False, "a": True, "k": True}, 2 * 24)
    # with zero gradients only weight decay moves a parameter: matrices, not norms or IA3 scales
    assert moved("all", 0.0)[0] == {"w": True, "norm": False, "a": True, "k": False}


def test_adapter_names_and_counts(bank):
    cfg, _, trained = bank
    model = _trunk(cfg, trained)
    n = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and "adapters" in path:
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim and names[0] == "adapters", path
            assert all(name in sharding.RULES for name in names), (path, names)
            n += var[...].size
    assert n == adapter_param_count(cfg) > 0
    assert adapter_param_count(micro_config(F32, ADAPTERS, "model.ia3=false").model) < n
    # the large dimension of each LoRA factor is named like the base weight's, so it shards the same
    lora = model.blocks[0].adapters.lora
    assert lora["wq"].a.get_metadata()["out_sharding"] == ("adapters", "embed", "lora")
    assert lora["wq"].b.get_metadata()["out_sharding"] == ("adapters", "lora", "heads")
    assert lora["w_down"].a.get_metadata()["out_sharding"] == ("adapters", "mlp", "lora")

    big = load_config("3b").model
    abstract = nnx.eval_shape(lambda: AdapterBank(big, rngs=nnx.Rngs(0)))
    per_block = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert big.n_layers * per_block == adapter_param_count(big)
