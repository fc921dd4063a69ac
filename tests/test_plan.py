"""The dry run at scale: what a training step holds per TPU chip, how long the stage plan takes,
and the one-line refusals, all from shapes (nothing allocated).

The 3b preset is traced once (about 10 s on the 2-core machine); the plans reuse that trace."""

import pytest

from helpers import micro_config
from quietreasoning.config import ConfigError, load_config
from quietreasoning.model.trunk import flops_per_token
from quietreasoning.training import plan as planning
from quietreasoning.training.plan import (GiB, TPU_CHIPS, check_fits, example_topology, format_scale_plan,
                                          parse_topology, scale_plan)


@pytest.mark.parametrize("text, expected", [
    ("4x4x4", ("v4", 64)), ("v4:2x2x1", ("v4", 4)), ("v5p:2x2x4", ("v5p", 16)),
    ("v5e:4x4", ("v5e", 16)), (" V6E:8x16 ", ("v6e", 128)),
])
def test_a_topology_names_a_generation_and_its_chips(text, expected):
    assert parse_topology(text) == expected


@pytest.mark.parametrize("text", ["4x4", "v5e:4x4x4", "v9:2x2x2", "4 by 4", "", "0x4x4", "v5e:32x32",
                                  "v4:2x2x2:2"])
def test_a_bad_topology_is_one_error_naming_the_flag(text):
    with pytest.raises(ConfigError) as e:
        parse_topology(text)
    message = str(e.value)
    assert message.startswith("--tpu-topology") and "\n" not in message
    assert any(example in message for example in ("4x4x4", "v5p:2x2x4", "chips exceed")), message


def test_example_topologies_have_the_chips_they_are_named_for():
    assert example_topology("v4", 4) == "2x2x1"
    assert example_topology("v4", 64) == "4x4x4"
    assert example_topology("v5e", 16) == "4x4"
    for gen in TPU_CHIPS:
        for chips in (1, 8, 128):
            assert parse_topology(f"{gen}:{example_topology(gen, chips)}") == (gen, chips)


def test_the_3b_preset_fits_4x4x4_at_one_row_per_chip():
    r = scale_plan(load_config("3b", ["train.grad_accum=12"]), "4x4x4")
    check_fits(r)
    assert r["fits"] and r["headroom_bytes"] > 0
    assert 3.0e9 <= r["params"] <= 3.4e9  # trunk ~2.0B + PKM ~1.08B + modules (tests/test_config.py)
    # configs/3b.yaml fixes 16 devices (fsdp 8 x tensor 2); 64 chips keep tensor 2 and fill fsdp
    assert r["mesh"] == {"data": 1, "fsdp": 32, "tensor": 2} and "mesh.fsdp" in r["mesh_note"]
    assert r["rows_per_device"] == 1  # 384 rows / 12 micro-batches / 32 data-parallel chips
    parts = ("param_bytes_per_device", "optimizer_bytes_per_device", "gradient_bytes_per_device",
             "activation_bytes_per_device")
    assert r["bytes_per_device"] == sum(r[p] for p in parts)
    assert r["optimizer_bytes"] >= 2 * r["param_bytes"]  # AdamW: two float32 moments per parameter
    assert r["optimizer_bytes_per_device"] * 64 >= r["optimizer_bytes"]
    text = format_scale_plan(r)
    for fragment in ("3b on TPU v4 4x4x4: 64 chips", "parameters", "optimizer state", "fits", "tokens/s", "days"):
        assert fragment in text, text


def test_the_3b_stage_plan_takes_days_consistent_with_its_throughput():
    cfg = load_config("3b", ["train.grad_accum=1"])  # 256 chips: 3 rows each, no accumulation needed
    r = scale_plan(cfg, "v5p:4x8x8", mfu=0.5)
    assert r["plan_tokens"] == 1.75e10  # the seed's stages: 7e9 + 7e9 + 2e9 + 1e9 + 5e8
    assert r["tokens_per_second"] == pytest.approx(0.5 * 459e12 * 256 / flops_per_token(cfg.model, 8192))
    assert r["days"] > 0
    assert r["days"] * 86400 * r["tokens_per_second"] == pytest.approx(r["plan_tokens"])
    assert f"{r['days']:.1f} days" in format_scale_plan(r)


def test_the_3b_preset_fits_4x4x4_and_without_accumulation_is_refused_naming_the_grad_accum_that_fits():
    assert scale_plan(load_config("3b"), "4x4x4")["fits"]  # configs/3b.yaml: train.grad_accum=12
    r = scale_plan(load_config("3b", ["train.grad_accum=1"]), "4x4x4")  # 12 rows of 8192 tokens per chip
    assert not r["fits"] and r["rows_per_device"] == 12
    assert r["fits_with_grad_accum"] == 12
    with pytest.raises(ConfigError) as e:
        check_fits(r)
    message = str(e.value)
    assert message.startswith("--tpu-topology 4x4x4: the 3b step needs") and "\n" not in message
    assert "set train.grad_accum=12 (1 row per chip)" in message


def test_a_single_v4_chip_is_refused_with_the_shortfall_and_the_slice_that_fits():
    r = scale_plan(load_config("3b"), "v4:1x1x1")
    assert not r["fits"] and r["fits_with_grad_accum"] is None  # params + Adam alone exceed 32 GiB
    assert r["param_bytes_per_device"] + r["optimizer_bytes_per_device"] > TPU_CHIPS["v4"].hbm_bytes
    with pytest.raises(ConfigError) as e:
        check_fits(r)
    message = str(e.value)
    assert message.startswith("--tpu-topology v4:1x1x1:")
    assert f"short by {-r['headroom_bytes'] / GiB:,.1f} GiB" in message
    assert f"use at least {r['min_chips']} chips" in message and r["min_chips"] > 1
    bigger = scale_plan(load_config("3b", [f"train.grad_accum={r['min_chips_grad_accum']}"]),
                        f"v4:{r['min_topology']}")
    assert bigger["fits"]


def test_tokens_per_second_scale_linearly_with_chips():
    cfg = micro_config("train.global_batch=64")
    small, large = scale_plan(cfg, "v4:2x2x2"), scale_plan(cfg, "4x4x4")
    assert large["chips"] == 8 * small["chips"]
    assert large["tokens_per_second"] == pytest.approx(8 * small["tokens_per_second"])
    assert large["days"] == pytest.approx(small["days"] / 8)


def test_an_mfu_outside_zero_to_one_is_refused():
    with pytest.raises(ConfigError, match="--mfu"):
        scale_plan(micro_config(), "v4:2x2x2", mfu=1.5)


def test_a_batch_that_does_not_split_over_the_slice_is_refused():
    with pytest.raises(ConfigError, match=r"--tpu-topology 4x4x4: train.global_batch=16"):
        scale_plan(micro_config(), "4x4x4")  # 16 rows over 64 data-parallel chips


def test_saved_activations_grow_by_the_same_bytes_per_row_and_remat_keeps_less():
    from quietreasoning.training.train_step import abstract_train_state

    def saved(cfg, rows):
        graphdef, _, _, abstract = abstract_train_state(cfg)
        return planning.saved_activation_bytes(cfg, graphdef, abstract["params"], rows)

    full, none = micro_config("model.remat=full"), micro_config("model.remat=none")
    one, two, three = (saved(full, rows) for rows in (1, 2, 3))
    assert three - two == two - one > 0  # affine in the rows: two traces give any row count
    m, t = full.model, full.train
    assert two - one >= m.n_layers * t.seq_len * m.d_model * 4  # the float32 stream entering each block
    assert saved(none, 1) > one  # without remat the blocks' insides are kept too
