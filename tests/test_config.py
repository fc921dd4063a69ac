"""The typed config: loading order, the commented base.yaml, the presets, one-line errors, the CLI.

Everything except the last section runs in-process on `load_config` (milliseconds). The CLI
section starts `train.py` in a subprocess five times (about 3-6 s each for the imports).
"""

import dataclasses
import json
import re

import pytest
import yaml

from conftest import REPO
from quietreasoning.config import (BASE_CONFIG, SECTIONS, Config, ConfigError, MeshConfig,
                                   load_config)
from quietreasoning.memory.pkm import pkm_param_count

BASE_TEXT = BASE_CONFIG.read_text()
BASE_TREE = yaml.safe_load(BASE_TEXT)


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError that `load_config(*args, **kwargs)` raises, checked to be
    one line (what the CLIs print after 'error: ')."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def write(path, text: str):
    path.write_text(text)
    return path


# --- 1. Loading order: base.yaml, then the preset, then key=value overrides ----------------------

def test_no_preset_gives_exactly_the_base_yaml_values():
    cfg = load_config()
    for section, values in BASE_TREE.items():
        for key, value in values.items():
            loaded = getattr(getattr(cfg, section), key)
            expected = tuple(value) if isinstance(value, list) else value if value is not None else ""
            assert loaded == expected, f"{section}.{key}"


def test_command_line_overrides_win_over_the_preset():
    cfg = load_config("tiny", ["model.d_model=512", "train.steps=7"])
    assert cfg.model.d_model == 512
    assert cfg.train.steps == 7
    assert cfg.model.n_layers == 4  # untouched keys keep the preset's value


def test_preset_overrides_base_and_unset_keys_fall_through_to_base():
    cfg = load_config("small")
    assert BASE_TREE["model"]["d_model"] == 256
    assert cfg.model.d_model == 512  # small.yaml
    assert cfg.model.vocab_size == 32000  # small.yaml
    assert cfg.train.lr == pytest.approx(1.0e-3)  # small.yaml
    assert cfg.model.rope_theta == BASE_TREE["model"]["rope_theta"]  # not in small.yaml
    assert cfg.train.b2 == BASE_TREE["train"]["b2"]
    assert cfg.run.name == "small"


def test_command_line_overrides_apply_over_a_preset_that_changed_the_same_key():
    assert load_config("small", ["model.d_model=1024"]).model.d_model == 1024


def test_the_last_of_repeated_overrides_wins():
    assert load_config("tiny", ["train.steps=7", "train.steps=9"]).train.steps == 9


def test_a_preset_may_be_a_name_or_a_path():
    assert load_config("small") == load_config(REPO / "configs" / "small.yaml")
    assert load_config("small") == load_config(str(REPO / "configs" / "small.yaml"))


def test_a_preset_file_outside_the_repo_is_layered_between_base_and_overrides(tmp_path):
    preset = write(tmp_path / "mine.yaml", "model:\n  d_model: 128\ntrain:\n  steps: 11\n")
    cfg = load_config(preset, ["train.steps=12"])
    assert cfg.model.d_model == 128
    assert cfg.train.steps == 12
    assert cfg.model.n_heads == BASE_TREE["model"]["n_heads"]


def test_validation_sees_the_merged_tree_so_an_override_can_repair_a_preset(tmp_path):
    preset = write(tmp_path / "bad_heads.yaml", "model:\n  n_heads: 6\n  n_kv_heads: 2\n")
    assert load_config(preset, ["model.n_heads=8"]).model.n_heads == 8


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=1.0e-3", "train.lr", 1.0e-3),
    ("train.lr=0.0005", "train.lr", 5e-4),
    ("train.lr=2", "train.lr", 2.0),               # an int where a float is expected
    ("model.norm_eps=1.0e-5", "model.norm_eps", 1e-5),
    ("model.tie_embeddings=true", "model.tie_embeddings", True),
    ("checkpoint.async_save=false", "checkpoint.async_save", False),
    ("train.steps=1000", "train.steps", 1000),
    ("run.name=exp 1", "run.name", "exp 1"),
    ("train.stage=123", "train.stage", "123"),      # a number where a string is expected
    ("checkpoint.dir=", "checkpoint.dir", ""),
    ("train.load_parameters_path=gs://b/p", "train.load_parameters_path", "gs://b/p"),
])
def test_override_values_are_parsed_as_yaml_and_coerced_to_the_field_type(override, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config("tiny", [override]), section), name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("raw, expected", [("1e-3", 1e-3), ("5e-4", 5e-4), ("2E-5", 2e-5)])
def test_scientific_floats_without_a_dot_are_accepted_on_the_command_line(raw, expected):
    # PyYAML (YAML 1.1) reads '1e-3' as a string; a float field must still take it
    assert load_config("tiny", [f"train.lr={raw}"]).train.lr == pytest.approx(expected)


def test_scientific_floats_without_a_dot_are_accepted_in_a_preset_file(tmp_path):
    preset = write(tmp_path / "lr.yaml", "train:\n  lr: 1e-3\n  z_loss: 5e-5\n")
    cfg = load_config(preset)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.z_loss == pytest.approx(5e-5)


@pytest.mark.parametrize("raw", [".nan", "nan", ".inf", "inf"])
def test_non_finite_floats_are_rejected(raw):
    config_error("tiny", [f"train.lr={raw}"])


def test_a_config_is_frozen_and_round_trips_through_to_dict():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 1
    assert cfg.to_dict()["model"]["d_model"] == cfg.model.d_model
    assert cfg.checkpoint_dir.endswith("tiny/checkpoints")


# --- 2. base.yaml lists every setting, each with a comment ----------------------------------------

def _base_key_lines() -> dict[str, str]:
    """{"section.key": the full line} for every indented `key: value` line of base.yaml."""
    lines, section = {}, None
    for line in BASE_TEXT.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
            continue
        entry = re.match(r"^\s+(\w+):", line)
        assert entry and section, f"unexpected line in base.yaml: {line!r}"
        lines[f"{section}.{entry.group(1)}"] = line
    return lines


def test_every_key_in_base_yaml_has_a_one_line_comment():
    lines = _base_key_lines()
    assert set(lines) == {f"{s}.{k}" for s, v in BASE_TREE.items() for k in v}, \
        "the line scan must see exactly the keys YAML sees"
    for key, line in lines.items():
        comment = re.search(r"\s#\s*(\S.*)$", line)
        assert comment, f"base.yaml: '{key}' has no comment: {line!r}"
        # the comment is a comment, not part of the value
        section, name = key.split(".")
        value_text = line[line.index(":") + 1: comment.start()]
        assert yaml.safe_load(f"v: {value_text}")["v"] == BASE_TREE[section][name], key


def test_base_yaml_sections_are_exactly_the_config_sections():
    assert list(BASE_TREE) == list(SECTIONS)
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(Config)}


def test_every_dataclass_field_is_in_base_yaml_and_every_base_key_is_a_field():
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    keys = {f"{s}.{k}" for s, values in BASE_TREE.items() for k in values}
    assert fields - keys == set(), "dataclass fields missing from base.yaml"
    assert keys - fields == set(), "base.yaml keys that are not dataclass fields"


# --- 3. Presets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "small", "3b"])
def test_each_shipped_preset_loads_and_names_its_run(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.run.name == preset


def test_3b_preset_has_the_seed_sizes():
    cfg = load_config("3b")
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ff, m.vocab_size) == (28, 2304, 24, 6144, 50000)
    assert cfg.train.seq_len == 8192
    assert m.resolved_head_dim == 96
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 8, 2)


def test_tiny_preset_is_the_base_sizes():
    base, tiny = load_config(), load_config("tiny")
    assert tiny.model == base.model
    assert tiny.train == base.train


# --- 4. Errors: ConfigError, one line, naming the file (or 'command line') and the key -------------

def test_unknown_key_suggests_the_nearest_valid_key():
    message = config_error("tiny", ["model.n_head=4"])
    assert message.startswith("command line:")
    assert "'model.n_head'" in message
    assert "did you mean 'model.n_heads'?" in message


def test_unknown_section_suggests_a_section_or_lists_them():
    assert "did you mean 'model'?" in config_error("tiny", ["modle.d_model=4"])
    message = config_error("tiny", ["zzz.d_model=4"])
    assert "unknown key 'zzz'" in message
    assert "valid sections: model, train, losses, mesh, data, memory, latent, serve, stages, checkpoint, run" in message


def test_unknown_key_in_a_preset_file_names_that_file(tmp_path):
    preset = write(tmp_path / "typo.yaml", "train:\n  stesp: 5\n")
    message = config_error(preset)
    assert message.startswith(f"{preset}:")
    assert "did you mean 'train.steps'?" in message


def test_override_without_equals_is_an_error_naming_the_command_line():
    message = config_error("tiny", ["model.d_model"])
    assert message.startswith("command line:")
    assert "model.d_model" in message


def test_heads_not_dividing_d_model_names_the_key_and_the_command_line():
    message = config_error("tiny", ["model.n_heads=6"])
    assert message.startswith("command line:")
    assert "model.n_heads=6" in message
    assert "model.d_model=256" in message


def test_heads_not_dividing_d_model_is_allowed_with_an_explicit_head_dim():
    cfg = load_config("tiny", ["model.n_heads=6", "model.n_kv_heads=2", "model.head_dim=32"])
    assert cfg.model.resolved_head_dim == 32


def test_bad_divisibility_in_a_preset_file_names_that_file(tmp_path):
    preset = write(tmp_path / "bad_heads.yaml", "model:\n  d_model: 256\n  n_heads: 6\n  n_kv_heads: 2\n")
    message = config_error(preset)
    assert message.startswith(f"{preset}:")
    assert "model.n_heads=6" in message


def test_kv_heads_not_dividing_heads_names_the_key():
    message = config_error("tiny", ["model.n_kv_heads=3"])
    assert message.startswith("command line:")
    assert "model.n_kv_heads=3" in message
    assert "model.n_heads=4" in message


@pytest.mark.parametrize("override, key", [
    ("train.steps=-1", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("train.warmup_steps=-5", "train.warmup_steps"),
    ("train.global_batch=0", "train.global_batch"),
    ("model.d_model=-256", "model.d_model"),
    ("model.n_layers=0", "model.n_layers"),
    ("checkpoint.every=0", "checkpoint.every"),
    ("data.synthetic_successors=0", "data.synthetic_successors"),
    ("mesh.tensor=0", "mesh.tensor"),
    ("mesh.fsdp=-2", "mesh.fsdp"),
])
def test_negative_or_zero_budgets_and_sizes_are_rejected(override, key):
    message = config_error("tiny", [override])
    assert message.startswith("command line:")
    assert key in message


@pytest.mark.parametrize("overrides, fragment", [
    (["train.grad_accum=3"], "train.grad_accum=3 does not divide train.global_batch=16"),
    (["model.compute_dtype=float16"], "model.compute_dtype"),
    (["model.param_dtype=int8"], "model.param_dtype"),
    (["model.remat=some"], "model.remat"),
    (["model.head_dim=33"], "head dimension 33 must be even"),  # RoPE rotates pairs
    (["serve.kv_bits=6"], "serve.kv_bits=6 must be one of (16, 8, 4)"),
    (["serve.awq_bits=2"], "serve.awq_bits=2 must be one of (8, 4)"),
    (["serve.snapkv_keep=0"], "serve.snapkv_keep=0.0 must be in (0, 1]"),
    (["serve.snapkv_kernel=4"], "serve.snapkv_kernel=4 must be a positive odd number"),
    (["serve.kv_group=0"], "serve.kv_group=0 must be positive"),
])
def test_impossible_combinations_and_bad_choices_are_named(overrides, fragment):
    message = config_error("tiny", overrides)
    assert message.startswith("command line:")
    assert fragment in message


def test_two_fill_axes_in_the_mesh_are_rejected():
    config_error("tiny", ["mesh.data=-1", "mesh.fsdp=-1"])


@pytest.mark.parametrize("preset, override", [
    ("3b", "model.d_model=2000"),           # n_heads comes from 3b.yaml, the bad d_model from the command line
    ("tiny", "mesh.fsdp=-1"),               # the second -1 comes from the command line
    ("tiny", "checkpoint.max_to_keep=0"),   # checkpoint.every is base.yaml's, max_to_keep the command line's
])
def test_a_cross_key_error_names_the_layer_that_set_the_offending_value(preset, override):
    assert config_error(preset, [override]).startswith("command line:")


def test_an_error_in_a_preset_given_by_name_names_its_file(tmp_path, monkeypatch):
    from quietreasoning import config as config_module
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs" / "base.yaml", BASE_TEXT)
    write(tmp_path / "configs" / "typo.yaml", "train:\n  stesp: 5\n")
    monkeypatch.setattr(config_module, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(config_module, "BASE_CONFIG", tmp_path / "configs" / "base.yaml")
    message = config_error("typo")
    assert "did you mean 'train.steps'?" in message  # the error itself is right
    assert message.startswith("configs/typo.yaml:")


def test_negative_head_dim_is_rejected():
    config_error("tiny", ["model.head_dim=-4"])


@pytest.mark.parametrize("override, key", [
    ("model.d_model=abc", "model.d_model"),
    ("model.d_model=true", "model.d_model"),       # a bool is not an int
    ("model.d_model=256.5", "model.d_model"),
    ("train.lr=fast", "train.lr"),
    ("model.tie_embeddings=1", "model.tie_embeddings"),
    ("run.name=[a, b]", "run.name"),
])
def test_wrong_types_name_the_key_and_the_command_line(override, key):
    message = config_error("tiny", [override])
    assert message.startswith("command line:")
    assert key in message
    assert "must be a" in message


def test_a_whole_float_is_accepted_where_an_int_is_expected():
    assert load_config("tiny", ["train.steps=7.0"]).train.steps == 7


def test_malformed_yaml_names_the_file_and_the_line(tmp_path):
    bad = write(tmp_path / "broken.yaml", "model:\n  d_model: 256\n  n_heads: [4\ntrain:\n  steps: 3\n")
    message = config_error(bad)
    assert message.startswith(f"{bad}:")
    assert "malformed YAML" in message
    assert re.search(r"\bline 4\b", message)


def test_tab_indentation_is_malformed_yaml_naming_the_line(tmp_path):
    bad = write(tmp_path / "tabs.yaml", "model:\n\td_model: 256\n")
    message = config_error(bad)
    assert message.startswith(f"{bad}:")
    assert "line 2" in message


def test_a_preset_whose_top_level_is_not_a_mapping_is_rejected(tmp_path):
    bad = write(tmp_path / "list.yaml", "- model\n- train\n")
    assert config_error(bad).startswith(f"{bad}:")


def test_a_section_that_is_not_a_mapping_is_rejected(tmp_path):
    bad = write(tmp_path / "scalar.yaml", "model: 5\n")
    message = config_error(bad)
    assert message.startswith(f"{bad}:")
    assert "'model'" in message


def test_an_empty_preset_file_changes_nothing(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == load_config()


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert message.startswith(f"{missing}:")
    assert "not found" in message


def test_a_missing_preset_name_names_the_file_it_looked_for():
    message = config_error("no_such_preset")
    assert str(REPO / "configs" / "no_such_preset.yaml") in message
    assert "not found" in message


# --- mesh: the product must equal the device count; one -1 fills --------------------------------

def test_mesh_product_not_equal_to_device_count_is_an_error():
    cfg = load_config("tiny", ["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1"])
    with pytest.raises(ConfigError) as info:
        cfg.mesh.shape(8)
    message = str(info.value)
    assert "\n" not in message
    assert "3" in message and "8 devices" in message


def test_mesh_minus_one_fills_the_remaining_devices():
    cfg = load_config("tiny", ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert cfg.mesh.shape(8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_default_puts_every_device_on_data():
    assert load_config("tiny").mesh.shape(8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_mesh_exact_product_is_accepted_unchanged():
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_fixed_axes_that_do_not_divide_the_device_count_cannot_be_filled():
    with pytest.raises(ConfigError, match="does not divide"):
        MeshConfig(data=-1, fsdp=3, tensor=1).shape(8)


# --- 5. The CLI: one 'error:' line and exit code 2; the 3b dry run ----------------------------------

def _broken_yaml(tmp_path):
    bad = write(tmp_path / "broken.yaml", "model:\n  n_heads: [4\ntrain:\n  steps: 3\n")
    return ["--config", str(bad)], [str(bad), "line 3"]


def _missing_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    return ["--config", str(missing)], [str(missing), "not found"]


CLI_ERRORS = {
    "unknown_key": lambda tmp_path: (["model.n_head=4"], ["model.n_head", "model.n_heads"]),
    "bad_divisibility": lambda tmp_path: (["model.n_heads=6"], ["command line", "model.n_heads=6"]),
    "malformed_yaml": _broken_yaml,
    "missing_config_file": _missing_file,
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_train_cli_reports_config_errors_as_one_line_and_exit_code_2(run_cli, tmp_path, case):
    args, expected = CLI_ERRORS[case](tmp_path)
    result = run_cli("train.py", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("error: ")
    for fragment in expected:
        assert fragment in lines[0]


def test_train_cli_3b_dry_run_prints_one_json_plan(run_cli):
    result = run_cli("train.py", "--config", str(REPO / "configs" / "3b.yaml"), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    assert {"params", "flops_per_token", "mesh", "bytes_per_device"} <= set(report)
    assert 3.0e9 <= report["params"] <= 3.4e9  # trunk ~2.0B + PKM ~1.08B (4M x 256 values) + modules ~0.14B
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2}
    dense = report["params"] - pkm_param_count(load_config("3b").model)  # PKM values are gathered, not multiplied
    assert report["flops_per_token"] > 6 * dense  # 6N plus attention
    assert 0 < report["bytes_per_device"]


def test_an_unknown_data_source_is_an_error_not_a_silent_fallback():
    message = config_error("tiny", ["data.source=gs://bucket/train-*.tfrecord"])
    assert message.startswith("command line:") and "data.source" in message and "synthetic" in message


def test_a_mesh_that_does_not_fit_the_devices_names_the_file_that_set_it(tmp_path):
    preset = write(tmp_path / "mesh.yaml", "mesh:\n  data: 3\n  fsdp: 1\n  tensor: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset).mesh_shape(8)
    assert str(info.value).startswith(f"{preset}:") and "8 devices" in str(info.value)
    with pytest.raises(ConfigError, match="^command line: "):
        load_config("tiny", ["mesh.data=3"]).mesh_shape(8)
    assert load_config("3b").mesh.fixed_devices == 16 and load_config("tiny").mesh.fixed_devices is None
