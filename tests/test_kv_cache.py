"""The serving KV cache (memory/kv_cache.py): exact bits-16 store, int8/int4 codes within half a
quantisation step, writes that leave other rows and finished groups alone, the residual
invariant, per-channel keys under outlier channels, byte counts, and SnapKV selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import micro_config

from quietreasoning.config import ConfigError
from quietreasoning.memory import kv_cache
from quietreasoning.memory.kv_cache import KVSettings

B, KV, DH, G, SIZE, T = 3, 2, 8, 4, 26, 12  # SIZE rounds up to S = 28
LENGTHS = np.array([5, 12, 1])
STEPS = 7  # one-token writes after the prefill: row 0 crosses slots 8, row 1 slots 16, row 2 slot 4

write = jax.jit(kv_cache.write, static_argnames="kv")
read = jax.jit(kv_cache.read, static_argnames=("kv", "dtype"))
select = jax.jit(kv_cache.snapkv_select, static_argnames="kv")
gather = jax.jit(kv_cache.gather_positions)


def _tokens(rng, n):
    return rng.normal(size=(B, n, KV, DH)).astype(np.float32)


def _run(kv, seed=0, check=None):
    """Prefill (ragged LENGTHS, bucket T) then STEPS one-token writes; returns the store, the ends and
    the reference arrays (what each slot below end should hold). `check(before, after, start, end)`
    is called after every write."""
    rng = np.random.default_rng(seed)
    store = kv_cache.init_store(B, SIZE, KV, DH, jnp.float32, kv)
    ref_k, ref_v = np.zeros((B, 28, KV, DH), np.float32), np.zeros((B, 28, KV, DH), np.float32)
    start, end = np.zeros(B, np.int32), LENGTHS.astype(np.int32)
    k, v = _tokens(rng, T), _tokens(rng, T)
    for _ in range(STEPS + 1):
        new = write(store, jnp.asarray(k), jnp.asarray(v), jnp.asarray(start), jnp.asarray(end), kv=kv)
        if check is not None:
            check(store, new, start, end)
        store = new
        for b in range(B):
            ref_k[b, start[b]:end[b]], ref_v[b, start[b]:end[b]] = k[b, :end[b] - start[b]], v[b, :end[b] - start[b]]
        start, end = end, end + 1
        k, v = _tokens(rng, 1), _tokens(rng, 1)
    return store, start, ref_k, ref_v


def _steps(store, kv):
    """Each slot's quantisation step from the stored scales: keys (B, S, KV, Dh), values (B, S, KV, 1)."""
    return np.repeat(np.asarray(store["k_scale"]), kv.group, axis=1), np.asarray(store["v_scale"])[..., None]


def _within_half_step(got, want, step):
    """|got - want| <= step / 2 everywhere (with float32 rounding slack)."""
    return np.all(np.abs(got - want) <= step * (0.5 + 1e-5) + 1e-6)


def test_settings_validate_and_come_from_config():
    kv = KVSettings.from_config(micro_config().serve)
    assert (kv.bits, kv.group, kv.window, kv.kernel) == (8, 32, 32, 7) and kv.snapkv
    assert not KVSettings().snapkv
    for bad in ({"bits": 2}, {"group": 0}, {"keep": 0.0}, {"keep": 1.5}, {"window": 0}, {"kernel": 4}):
        with pytest.raises(ConfigError, match=f"KVSettings.{next(iter(bad))}="):
            KVSettings(**bad)
    with pytest.raises(ConfigError, match="head_dim=7"):
        kv_cache.init_store(1, 8, 1, 7, jnp.float32, KVSettings(bits=4))


def test_store_shapes_round_slots_up_to_a_group():
    s16 = kv_cache.init_store(B, SIZE, KV, DH, jnp.bfloat16, KVSettings(group=G))
    assert s16["k"].shape == (B, 28, KV, DH) and s16["v"].dtype == jnp.bfloat16
    s4 = kv_cache.init_store(B, SIZE, KV, DH, jnp.bfloat16, KVSettings(bits=4, group=G))
    assert s4["k_codes"].shape == (B, 28, KV, DH // 2) and s4["k_codes"].dtype == jnp.uint8
    assert s4["k_scale"].shape == (B, 7, KV, DH) and s4["v_scale"].shape == (B, 28, KV)
    assert s4["k_residual"].shape == (B, G, KV, DH) and s4["k_residual"].dtype == jnp.bfloat16


def test_bits16_read_is_bit_exact_after_prefill_and_steps():
    kv = KVSettings(bits=16, group=G)
    store, end, ref_k, ref_v = _run(kv)
    keys, values = read(store, kv=kv, dtype=jnp.float32)
    for b in range(B):
        np.testing.assert_array_equal(np.asarray(keys)[b, :end[b]], ref_k[b, :end[b]])
        np.testing.assert_array_equal(np.asarray(values)[b, :end[b]], ref_v[b, :end[b]])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_read_is_within_half_a_step_and_the_residual_is_exact(bits):
    kv = KVSettings(bits=bits, group=G)
    store, end, ref_k, ref_v = _run(kv)
    keys, values = (np.asarray(x) for x in read(store, kv=kv, dtype=jnp.float32))
    k_step, v_step = _steps(store, kv)
    for b in range(B):
        base = end[b] // G * G
        assert _within_half_step(keys[b, :base], ref_k[b, :base], k_step[b, :base])
        assert _within_half_step(values[b, :base], ref_v[b, :base], v_step[b, :base])
        np.testing.assert_array_equal(keys[b, base:end[b]], ref_k[b, base:end[b]])
        np.testing.assert_array_equal(values[b, base:end[b]], ref_v[b, base:end[b]])
        # the residual invariant: [base, end) lives unquantised in the residual
        np.testing.assert_array_equal(np.asarray(store["k_residual"])[b, :end[b] - base], ref_k[b, base:end[b]])
        np.testing.assert_array_equal(np.asarray(store["v_residual"])[b, :end[b] - base], ref_v[b, base:end[b]])
    np.testing.assert_array_equal(np.asarray(store["end"]), end)
    # the finished groups really are codes, not a full-precision copy
    assert np.abs(keys[1, :16] - ref_k[1, :16]).max() > 0


def test_a_write_leaves_finished_groups_bit_identical_and_requantises_only_the_residual():
    kv = KVSettings(bits=4, group=G)

    def check(before, after, start, end):
        read_before = [np.asarray(x) for x in read(before, kv=kv, dtype=jnp.float32)]
        read_after = [np.asarray(x) for x in read(after, kv=kv, dtype=jnp.float32)]
        k_step, v_step = _steps(after, kv)
        for b in range(B):
            g0 = start[b] // G * G
            for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
                np.testing.assert_array_equal(np.asarray(after[name])[b, :g0], np.asarray(before[name])[b, :g0])
            for name in ("k_scale", "k_zero"):
                done = g0 // G
                np.testing.assert_array_equal(np.asarray(after[name])[b, :done], np.asarray(before[name])[b, :done])
            for got, was in zip(read_after, read_before):
                np.testing.assert_array_equal(got[b, :g0], was[b, :g0])
            # the residual's slots before start were exact; a flush to codes moves them at most half a step
            flushed = slice(g0, start[b])
            for got, was, step in zip(read_after, read_before, (k_step, v_step)):
                assert _within_half_step(got[b, flushed], was[b, flushed], step[b, flushed])

    _run(kv, check=check)


@pytest.mark.parametrize("bits", [16, 8])
def test_rows_are_written_independently(bits):
    kv = KVSettings(bits=bits, group=G)
    rng = np.random.default_rng(1)
    k, v = _tokens(rng, T), _tokens(rng, T)
    start, end = np.array([4, 3, 8], np.int32), np.array([9, 15, 9], np.int32)
    store = write(kv_cache.init_store(B, SIZE, KV, DH, jnp.float32, kv), jnp.asarray(k), jnp.asarray(v),
                  jnp.asarray(np.zeros(B, np.int32)), jnp.asarray(start), kv=kv)  # rows hold `start` slots first
    both = write(store, jnp.asarray(k), jnp.asarray(v), jnp.asarray(start), jnp.asarray(end), kv=kv)
    for b in range(B):
        alone = {n: x[b:b + 1] for n, x in store.items()}
        alone = write(alone, jnp.asarray(k[b:b + 1]), jnp.asarray(v[b:b + 1]), jnp.asarray(start[b:b + 1]),
                      jnp.asarray(end[b:b + 1]), kv=kv)
        for name in both:
            np.testing.assert_array_equal(np.asarray(both[name])[b:b + 1], np.asarray(alone[name]), err_msg=name)


def test_rewriting_from_inside_a_finished_group_requantises_that_group_only():
    kv = KVSettings(bits=8, group=G)
    rng = np.random.default_rng(2)
    k, v = _tokens(rng, T), _tokens(rng, T)
    ends = jnp.asarray(np.full(B, T, np.int32))
    store = write(kv_cache.init_store(B, SIZE, KV, DH, jnp.float32, kv), jnp.asarray(k), jnp.asarray(v),
                  jnp.zeros(B, jnp.int32), ends, kv=kv)
    before = np.asarray(read(store, kv=kv, dtype=jnp.float32)[0])
    start = np.array([6, 5, 9], np.int32)  # inside groups 1, 1, 2, all finished
    new_k = _tokens(rng, 4)
    after = write(store, jnp.asarray(new_k), jnp.asarray(new_k), jnp.asarray(start), jnp.asarray(start + 4), kv=kv)
    keys = np.asarray(read(after, kv=kv, dtype=jnp.float32)[0])
    old_step, new_step = _steps(store, kv)[0], _steps(after, kv)[0]
    for b in range(B):
        g0 = start[b] // G * G
        np.testing.assert_array_equal(np.asarray(after["k_codes"])[b, :g0], np.asarray(store["k_codes"])[b, :g0])
        np.testing.assert_array_equal(keys[b, :g0], before[b, :g0])
        span = slice(g0, start[b])
        bound = (old_step[b, span] + new_step[b, span]) * (0.5 + 1e-5) + 1e-6
        assert np.all(np.abs(keys[b, span] - k[b, span]) <= bound)
        new = slice(start[b], start[b] + 4)
        assert _within_half_step(keys[b, new], new_k[b], new_step[b, new])


def test_per_channel_keys_beat_per_token_keys_under_outlier_channels():
    """KIVI's observation: key outliers sit in a few fixed channels. One scale per channel keeps
    each outlier's range in its own channel; one per token (how values are stored) spreads it over
    every channel of the token. The same numbers written as keys and as values show the gap."""
    kv = KVSettings(bits=4, group=16)
    x = np.random.default_rng(3).normal(size=(1, 64, 1, 16)).astype(np.float32)
    x[..., [3, 11]] *= 30.0
    store = write(kv_cache.init_store(1, 64, 1, 16, jnp.float32, kv), jnp.asarray(x), jnp.asarray(x),
                  jnp.zeros(1, jnp.int32), jnp.full(1, 64, jnp.int32), kv=kv)
    keys, values = (np.asarray(y) for y in read(store, kv=kv, dtype=jnp.float32))
    normal = [c for c in range(16) if c not in (3, 11)]
    per_channel = np.abs(keys - x)[..., normal].mean()
    per_token = np.abs(values - x)[..., normal].mean()
    assert per_channel < 0.25 * per_token


def test_store_bytes_per_token_counts_the_store_and_undercuts_bf16():
    n_layers, n_kv, dh = 28, 8, 128
    bf16 = kv_cache.store_bytes_per_token(n_layers, n_kv, dh, KVSettings(bits=16), jnp.bfloat16)
    int8 = kv_cache.store_bytes_per_token(n_layers, n_kv, dh, KVSettings(bits=8), jnp.bfloat16)
    int4 = kv_cache.store_bytes_per_token(n_layers, n_kv, dh, KVSettings(bits=4), jnp.bfloat16)
    assert bf16 == 2 * n_layers * n_kv * dh * 2
    scale_overhead = n_layers * n_kv * (dh * 8 / 32 + 8)  # f32 scale + zero: per channel per 32 keys, per token value
    assert int8 <= bf16 / 2 + scale_overhead and int8 < 0.6 * bf16
    assert int4 < int8 and int4 <= bf16 / 4 + scale_overhead
    for bits in (16, 8, 4):  # the figure is what the store's arrays (less residual and end) hold per slot
        kv = KVSettings(bits=bits, group=4)
        store = jax.eval_shape(lambda kv=kv: kv_cache.init_store(2, 16, 3, 8, jnp.bfloat16, kv))
        held = sum(x.size * x.dtype.itemsize for n, x in store.items() if "residual" not in n and n != "end")
        assert held / (2 * 16) == kv_cache.store_bytes_per_token(1, 3, 8, kv, jnp.bfloat16)


def test_snapkv_votes_sum_window_queries_and_the_query_group():
    rng = np.random.default_rng(4)
    probs = rng.random((2, 2, 3, 5, 7)).astype(np.float32)
    window = np.array([[0, 0, 1, 1, 1], [1, 0, 0, 0, 1]], bool)
    votes = jax.jit(kv_cache.snapkv_votes)(jnp.asarray(probs), jnp.asarray(window))
    np.testing.assert_allclose(np.asarray(votes), (probs * window[:, None, None, :, None]).sum((2, 3)), rtol=1e-6)


def test_snapkv_capacity_and_kept_counts():
    kv = KVSettings(keep=0.3, window=4)
    assert kv_cache.snapkv_capacity(14, kv) == 4 + 3  # 0.3 * 10 is 3, not the float 3.0000000000000004
    assert kv_cache.snapkv_capacity(15, kv) == 4 + 4
    assert kv_cache.snapkv_capacity(3, kv) == 3
    assert kv_cache.snapkv_capacity(20, KVSettings(keep=1.0, window=4)) == 20
    lengths = np.array([14, 15, 3, 0, 5])
    _, kept = select(jnp.zeros((5, 1, 16)), jnp.asarray(lengths), kv=kv)
    np.testing.assert_array_equal(np.asarray(kept), [7, 8, 3, 0, 5])


def _reference_select(votes, length, kv):
    """The kept positions of one head, from the definition, in numpy."""
    prefix = max(length - kv.window, 0)
    pooled = np.convolve(np.where(np.arange(votes.size) < prefix, votes, 0.0), np.ones(kv.kernel) / kv.kernel, "same")
    n_keep = int(np.ceil(kv.keep * prefix - 1e-9))
    chosen = np.argsort(-pooled[:prefix], kind="stable")[:n_keep]
    return np.sort(np.concatenate([chosen, np.arange(prefix, length)]))


def test_snapkv_select_keeps_the_window_and_each_heads_top_pooled_votes():
    kv = KVSettings(keep=0.4, window=3, kernel=3)
    s = 20
    rng = np.random.default_rng(5)
    votes = rng.random((3, 4, s)).astype(np.float32)
    votes[:, :, 16:] = 100.0  # padding of rows shorter than 16 must not be chosen, however tempting
    lengths = np.array([16, 9, 2])
    index, kept = select(jnp.asarray(votes), jnp.asarray(lengths), kv=kv)
    index, kept = np.asarray(index), np.asarray(kept)
    assert index.shape == (3, 4, kv_cache.snapkv_capacity(s, kv)) and index.dtype == np.int32
    np.testing.assert_array_equal(kept, [3 + 6, 3 + 3, 2])
    for b in range(3):
        for h in range(4):
            got = index[b, h, :kept[b]]
            np.testing.assert_array_equal(got, _reference_select(votes[b, h], lengths[b], kv))
            assert np.all(got < lengths[b]) and np.all(np.diff(got) > 0)
            assert set(range(max(lengths[b] - 3, 0), lengths[b])) <= set(got.tolist())
    assert len({tuple(index[0, h, :kept[0]]) for h in range(4)}) > 1  # heads choose their own positions


def test_gather_positions_takes_each_heads_own_positions_and_compacts_into_a_store():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 10, 3, 4)).astype(np.float32)
    index = rng.integers(0, 10, size=(2, 3, 5)).astype(np.int32)
    got = np.asarray(gather(jnp.asarray(x), jnp.asarray(index)))
    want = np.stack([np.stack([x[b, index[b, h], h] for h in range(3)], axis=1) for b in range(2)])
    np.testing.assert_array_equal(got, want)
    # a compacted cache is written at start 0 with end = kept, over a store that held the prompt
    kv = KVSettings(bits=8, group=4, keep=0.5, window=2, kernel=3)
    lengths = jnp.asarray([10, 7])
    store = kv_cache.init_store(2, 10, 3, 4, jnp.float32, kv)
    store = write(store, jnp.asarray(x), jnp.asarray(x), jnp.zeros(2, jnp.int32), lengths, kv=kv)
    index, kept = select(jnp.asarray(rng.random((2, 3, 10)), jnp.float32), lengths, kv=kv)
    compact = gather(jnp.asarray(x), index)
    store = write(store, compact, compact, jnp.zeros(2, jnp.int32), kept, kv=kv)
    keys = np.asarray(read(store, kv=kv, dtype=jnp.float32)[0])
    k_step = _steps(store, kv)[0]
    for b in range(2):
        n = int(kept[b])
        assert _within_half_step(keys[b, :n], np.asarray(compact)[b, :n], k_step[b, :n])
