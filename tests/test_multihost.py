"""Multi-process training: two processes x four CPU devices on 127.0.0.1 train like one process on
eight devices, each feeding only its own rows; their checkpoint restores in one process. (A process
whose peer never comes: tests/faults/test_peer_faults.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import MICRO, free_port, micro_config

from quietreasoning import cli
from quietreasoning.config import ConfigError
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer
from quietreasoning.training.input import batches, local_rows
from quietreasoning.training.train_step import setup
from quietreasoning.training.trainer import train

from conftest import REPO

STEPS = 3
RUN = [*MICRO, "model.compute_dtype=float32", f"train.steps={STEPS}", "checkpoint.async_save=false", "run.name=mh"]


def test_a_host_builds_only_its_rows_and_they_match_the_global_batch():
    language = SyntheticLanguage(256, 4, seed=3)
    rows = np.array([2, 3, 9, 14])
    part, whole = language.batch(5, 16, 32, rows), language.batch(5, 16, 32)
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][rows], err_msg=k)

    cfg = micro_config()
    mesh = sharding.make_mesh(cfg)
    batch_sh = sharding.batch_sharding(mesh)
    assert local_rows(batch_sh, 16, 32).tolist() == list(range(16))  # one process holds every row
    fed = batches(cfg, batch_sh, position=5).next()
    expected = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed).batch(5, 16, 32)
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(fed[k]), v, err_msg=k)


def test_two_processes_train_like_one_and_their_checkpoint_restores_on_eight_devices(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    shared = tmp_path / "two" / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(REPO / "tests" / "multihost_worker.py"), "--coordinator", coordinator,
               "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "60",
               "--result", str(tmp_path / f"result{i}.json"), "--config", "tiny", *RUN,
               f"run.out_dir={tmp_path / f'out{i}'}", f"checkpoint.dir={shared}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # a hung peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert [(r["process_index"], r["process_count"], r["local_devices"], r["devices"]) for r in results] == \
        [(0, 2, 4, 8), (1, 2, 4, 8)]
    assert results[0]["rows"] == list(range(8)) and results[1]["rows"] == list(range(8, 16))  # half each
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == STEPS
    # only process 0 writes the log
    assert len((tmp_path / "out0" / "mh" / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert not (tmp_path / "out1" / "mh").joinpath("metrics.jsonl").exists()

    # the same run in this one process on its eight devices
    cfg = micro_config(*RUN, f"checkpoint.dir={tmp_path / 'one' / 'checkpoints'}", out_dir=tmp_path / "one")
    assert jax.device_count() == 8
    one = train(cfg, measure_roof=False, progress=False)
    np.testing.assert_allclose(results[0]["losses"], [h["loss"] for h in one.history], rtol=1e-5)

    # the two-process checkpoint restores onto one process's eight devices and equals the one-process state
    mesh = sharding.make_mesh(cfg)
    ts = setup(cfg, mesh)
    ckpt = Checkpointer(str(shared), async_save=False)
    with jax.set_mesh(mesh):
        assert ckpt.latest_step() == STEPS
        state, meta = ckpt.restore(STEPS, ts.abstract_sharded())
    ckpt.close()
    assert meta["data_position"] == STEPS and int(state["step"]) == STEPS
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(one.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_distributed_flags_come_together():
    p = cli.parser("test", "tiny")
    with pytest.raises(ConfigError, match="--process-id missing"):
        cli.load(p.parse_args(["--coordinator", "127.0.0.1:1234", "--num-processes", "2"]))
    with pytest.raises(ConfigError, match="--coordinator localhost: expected HOST:PORT"):
        cli.load(p.parse_args(["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"]))
    with pytest.raises(ConfigError, match="--process-id 2 --num-processes 2"):
        cli.load(p.parse_args(["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"]))
