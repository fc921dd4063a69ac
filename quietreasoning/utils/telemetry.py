"""The run's telemetry: metrics.jsonl under the run directory, wandb, and the end-of-run PNG plots.

`Telemetry(run_dir, config=...)` appends each logged record, tagged with its stage, to
<run_dir>/metrics.jsonl and sends it to wandb:

  disabled   WANDB_MODE=disabled in the environment (tests and CI set it): wandb is never imported
  online     a project is given (run.py --wandb-project) and an API key is set (WANDB_API_KEY,
             `wandb login`, or a netrc entry)
  offline    otherwise (and whenever WANDB_MODE=offline): the run is kept under <run_dir>/wandb/,
             `wandb sync <run_dir>/wandb/offline-run-*` uploads it later

Only the lead process (process 0) writes anything; the others' Telemetry does nothing. The wandb
run id is kept in <run_dir>/wandb_id.txt, so a resumed run continues the same wandb run.

metrics.jsonl is append-only, one JSON object per line. A kill in the middle of a write can leave
a half line at the end: `read_metrics` skips it, and the next Telemetry on that directory drops it
before appending. A run directory on a cloud bucket (gs://) cannot be appended to, so there the
file is rewritten whole (renamed into place) at most every FLUSH_SECONDS and at every stage
change, summary and close.

`plot_run(records, evals, out_dir)` draws the run's figures (loss per stage, router usage per
module, halting steps, latent advantage, retrieval gain) from those records and the evaluation
results (eval/suite.py), skipping any whose data the run does not have.
"""

from __future__ import annotations

import io as _io
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

from quietreasoning.config import ConfigError, DataError
from quietreasoning.utils import io

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_id.txt"
SUMMARY = "summary.json"
DEFAULT_PROJECT = "quietreasoning"
FLUSH_SECONDS = 60.0  # how stale a cloud run directory's metrics.jsonl may get


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order. A last line cut short by a kill mid-write is
    skipped; a bad line anywhere else is a DataError naming the file and line."""
    src = io.path(path)
    if not src.exists():
        raise DataError(f"{path}: file not found; metrics.jsonl is written into a run directory by "
                        "train.py or run.py")
    lines = src.read_text().split("\n")  # a complete file ends with "\n": its last piece is ""
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the unterminated last line: a write the process did not finish
                break
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); metrics.jsonl "
                            "holds one JSON object per line (remove the line to keep the rest)") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a {type(record).__name__}, not a JSON object; metrics.jsonl holds "
                            "one record per line")
        records.append(record)
    return records


def _plain(value):
    """json.dumps's fallback: numpy and JAX scalars and arrays as Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} in a metrics record; log numbers, strings or lists of numbers")


# ----------------------------------------------------------------------------- wandb

def wandb_mode(project: str) -> str:
    """'disabled', 'offline' or 'online' (see the module docstring)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled"
    if env in ("offline", "dryrun") or not project:
        return "offline"
    import wandb

    # verify=False: look for a key (environment, settings, netrc) without asking the server
    has_key = bool(os.environ.get("WANDB_API_KEY")) or wandb.login(prompt=False, verify=False)
    if not has_key:
        print(f"wandb: --wandb-project {project} but no API key (set WANDB_API_KEY or run `wandb login`); "
              "logging offline", file=sys.stderr)
    return "online" if has_key else "offline"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _wandb_values(row: dict, wandb) -> dict:
    """A record as wandb.log wants it: numbers as they are, a router histogram (10 bins over the
    gate's range, losses.router_losses) as a wandb.Histogram, any other list of numbers as one
    scalar per entry (key/0, key/1, ...); strings (the stage) stay in metrics.jsonl only."""
    import numpy as np

    out = {}
    for k, v in row.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif _is_number(v):
            out[k] = v
        elif isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v):
            if k.endswith("_hist"):
                out[k] = wandb.Histogram(np_histogram=(np.asarray(v, float), np.linspace(0.0, 1.0, len(v) + 1)))
            else:
                out.update({f"{k}/{i}": x for i, x in enumerate(v)})
    if "global_step" not in out and _is_number(row.get("step")):
        out["global_step"] = row["step"]
    return out


# ----------------------------------------------------------------------------- the logger

class Telemetry:
    """Logs a run's records to <run_dir>/metrics.jsonl and wandb (see the module docstring).

    `config` is the resolved config (Config.to_dict()), stored with the wandb run; `stage` tags
    records until `set_stage` changes it; `lead` is false on every process but the first, which
    then writes nothing. Use as a context manager, or call `close()` at the end."""

    def __init__(self, run_dir: str | os.PathLike, *, config: Mapping, stage: str = "", wandb_project: str = "",
                 wandb_entity: str = "", wandb_tags: Iterable[str] = (), wandb_run: str = "", lead: bool = True):
        self.run_dir = io.path(run_dir)
        self.metrics_path = self.run_dir / METRICS
        self.stage = stage
        self.lead = lead
        self.mode = wandb_mode(wandb_project) if lead else "disabled"
        self.resumed = False  # whether the wandb run id came from an earlier run in this directory
        self._run = None
        self._file = None
        self._cloud = "://" in str(self.run_dir)
        self._rows: list[dict] = []  # a cloud run directory's records, rewritten whole on flush
        self._dirty, self._flushed_at = False, time.monotonic()
        if not lead:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            if self._cloud:
                self._rows = read_metrics(self.metrics_path)
            elif self._unterminated():
                # a half line left by a kill: drop it, or the next append would run on from it
                io.atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n"
                                                                for r in read_metrics(self.metrics_path)))
        if not self._cloud:
            self._file = self.metrics_path.open("a")
        if self.mode != "disabled":
            try:
                self._run = self._start_wandb(dict(config), wandb_project, wandb_entity, tuple(wandb_tags),
                                              wandb_run or self.run_dir.name)
            except BaseException:
                self.close()
                raise

    def _unterminated(self) -> bool:
        text = self.metrics_path.read_text()
        return bool(text) and not text.endswith("\n")

    def _start_wandb(self, config: dict, project: str, entity: str, tags: tuple, name: str):
        import wandb

        id_path = self.run_dir / WANDB_ID
        run_id = id_path.read_text().strip() if id_path.exists() else ""
        self.resumed = bool(run_id)
        if not run_id:
            run_id = secrets.token_hex(6)
            io.atomic_write_text(id_path, run_id + "\n")
        try:
            run = wandb.init(project=project or DEFAULT_PROJECT, entity=entity or None, name=name,
                             tags=list(tags) or None, config=config, id=run_id, resume="allow", mode=self.mode,
                             dir=None if self._cloud else os.fspath(self.run_dir),
                             settings=wandb.Settings(quiet=True))
        except wandb.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"wandb: could not start the {self.mode} run {run_id} of project "
                              f"'{project or DEFAULT_PROJECT}' ({first}); check the key, entity and network, or "
                              "drop --wandb-project to log offline") from None
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")  # the run's step counts across stages
        return run

    # ------------------------------------------------------------------------- logging

    def log(self, record: Mapping) -> None:
        """Appends one record (tagged with the current stage unless it names its own) to
        metrics.jsonl and logs it to wandb."""
        if not self.lead:
            return
        row = dict(record)
        row["stage"] = row.get("stage") or self.stage
        line = json.dumps(row, default=_plain)
        if self._cloud:
            self._rows.append(json.loads(line))
            self._dirty = True
            if time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
                self.flush()
        else:
            self._file.write(line + "\n")  # one write per line: a kill leaves at most its tail unwritten
            self._file.flush()
        if self._run is not None:
            import wandb

            self._run.log(_wandb_values(json.loads(line), wandb))

    def flush(self) -> None:
        """Makes everything logged so far readable in metrics.jsonl (a no-op for a local directory,
        whose lines are flushed as they are written)."""
        if self.lead and self._cloud and self._dirty:
            io.atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self._rows))
            self._dirty, self._flushed_at = False, time.monotonic()

    def set_stage(self, name: str) -> None:
        """Tags the records logged from now on with stage `name`."""
        self.flush()
        self.stage = name

    def summary(self, values: Mapping) -> None:
        """Sets the run's final figures: in the wandb run's summary and merged into
        <run_dir>/summary.json (keys already there that `values` does not name are kept)."""
        if not self.lead:
            return
        self.flush()
        path = self.run_dir / SUMMARY
        merged = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise DataError(f"{path}: not valid JSON; delete it and it is written again") from None
            if not isinstance(merged, dict):
                raise DataError(f"{path}: not a JSON object; delete it and it is written again")
        merged.update(values)
        io.atomic_write_text(path, json.dumps(merged, indent=1, default=str) + "\n")
        if self._run is not None:
            self._run.summary.update(json.loads(json.dumps(dict(values), default=str)))

    def close(self, exit_code: int = 0) -> None:
        """Flushes metrics.jsonl and finishes the wandb run; safe to call twice."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


# ----------------------------------------------------------------------------- plots

PLOTS = ("loss", "router_usage", "halting", "latent_advantage", "retrieval_gain")
_ROUTER_MEAN = re.compile(r"^router_(.+)_mean$")


def _x_and_stages(records: Sequence[dict]) -> tuple[list[float], list[str]]:
    """Each record's global step (its "global_step", or its "step" counted on from the end of the
    stages before it) and its stage."""
    xs, stages, offset, last, current = [], [], 0.0, 0.0, None
    for r in records:
        stage = str(r.get("stage") or "")
        if stage != current:
            offset, current = last, stage
        x = float(r["global_step"]) if _is_number(r.get("global_step")) else offset + float(r.get("step", 0))
        xs.append(x)
        stages.append(stage)
        last = x
    return xs, stages


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # imported here: only plotting needs it

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _stage_boundaries(ax, xs: list[float], stages: list[str]) -> None:
    """A dotted vertical line where each stage after the first begins (the previous one's last step)."""
    for i in range(1, len(xs)):
        if stages[i] != stages[i - 1]:
            ax.axvline(xs[i - 1], color="0.5", linestyle=":", linewidth=1)


def _series(records, xs, key) -> tuple[list[float], list[float]]:
    pts = [(x, float(r[key])) for r, x in zip(records, xs) if _is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_plot(records, xs, stages, evals):
    if not any(_is_number(r.get("loss")) for r in records):
        return None
    fig, ax = _figure("Training loss per stage", "global step", "loss")
    order = list(dict.fromkeys(stages))
    for stage in order:
        rows = [(x, float(r["loss"])) for r, x, s in zip(records, xs, stages) if s == stage and _is_number(r.get("loss"))]
        if rows:
            ax.plot([p[0] for p in rows], [p[1] for p in rows], marker="." if len(rows) < 30 else None,
                    label=stage or "run")
    _stage_boundaries(ax, xs, stages)
    ax.legend(fontsize=8)
    return fig


def _router_plot(records, xs, stages, evals):
    modules = sorted({m.group(1) for r in records for k in r if (m := _ROUTER_MEAN.match(k))})
    if not modules:
        return None
    fig, ax = _figure("Router usage per module\n(mean gate; band: ±1 std over examples and chunks)",
                      "global step", "mean gate")
    for name in modules:
        x, y = _series(records, xs, f"router_{name}_mean")
        line, = ax.plot(x, y, label=name)
        sx, sd = _series(records, xs, f"router_{name}_std")
        if sx == x:
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    _stage_boundaries(ax, xs, stages)
    ax.legend(fontsize=8)
    return fig


def _halting_plot(records, xs, stages, evals):
    x, y = _series(records, xs, "ws_halting_avg")
    if not x:
        return None
    fig, ax = _figure("Workspace halting steps (ACT, mean over chunks)", "global step", "expected halting steps")
    ax.plot(x, y, marker="." if len(x) < 30 else None)
    _stage_boundaries(ax, xs, stages)
    return fig


def _latent_plot(records, xs, stages, evals):
    r = evals.get("reasoning") or {}
    by_k = {int(k): float(v) for k, v in (r.get("accuracy_by_k") or {}).items()}
    if not by_k:
        return None
    ks = sorted(by_k)
    advantage = r.get("latent_advantage")
    if advantage is None and 0 in by_k:
        advantage = max(by_k.values()) - by_k[0]
    title = f"Answer accuracy by latent thoughts K ({r['task']})" if r.get("task") else "Answer accuracy by latent thoughts K"
    if advantage is not None:
        title += f"\nlatent advantage (best K vs K=0): {100 * advantage:+.1f} points"
    fig, ax = _figure(title, "", "accuracy (%)")
    names, values, colours = [f"K={k}" for k in ks], [100 * by_k[k] for k in ks], ["C0"] * len(ks)
    if _is_number(r.get("cot_accuracy")):
        names, values, colours = names + ["CoT"], values + [100 * r["cot_accuracy"]], colours + ["C1"]
    bars = ax.bar(range(len(names)), values, color=colours)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 105)
    return fig


def _popqa_buckets(p) -> tuple[list[str], list[int], list[float], list[float], tuple[str, str]] | None:
    """(labels, counts, accuracy without memory, accuracy with it, the two systems' names) from
    eval/suite.py's popqa dict ({"by_bucket": {label: {n, closed_book, with_memory}}}) or an
    eval/popqa.py Comparison (its first system without memory, its last with)."""
    if isinstance(p, Mapping) and p.get("by_bucket"):
        rows = list(p["by_bucket"].items())
        return ([label for label, _ in rows], [int(v.get("n", 0)) for _, v in rows],
                [float(v["closed_book"]) for _, v in rows], [float(v["with_memory"]) for _, v in rows],
                ("closed book", "with memory"))
    scores = getattr(p, "scores", None)
    if isinstance(scores, Mapping) and len(scores) >= 2:
        names = list(scores)
        without, with_ = scores[names[0]].by_bucket(), scores[names[-1]].by_bucket()
        return ([label for label, _, _ in without], [n for _, n, _ in without], [a for _, _, a in without],
                [a for _, _, a in with_], (names[0], names[-1]))
    return None


def _retrieval_plot(records, xs, stages, evals):
    p = evals.get("popqa")
    found = _popqa_buckets(p) if p is not None else None
    if not found:
        return None
    labels, counts, without, with_, names = found
    gain = p.get("retrieval_gain") if isinstance(p, Mapping) else None
    title = "PopQA accuracy by subject popularity, without and with memory"
    if _is_number(gain):
        title += f"\nretrieval gain: {100 * gain:+.1f} points"
    fig, ax = _figure(title, "subject popularity s_pop (monthly page views)", "accuracy (%)")
    pos, w = list(range(len(labels))), 0.38
    for shift, acc, name in ((-w / 2, without, names[0]), (w / 2, with_, names[1])):
        bars = ax.bar([i + shift for i in pos], [100 * a for a in acc], w, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(pos, [f"{label}\nn={n}" for label, n in zip(labels, counts)])
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    return fig


_MAKERS = {"loss": _loss_plot, "router_usage": _router_plot, "halting": _halting_plot,
           "latent_advantage": _latent_plot, "retrieval_gain": _retrieval_plot}


def plot_run(records: Sequence[dict], evals: Mapping | None, out_dir: str | os.PathLike) -> dict:
    """Writes <out_dir>/<name>.png for each of PLOTS whose data is there and returns
    {name: path, ..., "skipped": [names without data]}.

    `records` are the run's metrics records in order (training/stages.py run_metrics, or
    read_metrics of a metrics.jsonl): "loss", router_<module>_mean/_std and ws_halting_avg per
    logged step, with "stage" and "global_step". `evals` is eval/suite.py's results:
    evals["reasoning"] {"accuracy_by_k": {K: accuracy}, "cot_accuracy": ...} and evals["popqa"]
    (its dict, or an eval/popqa.py Comparison of a closed-book and a memory system)."""
    records = [r for r in records if isinstance(r, Mapping)]
    evals = evals or {}
    xs, stages = _x_and_stages(records)
    out = io.path(out_dir)
    written, skipped = {}, []
    for name in PLOTS:
        fig = _MAKERS[name](records, xs, stages, evals)
        if fig is None:
            skipped.append(name)
            continue
        if not written:
            out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        io.atomic_write_bytes(path, _png(fig))
        written[name] = str(path)
    return {**written, "skipped": skipped}
