"""Checkpoints: restore onto another mesh, resume equals an uninterrupted run, parameters-only loading."""

import jax
import numpy as np
import pytest

from helpers import micro_config
from quietreasoning.config import ConfigError
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer
from quietreasoning.training.train_step import setup
from quietreasoning.training.trainer import train


def _params(result):
    return jax.device_get(result.state["params"])


def test_saved_on_8_devices_restores_on_4_with_another_mesh(tmp_path):
    cfg8 = micro_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=2", out_dir=tmp_path)
    saved = train(cfg8, measure_roof=False, progress=False)

    cfg4 = micro_config("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.steps=2", out_dir=tmp_path)
    mesh4 = sharding.make_mesh(cfg4, jax.devices()[:4])
    ts4 = setup(cfg4, mesh4)
    ckpt = Checkpointer(cfg4.checkpoint_dir)
    assert ckpt.latest_step() == 2
    state, meta = ckpt.restore(2, ts4.abstract_sharded())
    ckpt.close()
    assert meta["stage"] == "train" and meta["data_position"] == 2
    assert meta["config"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    wq = state["params"]["blocks"][0]["attn"]["wq"]
    assert wq.sharding.mesh.devices.size == 4
    assert wq.addressable_shards[0].data.shape == (cfg4.model.d_model // 4, wq.shape[1])
    for a, b in zip(jax.tree.leaves(_params(saved)), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)
    assert int(state["step"]) == 2


def test_resume_after_preemption_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    steps = 6
    interrupted = micro_config(f"train.steps={steps}", "checkpoint.every=3", out_dir=tmp_path / "a")
    first = train(interrupted, measure_roof=False, progress=False, stop_at=steps // 2)
    assert (first.resumed_from, first.final_step) == ("init", 3)
    resumed = train(interrupted, measure_roof=False, progress=False)
    assert (resumed.resumed_from, resumed.start_step, resumed.final_step) == ("checkpoint", 3, steps)

    straight = train(micro_config(f"train.steps={steps}", "checkpoint.every=3", out_dir=tmp_path / "b"),
                     measure_roof=False, progress=False)
    for a, b in zip(jax.tree.leaves(_params(resumed)), jax.tree.leaves(_params(straight))):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_load_parameters_path_starts_a_new_run_from_saved_parameters(tmp_path):
    source = train(micro_config("train.steps=2", out_dir=tmp_path / "src"), measure_roof=False, progress=False)
    step_dir = f"{source.checkpoint_dir}/2"
    new = micro_config("train.steps=1", f"train.load_parameters_path={step_dir}", out_dir=tmp_path / "new")
    fresh = train(new, measure_roof=False, progress=False, stop_at=0)
    assert fresh.resumed_from == "parameters" and fresh.final_step == 0
    for a, b in zip(jax.tree.leaves(_params(source)), jax.tree.leaves(_params(fresh))):
        np.testing.assert_array_equal(a, b)


def test_resuming_a_run_with_another_model_size_is_a_clear_error(tmp_path):
    train(micro_config("train.steps=1", out_dir=tmp_path), measure_roof=False, progress=False)
    with pytest.raises(ConfigError, match=r"model.d_model=64 there, 128 here.*set run.name"):
        train(micro_config("train.steps=2", "model.d_model=128", out_dir=tmp_path), measure_roof=False, progress=False)
