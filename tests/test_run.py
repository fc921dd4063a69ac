"""run.py end to end at micro size: it trains, says what it did, and a second call resumes."""

from helpers import MICRO


def test_run_py_trains_reports_and_resumes(run_cli, tmp_path):
    args = [*MICRO, "train.steps=4", "checkpoint.every=2", "train.log_every=2", "run.name=e2e"]
    first = run_cli("run.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "start: init" in first.stdout and "steps: 0 -> 4" in first.stdout
    assert "loss:" in first.stdout and "unigram" in first.stdout
    assert (tmp_path / "runs" / "e2e" / "checkpoints" / "4").is_dir()
    assert len((tmp_path / "runs" / "e2e" / "metrics.jsonl").read_text().splitlines()) == 2

    again = run_cli("run.py", *args[:-3], "train.steps=6", "checkpoint.every=2", "train.log_every=2", "run.name=e2e")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "start: checkpoint" in again.stdout and "steps: 4 -> 6" in again.stdout


def test_run_py_reports_a_bad_config_in_one_line_with_exit_code_2(run_cli):
    bad = run_cli("run.py", "model.n_heads=7")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: ")
    assert "model.n_heads=7" in bad.stderr and "Traceback" not in bad.stderr
