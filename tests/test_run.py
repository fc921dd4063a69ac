"""run.py end to end at micro size: data, tokenizer, all six stages, evaluation, bundle, summary and
plots; stopped mid-stage by SIGTERM and rerun, it ends with the parameters of a run never stopped; a second call
skips what is complete. And its errors: one line, exit code 2."""

import json
import os
import signal
import time

import numpy as np
import pytest

from quietreasoning.training import stages as st
from test_stages import PLAN_MICRO, stage_params

# every stage at four steps (pkm_adapters in two anneal pieces of two): the pipeline, not its quality
PLAN = [*PLAN_MICRO, "train.seq_len=64", "latent.k_max=1", "stages.eval_examples=2", "stages.anneal_segments=2"]
STEPS = ["--steps", "4"]


def wait_for_checkpoint(proc, directory, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
            return True
        time.sleep(0.1)
    return False


def test_run_py_runs_every_stage_resumes_a_preempted_stage_exactly_and_skips_what_is_done(run_cli, tmp_path):
    # one fake device per child: compiling is most of the cost
    first = run_cli("run.py", "--output-dir", "whole", "data.docs=200", *PLAN, *STEPS, timeout=900, devices=1)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "whole"
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert all("seconds" in s for s in stages.values()), stages.keys()
    assert stages["pkm_adapters"]["carried"]["carried"] > 0 and stages["pkm_adapters"]["carried"]["fresh"] > 0
    assert stages["retrieval_supervision"]["facts"] > 0
    assert (out / "stages" / "5_compress_serve" / "bundle" / "manifest.json").exists()
    assert set(summary["eval"]) == {"reasoning", "popqa", "long_context"}
    assert set(summary["eval"]["reasoning"]["accuracy_by_k"]) == {"0", "1"}
    assert summary["eval"]["popqa"]["n"] == 2
    for name in ("loss", "router_usage", "halting", "latent_advantage", "retrieval_gain"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} >= {"warmstart_dense_ws", "latent_distill", "retrieval_supervision"}
    assert "retrieval_bce" in log[-1] and "Quiet Reasoning run finished" in first.stdout

    # the first two stages again, stopped by SIGTERM once pkm_adapters has a checkpoint, then the same command
    args = ["--output-dir", "cut", "--pretrain-pattern", str(out / "data" / "*.tfrecord*"), *PLAN, *STEPS,
            "--stages", "1..2", "--no-eval"]
    proc = run_cli("run.py", *args, devices=1, background=True)
    cut_stage = tmp_path / "cut" / "stages" / "1_pkm_adapters"
    assert wait_for_checkpoint(proc, cut_stage / "checkpoints"), "run.py ended before it could be stopped mid-stage"
    os.kill(proc.pid, signal.SIGTERM)  # a preemption notice: the stage saves its step, the run stops, exit 0
    assert proc.wait(timeout=120) == 0
    assert not (cut_stage / st.DONE).exists() and not (tmp_path / "cut" / "stages" / "2_ssm_light").exists()
    again = run_cli("run.py", *args, devices=1, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/6 warmstart_dense_ws] complete" in again.stdout
    scheds = [st.StageScheduler("tiny", PLAN, tmp_path / name, max_steps=4) for name in ("whole", "cut")]
    records = [s.stage("pkm_adapters").done() for s in scheds]
    assert records[0]["data_position"] == records[1]["data_position"]
    assert records[1]["segments"] == [[2, 2.0], [4, pytest.approx(0.7)]]
    a, b = (stage_params(s, "pkm_adapters") for s in scheds)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))

    done = run_cli("run.py", "--output-dir", "whole", "data.docs=200", *PLAN, *STEPS, "--no-eval", devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("; skipped") == 6


def test_run_py_reports_a_bad_config_in_one_line_with_exit_code_2(run_cli):
    for args, fragment in ((["model.n_heads=7"], "model.n_heads=7"), (["--stages", "9"], "--stages 9"),
                           (['stages.ssm_light=["model.nope=1"]'], "stages.ssm_light")):
        bad = run_cli("run.py", "--dry-run", *args)
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: ")
        assert fragment in bad.stderr and "Traceback" not in bad.stderr


def test_dry_run_prints_the_plan_and_refuses_a_slice_too_small(run_cli):
    plan = run_cli("run.py", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    for name in ("warmstart_dense_ws", "retrieval_supervision", "compress_serve"):
        assert name in plan.stdout
    small = run_cli("run.py", "--config", "3b", "--tpu-topology", "v4:2x2x1", "--dry-run")
    assert small.returncode == 2 and "short by" in small.stderr and "--tpu-topology" in small.stderr
