"""The idea-bottleneck stack: config parsing, shapes of every middle and pooling, padding-free
ideas, frozen parameters staying bit-identical, loss going down, greedy decoding agreeing with
teacher forcing, interpolation endpoints decoding like their inputs, and train -> eval through the
CLI on local SAMSum-format files.

One micro stack is trained once per module (two memorised dialogues); the other tests build
their own micro setups on one device.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import MICRO
from quietreasoning.config import ConfigError
from quietreasoning.stack.__main__ import main
from quietreasoning.stack.config import run_dir, stack_config
from quietreasoning.stack.evaluate import Stack, interpolate, jitted, lead
from quietreasoning.stack.model import IdeaStack
from quietreasoning.stack.train import TRUNKS, load_trunk, setup, train
from quietreasoning.training import sharding
from quietreasoning.training.checkpoint import Checkpointer

TRUNK = [*MICRO, "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "model.n_layers=1",
         "model.compute_dtype=float32", "train.global_batch=8", "train.warmup_steps=5", "train.log_every=5"]
STACK = ["latent_dim=32", "prefix_len=4", "hidden=64", "middle_layers=1", "slots=2", "middle_heads=2",
         "max_input_len=40", "max_target_len=16"]
DIALOGUES = [
    {"id": "a", "dialogue": "Ann: Are you coming to the lake on Sunday?\nBen: Yes, I will bring the boat.",
     "summary": "Ben brings the boat."},
    {"id": "b", "dialogue": "Cleo: The printer is broken again.\nDan: I will call the repair shop tomorrow.",
     "summary": "Dan calls the shop."},
]


def _one_device(s):
    return sharding.make_mesh(s.project_config(), jax.devices()[:1])


def _batch(s, cfg, rows=8, seed=0):
    rng = np.random.default_rng(seed)
    v, te, td = cfg.model.vocab_size, s.max_input_len, s.max_target_len
    enc_len, dec_len = rng.integers(5, te, rows), rng.integers(2, td, rows)
    return {"enc_tokens": rng.integers(6, v, (rows, te)).astype(np.int32),
            "enc_segments": (np.arange(te) < enc_len[:, None]).astype(np.int32),
            "dec_inputs": rng.integers(6, v, (rows, td)).astype(np.int32),
            "dec_targets": rng.integers(6, v, (rows, td)).astype(np.int32),
            "dec_mask": (np.arange(td) < dec_len[:, None]).astype(np.int32)}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A micro stack (attention pooling, slot transformer) trained until it has memorised two
    SAMSum-format dialogues; validation holds the same two."""
    root = tmp_path_factory.mktemp("stack")
    data = root / "samsum"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES))
    overrides = [*STACK, "pooling=attention", "middle=transformer", f"data=samsum:{data}", "max_target_len=20", *TRUNK,
                 "model.vocab_size=300", "train.steps=300", "train.lr=3e-3", "checkpoint.every=300",
                 f"run.out_dir={root}", "run.name=memo"]
    s = stack_config(overrides)
    run = train(s, mesh=_one_device(s), progress=False)
    return run, overrides


def test_bare_keys_set_the_stack_and_dotted_keys_the_trunks():
    s = stack_config(["latent_dim=64", "middle=gru", "model.n_layers=3", "tasks=[qa]"])
    assert (s.latent_dim, s.middle, s.tasks) == (64, "gru", ("qa",))
    assert s.trunk[-1] == "model.n_layers=3" and s.project_config().model.n_layers == 3
    assert stack_config(["freeze=lora"]).project_config().model.adapters == ("stack",)
    with pytest.raises(ConfigError, match="did you mean 'latent_dim'"):
        stack_config(["latent_dims=64"])
    with pytest.raises(ConfigError, match="middle='lstm' must be one of"):
        stack_config(["middle=lstm"])
    with pytest.raises(ConfigError, match="samsum:DIR"):
        stack_config(["data=samsum"])


@pytest.mark.parametrize("middle,pooling", [("mlp", "mean"), ("transformer", "attention"), ("gru", "mean")])
def test_shapes_of_idea_prefix_and_logits_for_every_middle(middle, pooling):
    s = stack_config([*STACK, f"middle={middle}", f"pooling={pooling}", *TRUNK])
    m = s.project_config().model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: IdeaStack(s, m, rngs=nnx.Rngs(0))))

    def shape(fn, *args):  # nothing is allocated or compiled
        return jax.eval_shape(lambda p, *a: fn(nnx.merge(graphdef, p), *a), params, *args).shape

    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(s, s.project_config(), rows=3).items()}
    z = jax.ShapeDtypeStruct((3, s.latent_dim), jnp.float32)
    assert shape(lambda model, b: model.encode(b["enc_tokens"], b["enc_segments"]), batch) == z.shape
    assert shape(lambda model, z: model.prefix(z), z) == (3, s.prefix_len, m.d_model)
    assert shape(lambda model, b: model(b), batch) == (3, s.max_target_len, m.vocab_size)
    assert shape(lambda model, z: model.generate(z, 5, 1), z) == (3, 5)


@pytest.mark.parametrize("freeze", ["none", "trunks", "lora"])
def test_freeze_selects_all_or_the_bottleneck_or_it_and_the_trunk_adapters(freeze):
    s = stack_config([*STACK, f"freeze={freeze}", *TRUNK])
    ts = setup(s, s.project_config(), _one_device(s))
    paths = [p for p, _ in nnx.to_flat_state(ts.abstract_state["params"])]
    chosen = {p for p, _ in nnx.to_flat_state(nnx.split_state(ts.abstract_state["params"], ts.trainable, ...)[0])}
    for p in paths:
        in_trunk = TRUNKS(p, None)
        expected = {"none": True, "trunks": not in_trunk, "lora": not in_trunk or "adapters" in p}[freeze]
        assert (p in chosen) == expected, p
    assert any("adapters" in p for p in chosen) == (freeze == "lora")


def test_loss_goes_down_when_memorising(memorised):
    run, _ = memorised
    losses = [h["loss"] for h in run.history]
    assert losses[-1] < 0.1 * losses[0], losses


def test_padding_does_not_change_the_idea_vector(memorised):
    run, _ = memorised
    encode, _ = jitted(run.setup.graphdef, run.s.max_target_len, run.tokenizer.bos_id)
    b = _batch(run.s, run.setup.cfg)
    padded = run.setup.put({k: np.pad(b[k], ((0, 0), (0, 8))) for k in ("enc_tokens", "enc_segments")})
    b = run.setup.put(b)
    with jax.set_mesh(run.setup.mesh):
        z = encode(run.params, b["enc_tokens"], b["enc_segments"])
        z_padded = encode(run.params, padded["enc_tokens"], padded["enc_segments"])
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_padded), rtol=1e-5, atol=1e-5)


def test_greedy_decoding_agrees_with_teacher_forced_argmax(memorised):
    run, _ = memorised
    bos = run.tokenizer.bos_id
    encode, generate = jitted(run.setup.graphdef, run.s.max_target_len, bos)

    @jax.jit
    def teacher_forced_argmax(params, z, tokens):
        model = nnx.merge(run.setup.graphdef, params)
        inputs = jnp.concatenate([jnp.full((len(z), 1), bos, jnp.int32), tokens[:, :-1]], axis=1)
        return jnp.argmax(model.decode_logits(model.prefix(z), inputs, jnp.ones_like(inputs)), axis=-1)

    b = run.setup.put(_batch(run.s, run.setup.cfg, seed=3))
    with jax.set_mesh(run.setup.mesh):
        z = encode(run.params, b["enc_tokens"], b["enc_segments"])
        tokens = generate(run.params, z)
        np.testing.assert_array_equal(np.asarray(teacher_forced_argmax(run.params, z, tokens)), np.asarray(tokens))


def test_interpolation_endpoints_decode_like_their_inputs(memorised):
    run, _ = memorised
    stack = Stack(run)
    a, b = run.held_out
    path = interpolate(stack, a, b, steps=3)
    assert [alpha for alpha, _ in path] == [0.0, 0.5, 1.0]
    assert path[0][1] == stack.predict([a])[0] == a.target
    assert path[-1][1] == stack.predict([b])[0] == b.target


def test_a_finished_run_resumes_to_the_same_parameters_without_training(memorised):
    run, overrides = memorised
    again = train(stack_config(overrides), mesh=run.setup.mesh, progress=False)
    assert (again.start_step, again.final_step) == (300, 300)
    for x, y in zip(jax.tree.leaves(jax.device_get(run.params)), jax.tree.leaves(jax.device_get(again.params))):
        np.testing.assert_array_equal(x, y)


def test_eval_cli_scores_what_train_wrote_against_lead_n(memorised, tmp_path, capsys):
    run, overrides = memorised
    run_name = [o for o in overrides if o.startswith(("run.out_dir", "run.name"))]
    assert main(["eval", f"--pca={tmp_path / 'pca.png'}", *run_name]) == 0
    out = capsys.readouterr().out
    assert "| samsum | stack | 2 |" in out and "| samsum | lead-1 | 2 |" in out
    result = json.loads((run_dir(run.setup.cfg) / "eval.json").read_text())
    stack_row = next(r for r in result["scores"] if r["system"] == "stack")
    assert stack_row["rouge1"] == pytest.approx(100.0)
    assert (tmp_path / "pca.png").stat().st_size > 1000
    assert lead(DIALOGUES[0]["dialogue"], 1) == "Ann: Are you coming to the lake on Sunday?"


def test_lora_freeze_keeps_the_loaded_trunk_weights_bit_identical_after_steps(memorised, tmp_path):
    """freeze=lora with init_from: both trunks start as a saved trunk (the memorised stack's
    encoder, saved as a project checkpoint step) and their base weights stay so; the adapters and
    the whole bottleneck (a GRU middle here) move."""
    run, overrides = memorised
    saved = dict(nnx.to_flat_state(jax.device_get(run.params["encoder"])))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {"params": run.params["encoder"], "step": jnp.zeros((), jnp.int32)}, {"step": 1})
    ckpt.close()
    s = stack_config([*overrides, "freeze=lora", "middle=gru", f"init_from={tmp_path / '1'}"])
    cfg, mesh = s.project_config(), _one_device(s)
    ts = setup(s, cfg, mesh)
    with jax.set_mesh(mesh):
        state = ts.init(load_trunk(s.init_from, cfg, mesh))
        before = dict(nnx.to_flat_state(jax.device_get(state["params"])))
        for i in range(2):
            state, _ = ts.step_fn(state, ts.put(_batch(s, cfg, seed=i)))
        after = dict(nnx.to_flat_state(jax.device_get(state["params"])))
    for (name, *rest), value in after.items():
        if name in ("encoder", "decoder") and "adapters" not in rest:
            np.testing.assert_array_equal(value[...], before[(name, *rest)][...])
            np.testing.assert_array_equal(value[...], saved[tuple(rest)][...])
        elif name not in ("encoder", "decoder"):
            assert not np.array_equal(value[...], before[(name, *rest)][...]), (name, *rest)
    moved = [p for p in after if "adapters" in p and not np.array_equal(after[p][...], before[p][...])]
    assert moved  # LoRA B leaves zero and IA3 scales leave one
    assert ts.n_params("trainable") < ts.n_params()


def test_unknown_run_is_one_line_error(tmp_path, capsys):
    assert main(["eval", f"run.out_dir={tmp_path}", "run.name=none"]) == 2
    assert "no stack checkpoint" in capsys.readouterr().err
