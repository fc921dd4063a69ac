"""Product-key memory: the product top-k is the exact top-k over all N slots, gradients reach the
query, the sub-keys and only the value rows that were read, the int8 table round-trips within half
a quantisation step and reads nearly as the float one, and in the trunk: off means identical,
causal with the workspace and router on, a jitted sharded train step learns, the count is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import DataError, load_config
from quietreasoning.memory.pkm import (ProductKeyMemory, dequantize_rows, load_values, pkm_param_count,
                                       quantize_rows, save_values, scales_path, slot_usage)
from quietreasoning.model.trunk import Trunk, param_count, trunk_param_count

PKM = ["model.pkm_slots=256", "model.pkm_heads=2", "model.pkm_topk=4", "model.pkm_key_dim=16",
       "model.pkm_value_dim=16", "model.compute_dtype=float32"]
ROUTED = ["model.workspace=true", "model.router=true", "model.ws_layer=1", "model.ws_read_layers=[1]",
          "model.ws_chunk=8", "model.ws_slots=4", "model.ws_dim=32", "model.router_hidden=16"]


def layer(*overrides, seed=0):
    cfg = micro_config(*PKM, *overrides).model
    return cfg, ProductKeyMemory(cfg, rngs=nnx.Rngs(seed))


def hidden(b=2, t=6, d=64, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, d))


def n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_a_read_has_d_model_width_and_k_slots_per_head_with_weights_summing_to_one():
    cfg, m = layer()
    x = hidden()
    out, slots = jax.jit(lambda x: m(x))(x)
    weights, same_slots = jax.jit(lambda x: m.lookup(x))(x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert slots.shape == weights.shape == (2, 6, cfg.pkm_heads, cfg.pkm_topk) and slots.dtype == jnp.int32
    np.testing.assert_array_equal(slots, same_slots)
    assert 0 <= int(slots.min()) and int(slots.max()) < cfg.pkm_slots
    for row in np.asarray(slots).reshape(-1, cfg.pkm_topk):  # k different slots per head
        assert len(set(row)) == cfg.pkm_topk
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    assert 0 < float(slot_usage(slots, cfg.pkm_slots)) <= slots.size / cfg.pkm_slots


def test_product_topk_equals_brute_force_topk_over_all_n_product_keys():
    cfg, m = layer("model.pkm_topk=5")
    x = hidden(t=8)
    weights, slots = jax.jit(lambda x: m.lookup(x))(x)
    b, t, h, n, half = 2, 8, cfg.pkm_heads, cfg.pkm_sub_keys, cfg.pkm_key_dim // 2
    q = m.query_norm((x @ m.w_query[...]).reshape(b, t, h, 2, half)).reshape(b, t, h, 2 * half)
    c = m.sub_keys[...]  # (h, 2, n, half): the full key of slot i * n + j is [c[:, 0, i] ; c[:, 1, j]]
    full = jnp.concatenate([jnp.repeat(c[:, 0], n, axis=1), jnp.tile(c[:, 1], (1, n, 1))], axis=-1)  # (h, N, d_k)
    scores = jnp.einsum("bthd,hnd->bthn", q, full, precision=jax.lax.Precision.HIGHEST)  # all N = n^2 slots
    best, want = jax.lax.top_k(scores, cfg.pkm_topk)
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(want))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(jax.nn.softmax(best / cfg.pkm_temperature)),
                               rtol=1e-5, atol=1e-6)


def test_gradients_reach_query_norm_sub_keys_output_and_only_the_read_value_rows():
    cfg, m = layer()
    x = hidden()
    probe = jax.random.normal(jax.random.key(7), x.shape)
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(p):
        out, slots = nnx.merge(graphdef, p)(x)
        return jnp.sum(out * probe), slots

    grads, slots = jax.jit(jax.grad(loss, has_aux=True))(params)
    for name in ("w_query", "sub_keys", "w_out"):
        assert np.any(np.asarray(grads[name][...]) != 0), name
    assert np.any(np.asarray(grads["query_norm"]["scale"][...]) != 0)
    rows_with_grad = set(np.flatnonzero(np.any(np.asarray(grads["slot_values"][...]) != 0, axis=1)))
    assert rows_with_grad == set(np.asarray(slots).ravel())
    assert len(rows_with_grad) < cfg.pkm_slots
    # sub-keys: only those that made a head's top-k in some token get a gradient
    key_rows = np.any(np.asarray(grads["sub_keys"][...]) != 0, axis=-1)  # (h, 2, n)
    assert 0 < key_rows.sum() < key_rows.size


def test_int8_rows_round_trip_within_half_a_step_and_files_keep_exact_codes(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(64, 16)).astype(np.float32) * rng.uniform(0.01, 5, size=(64, 1)).astype(np.float32)
    values[3] = 0.0  # an all-zero row stays zero
    q, scales = quantize_rows(values)
    assert q.dtype == jnp.int8 and scales.dtype == jnp.float32 and scales.shape == (64,)
    peak = np.abs(values).max(axis=1)
    np.testing.assert_allclose(np.asarray(scales), np.where(peak > 0, peak / 127, 1.0), rtol=1e-6)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    err = np.abs(np.asarray(dequantize_rows(q, scales)) - values)
    assert np.all(err <= np.asarray(scales)[:, None] / 2 * (1 + 1e-5))
    assert not np.any(np.asarray(dequantize_rows(q, scales))[3])

    path = tmp_path / "pkm_values.npy"
    save_values(path, values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkm_values.npy", "pkm_values.scales.npy"]
    assert scales_path(path) == str(tmp_path / "pkm_values.scales.npy")
    q2, s2 = load_values(path)
    assert q2.dtype == np.int8 and s2.dtype == np.float32
    np.testing.assert_array_equal(q2, np.asarray(q))
    np.testing.assert_array_equal(s2, np.asarray(scales))


def test_int8_layer_reads_the_same_slots_and_nearly_the_float_output(tmp_path):
    cfg, m = layer()
    x = hidden(t=16)
    float_out, float_slots = jax.jit(lambda x: m(x))(x)
    float_table = m.slot_values[...]
    m.quantize()
    assert m.slot_values is None and m.slot_values_int8[...].dtype == jnp.int8
    assert not any(v.dtype == jnp.int8 for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    int8_out, int8_slots = jax.jit(lambda x: m(x))(x)
    np.testing.assert_array_equal(np.asarray(int8_slots), np.asarray(float_slots))
    scale = float(jnp.max(jnp.abs(float_out)))
    np.testing.assert_allclose(np.asarray(int8_out), np.asarray(float_out), atol=0.01 * scale)
    assert not np.array_equal(np.asarray(int8_out), np.asarray(float_out))

    # values taken in from a file: into the int8 layer as codes, into a float layer dequantised
    path = tmp_path / "pkm_values.npy"
    save_values(path, float_table)
    _, fresh = layer(seed=5)
    fresh.set_values(*load_values(path))
    np.testing.assert_array_equal(np.asarray(fresh.slot_values[...]), np.asarray(dequantize_rows(*load_values(path))))
    m.set_values(np.asarray(float_table) * 2)
    np.testing.assert_array_equal(np.asarray(m.slot_values_int8[...]), np.asarray(load_values(path)[0]))
    np.testing.assert_allclose(np.asarray(m.slot_scales[...]), 2 * load_values(path)[1], rtol=1e-6)


def test_bad_value_tables_and_files_are_one_line_data_errors(tmp_path):
    cfg, m = layer()
    with pytest.raises(DataError, match=r"model.pkm_slots=256 x model.pkm_value_dim=16"):
        m.set_values(np.zeros((128, 16), np.float32))
    with pytest.raises(DataError, match="scales"):
        m.set_values(np.zeros((256, 16), np.int8))
    missing = tmp_path / "none.npy"
    with pytest.raises(DataError, match=f"^{missing}: PKM values not found; .*build_indices pkm"):
        load_values(missing)
    np.save(tmp_path / "t.npy", np.zeros((4, 2), np.int8))
    with pytest.raises(DataError, match=r"t.scales.npy: PKM scales not found"):
        load_values(tmp_path / "t.npy")
    np.save(tmp_path / "t.scales.npy", np.ones((3,), np.float32))
    with pytest.raises(DataError, match=r"must be float32 of shape \(4,\)"):
        load_values(tmp_path / "t.npy")
    (tmp_path / "c.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="not a readable .npy") as info:
        load_values(tmp_path / "c.npy")
    assert "\n" not in str(info.value)


def inputs(b=2, t=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(2, 256, (b, t)), jnp.int32)
    return tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(t), (b, t))


def jitted_forward(model):
    """(state, tokens) -> (logits, aux) of `model`'s graph, jitted once (state: nnx.state(model))."""
    graphdef, _ = nnx.split(model)
    _, segs, pos = inputs()

    def forward(state, tokens):
        m = nnx.merge(graphdef, state)
        h, aux = m.forward(tokens, segs, pos)
        return m.logits(h), aux
    return jax.jit(forward)


@pytest.fixture(scope="module")
def routed():
    """The micro trunk with a PKM read after block 1, workspace and router on (so the PKM gate is
    applied), and its jitted forward."""
    cfg = micro_config(*PKM, *ROUTED, "model.pkm_layers=[1]")
    model = Trunk(cfg.model, rngs=nnx.Rngs(0))
    return cfg, model, jitted_forward(model)


def test_pkm_off_is_the_model_without_it_bit_for_bit(routed):
    """pkm_layers=[] builds nothing and draws no random numbers, so every other parameter is the one
    the PKM model got from the same seed; with the PKM output path zeroed the logits are identical."""
    on_cfg, on, forward_on = routed
    off_cfg = micro_config(*PKM, *ROUTED)
    off = Trunk(off_cfg.model, rngs=nnx.Rngs(0))
    off_params = dict(nnx.to_flat_state(nnx.state(off, nnx.Param)))
    on_flat = nnx.to_flat_state(nnx.state(on))
    assert set(off_params) == {p for p, _ in on_flat if p[0] != "pkm"}
    for path, v in on_flat:
        if path[0] != "pkm":
            np.testing.assert_array_equal(np.asarray(off_params[path][...]), np.asarray(v[...]))
    assert n_params(off) == param_count(off_cfg.model) == param_count(on_cfg.model) - pkm_param_count(on_cfg.model)
    tokens, _, _ = inputs()
    (logits_on, aux_on), (logits_off, aux_off) = forward_on(nnx.state(on), tokens), jitted_forward(off)(nnx.state(off), tokens)
    assert "pkm_slots" in aux_on and "pkm_slots" not in aux_off
    assert not np.allclose(np.asarray(logits_on), np.asarray(logits_off))
    silent = nnx.from_flat_state([(p, v.replace(jnp.zeros(v.shape, v.dtype)) if p[0] == "pkm" and p[-1] == "w_out" else v)
                                  for p, v in on_flat])
    np.testing.assert_array_equal(np.asarray(forward_on(silent, tokens)[0]), np.asarray(logits_off))


def test_causal_with_pkm_workspace_and_router_on(routed):
    _, model, forward = routed
    tokens, _, _ = inputs()
    base = np.asarray(forward(nnx.state(model), tokens)[0])
    for t in (3, 8, 13, 24):  # inside a chunk and at chunk edges
        changed = tokens.at[:, t:].set((tokens[:, t:] * 7 + 3) % 250 + 2)
        out = np.asarray(forward(nnx.state(model), changed)[0])
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])


def test_a_jitted_sharded_train_step_with_pkm_learns():
    from quietreasoning.data.synthetic import SyntheticLanguage
    from quietreasoning.training import sharding
    from quietreasoning.training.train_step import put_batch, setup
    cfg = micro_config(*PKM, "model.pkm_layers=[1]", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                       "train.lr=1e-2", "train.warmup_steps=1")
    mesh = sharding.make_mesh(cfg)
    ts = setup(cfg, mesh)
    spec = jax.tree.leaves(ts.state_shardings["params"]["pkm"][0]["slot_values"])[0].spec
    assert tuple(spec) == (("fsdp", "tensor"), None)
    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
    batch = put_batch(data.batch(0, cfg.train.global_batch, cfg.train.seq_len), ts.batch_sharding)
    with jax.set_mesh(mesh):
        state = ts.init()
        before = np.asarray(state["params"]["pkm"][0]["slot_values"])
        losses = []
        for _ in range(5):
            state, metrics = ts.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3
    changed = np.any(np.asarray(state["params"]["pkm"][0]["slot_values"]) != before, axis=1)
    assert 0 < changed.sum() < cfg.model.pkm_slots  # only rows that were read have moved (no decay on values)


def test_param_count_closed_form_matches_the_built_and_the_3b_layer():
    cfg = micro_config(*PKM, "model.pkm_layers=[0,1]").model
    model = Trunk(cfg, rngs=nnx.Rngs(0))
    assert n_params(model) == param_count(cfg) == trunk_param_count(cfg) + pkm_param_count(cfg)
    big = load_config("3b").model
    abstract = nnx.eval_shape(lambda: ProductKeyMemory(big, rngs=nnx.Rngs(0)))
    per_layer = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert len(big.pkm_layers) * per_layer == pkm_param_count(big)
    assert 1.07e9 < per_layer < 1.1e9  # 4M x 256 values dominate (SPEC_FACTS: 1.07B)
