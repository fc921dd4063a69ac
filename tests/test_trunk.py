"""The trunk's invariants: exact parameter count, causality, segment isolation, names on every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import micro_config
from quietreasoning.config import load_config
from quietreasoning.model.trunk import Trunk, param_count
from quietreasoning.training.train_step import abstract_train_state


def _model(*overrides):
    cfg = micro_config("model.compute_dtype=float32", *overrides)
    return cfg, Trunk(cfg.model, rngs=nnx.Rngs(0))


def _ones(b, t):
    return jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t))


def test_3b_param_count_from_eval_shape_equals_closed_form():
    # the bare trunk (modules off); tests/test_modules.py counts the 3b model with every module
    cfg = load_config("3b", ["model.workspace=false", "model.router=false", "model.ssm_layers=[]", "model.adapters=[]",
                             "model.pkm_layers=[]", "model.episodic=false"])
    _, _, _, abstract = abstract_train_state(cfg)
    counted = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    m = cfg.model
    d, f, v, L = m.d_model, m.d_ff, m.vocab_size, m.n_layers
    # the seed's accounting: untied embeddings, 4 d^2 attention, 3 d f SwiGLU, two norms per block
    closed = 2 * v * d + L * (4 * d * d + 3 * d * f + 2 * d) + d
    assert counted == closed == param_count(m)
    # the trunk alone is about 2.0B; the memory tiers and experts bring the model to about 3.2B
    assert 1.9e9 < counted < 2.2e9


def test_tied_embeddings_drop_the_head():
    cfg, untied = _model()
    _, tied = _model("model.tie_embeddings=true")
    n = lambda mdl: sum(x.size for x in jax.tree.leaves(nnx.state(mdl, nnx.Param)))
    tied_cfg = micro_config("model.tie_embeddings=true").model
    assert n(untied) - n(tied) == cfg.model.vocab_size * cfg.model.d_model
    assert n(tied) == param_count(tied_cfg)
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % cfg.model.vocab_size
    seg, pos = _ones(1, 12)
    assert tied(tokens, seg, pos).shape == (1, 12, cfg.model.vocab_size)


def test_changing_a_future_token_leaves_past_logits_unchanged():
    cfg, model = _model()
    t = 16
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, cfg.model.vocab_size)
    seg, pos = _ones(2, t)
    base = model(tokens, seg, pos)
    for cut in (3, 10):
        changed = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 7) % cfg.model.vocab_size)
        out = model(changed, seg, pos)
        np.testing.assert_array_equal(np.asarray(out[:, :cut + 1]), np.asarray(base[:, :cut + 1]))
        assert not np.allclose(out[:, cut + 1:], base[:, cut + 1:])


def test_packed_segments_do_not_see_each_other():
    cfg, model = _model()
    v = cfg.model.vocab_size
    doc_a = jax.random.randint(jax.random.key(2), (1, 6), 0, v)
    doc_b = jax.random.randint(jax.random.key(3), (1, 10), 0, v)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    out = model(packed, seg, pos)
    alone_b = model(doc_b, *_ones(1, 10))
    np.testing.assert_allclose(np.asarray(out[:, 6:]), np.asarray(alone_b), atol=1e-5, rtol=1e-5)
    other_a = (doc_a + 5) % v
    out2 = model(jnp.concatenate([other_a, doc_b], axis=1), seg, pos)
    np.testing.assert_array_equal(np.asarray(out2[:, 6:]), np.asarray(out[:, 6:]))


def test_remat_changes_memory_not_results():
    cfg, plain = _model()
    _, remat = _model("model.remat=full")
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.model.vocab_size)
    seg, pos = _ones(2, 16)

    def grads(model):
        g, params = nnx.split(model, nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(tokens, seg, pos) ** 2))(params)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_every_parameter_carries_logical_axis_names():
    _, model = _model()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim, path


def test_bf16_compute_stays_close_to_f32():
    cfg, f32 = _model()
    bf16 = Trunk(micro_config("model.compute_dtype=bfloat16").model, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, cfg.model.vocab_size)
    seg, pos = _ones(2, 16)
    a, b = f32(tokens, seg, pos), bf16(tokens, seg, pos)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)
