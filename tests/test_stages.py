"""The stage plan (training/stages.py): configs that accumulate, the PKM anneal, parameters carried
across stages, one-line errors (run.py end to end and killed mid-stage: tests/test_run.py)."""

import os
import sys

import numpy as np
import pytest
from flax import nnx

from quietreasoning.config import STAGES, ConfigError
from quietreasoning.model.trunk import Trunk
from quietreasoning.training import sharding
from quietreasoning.training import stages as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# four blocks (the plan's module positions), small widths, the synthetic stream: steps are milliseconds
PLAN_MICRO = ["model.vocab_size=512", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
              "model.ws_dim=16", "model.ws_slots=4", "model.ws_heads=2", "model.ws_chunk=8", "model.router_hidden=16",
              "model.pkm_slots=256", "model.pkm_topk=4", "model.pkm_heads=2", "model.pkm_key_dim=8",
              "model.pkm_value_dim=8", "model.ssm_state=4", "model.lora_rank=2", "model.episodic_dim=64",
              "model.compute_dtype=float32", "train.seq_len=32", "train.global_batch=8", "train.warmup_steps=1",
              "train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false", "data.source=synthetic"]


def scheduler(tmp_path, *extra, only=None, max_steps=None):
    return st.StageScheduler("tiny", [*PLAN_MICRO, *extra], tmp_path, only=only, max_steps=max_steps)


def test_each_stage_adds_its_overrides_to_the_ones_before_it(tmp_path):
    sched = scheduler(tmp_path)
    by = {s.name: s.cfg.model for s in sched.stages}
    assert by["warmstart_dense_ws"].workspace and not by["warmstart_dense_ws"].pkm_layers
    assert by["pkm_adapters"].pkm_layers == (3,) and by["pkm_adapters"].adapters == ("general", "math", "code")
    assert by["pkm_adapters"].pkm_temperature == 2.0
    assert by["ssm_light"].ssm_layers == (2,) and by["ssm_light"].router and by["ssm_light"].pkm_layers == (3,)
    # later stages keep the anneal's end; latent_distill is the LatentReasoner's view of the model
    assert by["ssm_light"].pkm_temperature == sched.base.stages.pkm_temperature_end
    latent = by["latent_distill"]
    assert not (latent.workspace or latent.router or latent.ssm_layers) and latent.pkm_layers == (3,)
    assert by["retrieval_supervision"].episodic and by["retrieval_supervision"].router
    assert by["retrieval_supervision"].ws_chunk == 8
    # budgets in steps; the runner's own keys: where each stage writes
    per_step = 8 * 32
    tokens = sched.base.stages.tokens
    assert [s.steps for s in sched.stages] == [max(1, round(t / per_step)) for t in tokens[:5]] + [0]
    assert sched.stages[2].cfg.checkpoint_dir == str(tmp_path / "stages" / "2_ssm_light" / "checkpoints")
    assert [s.cfg.train.stage for s in sched.stages] == list(STAGES)


def test_steps_cap_and_stage_selection(tmp_path):
    sched = scheduler(tmp_path, only=["ssm_light", "compress_serve"], max_steps=3)
    assert [s.name for s in sched.selected] == ["ssm_light", "compress_serve"]
    assert [s.steps for s in sched.stages] == [3, 3, 3, 3, 3, 0]
    assert sched.stages[0].cfg.train.steps == 3


def test_the_pkm_temperature_anneals_geometrically_in_pieces_in_pkm_adapters_only(tmp_path):
    sched = scheduler(tmp_path, "stages.anneal_segments=3", max_steps=9)
    pieces = sched.segments(sched.stage("pkm_adapters"))
    assert [end for end, _ in pieces] == [3, 6, 9]
    temps = [t for _, t in pieces]
    assert temps[0] == pytest.approx(2.0) and temps[-1] == pytest.approx(0.7)
    assert temps[1] == pytest.approx((2.0 * 0.7) ** 0.5)  # geometric: the middle is the geometric mean
    assert sched.segments(sched.stage("ssm_light")) == [(9, 0.7)]
    assert sched.segments(sched.stage("warmstart_dense_ws")) == [(9, 1.0)]
    one = scheduler(tmp_path, "stages.anneal_segments=1", max_steps=9)  # one piece: no anneal inside the stage
    assert one.segments(one.stage("pkm_adapters")) == [(9, pytest.approx(2.0))]


@pytest.mark.parametrize("override, fragment", [
    ('stages.pkm_adapters=["model.nope=1"]', "stages.pkm_adapters: 'model.nope=1' is not an override"),
    ('stages.ssm_light=["run.name=x"]', "stages.ssm_light: 'run.name=x' is not an override"),
    ("stages.run=[ssm_light, warmstart_dense_ws]", "must keep the plan's order"),
    ("stages.run=[warmup]", "unknown stage 'warmup'"),
    ("stages.tokens=[1, 2]", "stages.tokens needs 6 budgets"),
])
def test_a_bad_plan_is_one_clear_error(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        scheduler(tmp_path, override)


def test_a_stage_override_that_breaks_the_model_names_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.ssm_light .*model.ssm_layers"):
        scheduler(tmp_path, 'stages.ssm_light=["model.ssm_layers=[9]", "model.router=true"]')


def test_run_py_parses_stage_subsets_and_ranges():
    sys.path.insert(0, REPO)
    from run import parse_stages

    assert parse_stages("1..3") == list(STAGES[:3])
    assert parse_stages("latent_distill,compress_serve") == ["latent_distill", "compress_serve"]
    assert parse_stages("ssm_light..latent_distill,6") == ["ssm_light", "latent_distill", "compress_serve"]
    for bad, fragment in (("3..1", "runs backwards"), ("warmup", "unknown stage 'warmup'"), (",", "at least one")):
        with pytest.raises(ConfigError, match=fragment):
            parse_stages(bad)


def test_parameters_carry_by_path_and_a_new_module_starts_fresh(tmp_path):
    sched = scheduler(tmp_path)
    before = Trunk(sched.stage("warmstart_dense_ws").cfg.model, rngs=nnx.Rngs(1))
    after = Trunk(sched.stage("pkm_adapters").cfg.model, rngs=nnx.Rngs(2))
    old = st.flat_params(nnx.state(before, nnx.Param))
    tree, counts = st.carry_into(nnx.state(after, nnx.Param), [old])
    new = st.flat_params(tree)
    assert counts["carried"] == len(old) and counts["fresh"] == len(new) - len(old)
    for path, value in old.items():
        np.testing.assert_array_equal(new[path], value)
    pkm = [p for p in new if p[0] == "pkm"]
    assert pkm and all(p not in old for p in pkm)
    # a LatentReasoner's trunk carries into a Trunk: the paths agree once 'trunk' is dropped
    from quietreasoning.model.latent import LatentReasoner

    latent = LatentReasoner(sched.stage("latent_distill").cfg.model, rngs=nnx.Rngs(3))
    flat = st.flat_params(nnx.state(latent, nnx.Param))
    plain = Trunk(sched.stage("latent_distill").cfg.model, rngs=nnx.Rngs(4))
    _, counts = st.carry_into(nnx.state(plain, nnx.Param), [flat])
    assert counts["fresh"] == 0


def test_a_stage_waits_for_the_stages_before_it(tmp_path):
    sched = scheduler(tmp_path, max_steps=2)
    with pytest.raises(ConfigError, match="warmstart_dense_ws is not complete"):
        st.run_lm(sched, sched.stage("pkm_adapters"), progress=False)


def stage_params(sched, name):
    """The flat parameters a complete stage of `sched` ended with."""
    stage = sched.stage(name)
    return st.flat_params(st.stage_params(stage, sharding.make_mesh(stage.cfg)))


def test_the_retrieval_supervision_loss_is_bce_over_the_chunks_after_the_first():
    import jax.numpy as jnp

    from quietreasoning.training.losses import retrieval_supervision_loss

    logits = jnp.array([[[5.0], [2.0], [-1.0]], [[-3.0], [0.5], [9.0]]])  # (B=2, C=3, 1)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)                          # row 1's last chunk is empty
    retrieve = jnp.array([[1.0], [0.0]])
    loss, metrics = retrieval_supervision_loss(logits, mask, retrieve)
    bce = lambda z, y: np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z))  # noqa: E731
    expected = (bce(2.0, 1) + bce(-1.0, 1) + bce(0.5, 0)) / 3               # chunk 0 and the empty chunk left out
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["retrieval_gate_acc"]) == pytest.approx(1 / 3)     # 2.0 -> 1 right; -1.0, 0.5 wrong
