"""The docs run: every runnable shell command of README.md and docs/*.md is executed, in order.

Runnable means: a line of a fenced block tagged `bash` that does not end in the comment
`# tpu-only`. That mark (the recipe's top states it too) is for commands that need a TPU VM,
several hosts or processes at once, the network, or shell variables such as `$BUCKET`; a line
ending in `\\` continues on the next, and the mark ends the whole command. Blank and comment-only
lines are not commands.

Each document runs as one bash script (`set -euo pipefail`) in its own fresh copy of the
repository, so later commands see what earlier ones wrote: the recipe is a chain (data -> stages ->
resume -> serve -> evaluate -> memories), and so is the README. The environment is the suite's
(tests/conftest.py, .ci/run: no hub, wandb disabled, quiet TensorFlow) with one fake CPU device per
process (compiling is most of the cost), `python` from this interpreter's folder, and stdin empty
(an `--interactive` prompt loop reads end of file and stops). The documents run side by side, one
per core, and share JAX's persistent compilation cache (a program compiled by one is loaded by the
next); `JAX_DISABLE_MOST_OPTIMIZATIONS` compiles at XLA's lowest optimization level, since at
micro size compiling costs far more than running.

Real sizes take minutes to hours, so REWRITES shrinks the commands; the first rule whose pattern
matches a command's start decides:

    pip install ...            skipped: CI's install is this command (.ci/run), and this test
                               runs in the environment it made
    pytest ...                 skipped: the suite this test belongs to is this command
    ... --dry-run ...          as written: a plan allocates nothing
    python bench/...           `--help` appended: a benchmark measures at full size for minutes
                               to hours and appends to docs/benchmarks.md; this checks that the
                               script is there and its command line builds
    python run.py              + --steps 2, data.docs=200, tests/test_run.py's micro PLAN
                               (less its data.source: the documented flags choose the data)
    python train.py            + the micro model (the documented train.steps stand), fewer logs
                               and checkpoints
    python -m quietreasoning.data build            + --docs 200 --vocab-size 512
    python -m quietreasoning.data tasks            + -n 64
    python -m quietreasoning.eval.popqa generate   + --people 40
    python -m quietreasoning.eval.popqa evaluate   + --limit 4, the micro model
    python -m quietreasoning.eval.reasoning        + --steps 2, 64 training and 4 test questions
                                                     (4 after each stage), latent.k_max=1; its own
                                                     model sizes (its vocabulary is its tokenizer's)
    python -m quietreasoning.eval.long_context     + --n 1 --lengths 256
    python -m quietreasoning.serve export          + the micro model, one calibration batch
    python -m quietreasoning.serve generate        + --max-new-tokens 8
    python -m quietreasoning.tools.build_indices   + the micro model
    python -m quietreasoning.stack                 + a micro stack, 2 steps
    anything else              as written

The micro model's overrides are the ones the checkpoints it reads were trained with, so a command
that loads a checkpoint gets the same ones. Flags and `key=value` overrides are appended after a
command's own, and the last of repeated ones wins (argparse; config.py), so everything else a
document says is what runs: a renamed flag, module, key or output path fails here. A failure names
the document, the line, the command that ran and the end of its stderr.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_run import PLAN

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TPU_ONLY = re.compile(r"#\s*tpu-only\s*$")
SKIP, HELP = "skip", ["--help"]
DOC_TIMEOUT = 1500  # seconds for one document's commands, all together

# run.py's micro plan (tests/test_run.py), less its data.source: the documented flags choose the data
RUN_MICRO = [o for o in PLAN if not o.startswith("data.")]
# one model of that plan: the memory-row width of run.py's retrieval stage (2 x d_model) stays the
# stage plan's business, so a trunk's episodic keys keep their width (d_model)
MICRO = [o for o in RUN_MICRO if not o.startswith(("model.episodic_dim=", "stages."))]
STACK_MICRO = ["latent_dim=16", "prefix_len=2", "hidden=32", "pool_queries=2", "middle_layers=1", "world=40",
               "additions=40", "eval_examples=4", "max_input_len=32", "max_target_len=8", "model.vocab_size=512",
               "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "train.steps=2",
               "train.global_batch=4", "train.warmup_steps=1", "train.log_every=1", "checkpoint.every=2"]

# (pattern matched at the command's start, SKIP | arguments to append); the first match decides
REWRITES: list[tuple[str, str | list[str]]] = [
    (r"pip install\b", SKIP),
    (r"pytest\b", SKIP),
    (r".*\s--dry-run\b", []),
    (r"python bench/", HELP),
    (r"python run\.py\b", ["--steps", "2", "data.docs=200", *RUN_MICRO]),
    (r"python train\.py\b", [*MICRO, "train.log_every=10", "checkpoint.every=50"]),
    (r"python -m quietreasoning\.data build\b", ["--docs", "200", "--vocab-size", "512"]),
    (r"python -m quietreasoning\.data tasks\b", ["-n", "64"]),
    (r"python -m quietreasoning\.eval\.popqa generate\b", ["--people", "40"]),
    (r"python -m quietreasoning\.eval\.popqa evaluate\b", ["--limit", "4", *MICRO]),
    (r"python -m quietreasoning\.eval\.reasoning\b",
     ["--steps", "2", "--n-train", "64", "--n-test", "4", "--stage-eval", "4", "latent.k_max=1"]),
    (r"python -m quietreasoning\.eval\.long_context\b", ["--n", "1", "--lengths", "256"]),
    (r"python -m quietreasoning\.serve export\b", [*MICRO, "serve.awq_calib_batches=1"]),
    (r"python -m quietreasoning\.serve generate\b", ["--max-new-tokens", "8"]),
    (r"python -m quietreasoning\.tools\.build_indices\b", MICRO),
    (r"python -m quietreasoning\.stack\b", STACK_MICRO),
]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int         # where the command starts in its document (1-based)
    text: str         # as the document writes it, continuations joined
    run: str | None   # what runs; None: not run (marked `# tpu-only`, or skipped by a rule)
    rule: str | None  # the REWRITES pattern that decided, None when none did


def bash_commands(doc: Path) -> list[Command]:
    """The commands of `doc`'s ```bash blocks in order, each with what REWRITES makes of it."""
    out, in_bash, pending, start = [], False, "", 0
    for n, raw in enumerate(doc.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            in_bash = not in_bash and line == "```bash"
            continue
        if not in_bash or not pending and (not line or line.startswith("#")):
            continue
        start = start if pending else n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(rewrite(doc.name, start, pending + line))
        pending = ""
    return out


def rewrite(doc: str, line: int, text: str) -> Command:
    if TPU_ONLY.search(text):
        return Command(doc, line, text, None, None)
    rule = next(((pattern, action) for pattern, action in REWRITES if re.match(pattern, text)), None)
    if rule is None:
        return Command(doc, line, text, text, None)
    pattern, action = rule
    if action == SKIP:
        return Command(doc, line, text, None, pattern)
    return Command(doc, line, text, f"{without_comment(text)} {shlex.join(action)}".rstrip(), pattern)


def without_comment(text: str) -> str:
    """`text` without its trailing `# ...` comment, found as bash finds it (a `#` that starts a word
    outside quotes), so that appended arguments are not commented out."""
    quote, escaped, previous = "", False, " "
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and previous.isspace():
            return text[:i].rstrip()
        previous = ch
    return text


RUNNABLE = [doc for doc in DOCS if any(c.run for c in bash_commands(doc))]


def copy_repo(dest: Path) -> Path:
    """A working copy of the checkout (sources, configs, docs), without what earlier runs left."""
    everywhere = {".git", ".hypothesis", "__pycache__", ".pytest_cache"}
    top_level = {"runs", "data", "artifacts", "wandb", "notes"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == REPO
        return [n for n in names if n in everywhere or top and (n in top_level or n.endswith(".egg-info"))]

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def environment(work: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(work), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(work / ".hf"),
               TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0", OMP_WAIT_POLICY="PASSIVE",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class DocRun:
    """One document's commands as one bash script in a fresh copy of the repository. Each command's
    stdout and stderr go to logs/<line>.out and .err, and its line to logs/steps when it starts, so
    the last line there is the command that failed when the script stops early."""

    def __init__(self, doc: Path, base: Path, cache: Path):
        self.doc, self.logs = doc, base / "logs"
        self.steps = self.logs / "steps"
        self.commands = [c for c in bash_commands(doc) if c.run]
        work = copy_repo(base / "work")
        self.logs.mkdir()
        body = [f"step {c.line}\n{c.run}" for c in self.commands]
        script = "\n".join(["set -euo pipefail",
                            f'step() {{ echo "$1 $EPOCHREALTIME" >> "{self.steps}"; '
                            f'exec >"{self.logs}/$1.out" 2>"{self.logs}/$1.err"; }}', *body, "step end", ""])
        (base / "commands.sh").write_text(script)
        self.began = time.time()
        with open(self.logs / "bash.err", "w") as err:  # bash's own complaints, before the first step
            self.proc = subprocess.Popen(["bash", str(base / "commands.sh")], cwd=work,
                                         env=environment(work, cache), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def failure(self, timeout: float) -> str | None:
        """None when every command succeeded within `timeout` seconds of the start, else what failed
        and why."""
        try:
            rc = self.proc.wait(max(0.0, self.began + timeout - time.time()))
        except subprocess.TimeoutExpired:
            self.stop()
            rc = f"killed: the document's commands ran past {timeout} s"
        steps = [s.split() for s in self.steps.read_text().splitlines()] if self.steps.exists() else []
        if not steps:
            return f"{self.doc.name}: the script did not start (exit {rc}): {(self.logs / 'bash.err').read_text()}"
        if rc == 0 and steps[-1][0] == "end":
            return None
        line, began = steps[-1]
        c = next(c for c in self.commands if str(c.line) == line)
        err = [x for x in re.split(r"[\r\n]+", (self.logs / f"{line}.err").read_text()) if x.strip()]
        took = time.time() - float(began)
        return (f"{self.doc.name}, line {line}: {c.text}\nran: {c.run}\nexit {rc} after {took:.0f} s; the end of "
                "its stderr:\n" + "\n".join(err[-25:]))

    def seconds(self) -> dict[int, float]:
        """Each finished command's wall time, by line."""
        steps = [s.split() for s in self.steps.read_text().splitlines()]
        return {int(a): float(tb) - float(ta) for (a, ta), (_, tb) in zip(steps, steps[1:])}


@pytest.fixture(scope="module")
def doc_runs(request, tmp_path_factory):
    """The selected documents' scripts, started together: each is a chain of its own."""
    selected = {item.callspec.params["doc"] for item in request.session.items
                if item.module is request.module and "doc" in getattr(getattr(item, "callspec", None), "params", {})}
    # the session's compilation cache (tests/conftest.py), else one of this module's own
    cache = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path_factory.mktemp("jax_cache"))
    runs = {doc: DocRun(doc, tmp_path_factory.mktemp(doc.stem), cache) for doc in DOCS if doc in selected}
    yield runs
    for run in runs.values():
        run.stop()


@pytest.mark.parametrize("doc", RUNNABLE, ids=[d.name for d in RUNNABLE])
def test_every_runnable_command_of_the_document_succeeds_in_order(doc, doc_runs):
    run = doc_runs[doc]
    failure = run.failure(DOC_TIMEOUT)
    if failure:
        pytest.fail(failure, pytrace=False)
    text = {c.line: c.text for c in run.commands}
    slowest = sorted(run.seconds().items(), key=lambda item: -item[1])[:8]
    print("\n".join(f"{seconds:6.1f} s  line {line}: {text[line][:90]}" for line, seconds in slowest))


def test_commands_are_read_with_continuations_marks_and_rewrites(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```text", "python run.py", "```",
        "```bash", "# a comment", "", "pip install -e .",
        "python train.py --config configs/3b.yaml \\", "  --dry-run   # the plan",
        "./launch_tpu.sh P T Z \\", '  "python train.py"   # tpu-only',
        'python -m quietreasoning.serve generate --bundle b --prompt "a # b"   # comment',
        "ls runs", "```"]))
    got = bash_commands(page)
    assert [(c.line, c.run) for c in got] == [
        (7, None),
        (8, "python train.py --config configs/3b.yaml  --dry-run"),
        (10, None),
        (12, 'python -m quietreasoning.serve generate --bundle b --prompt "a # b" --max-new-tokens 8'),
        (13, "ls runs")]
    assert got[0].rule == r"pip install\b" and got[2].rule is None and got[4].rule is None


def test_every_rewrite_rule_is_used_by_the_docs():
    used = {c.rule for doc in DOCS for c in bash_commands(doc)}
    assert [pattern for pattern, _ in REWRITES if pattern not in used] == []
