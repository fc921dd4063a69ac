"""Readers for the public reasoning benchmarks kept in /work/shared/benchmarks, for evaluation
only (never train on them), and the accuracy their papers published, to print beside ours.

    load_benchmark("prosqa")              -> [{task, question, steps, answer, difficulty}, ...]
    published_results("prosqa")           -> [Published(benchmark, method, model, accuracy, ...)]

Benchmarks (BENCHMARKS: name -> file under the benchmarks folder):
  prosqa               prosqa/prosqa_valid.json: Coconut's 300 validation graphs, a JSON list of
                       objects with question, steps and answer (and the graph, not kept here)
  multiplication-NxN   multiplication/N_by_N_valid.txt, N = 4, 5, 7: 1,000 implicit-CoT lines
                       each, `a * b||pp0 + pp1 ( sum ) + ... #### product`, digits reversed

Examples come out as tasks.reasoning_example's do: question, steps, answer with the implicit-CoT
markers dropped, task ('prosqa' or 'multiplication') and difficulty ({'hops': path length} or
{'digits': N}), so one evaluation loop reads both our splits and these. A missing or malformed
file is one line (DataError) naming the file, the record and the fix.
"""

from __future__ import annotations

import dataclasses
import json

from quietreasoning.config import ConfigError, DataError
from quietreasoning.data import tasks
from quietreasoning.utils import io

BENCHMARKS_DIR = "/work/shared/benchmarks"
BENCHMARKS = {
    "prosqa": "prosqa/prosqa_valid.json",
    "multiplication-4x4": "multiplication/4_by_4_valid.txt",
    "multiplication-5x5": "multiplication/5_by_5_valid.txt",
    "multiplication-7x7": "multiplication/7_by_7_valid.txt",
}
COCONUT = "Hao et al. 2024, Training LLMs to Reason in a Continuous Latent Space (Coconut), Table 1"
STEPWISE = "Deng et al. 2024, From Explicit CoT to Implicit CoT: Learning to Internalize CoT Step by Step"
ICOT_KD = "Deng et al. 2023, Implicit Chain of Thought Reasoning via Knowledge Distillation"


@dataclasses.dataclass(frozen=True)
class Published:
    """One published result: accuracy in percent; tokens generated per question where reported."""

    benchmark: str
    method: str
    model: str
    accuracy: float
    tokens: float | None
    source: str


# As listed in /work/shared/benchmarks/README.md, which quotes the papers named in `source`.
PUBLISHED = (
    Published("prosqa", "CoT", "GPT-2 124M", 77.5, 49.4, COCONUT),
    Published("prosqa", "No-CoT", "GPT-2 124M", 76.7, 8.2, COCONUT),
    Published("prosqa", "iCoT", "GPT-2 124M", 98.2, 8.2, COCONUT),
    Published("prosqa", "Pause token", "GPT-2 124M", 75.9, None, COCONUT),
    Published("prosqa", "Coconut", "GPT-2 124M", 97.0, 14.2, COCONUT),
    Published("prosqa", "Coconut without curriculum", "GPT-2 124M", 76.1, None, COCONUT),
    Published("prosqa", "Coconut, pause as thought", "GPT-2 124M", 96.6, None, COCONUT),
    Published("multiplication-4x4", "stepwise internalization", "GPT-2 small 124M", 100.0, None, STEPWISE),
    Published("multiplication-5x5", "stepwise internalization", "GPT-2 small 124M", 99.6, None, STEPWISE),
    Published("multiplication-7x7", "stepwise internalization", "GPT-2 small 124M", 95.0, None, STEPWISE),
    Published("multiplication-4x4", "implicit CoT by distillation", "GPT-2 small 124M", 96.6, None, ICOT_KD),
    Published("multiplication-5x5", "implicit CoT by distillation", "GPT-2 small 124M", 9.5, None, ICOT_KD),
    Published("multiplication-5x5", "implicit CoT by distillation", "GPT-2 medium 355M", 96.4, None, ICOT_KD),
)


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark '{name}' is unknown; use one of {', '.join(BENCHMARKS)}")


def published_results(name: str) -> list[Published]:
    """The published rows for benchmark `name`, in the order above."""
    _check_name(name)
    return [row for row in PUBLISHED if row.benchmark == name]


def _prosqa(text: str, where: str) -> list[dict]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e}); restore the file from facebookresearch/coconut "
                        f"(data/prosqa_valid.json)") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{where}: expected a non-empty JSON list of examples; restore the file")
    out = []
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
              and isinstance(r.get("steps"), list) and r["steps"] and all(isinstance(s, str) for s in r["steps"]))
        if not ok:
            raise DataError(f"{where}: example {i} needs a string question and answer and a non-empty list of "
                            f"string steps; restore the file")
        out.append({"task": "prosqa", "question": r["question"], "steps": r["steps"], "answer": r["answer"],
                    "difficulty": {"hops": len(r["steps"])}})
    return out


def _multiplication(text: str, where: str, digits: int) -> list[dict]:
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        ex = tasks.implicit_cot_example(line, tasks.MULTIPLICATION_STEP_SEP)
        try:
            a, b = tasks.parse_multiplication(line)
            product = [int(c) for c in ex["answer"].split()]
        except ValueError:
            a, b, product = [], [], []
        if len(a) != digits or len(b) != digits or tasks._value(product) != tasks._value(a) * tasks._value(b):
            raise DataError(f"{where}: line {i + 1} is not a correct {digits}x{digits} implicit-CoT multiplication "
                            f"('a * b||steps #### product', digits reversed); restore the file from "
                            f"da03/Internalize_CoT_Step_by_Step")
        out.append({"task": "multiplication", **ex, "difficulty": {"digits": digits}})
    if not out:
        raise DataError(f"{where}: no examples; restore the file from da03/Internalize_CoT_Step_by_Step")
    return out


def load_benchmark(name: str, root: str = BENCHMARKS_DIR) -> list[dict]:
    """Every example of benchmark `name` (see BENCHMARKS) under `root`, in file order."""
    _check_name(name)
    path = io.path(root) / BENCHMARKS[name]
    if not path.exists():
        raise DataError(f"{path}: not found; benchmark '{name}' is read from {root}/{BENCHMARKS[name]} "
                        f"(see /work/shared/benchmarks/README.md), or pass root= the folder that holds it")
    text = path.read_text()
    if name == "prosqa":
        return _prosqa(text, str(path))
    return _multiplication(text, str(path), int(name.rsplit("x", 1)[1]))
