"""The episodic read and the fact retrieval that feeds it: off builds nothing and is the bare trunk
bit for bit, causal with memory on, masked memory tokens and a closed router gate change nothing,
gradients reach the read and the memory, the jitted train step takes memory from the batch, and
the retrieval glue returns arrays of the shapes the model takes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import ConfigError, DataError
from quietreasoning.data import tasks
from quietreasoning.eval import popqa
from quietreasoning.memory.episodic_read import episodic_read_param_count
from quietreasoning.memory.knn_lm import KNNDatastore
from quietreasoning.memory.retrieval import FactMemory, fact_statement, memory_arrays
from quietreasoning.model.router import gate_widths
from quietreasoning.model.trunk import Trunk, param_count
from quietreasoning.utils.tokenizer import train_tokenizer

VOCAB = 320
ON = ["model.episodic=true", "model.episodic_layer=1", "model.compute_dtype=float32", f"model.vocab_size={VOCAB}"]
ROUTED = ["model.workspace=true", "model.router=true", "model.ws_layer=1", "model.ws_read_layers=[1]",
          "model.ws_chunk=8", "model.ws_slots=4", "model.ws_dim=32", "model.router_hidden=16"]
B, T, M = 2, 32, 6


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(4, VOCAB, (B, T)), jnp.int32)


def memory(seed=1, d=64):
    mem = jax.random.normal(jax.random.key(seed), (B, M, d))
    mask = jnp.array([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    return mem, mask


def compiled(model):
    """(state, jitted logits with memory: f(state, tokens, memory, memory_mask), jitted logits
    without: f(state, tokens)); a state is an argument, so an edited one reuses the compilation."""
    graphdef, state = nnx.split(model)

    def logits(state, tokens, memory=None, memory_mask=None):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, _ = m.forward(tokens, jnp.ones_like(tokens), pos, memory=memory, memory_mask=memory_mask)
        return m.logits(h)
    with_memory, plain = jax.jit(logits), jax.jit(lambda state, tokens: logits(state, tokens))
    return state, lambda *a: np.asarray(with_memory(*a)), lambda *a: np.asarray(plain(*a))


def n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def plain():
    """The micro trunk with the read before block 1, and its compiled forwards."""
    cfg = micro_config(*ON)
    return (cfg, *compiled(Trunk(cfg.model, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def routed():
    """The same with the workspace and router on, so the router's episodic gate applies."""
    cfg = micro_config(*ON, *ROUTED)
    return (cfg, *compiled(Trunk(cfg.model, rngs=nnx.Rngs(0))))


def test_off_builds_nothing_and_the_logits_are_the_bare_trunks_bit_for_bit(plain):
    on_cfg, on_state, _, on_plain = plain
    off_cfg = micro_config(*[o for o in ON if not o.startswith("model.episodic=")])
    off = Trunk(off_cfg.model, rngs=nnx.Rngs(0))
    assert off.episodic is None and n_params(off) == param_count(off_cfg.model)
    on_params = dict(nnx.to_flat_state(nnx.state(on_state, nnx.Param)))
    assert sum(v.size for v in on_params.values()) == param_count(on_cfg.model) == (
        param_count(off_cfg.model) + episodic_read_param_count(on_cfg.model))
    for path, v in nnx.to_flat_state(nnx.state(off, nnx.Param)):  # the read draws its numbers last
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(on_params[path][...]))
    off_state, _, off_plain = compiled(off)
    np.testing.assert_array_equal(on_plain(on_state, tokens()), off_plain(off_state, tokens()))  # memory None: no read


def test_causal_with_memory_workspace_and_router_on(routed):
    _, state, forward, _ = routed
    mem, mask = memory()
    base = forward(state, tokens(), mem, mask)
    for t in (3, 8, 21):
        changed = tokens().at[:, t:].set((tokens()[:, t:] * 7 + 3) % (VOCAB - 4) + 4)
        out = forward(state, changed, mem, mask)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])


def test_a_masked_memory_token_changes_nothing_and_an_empty_row_reads_nothing(plain):
    _, state, forward, no_memory = plain
    mem, mask = memory()
    base = forward(state, tokens(), mem, mask)
    noise = jax.random.normal(jax.random.key(9), mem.shape) * 100
    np.testing.assert_array_equal(forward(state, tokens(), jnp.where(mask[..., None], mem, noise), mask), base)
    assert not np.allclose(forward(state, tokens(), jnp.where(mask[..., None], noise, mem), mask), base)
    empty = forward(state, tokens(), mem, mask.at[1].set(False))
    np.testing.assert_array_equal(empty[1], no_memory(state, tokens())[1])
    np.testing.assert_array_equal(empty[0], base[0])
    assert not np.allclose(base[1], no_memory(state, tokens())[1])


def test_a_closed_router_gate_shuts_the_read(routed):
    """With the episodic gate at 0 the logits are those of a read of nothing (an all-masked memory,
    which adds exactly zero: the test above), whatever the memory holds."""
    cfg, state, forward, _ = routed
    widths = gate_widths(cfg.model)
    column = sum(list(widths.values())[:list(widths).index("episodic")])
    flat = [(p, v.replace(v[...].at[column].set(-1e4)) if p[-2:] == ("router", "b_out") else v)
            for p, v in nnx.to_flat_state(state)]  # sigmoid(-1e4) underflows to exactly 0
    closed = nnx.from_flat_state(flat)
    mem, mask = memory()
    nothing = forward(closed, tokens(), mem, jnp.zeros_like(mask))
    np.testing.assert_array_equal(forward(closed, tokens(), mem, mask), nothing)
    assert not np.allclose(forward(state, tokens(), mem, mask), forward(state, tokens(), mem, jnp.zeros_like(mask)))


def test_gradients_reach_every_read_parameter_and_the_memory_tokens():
    cfg = micro_config(*ON)
    graphdef, params, rest = nnx.split(Trunk(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    mem, mask = memory()
    targets = tokens(5)

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1))
    def grads(params, mem):
        m = nnx.merge(graphdef, params, rest)
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        h, _ = m.forward(tokens(), jnp.ones((B, T), jnp.int32), pos, memory=mem, memory_mask=mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(m.logits(h)), targets[..., None], -1))

    g_params, g_mem = grads(params, mem)
    for name, g in nnx.to_flat_state(g_params["episodic"]):
        assert np.abs(np.asarray(g[...])).max() > 0, name
    g_mem = np.asarray(g_mem)
    assert np.abs(g_mem[np.asarray(mask)]).min(axis=-1).max() > 0 and np.all(g_mem[~np.asarray(mask)] == 0)


def test_memory_given_to_an_off_model_or_of_the_wrong_width_is_a_one_line_error():
    off = Trunk(micro_config("model.compute_dtype=float32", f"model.vocab_size={VOCAB}").model, rngs=nnx.Rngs(0))
    on = Trunk(micro_config(*ON).model, rngs=nnx.Rngs(0))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    with pytest.raises(ConfigError, match="model.episodic=false"):
        off.forward(tokens(), jnp.ones((B, T), jnp.int32), pos, memory=memory()[0])
    with pytest.raises(DataError, match=r"must be \(batch=2, M, model.episodic_dim=64\)"):
        on.forward(tokens(), jnp.ones((B, T), jnp.int32), pos, memory=memory(d=32)[0])
    with pytest.raises(DataError, match="memory_mask of shape"):
        on.forward(tokens(), jnp.ones((B, T), jnp.int32), pos, memory=memory()[0], memory_mask=jnp.ones((B, 3), bool))


def test_the_jitted_train_step_takes_memory_from_the_batch():
    from quietreasoning.data.synthetic import SyntheticLanguage
    from quietreasoning.training import sharding
    from quietreasoning.training.train_step import put_batch, setup, train_state
    cfg = micro_config(*ON, "model.n_layers=1", "model.episodic_layer=0", "train.lr=1e-2")  # one block: a quick compile
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    ts = setup(cfg, mesh)
    t = cfg.train
    language = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, t.seed)
    host = language.batch(0, t.global_batch, t.seq_len)
    rng = np.random.default_rng(0)
    host["memory"] = rng.normal(size=(t.global_batch, M, 64)).astype(np.float32)
    host["memory_mask"] = rng.random((t.global_batch, M)) < 0.7
    batch = put_batch(host, ts.batch_sharding)
    assert set(batch) >= {"memory", "memory_mask"}
    with jax.set_mesh(mesh):
        state = train_state(nnx.state(Trunk(cfg.model, rngs=nnx.Rngs(0)), nnx.Param), ts.tx)  # ts.init(), uncompiled
        before = np.asarray(state["params"]["episodic"]["w_k"])
        losses = []
        for _ in range(3):
            state, metrics = ts.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.allclose(np.asarray(state["params"]["episodic"]["w_k"]), before)


# ----------------------------------------------------------------------------- retrieval glue

@pytest.fixture(scope="module")
def facts():
    """A small world, a tokenizer of its texts, a micro reader and a FactMemory keyed by it."""
    records = tasks.popqa_records(0, n_people=30)
    tokenizer = train_tokenizer([tasks.fact_document(r).text for r in records], VOCAB)
    cfg = micro_config(*ON, "model.episodic_slots=3", "model.episodic_dim=128")  # rows: a state and an embedding
    model = Trunk(cfg.model, rngs=nnx.Rngs(0))
    return records, tokenizer, model, FactMemory.build(cfg, model, tokenizer, records, progress=False)


def test_retrieval_returns_the_asked_fact_first_and_memory_arrays_of_the_model_shapes(facts):
    records, tokenizer, model, memory = facts
    asked = records[::7]
    found = memory.retrieve([r["question"] for r in asked])
    q, k, length = len(asked), 3, memory.value_len
    assert length == max(len(tokenizer.encode(fact_statement(r))) + 1 for r in records)  # <bos> + the longest
    assert found.values.shape == (q, k, length, 128) and found.values.dtype == np.float32 and found.mask.all()
    sources = memory.store.metadata(found.ids[:, 0])["source"]
    assert sources.tolist() == [str(r["id"]) for r in asked]  # the asked question's key is its fact's own
    table = np.asarray(model.embed[...])
    ids = [tokenizer.bos_id, *tokenizer.encode(fact_statement(asked[0])), tokenizer.eos_id]
    np.testing.assert_array_equal(found.values[0, 0, :len(ids) - 1, 64:], table[ids[1:]])  # each row's next token
    inputs = memory_arrays(found)
    assert inputs["memory"].shape == (q, k * length, 128) and inputs["memory_mask"].shape == (q, k * length)
    lengths = inputs["memory_mask"].reshape(q, k, length).sum(-1)  # each fact's real rows, at the front
    first = np.array([len(tokenizer.encode(fact_statement(r))) + 1 for r in asked])
    np.testing.assert_array_equal(lengths[:, 0], first)
    assert np.all(inputs["memory"][~inputs["memory_mask"]] == 0)
    found.mask[0, 1:] = False  # entries a search did not fill are masked whole
    assert inputs["memory_mask"][0].sum() > memory_arrays(found)["memory_mask"][0].sum() == first[0]
    state, forward, _ = compiled(model)  # the arrays are what the trunk takes
    assert np.isfinite(forward(state, jnp.ones((q, 8), jnp.int32), inputs["memory"], inputs["memory_mask"])).all()


def test_predict_functions_answer_each_question_and_knn_at_lambda_zero_is_the_model_alone(facts):
    records, tokenizer, model, memory = facts
    questions = [r["question"] for r in records[:5]]
    with_memory = popqa.with_memory(model, tokenizer, memory, max_new_tokens=3)(questions)
    assert len(with_memory) == 5 and all(isinstance(a, str) for a in with_memory)
    rng = np.random.default_rng(0)
    store = KNNDatastore.from_arrays(rng.normal(size=(64, 64)).astype(np.float32), rng.integers(4, VOCAB, 64), "flat")
    silent = popqa.with_knn(model, tokenizer, store, memory=memory, lam=0.0, k=4, max_new_tokens=3)(questions)
    assert silent == with_memory
    loud = popqa.with_knn(model, tokenizer, store, memory=memory, lam=1.0, k=4, max_new_tokens=3)(questions)
    assert loud != with_memory  # the datastore's random tokens take over
