"""The think protocol and the latent recipes: the KV cache equals the whole-sequence forward, K = 0
is the bare trunk bit for bit, thoughts are never returned as tokens, a skipped thought changes
nothing, the curriculum replaces steps by thoughts, and the recipes train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import micro_config

from quietreasoning.model.latent import LatentReasoner, ModeController, generate
from quietreasoning.training import inference
from quietreasoning.training import latent as lt

BOT, EOT, EOS = 4, 5, 2


@pytest.fixture(scope="module")
def cfg():
    return micro_config("model.compute_dtype=float32")


@pytest.fixture(scope="module")
def model(cfg):
    return LatentReasoner(cfg.model, rngs=nnx.Rngs(0))


def _examples(cfg, n=4, seed=0):
    rng = np.random.default_rng(seed)
    v = cfg.model.vocab_size
    return [lt.Encoded([1, *rng.integers(6, v, rng.integers(3, 7)).tolist()],
                       [rng.integers(6, v, 3).tolist() for _ in range(rng.integers(1, 4))],
                       [*rng.integers(6, v, 2).tolist(), EOS]) for _ in range(n)]


def test_kv_cache_prefill_and_steps_equal_the_whole_sequence_forward(cfg, model):
    trunk = model.trunk
    b, t = 2, 11
    tokens = jnp.asarray(np.random.default_rng(1).integers(6, cfg.model.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = trunk.forward(tokens, jnp.ones((b, t), jnp.int32), pos)
    cache = trunk.empty_cache(b, 16)
    emb = trunk.embed_tokens(tokens)
    h, cache = trunk.extend(emb[:, :6], pos[:, :6], jnp.ones((b, 6), bool), cache)
    pieces = [h]
    for i in range(6, t):
        h, cache = trunk.extend(emb[:, i:i + 1], pos[:, i:i + 1], jnp.ones((b, 1), bool), cache)
        pieces.append(h)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=1e-5)
    assert np.asarray(cache.length).tolist() == [t] * b


def test_k0_generation_is_the_bare_trunk_bit_for_bit(cfg, model):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(6, cfg.model.vocab_size, n).tolist() for n in (5, 9, 3)]
    bare = generate(model, ModeController(BOT, EOT, 0), prompts, max_new_tokens=8, eos_id=EOS)
    forced = generate(model, ModeController(BOT, EOT, 0), prompts, max_new_tokens=8, eos_id=EOS,
                      force_think_at=[0, 3])
    assert forced == bare
    assert bare == inference.generate(model.trunk, prompts, max_new_tokens=8, eos_id=EOS)


def test_a_forced_think_block_returns_real_tokens_only(cfg, model):
    prompts = [[1, 7, 8, 9], [1, 10, 11]]
    out = generate(model, ModeController(BOT, EOT, 3), prompts, max_new_tokens=8, eos_id=None, force_think_at=[2])
    for row in out:
        assert len(row) == 8 and row[2:4] == [BOT, EOT]  # <bot> then <eot>: three thoughts ran between, unreturned
    # a prompt ending with <bot> opens the block at once
    out = generate(model, ModeController(BOT, EOT, 2), [p + [BOT] for p in prompts], max_new_tokens=4, eos_id=None)
    assert all(row[0] == EOT for row in out)
    # the thoughts change what follows (K=2 vs K=0 after the same forced block)
    k2 = generate(model, ModeController(BOT, EOT, 2), prompts, max_new_tokens=8, eos_id=None, force_think_at=[0])
    assert k2 != generate(model, ModeController(BOT, EOT, 0), prompts, max_new_tokens=8, eos_id=None)


def test_latent_forward_with_no_thoughts_is_the_plain_forward(cfg, model):
    ex = _examples(cfg, 1)[0]
    seq = ex.question + [t for s in ex.steps for t in s] + ex.answer
    n, nq = len(seq), len(ex.question)
    full = model.trunk(jnp.asarray([seq]), jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
    out = lt.latent_forward(model, lt.make_batch([ex], 0, 1, BOT, EOT))
    # the same function, summed in another order: the cached pass attends over the cache's slots
    # (masked), the plain one over the sequence, so float32 rounding differs by a few ulps (K = 0
    # generation, the inference path, is bit for bit: test_k0_generation_is_the_bare_trunk_bit_for_bit)
    np.testing.assert_allclose(np.asarray(out["logits"][0, :n - nq]), np.asarray(full[0, nq - 1:n - 1]),
                               rtol=0, atol=1e-6)


def test_curriculum_stage_replaces_the_first_steps_by_thoughts(cfg):
    exs = _examples(cfg, 6)
    batch = lt.make_batch(exs, 2, 2, BOT, EOT)
    for r, ex in enumerate(exs):
        replaced = min(2, len(ex.steps))
        assert batch["active"][r].sum() == 2 * replaced
        suffix = batch["suffix"][r][batch["suffix_valid"][r]].tolist()
        assert suffix == [EOT] + [t for s in ex.steps[replaced:] for t in s] + ex.answer
        prefix = batch["prefix"][r][batch["prefix_valid"][r]].tolist()
        assert prefix == ex.question + [BOT]
    assert not (batch["loss_mask"] & (batch["suffix"] == EOT)).any()  # the forced <eot> is not a target


def test_a_skipped_thought_slot_changes_nothing(cfg, model):
    ex = _examples(cfg, 1, seed=3)[0]
    wide = lt.make_batch([ex], 1, 1, BOT, EOT)  # one thought
    wide["active"] = np.concatenate([wide["active"], np.zeros((1, 2), bool)], 1)  # plus two skipped slots
    a = lt.latent_forward(model, lt.make_batch([ex], 1, 1, BOT, EOT))["logits"]
    b = lt.latent_forward(model, wide)["logits"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_latent_forward_is_causal(cfg, model):
    exs = _examples(cfg, 2, seed=4)
    batch = lt.make_batch(exs, 1, 2, BOT, EOT)
    changed = {k: v.copy() for k, v in batch.items()}
    cut = 3
    changed["suffix"][:, cut:] = (changed["suffix"][:, cut:] + 1) % cfg.model.vocab_size
    a = lt.latent_forward(model, batch)["logits"]
    b = lt.latent_forward(model, changed)["logits"]
    np.testing.assert_array_equal(np.asarray(a[:, :cut + 1]), np.asarray(b[:, :cut + 1]))


def test_codi_alignment_is_zero_for_equal_states_and_stops_the_teacher_gradient():
    s = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 8)), jnp.float32)
    assert float(lt.codi_alignment(s, s)) == 0.0
    g_teacher = jax.grad(lambda t: lt.codi_alignment(s + 1.0, t))(s)
    assert float(jnp.abs(g_teacher).max()) == 0.0
    g_student = jax.grad(lambda x: lt.codi_alignment(x, s))(s + 1.0)
    assert float(jnp.abs(g_student).max()) > 0


@pytest.mark.parametrize("recipe", ["coconut", "codi", "stochastic"])
def test_the_recipes_lower_their_loss_and_train_the_projection(cfg, recipe):
    c = micro_config("model.compute_dtype=float32", f"latent.recipe={recipe}", "latent.k_max=2", "train.lr=3e-3",
                     "train.warmup_steps=0")
    m = LatentReasoner(c.model, heads=2 if recipe == "stochastic" else 0, rngs=nnx.Rngs(1))
    before = np.asarray(m.project.w_in[...]).copy()
    exs = _examples(c, 8, seed=6)
    plan = [(0, 10), (1, 20)] if recipe == "coconut" else [(0, 30)]
    hist = lt.train(m, exs, c, bot_id=BOT, eot_id=EOT, stage_steps=plan, batch_size=8, progress=False)
    assert hist[-1]["ce"] < 0.7 * hist[0]["ce"]
    assert not np.allclose(np.asarray(m.project.w_in[...]), before)  # gradients reach the projection
    if recipe == "stochastic":
        assert 0 <= hist[-1]["k"] <= 2 and np.isfinite(hist[-1]["kl"]) and hist[-1]["verifier_ece"] >= 0


def test_latent_reasoning_names_the_modules_it_cannot_serve():
    c = micro_config("model.workspace=true", "model.ws_layer=1", "model.ws_read_layers=[1]")
    with pytest.raises(ValueError, match="model.workspace"):
        LatentReasoner(c.model, rngs=nnx.Rngs(0))


def test_reasoning_eval_reads_answers_and_counts_leakage():
    from quietreasoning.eval import reasoning

    assert reasoning.answer_of("b=5\nc=1\n### 7\nmore") == "7"
    assert reasoning.answer_of(" 9 1 1") == "9 1 1"
    assert reasoning.leakage(["c=1 ### 7", "### 8"], frozenset({"c=1"})) == 1 / 5  # 5 whitespace tokens
    assert reasoning.leakage(["anything"], frozenset()) is None
    rows = {0: {"accuracy": 0.5, "correct": [True, False], "questions_per_s": 10.0},
            2: {"accuracy": 1.0, "correct": [True, True], "questions_per_s": 8.0}}
    table = reasoning.codi_table(rows, 2, None, 0.0)
    assert "| latent (K=2) | 100.0% | 8.0 | 1 | 0 |" in table and "+50.0 points" in table


def test_published_rows_sit_beside_our_numbers():
    from quietreasoning.eval import reasoning

    table = reasoning.published_table("prosqa", 0.5, 0.25, 3)
    assert "| ours | latent (K=3) | this run | 50.0% |" in table
    assert "| published | CoT | GPT-2 124M | 77.5% |" in table and "Coconut" in table
