"""KV-cached decoding: a prefill plus one-token steps equals recomputing the whole sequence, with
every module on; quantised and SnapKV caches; sampling; streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import micro_config

from quietreasoning.memory.kv_cache import KVSettings
from quietreasoning.model.trunk import Trunk
from quietreasoning.training import inference

EVERY_MODULE = ["model.n_layers=2", "model.workspace=true", "model.router=true", "model.ws_layer=1",
                "model.ws_read_layers=[1]", "model.ws_chunk=8", "model.ws_slots=4", "model.ws_dim=32",
                "model.ssm_layers=[1]", "model.ssm_state=8", "model.adapters=[general,math]", "model.lora_rank=2",
                "model.router_hidden=16", "model.pkm_layers=[1]", "model.pkm_slots=256", "model.pkm_heads=2",
                "model.pkm_topk=4", "model.pkm_key_dim=16", "model.pkm_value_dim=16", "model.episodic=true",
                "model.episodic_layer=1", "model.compute_dtype=float32"]
LENGTHS = [13, 5, 16]  # ragged prompts, right-padded in a 16-token buffer
P, STEPS, M = 16, 11, 5


@pytest.fixture(scope="module")
def setup():
    cfg = micro_config(*EVERY_MODULE)
    model = Trunk(cfg.model, rngs=nnx.Rngs(0))
    # random (not zero-initialised) module outputs, so every module visibly moves the logits
    rng = np.random.default_rng(1)
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    leaves = [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    tokens = rng.integers(4, cfg.model.vocab_size, (len(LENGTHS), 32)).astype(np.int32)  # >= P + STEPS, whole chunks
    memory = jnp.asarray(rng.normal(size=(len(LENGTHS), M, cfg.model.resolved_episodic_dim)), jnp.float32)
    return cfg, model, tokens, memory


@pytest.fixture(scope="module")
def reference(setup):
    cfg, model, tokens, memory = setup
    return reference_logits(model, tokens, LENGTHS, memory)


def reference_logits(model, tokens, lengths, memory):
    """Logits of row b at positions [lengths_b - 1, lengths_b - 1 + STEPS): the whole sequence through
    `forward` each time, cut after the row's current last token."""
    @jax.jit
    def run(tokens, memory):
        rows, total = tokens.shape
        index = jnp.arange(total)

        def one(step):
            upto = jnp.asarray(lengths) + step
            segs = (index[None] < upto[:, None]).astype(jnp.int32)
            hidden = model.forward(tokens, segs, jnp.broadcast_to(index, tokens.shape), memory=memory)[0]
            return model.logits(jnp.take_along_axis(hidden, (upto - 1)[:, None, None], axis=1)[:, 0])
        return jax.lax.map(one, jnp.arange(STEPS + 1)).transpose(1, 0, 2)
    return run(jnp.asarray(tokens), memory)


def cached_logits(model, tokens, lengths, memory, kv=None):
    """The same logits from a prefill of the right-padded prompts and one-token cached steps, where
    row b's step i feeds tokens[b, lengths_b + i]."""
    return jax.jit(lambda t, m: _cached_logits(model, t, lengths, m, kv))(jnp.asarray(tokens), memory)


def _cached_logits(model, tokens, lengths, memory, kv):
    rows = tokens.shape[0]
    lengths = jnp.asarray(lengths, jnp.int32)
    prompt = jnp.where(jnp.arange(P)[None] < lengths[:, None], jnp.asarray(tokens[:, :P]), 0)
    positions = jnp.broadcast_to(jnp.arange(P), (rows, P))
    cache = model.empty_cache(rows, P + STEPS, kv)
    h, cache = model.extend(model.embed_tokens(prompt), positions, positions < lengths[:, None], cache, kv=kv,
                            fresh=True, end=lengths, memory=memory)
    outs = [model.logits(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0])]

    def step(cache, i):
        pos = lengths + i
        tok = jnp.take_along_axis(tokens, pos[:, None], axis=1)
        h, cache = model.extend(model.embed_tokens(tok), pos[:, None], jnp.ones((rows, 1), bool), cache, kv=kv,
                                memory=memory)
        return cache, model.logits(h[:, 0])
    cache, steps = jax.lax.scan(step, cache, jnp.arange(STEPS))
    return jnp.concatenate([outs[0][:, None], steps.transpose(1, 0, 2)], 1), cache


def test_cached_decoding_equals_recomputing_the_whole_sequence_with_every_module_on(setup, reference):
    cfg, model, tokens, memory = setup
    ref = reference
    got, cache = cached_logits(model, tokens, LENGTHS, memory)
    assert float(jnp.std(ref)) > 0.1  # the logits are far from uniform: the comparison has teeth
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4, rtol=2e-4)
    assert np.asarray(cache.length).tolist() == [n + STEPS for n in LENGTHS]
    # every module is in the computation the equivalence covers
    assert model.workspace is not None and model.router is not None and model.episodic is not None
    assert len(model.ssm) == 1 and len(model.pkm) == 1 and model.blocks[0].adapters is not None


def test_int8_and_int4_caches_stay_close_and_int8_is_closer(setup, reference):
    cfg, model, tokens, memory = setup
    ref = reference
    errors = {}
    for bits in (8, 4):
        got, _ = cached_logits(model, tokens, LENGTHS, memory, KVSettings(bits=bits, group=4))
        errors[bits] = float(jnp.max(jnp.abs(got - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert 0 < errors[8] < errors[4] < 0.25 * scale, errors


def test_greedy_generation_with_the_cache_matches_the_recomputing_decoder(setup):
    cfg, model, tokens, memory = setup
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    cached = inference.generate(model, prompts, max_new_tokens=9, eos_id=None, memory=memory)
    recomputed = inference.generate(model, prompts, max_new_tokens=9, eos_id=None, memory=memory, recompute=True)
    assert cached == recomputed and all(len(x) == 9 for x in cached)


def test_snapkv_keeps_the_stated_share_and_with_everything_kept_changes_nothing(setup):
    cfg, model, tokens, memory = setup
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    full = inference.decode(model, prompts, max_new_tokens=6, eos_id=None, memory=memory)
    # a window as long as the prompt buffer keeps every position: SnapKV is then the identity
    everything = inference.decode(model, prompts, max_new_tokens=6, eos_id=None, memory=memory,
                                  kv=KVSettings(keep=0.5, window=64, kernel=3))
    assert everything.new == full.new
    snap = inference.decode(model, prompts, max_new_tokens=6, eos_id=None, memory=memory,
                            kv=KVSettings(keep=0.25, window=4, kernel=3))
    kept = [min(n, 4 + int(np.ceil(0.25 * max(n - 4, 0)))) for n in LENGTHS]
    assert kept == [7, 5, 7]  # 13 -> 4 + 3, 5 -> all, 16 -> 4 + 3
    assert snap.kv_slots == [k + len(new) for k, new in zip(kept, snap.new)]
    assert all(len(new) == 6 for new in snap.new)


def test_top_p_cut_to_one_token_is_greedy_and_sampling_follows_the_seed(setup):
    cfg, model, tokens, memory = setup
    prompts = [tokens[0, :7].tolist(), tokens[1, :3].tolist()]
    greedy = inference.generate(model, prompts, max_new_tokens=5, eos_id=None)
    assert inference.generate(model, prompts, max_new_tokens=5, eos_id=None, temperature=1.0, top_p=1e-6,
                              seed=4) == greedy
    a = inference.generate(model, prompts, max_new_tokens=5, eos_id=None, temperature=1.5, top_p=0.9, seed=1)
    assert a == inference.generate(model, prompts, max_new_tokens=5, eos_id=None, temperature=1.5, top_p=0.9, seed=1)
    samples = {tuple(inference.generate(model, prompts, max_new_tokens=5, eos_id=None, temperature=2.0, seed=s)[0])
               for s in range(4)}
    assert len(samples) > 1
    with pytest.raises(ValueError, match="top_p"):
        inference.generate(model, prompts, max_new_tokens=2, eos_id=None, top_p=0.0)


def test_the_streaming_hook_sees_every_new_token_in_order(setup):
    cfg, model, tokens, memory = setup
    prompts = [tokens[0, :6].tolist(), tokens[2, :9].tolist()]
    seen = []
    out = inference.decode(model, prompts, max_new_tokens=4, eos_id=None,
                           on_token=lambda step, picked, live: seen.append((step, picked[:2].tolist())))
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert [[p[r] for _, p in seen] for r in range(2)] == out.new


def test_decoding_a_model_sharded_over_the_mesh_gives_the_single_device_tokens():
    from quietreasoning.training import sharding

    cfg = micro_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.compute_dtype=float32")
    model = Trunk(cfg.model, rngs=nnx.Rngs(5))
    prompts = [[1, 5, 9, 33, 7, 101, 64], [1, 200], [3, 4]]
    single = inference.generate(model, prompts, max_new_tokens=5, eos_id=None, kv=KVSettings(bits=8, group=8))
    mesh = sharding.make_mesh(cfg)
    state = nnx.state(model)
    with jax.set_mesh(mesh):
        nnx.update(model, jax.device_put(state, sharding.shardings(mesh, state)))
        assert len(model.embed[...].sharding.device_set) == 8
        assert inference.generate(model, prompts, max_new_tokens=5, eos_id=None,
                                  kv=KVSettings(bits=8, group=8)) == single
