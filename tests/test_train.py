"""The train step: sharded equals one device, accumulation equals the full batch, the loss learns."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import micro_config
from quietreasoning.config import ConfigError
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.training import sharding
from quietreasoning.training.train_step import put_batch, setup
from quietreasoning.training.trainer import train


def _run_steps(cfg, mesh: Mesh, n: int = 2):
    ts = setup(cfg, mesh)
    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
    with jax.set_mesh(mesh):
        state = ts.init()
        losses = []
        for i in range(n):
            batch = put_batch(data.batch(i, cfg.train.global_batch, cfg.train.seq_len), ts.batch_sharding)
            state, m = ts.step_fn(state, batch)
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])


def _assert_params_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_step_on_2x2x2_mesh_matches_one_device():
    # float32 compute: the only difference left is the order of sharded reductions
    cfg = micro_config("model.compute_dtype=float32", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    one = micro_config("model.compute_dtype=float32", "mesh.data=1")
    mesh8 = sharding.make_mesh(cfg)
    mesh1 = sharding.make_mesh(one, jax.devices()[:1])
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    losses8, params8 = _run_steps(cfg, mesh8)
    losses1, params1 = _run_steps(one, mesh1)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    _assert_params_close(params8, params1, rtol=1e-4, atol=1e-6)


def test_parameters_are_sharded_by_logical_name():
    cfg = micro_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = sharding.make_mesh(cfg)
    ts = setup(cfg, mesh)
    wq, = jax.tree.leaves(ts.state_shardings["params"]["blocks"][0]["attn"]["wq"])
    assert tuple(wq.spec) == ("fsdp", "tensor")
    with jax.set_mesh(mesh):
        state = ts.init()
    w_up = state["params"]["blocks"][0]["mlp"]["w_up"]
    assert w_up.addressable_shards[0].data.shape == (cfg.model.d_model // 2, cfg.model.d_ff // 2)
    mu = state["opt_state"][1][0].mu["blocks"][0]["mlp"]["w_up"]  # Adam moments shard like their params
    assert mu.sharding.spec == w_up.sharding.spec


def test_gradient_accumulation_matches_the_full_batch_on_a_sharded_mesh():
    mesh_keys = ("model.compute_dtype=float32", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = sharding.make_mesh(micro_config(*mesh_keys))
    full_losses, full = _run_steps(micro_config(*mesh_keys), mesh)
    acc_losses, acc = _run_steps(micro_config(*mesh_keys, "train.grad_accum=4"), mesh)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    _assert_params_close(acc, full, rtol=1e-4, atol=1e-6)


def test_a_micro_batch_that_does_not_split_over_the_data_axes_is_a_config_error():
    cfg = micro_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=8")
    with pytest.raises(ConfigError, match="train.global_batch=16 / train.grad_accum=8"):
        setup(cfg, sharding.make_mesh(cfg))


def test_synthetic_stream_is_deterministic_and_packed():
    a, b = SyntheticLanguage(256, 4, seed=3), SyntheticLanguage(256, 4, seed=3)
    x, y = a.batch(5, 4, 64), b.batch(5, 4, 64)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a.batch(6, 4, 64)["inputs"], x["inputs"])
    # a document boundary: the target (BOS of the next document) is not scored, positions restart
    boundary = x["loss_mask"] == 0
    assert boundary.any()
    nxt = np.roll(x["segment_ids"], -1, axis=1)
    assert np.all(nxt[:, :-1][boundary[:, :-1]] == x["segment_ids"][:, :-1][boundary[:, :-1]] + 1)
    assert a.entropy_rate() < a.unigram_entropy() / 3


def test_loss_falls_well_below_unigram_entropy_in_a_few_hundred_steps(tmp_path):
    cfg = micro_config("train.steps=200", "train.lr=1e-2", "train.warmup_steps=20", "train.log_every=50",
                       "checkpoint.every=1000", out_dir=tmp_path)
    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
    unigram, floor = data.unigram_entropy(), data.entropy_rate()
    result = train(cfg, measure_roof=False, progress=False)
    assert result.final_step == 200
    assert result.final_loss < 0.5 * unigram, (result.final_loss, unigram, floor)
    assert result.final_loss < floor + 0.5
