"""Telemetry: metrics.jsonl that survives a kill mid-write, wandb disabled/offline, the run's plots."""

import json

import pytest

from quietreasoning.config import DataError
from quietreasoning.utils.telemetry import PLOTS, Telemetry, plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def fake_records():
    """Two stages of trainer-style records, steps counted across the run as run_metrics does."""
    rows = []
    for stage, offset, loss0 in (("warmstart_dense_ws", 0, 6.0), ("ssm_light", 20, 4.0)):
        for step in range(2, 21, 2):
            rows.append({"stage": stage, "step": step, "global_step": offset + step, "loss": loss0 - 0.05 * step,
                         "grad_norm": 1.0, "lr": 1e-3, "ws_halting_avg": 1.0 + 0.02 * step,
                         "router_pkm_mean": 0.5 + 0.01 * step, "router_pkm_std": 0.1,
                         "router_ssm_mean": 0.3, "router_ssm_std": 0.05,
                         "router_ssm_hist": [1.0] * 10, "router_ssm_usage": [0.3, 0.7]})
    return rows


def test_log_read_round_trip_skips_a_truncated_last_line(tmp_path):
    with Telemetry(tmp_path, config={"a": 1}, stage="s1") as t:
        t.log({"step": 1, "loss": 2.5, "router_ssm_hist": [1.0, 2.0]})
        t.set_stage("s2")
        t.log({"step": 2, "loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == [{"step": 1, "loss": 2.5, "router_ssm_hist": [1.0, 2.0], "stage": "s1"},
                                  {"step": 2, "loss": 2.0, "stage": "s2"}]
    with path.open("a") as f:  # a kill in the middle of a write
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    # the next writer drops the half line instead of running on from it
    with Telemetry(tmp_path, config={}, stage="s2") as t:
        t.log({"step": 3, "loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")


def test_a_bad_line_before_the_end_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_not_lead_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # even with wandb enabled
    run_dir = tmp_path / "run"
    t = Telemetry(run_dir, config={}, lead=False)
    t.log({"step": 1, "loss": 1.0})
    t.summary({"loss": 1.0})
    t.close()
    assert not run_dir.exists()


def test_wandb_disabled_by_env_writes_no_wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with Telemetry(tmp_path, config={}, wandb_project="p") as t:
        assert t.mode == "disabled"
        t.log({"step": 1, "loss": 1.0})
        t.summary({"final_loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 1.0}


def test_offline_run_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    # measured here: wandb import + offline init + finish about 2.5 s; no network in offline mode
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with Telemetry(tmp_path, config={"model": {"d_model": 64}}, stage="s1") as t:
        assert t.mode == "offline" and not t.resumed
        for row in fake_records()[:3]:
            t.log(row)
        t.summary({"final_loss": 1.0})
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    with Telemetry(tmp_path, config={}) as t:
        assert t.resumed
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id


def test_plots_are_pngs_and_absent_data_is_skipped(tmp_path):
    evals = {"reasoning": {"task": "prosqa", "accuracy_by_k": {"0": 0.4, "1": 0.55, "2": 0.5}, "cot_accuracy": 0.7,
                           "latent_advantage": 0.15},
             "popqa": {"retrieval_gain": 0.2, "by_bucket": {
                 "<10": {"n": 30, "closed_book": 0.1, "with_memory": 0.5},
                 "10-100": {"n": 20, "closed_book": 0.3, "with_memory": 0.6}}}}
    out = plot_run(fake_records(), evals, tmp_path / "plots")
    assert out["skipped"] == []
    for name in PLOTS:
        data = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert out[name] == str(tmp_path / "plots" / f"{name}.png")
        assert data.startswith(PNG) and len(data) > 1024

    bare = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 6)]  # a run without modules or evals
    out = plot_run(bare, {}, tmp_path / "bare")
    assert out["skipped"] == ["router_usage", "halting", "latent_advantage", "retrieval_gain"]
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["loss.png"]
    assert plot_run([], None, tmp_path / "none") == {"skipped": list(PLOTS)}
    assert not (tmp_path / "none").exists()


def test_retrieval_plot_accepts_a_popqa_comparison(tmp_path):
    from quietreasoning.eval.popqa import FIELDS, PopQAEvaluator

    records = [{**{f: "" for f in FIELDS}, "id": i, "question": f"q{i}", "possible_answers": ["yes"], "s_pop": pop}
               for i, pop in enumerate([5, 50, 500, 5, 50, 500])]
    comparison = PopQAEvaluator(records).compare({"closed book": lambda qs: ["no"] * len(qs),
                                                  "+ episodic memory": lambda qs: ["yes"] * len(qs)}, progress=False)
    out = plot_run([], {"popqa": comparison}, tmp_path)
    assert out["skipped"] == ["loss", "router_usage", "halting", "latent_advantage"]
    assert (tmp_path / "retrieval_gain.png").read_bytes().startswith(PNG)


def test_wandb_mode_online_only_with_a_project_and_a_key(tmp_path, monkeypatch):
    from quietreasoning.utils.telemetry import wandb_mode

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("p") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("p") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("") == "offline"
    assert wandb_mode("p") == "offline"  # no key anywhere
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("p") == "online"
