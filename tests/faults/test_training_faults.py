"""Faults of the training loop: preemption (SIGTERM), a kill during an async save, unreadable
checkpoints, non-finite steps, a full disk. Each test injects the fault for real (a signal to a
running train.py, bytes cut from checkpoint files, NaN in a batch, a 2 MB filesystem)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import MICRO, micro_config
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer, CheckpointError
from quietreasoning.training.input import batches
from quietreasoning.training.train_step import setup
from quietreasoning.training.trainer import TrainingDiverged, train

REPO = Path(__file__).resolve().parents[2]


def start_train(tmp_path, name, *overrides, stdout=None):
    """train.py on one fake device, its output in <tmp_path>/<name>.log."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    log = open(tmp_path / f"{name}.log", "a")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *MICRO, f"run.out_dir={tmp_path}",
                             f"run.name={name}", *overrides], cwd=tmp_path, env=env, stdout=log, stderr=log)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def saved_params(checkpoint_dir: Path, step: int, *overrides):
    cfg = micro_config(*overrides)
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ckpt = Checkpointer(str(checkpoint_dir), async_save=False)
    state, meta = ckpt.restore(step, setup(cfg, mesh).abstract_sharded())
    ckpt.close()
    return jax.device_get(state["params"]), meta


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_ends_bit_identical(tmp_path):
    steps = ["train.steps=30", "checkpoint.every=1000"]  # no scheduled save before the end
    proc = start_train(tmp_path, "cut", *steps)
    deadline = time.time() + 240
    while logged_steps(tmp_path / "cut") < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "cut.log").read_text()[-2000:]
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    assert proc.wait(timeout=60) == 0, (tmp_path / "cut.log").read_text()[-2000:]
    assert time.time() - sent < 60
    saved = Checkpointer(str(tmp_path / "cut" / "checkpoints"), async_save=False).steps()
    assert len(saved) == 1 and 3 <= saved[0] < 30, saved
    assert f"SIGTERM: saved checkpoint step {saved[0]}" in (tmp_path / "cut.log").read_text()

    again = start_train(tmp_path, "cut", *steps)
    assert again.wait(timeout=300) == 0
    assert f"resuming from checkpoint step {saved[0]}" in (tmp_path / "cut.log").read_text()
    straight = start_train(tmp_path, "straight", *steps)
    assert straight.wait(timeout=300) == 0
    resumed, meta = saved_params(tmp_path / "cut" / "checkpoints", 30)
    assert_same(resumed, saved_params(tmp_path / "straight" / "checkpoints", 30)[0])
    assert meta["data_position"] == 30


def test_a_kill_during_an_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    proc = start_train(tmp_path, "run", "train.steps=400", "checkpoint.every=1", "checkpoint.async_save=true",
                       "checkpoint.max_to_keep=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline, caught = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
        if any(n.isdigit() for n in names) and any("tmp" in n for n in names):
            proc.kill()  # SIGKILL while Orbax writes a step under its temporary name
            caught = True
            break
    proc.wait()
    assert caught, "train.py never showed a save in flight"
    complete = Checkpointer(str(checkpoints), async_save=False).steps()
    # the next start removes the half-written step and resumes from the newest complete one, saying which
    again = start_train(tmp_path, "run", f"train.steps={complete[-1] + 2}", "checkpoint.every=1")
    assert again.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-2000:]
    assert f"resuming from checkpoint step {complete[-1]}" in (tmp_path / "run.log").read_text()
    assert not [p for p in checkpoints.iterdir() if "tmp" in p.name]


def cut_files(step_dir: Path) -> None:
    """Truncates every array file of a checkpoint to half its size, as a crashed copy would."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, capsys):
    run = ["train.steps=6", "checkpoint.every=2", "checkpoint.async_save=false"]
    train(micro_config(*run, out_dir=tmp_path / "a"), measure_roof=False, progress=False, stop_at=4)
    ckpts = tmp_path / "a" / "tiny" / "checkpoints"
    cut_files(ckpts / "4")
    capsys.readouterr()
    resumed = train(micro_config(*run, out_dir=tmp_path / "a"), measure_roof=False, progress=False)
    out = capsys.readouterr().out
    assert f"{ckpts / '4'}: cannot restore checkpoint" in out
    assert "checkpoint step 4 is unreadable; resuming from the previous complete one, step 2" in out
    assert (resumed.resumed_from, resumed.start_step, resumed.final_step) == ("checkpoint", 2, 6)
    assert (ckpts / "4.unreadable").is_dir()  # kept for inspection, out of the way of the new step 4
    straight = train(micro_config(*run, out_dir=tmp_path / "b"), measure_roof=False, progress=False)
    assert_same(jax.device_get(resumed.state["params"]), jax.device_get(straight.state["params"]))


def test_when_no_checkpoint_reads_back_the_run_stops_unless_told_to_start_fresh(tmp_path, capsys):
    run = ["train.steps=2", "checkpoint.every=2", "checkpoint.async_save=false"]
    train(micro_config(*run, out_dir=tmp_path), measure_roof=False, progress=False)
    ckpts = tmp_path / "tiny" / "checkpoints"
    (ckpts / "2" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"no checkpoint reads back \(steps \[2\].*fresh_if_unreadable=true"):
        train(micro_config(*run, "train.steps=4", out_dir=tmp_path), measure_roof=False, progress=False)
    assert (ckpts / "2.unreadable").is_dir()
    (ckpts / "2.unreadable").rename(ckpts / "2")
    fresh = train(micro_config(*run, "train.steps=4", "checkpoint.fresh_if_unreadable=true", out_dir=tmp_path),
                  measure_roof=False, progress=False)
    assert (fresh.resumed_from, fresh.start_step) == ("init", 0)
    assert "starting fresh (checkpoint.fresh_if_unreadable=true)" in capsys.readouterr().out


def poisoned(positions, once=False):
    """A batch stream whose batches at `positions` carry NaN in their loss mask (so the loss and
    every gradient are NaN); with `once`, only the first time each position is drawn."""
    drawn = set()

    def stream(cfg, batch_sh, position, log=print):
        inner = batches(cfg, batch_sh, position, log=log)

        class Poisoned:
            def next(self):
                at = inner.position()
                batch = inner.next()
                if at in positions and not (once and at in drawn):
                    drawn.add(at)
                    batch = dict(batch, loss_mask=batch["loss_mask"] * np.nan)
                return batch

            def position(self):
                return inner.position()
        return Poisoned()
    return stream


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    run = ["train.steps=4", "checkpoint.every=100", "checkpoint.async_save=false"]
    before = train(micro_config(*run, out_dir=tmp_path / "a"), measure_roof=False, progress=False, stop_at=2)
    bad = train(micro_config(*run, out_dir=tmp_path / "b"), measure_roof=False, progress=False, stop_at=3,
                stream=poisoned({2}))
    # the third batch's update was skipped: the same parameters and optimizer state as after two steps
    assert_same(jax.device_get(before.state["params"]), jax.device_get(bad.state["params"]))
    assert_same(jax.device_get(before.state["opt_state"]), jax.device_get(bad.state["opt_state"]))
    assert int(bad.state["step"]) == 3 and int(bad.state["skipped"]) == 1 and int(bad.state["bad_streak"]) == 1
    assert np.isnan(bad.history[-1]["loss"]) and bad.history[-1]["skipped_steps"] == 1
    on = train(micro_config(*run, out_dir=tmp_path / "b"), measure_roof=False, progress=False, stream=poisoned({2}))
    assert int(on.state["skipped"]) == 1 and int(on.state["bad_streak"]) == 0 and np.isfinite(on.final_loss)


def test_a_streak_of_bad_steps_rolls_back_with_a_lower_lr_and_the_rerun_keeps_it(tmp_path, capsys):
    run = ["train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false", "train.max_bad_steps=2",
           "train.warmup_steps=0"]
    cfg = micro_config(*run, out_dir=tmp_path)
    done = train(cfg, measure_roof=False, progress=False, stream=poisoned({4, 5}, once=True))
    out = capsys.readouterr().out
    assert "2 steps in a row with a non-finite loss or gradient up to step 6; rolling back to checkpoint step 4 " \
           f"with train.lr {cfg.train.lr * 0.5:g} (rollback 1 of 2)" in out
    assert done.final_step == 8 and int(done.state["skipped"]) == 0 and np.isfinite(done.final_loss)
    lrs = {h["step"]: h["lr"] for h in done.history}
    straight = train(micro_config(*run, out_dir=tmp_path / "ref"), measure_roof=False, progress=False,
                     stop_at=5)
    assert lrs[5] == pytest.approx(0.5 * straight.history[-1]["lr"])  # the schedule, scaled
    meta = Checkpointer(cfg.checkpoint_dir, async_save=False).read_meta(8)
    assert meta["lr_scale"] == 0.5
    more = train(micro_config(*run, "train.steps=9", out_dir=tmp_path), measure_roof=False, progress=False)
    assert more.history[-1]["lr"] < straight.history[-1]["lr"]  # a rerun keeps the lowered rate


def test_bad_steps_that_come_back_after_every_rollback_stop_the_run_with_one_clear_message(tmp_path):
    run = ["train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false", "train.max_bad_steps=2",
           "train.max_rollbacks=1"]
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row with a non-finite loss or gradient, the last at "
                                               r"step 6 .*1 rollbacks so far\); lower train.lr"):
        train(micro_config(*run, out_dir=tmp_path), measure_roof=False, progress=False, stream=poisoned({4, 5}))
    stopped = micro_config(*run, "train.rollback_lr_scale=0", out_dir=tmp_path / "b")
    with pytest.raises(TrainingDiverged, match=r"0 rollbacks so far"):
        train(stopped, measure_roof=False, progress=False, stream=poisoned({4, 5}))
    # what was saved before the streak is intact
    assert Checkpointer(stopped.checkpoint_dir, async_save=False).steps() == [2, 4]


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    cfg = micro_config("train.steps=4", "checkpoint.every=2", "checkpoint.async_save=false", out_dir=tmp_path)
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", f"{cfg.checkpoint_dir}/4.orbax-checkpoint-tmp")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointError, match=rf"{cfg.checkpoint_dir}/4: disk full while saving checkpoint step 4 "
                                              r".*complete checkpoints kept: \[2\]"):
        train(cfg, measure_roof=False, progress=False)
    monkeypatch.undo()
    params, meta = saved_params(Path(cfg.checkpoint_dir), 2)
    assert meta["step"] == 2


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and mount in a user namespace (a real full disk)")
def test_a_full_disk_during_an_async_save_is_one_error_line_and_the_previous_checkpoint_reads_back(tmp_path):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    # a 2 MB filesystem holds one micro checkpoint (1.3 MB) but not two; checked while mounted, then copied out
    script = (f"mount -t tmpfs -o size=2m tmpfs {disk} && {sys.executable} {REPO / 'train.py'} {' '.join(MICRO)} "
              f"run.out_dir={tmp_path} train.steps=6 checkpoint.every=2 checkpoint.async_save=true "
              f"checkpoint.dir={disk}/ck; echo $? > {tmp_path}/rc; cp -r {disk}/ck {kept}")
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert (tmp_path / "rc").read_text().strip() == "2", done.stderr[-2000:]
    # one line of ours (Orbax's writer threads may also print their own asyncio noise as they fail)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"error: {disk}/ck/") and "disk full while saving checkpoint step" in errors[0]
    assert "complete checkpoints kept: [2]" in errors[0]
    _, meta = saved_params(kept, 2)
    assert meta["step"] == 2 and meta["data_position"] == 2
