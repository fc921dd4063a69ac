"""Bad configuration, fuzzed: random keys, types and values on the command line and in preset
files. The loader either returns a Config or raises ConfigError with one line naming the layer
that set the bad value; every command-line tool turns bad input (config overrides or flags) into
that one line on stderr and exit code 2, never a traceback, before any work starts."""

import contextlib
import dataclasses
import importlib.util
import io
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quietreasoning.config import SECTIONS, Config, ConfigError, load_config
from quietreasoning.data.__main__ import main as data_main
from quietreasoning.eval.long_context import main as long_context_main
from quietreasoning.eval.popqa import main as popqa_main
from quietreasoning.eval.reasoning import MODEL_DEFAULTS
from quietreasoning.eval.reasoning import main as reasoning_main
from quietreasoning.serve.__main__ import main as serve_main
from quietreasoning.tools.build_indices import main as build_indices_main

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CLI_FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TYPES = {f"{s}.{f.name}": typing.get_type_hints(cls)[f.name] for s, cls in SECTIONS.items()
         for f in dataclasses.fields(cls)}
KEYS = sorted(TYPES)

# values YAML reads in surprising ways, or not at all
ODD_VALUES = [".nan", ".inf", "-.inf", "nan", "inf", "1e999", "-1e999", "1e-3", "2020-13-01", "2020-01-01", "12:30:00",
              "!!float abc", "!!int abc", "!!timestamp abc", "!!binary xyz", "!!set {a}", "!!python/object:os.system x",
              "[", "]", "{", "}", "{a: 1}", "[1, [2]]", "[a, b]", "[]", "{}", "yes", "no", "on", "null", "~", "",
              "'quoted'", '"x\\ny"', "&a [*a]", "*a", "0x1F", "0o17", "1_000", "9" * 60, "-0", "+5", ":", "- a",
              "? x", "|", ">", "%YAML", "#c", "a\nb", "\t", "[" * 300, "é\u2028x"]
# values of the right shape but perhaps the wrong size: these reach the cross-key checks
PLAUSIBLE = ["true", "false", "0.5", "1.0", "[]", "[0, 1]", "[1, 1]", "float32", "bfloat16", "hnsw", "ivfpq", "GZIP",
             "tfrecord", "synthetic", "adapters", "[warmstart_dense_ws]", "[prose=1]", "[code=0]"]
values = st.one_of(st.sampled_from(ODD_VALUES), st.sampled_from(PLAUSIBLE), st.text(max_size=12),
                   st.integers(-3, 600).map(str), st.integers(-(10 ** 30), 10 ** 30).map(str),
                   st.floats().map(repr), st.lists(st.integers(-5, 50), max_size=4).map(str))
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=16),
                 st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTIONS)), st.text(max_size=10)))
items = st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=20))


def check_one_line(message: str, source: str) -> None:
    assert message and len(message.splitlines()) == 1, repr(message)
    assert message.startswith(f"{source}: "), message  # the layer that set the bad value


# --- the loader --------------------------------------------------------------------------------

@FUZZ
@given(st.lists(items, min_size=1, max_size=4))
def test_the_loader_returns_a_config_or_one_line_naming_the_command_line(overrides):
    """base.yaml and the tiny preset are valid, so whatever goes wrong is the command line's."""
    try:
        cfg = load_config("tiny", overrides)
    except ConfigError as e:
        check_one_line(str(e), "command line")
    else:
        assert isinstance(cfg, Config)


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=2)),
    max_leaves=5)
sections = st.one_of(
    st.dictionaries(st.sampled_from(KEYS).map(lambda k: k.split(".")[1]), yaml_values, max_size=3),
    st.dictionaries(st.text(max_size=8), yaml_values, max_size=2), yaml_values)
trees = st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8)), sections, max_size=3)
preset_files = st.one_of(trees.map(lambda t: yaml.safe_dump(t).encode()),
                         st.sampled_from(ODD_VALUES).map(lambda v: f"model:\n  d_model: {v}\n".encode()),
                         st.text(max_size=60).map(str.encode), st.binary(max_size=40))


@pytest.fixture(scope="module")
def preset_path(tmp_path_factory):
    return tmp_path_factory.mktemp("presets") / "fuzzed.yaml"


@FUZZ
@given(content=preset_files)
def test_a_preset_file_gives_a_config_or_one_line_naming_that_file(preset_path, content):
    preset_path.write_bytes(content)
    try:
        cfg = load_config(preset_path)
    except ConfigError as e:
        check_one_line(str(e), str(preset_path))
    else:
        assert isinstance(cfg, Config)


# --- the command-line tools, in process -----------------------------------------------------------

def _wrong_type(key: str) -> list[str]:
    typ = TYPES[key]
    if typing.get_origin(typ) is tuple:
        return ["3", "{a: 1}", "true"] if typing.get_args(typ)[0] is str else ["[a]", "[1.5]", "{a: 1}"]
    return {int: ["abc", "[1]", "{a: 1}", "true", "1.5"], float: ["abc", "[1]", "{a: 1}", "true"],
            bool: ["3", "abc", "[1]", "1.0"], str: ["[1]", "{a: 1}", "true"]}[typ]


FLOAT_KEYS = [k for k in KEYS if TYPES[k] is float]
OUT_OF_RANGE = ["model.d_model=0", "model.n_heads=-1", "model.vocab_size=0", "train.steps=0", "train.b1=1.5",
                "train.lr=-1", "data.lang_threshold=2", "memory.episodic_dedupe=0", "serve.kv_bits=3",
                "serve.snapkv_keep=0", "model.remat=sometimes", "latent.recipe=magic", "data.compression=zip",
                "stages.run=[nope]", "mesh.data=0", "checkpoint.every=0", "losses.rationale=2",
                "model.pkm_slots=15", "train.trainable=everything", "data.corpus=nowhere"]
invalid = st.one_of(
    st.text(min_size=1, max_size=12).filter(lambda k: k not in TYPES and not k.startswith("-")).map(lambda k: f"{k}=1"),
    st.sampled_from(KEYS).flatmap(lambda k: st.sampled_from(_wrong_type(k)).map(lambda v: f"{k}={v}")),
    st.sampled_from(FLOAT_KEYS).flatmap(lambda k: st.sampled_from([".nan", ".inf", "-.inf", "1e999"]).map(
        lambda v: f"{k}={v}")),
    st.text(max_size=12).filter(lambda s: "=" not in s and not s.startswith("-")),  # not section.key=value
    st.sampled_from(["=1", "model=3", ".=x", "model.=1", "a.b.c=d"]),
    st.sampled_from(OUT_OF_RANGE))
# an invalid item last (so nothing after it can repair it), perhaps random ones before it
bad_overrides = st.builds(lambda extra, bad: [*extra, bad],
                          st.lists(items.filter(lambda s: not s.startswith("-")), max_size=2), invalid)


def _script(name: str):
    """train.py / run.py at the repo root, as modules."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
    """Each tool (a script, or a module under quietreasoning) -> (its main, its argv around the given
    overrides, the overrides it loads the config with)."""
    t = str(tmp_path_factory.mktemp("cli"))
    model = ["--checkpoint", f"{t}/ckpt", "--tokenizer", f"{t}/t.model"]
    return {
        "train.py": (_script("train.py").main, lambda o: ["--dry-run", *o], list),
        "run.py": (_script("run.py").main, lambda o: ["--dry-run", *o], list),
        "data": (data_main, lambda o: ["build", "--output-dir", f"{t}/data", "--quiet", *o], list),
        "serve": (serve_main, lambda o: ["export", "--checkpoint", f"{t}/ckpt", "--output", f"{t}/b", *o], list),
        "tools.build_indices": (build_indices_main, lambda o: ["pkm", "--path", f"{t}/pkm.npy", *o], list),
        "eval.popqa": (popqa_main, lambda o: ["evaluate", "--records", f"{t}/r.jsonl", *model, *o], list),
        "eval.long_context": (long_context_main, lambda o: [*model, "--output", f"{t}/lc", *o], list),
        "eval.reasoning": (reasoning_main, lambda o: ["--task", "addition", "--output", f"{t}/r", "--steps", "1", *o],
                           lambda o: [*MODEL_DEFAULTS, "latent.recipe=coconut", *o]),
    }


def call(main, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of an in-process main(argv), whether it returns or exits."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


TOOLS = ["train.py", "run.py", "data", "serve", "tools.build_indices", "eval.popqa", "eval.long_context",
         "eval.reasoning"]


@pytest.mark.parametrize("name", TOOLS)
@CLI_FUZZ
@given(overrides=bad_overrides)
def test_bad_overrides_are_one_line_and_exit_code_2_in_every_tool(clis, name, overrides):
    main, argv, config_overrides = clis[name]
    try:
        load_config("tiny", config_overrides(overrides))
    except ConfigError as e:
        expected = f"error: {e}"
    else:
        assume(False)  # an extra item made the bad one harmless (rare): nothing to check
    code, err = call(main, argv(overrides))
    assert code == 2 and err.splitlines() == [expected], err


@pytest.mark.parametrize("name, args, fragment", [
    ("train.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("train.py", ["--devices", "x"], "argument --devices: invalid int value: 'x'"),
    ("train.py", ["--dry-run", "--devices", "-3"], "--devices -3"),
    ("train.py", ["--distributed-timeout", "nan", "--coordinator", "h:1", "--num-processes", "1", "--process-id", "0"],
     "--distributed-timeout nan"),
    ("run.py", ["--dry-run", "--steps", "-3"], "--steps -3"),
    ("run.py", ["--dry-run", "--tpu-topology", "4x4x4", "--mfu", "nan"], "--mfu nan"),
    ("run.py", ["--dry-run", "--stages", "9"], "--stages 9"),
    ("data", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("data", ["build"], "the following arguments are required: --output-dir"),
    ("data", ["build", "--output-dir", "x", "--vocab-size", "-4"], "--vocab-size -4"),
    ("serve", ["generate", "--bundle", "b"], "one of the arguments --prompt --interactive is required"),
    ("serve", ["generate", "--bundle", "b", "--prompt", "x", "--kv-bits", "5"], "argument --kv-bits"),
    ("tools.build_indices", ["knn", "--output", "k.index", "--nlist", "many"], "argument --nlist: invalid int value"),
    ("eval.popqa", ["generate", "--output", "p.jsonl", "--people", "0"], "--people 0"),
    ("eval.long_context", ["--output", "lc", "--lengths", "0"], "--lengths 0"),
    ("eval.long_context", ["--output", "lc", "--bundle", "b", "model.d_model=8"], "apply to --checkpoint only"),
    ("eval.reasoning", ["--task", "addition", "--output", "r", "--minutes", "nan"], "--minutes nan"),
    ("eval.reasoning", ["--task", "addition", "--output", "r", "--batch-size", "0"], "--batch-size 0"),
    ("eval.reasoning", ["--task", "addition", "--output", "r", "model.vocab_size=300"], "set its size with --vocab-size"),
])
def test_bad_flags_are_one_line_and_exit_code_2(clis, name, args, fragment):
    code, err = call(clis[name][0], args)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


# --- the real processes: exit code and stderr --------------------------------------------------------

def test_the_real_processes_exit_2_with_one_line_and_no_traceback(tmp_path):
    """A few tools as their users start them (each costs seconds of imports, so they run side by side)."""
    runs = {
        ("train.py", "--no-such-flag"): "error: train.py: unrecognized arguments: --no-such-flag; see train.py --help",
        ("-m", "quietreasoning.data", "build", "--output-dir", "d", "train.lr=.nan"):
            "error: command line: train.lr=nan must be a finite float",
        ("-m", "quietreasoning.serve", "export", "--checkpoint", "c", "--output", "b", "model.d_model=abc"):
            "error: command line: model.d_model='abc' must be an int",
        ("-m", "quietreasoning.eval.reasoning", "--task", "addition", "--output", "r", "model.nope=1"):
            "error: command line: unknown key 'model.nope'; did you mean 'model.norm_eps'?",
    }
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {args: subprocess.Popen([sys.executable, *(str(REPO / a) if a.endswith(".py") else a for a in args)],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in runs}
    for args, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err and err.splitlines() == [runs[args]], (args, err)
