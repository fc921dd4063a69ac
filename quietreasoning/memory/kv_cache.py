"""The serving KV cache: one layer's keys and values stored unquantised or as int8/int4 codes
(KIVI-style: Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"),
and SnapKV's choice of which prompt positions each head keeps (Li et al. 2024, "SnapKV: LLM
Knows What You are Looking for Before Generation"). Pure jnp functions with static shapes: every
one runs under jit. Terms, with the config keys (cfg.serve) that set them:

  B, S, KV, Dh  rows, slots per row, kv heads, head width; a slot holds one token's key and value
  bits   serve.kv_bits   16: keys and values kept as given (in the cache dtype); 8 or 4: codes
  G      serve.kv_group  tokens per key-quantisation group; S is rounded up to a multiple of G
  end_b                  slots row b holds; its group base is floor(end_b / G) * G

Quantisation is asymmetric min/max: a set of numbers x with minimum `zero` and range r becomes
codes round((x - zero) / scale) in [0, 2^bits - 1] with scale = r / (2^bits - 1), read back as
code * scale + zero, so every entry comes back within scale / 2. Scales and zeros are float32
(8 bytes per set), which keeps that bound exact. Following KIVI, keys share a scale per channel
(one set = one channel of one kv head over a group of G slots) and values per token (one set =
one slot's Dh channels of one kv head): a few key channels carry outliers many times larger than
the rest, and per-channel sets confine each outlier's range to its own channel, where per-token
sets would widen every token's step to the outlier's range. Int4 packs two codes per byte along
head_dim (even channel in the low nibble). Per-channel scales need a complete group, so the
residual, row b's group [base_b, base_b + G), is kept unquantised (keys and values, in the cache
dtype) and quantised when the row's end passes it. The store records end_b ("end"). Invariant
after every write: slots below base_b are quantised groups, which a later write touches only
when it starts inside them, and [base_b, end_b) live in the residual.

SnapKV (terms and config keys):
  window  serve.snapkv_window  the last prompt tokens; their queries vote for the positions to
                               keep, and they are always kept
  keep    serve.snapkv_keep    share of the positions before the window that each head keeps
                               (1.0 = SnapKV off)
  kernel  serve.snapkv_kernel  width of the average pooling of votes along the sequence
A vote is the attention probability a window query gives a position, summed over the window
queries and the query heads that share the kv head. Each kv head keeps its own positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quietreasoning.config import KV_BITS, ConfigError

SCALE_BYTES = 8  # one float32 scale and one float32 zero per quantised set


@dataclasses.dataclass(frozen=True)
class KVSettings:
    """How a layer's KV cache is stored and compacted (see the module docstring); hashable, so it
    can be a static argument of jit."""
    bits: int = 16
    group: int = 32
    keep: float = 1.0
    window: int = 32
    kernel: int = 7

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ConfigError(f"KVSettings.bits={self.bits} must be one of {KV_BITS} "
                              "(serve.kv_bits; 16 = unquantised)")
        if self.group <= 0:
            raise ConfigError(f"KVSettings.group={self.group} must be positive (serve.kv_group)")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"KVSettings.keep={self.keep} must be in (0, 1] (serve.snapkv_keep; 1 = SnapKV off)")
        if self.window <= 0:
            raise ConfigError(f"KVSettings.window={self.window} must be positive (serve.snapkv_window)")
        if self.kernel <= 0 or self.kernel % 2 == 0:
            raise ConfigError(f"KVSettings.kernel={self.kernel} must be a positive odd number (serve.snapkv_kernel)")

    @classmethod
    def from_config(cls, serve_cfg) -> KVSettings:
        """The settings of `cfg.serve` (ServeConfig)."""
        return cls(bits=serve_cfg.kv_bits, group=serve_cfg.kv_group, keep=serve_cfg.snapkv_keep,
                   window=serve_cfg.snapkv_window, kernel=serve_cfg.snapkv_kernel)

    @property
    def snapkv(self) -> bool:
        """SnapKV compacts the prompt (keep < 1)."""
        return self.keep < 1


# ---- the store --------------------------------------------------------------------------------

def init_store(batch: int, size: int, n_kv: int, head_dim: int, dtype, kv: KVSettings) -> dict[str, jax.Array]:
    """One layer's empty store with S = `size` rounded up to a multiple of kv.group slots per row.
    bits 16: {"k", "v"} (B, S, KV, Dh) in `dtype`. bits 8/4: "k_codes", "v_codes" (B, S, KV, Dh)
    uint8 (Dh / 2 for int4); "k_scale", "k_zero" (B, S / G, KV, Dh) f32; "v_scale", "v_zero"
    (B, S, KV) f32; "k_residual", "v_residual" (B, G, KV, Dh) in `dtype`; "end" (B,) int32."""
    if size <= 0:
        raise ConfigError(f"init_store: size={size} must be positive (slots per row)")
    if kv.bits == 4 and head_dim % 2:
        raise ConfigError(f"init_store: head_dim={head_dim} must be even for int4 codes (two per byte); "
                          "use serve.kv_bits=8")
    g = kv.group
    s = -(-size // g) * g
    if kv.bits == 16:
        zeros = jnp.zeros((batch, s, n_kv, head_dim), dtype)
        return {"k": zeros, "v": zeros}
    width = head_dim // 2 if kv.bits == 4 else head_dim
    codes = jnp.zeros((batch, s, n_kv, width), jnp.uint8)
    residual = jnp.zeros((batch, g, n_kv, head_dim), dtype)
    k_sets = jnp.zeros((batch, s // g, n_kv, head_dim), jnp.float32)
    v_sets = jnp.zeros((batch, s, n_kv), jnp.float32)
    return {"k_codes": codes, "k_scale": k_sets, "k_zero": k_sets, "k_residual": residual,
            "v_codes": codes, "v_scale": v_sets, "v_zero": v_sets, "v_residual": residual,
            "end": jnp.zeros((batch,), jnp.int32)}


def store_bytes_per_token(n_layers: int, n_kv: int, head_dim: int, kv: KVSettings, dtype) -> float:
    """Bytes one cached token costs across all layers: its key and value codes (or values in
    `dtype` for bits 16) plus its share of the scales and zeros (a key set spans G tokens, a value
    set one). The residual (at most G tokens per row and layer, in `dtype`) is excluded: it is a
    fixed cost per row, not per token."""
    if kv.bits == 16:
        per_head = 2 * head_dim * jnp.dtype(dtype).itemsize
    else:
        codes = head_dim * kv.bits / 8
        per_head = (codes + head_dim * SCALE_BYTES / kv.group) + (codes + SCALE_BYTES)
    return float(n_layers * n_kv * per_head)


def _quantise(x: jax.Array, axis: int, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric min/max codes of x (f32) over `axis` -> (uint8 codes, scale, zero), the scale
    and zero with `axis` removed; a constant set gets scale 1 (its codes are all 0)."""
    zero = jnp.min(x, axis=axis, keepdims=True)
    span = jnp.max(x, axis=axis, keepdims=True) - zero
    scale = jnp.where(span > 0, span / (2 ** bits - 1), 1.0)
    codes = jnp.clip(jnp.round((x - zero) / scale), 0, 2 ** bits - 1).astype(jnp.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, jnp.squeeze(scale, axis), jnp.squeeze(zero, axis)


def _unpack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes (..., Dh or Dh / 2 packed) -> f32 codes (..., Dh)."""
    if bits == 4:
        codes = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    return codes.astype(jnp.float32)


def _dequantise(q: dict[str, jax.Array], kv: KVSettings) -> tuple[jax.Array, jax.Array]:
    """The codes of n whole groups (B, n G, KV, .) with their scales and zeros (store names) -> f32
    keys and values (B, n G, KV, Dh)."""
    b, s, n_kv = q["k_codes"].shape[:3]
    keys = _unpack(q["k_codes"], kv.bits).reshape(b, s // kv.group, kv.group, n_kv, -1)
    keys = (keys * q["k_scale"][:, :, None] + q["k_zero"][:, :, None]).reshape(b, s, n_kv, -1)
    values = _unpack(q["v_codes"], kv.bits) * q["v_scale"][..., None] + q["v_zero"][..., None]
    return keys, values


def _rows_take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, N, ...) at per-row positions index (B, M) -> (B, M, ...); positions are clipped to N."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1, mode="clip")


def _group_values(store: dict[str, jax.Array], g0: jax.Array, kv: KVSettings) -> tuple[jax.Array, jax.Array]:
    """The dequantised keys and values (B, G, KV, Dh) f32 of the group at slot g0_b of each row."""
    slots, group = g0[:, None] + jnp.arange(kv.group), g0[:, None] // kv.group
    per_group = ("k_scale", "k_zero")
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    return _dequantise({n: _rows_take(store[n], group if n in per_group else slots) for n in names}, kv)


def write(store: dict[str, jax.Array], k: jax.Array, v: jax.Array, start: jax.Array, end: jax.Array,
          kv: KVSettings) -> dict[str, jax.Array]:
    """Writes keys k and values v (B, T, KV, Dh) of T new tokens (static) to slots
    [start_b, start_b + T) of row b; afterwards the row holds end_b slots (start_b < end_b <=
    start_b + T; slots [end_b, start_b + T) are padding that a later write overwrites). start_b is
    the row's previous end, or less to overwrite what follows. Slots past S are dropped.

    Quantised store: the write touches only the groups from start_b's group on. It assembles those
    groups in full precision (the group's slots before start_b from the residual, or, when start_b
    lies below the residual's group, dequantised from its codes and so requantised), overlays the
    new tokens, quantises the groups that end at or below end_b into the codes, and keeps end_b's
    group as the new residual."""
    b, t = k.shape[:2]
    rows = jnp.arange(b)[:, None]
    start, end = start.astype(jnp.int32), end.astype(jnp.int32)
    if kv.bits == 16:
        slots = start[:, None] + jnp.arange(t)
        return {"k": store["k"].at[rows, slots].set(k.astype(store["k"].dtype), mode="drop"),
                "v": store["v"].at[rows, slots].set(v.astype(store["v"].dtype), mode="drop")}
    g, dtype = kv.group, store["k_residual"].dtype
    s, n_kv = store["k_codes"].shape[1:3]
    n = -(-(g + t - 1) // g)  # groups a write can touch: start_b - g0_b + T <= G - 1 + T slots
    g0 = start // g * g
    # group g0's slots before start_b: from the residual, or dequantised when the row's residual lies above
    old_k, old_v = _group_values(store, g0, kv)
    in_residual = (g0 == store["end"] // g * g)[:, None, None, None]
    # the touched groups in full precision, plus one group of zeros so the new residual can be sliced out
    win_k = jnp.zeros((b, (n + 1) * g, n_kv, k.shape[-1]), dtype)
    win_v = jnp.zeros_like(win_k)
    win_k = win_k.at[:, :g].set(jnp.where(in_residual, store["k_residual"], old_k.astype(dtype)))
    win_v = win_v.at[:, :g].set(jnp.where(in_residual, store["v_residual"], old_v.astype(dtype)))
    offsets = (start - g0)[:, None] + jnp.arange(t)
    win_k = win_k.at[rows, offsets].set(k.astype(dtype))
    win_v = win_v.at[rows, offsets].set(v.astype(dtype))
    # quantise all n touched groups; store only those that end at or below end_b (others -> index S: dropped)
    grid_k = win_k[:, :n * g].astype(jnp.float32).reshape(b, n, g, n_kv, -1)
    k_codes, k_scale, k_zero = _quantise(grid_k, 2, kv.bits)
    v_codes, v_scale, v_zero = _quantise(win_v[:, :n * g].astype(jnp.float32), 3, kv.bits)
    groups = g0[:, None] // g + jnp.arange(n)
    groups = jnp.where((groups + 1) * g <= end[:, None], groups, s // g)
    slots = (groups[:, :, None] * g + jnp.arange(g)).reshape(b, n * g)

    def put(name, index, x):
        return store[name].at[rows, index].set(x, mode="drop")

    residual = (end // g * g - g0)[:, None] + jnp.arange(g)
    return {"k_codes": put("k_codes", slots, k_codes.reshape(b, n * g, n_kv, -1)),
            "k_scale": put("k_scale", groups, k_scale), "k_zero": put("k_zero", groups, k_zero),
            "k_residual": _rows_take(win_k, residual),
            "v_codes": put("v_codes", slots, v_codes), "v_scale": put("v_scale", slots, v_scale),
            "v_zero": put("v_zero", slots, v_zero), "v_residual": _rows_take(win_v, residual),
            "end": end}


def read(store: dict[str, jax.Array], kv: KVSettings, dtype) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, S, KV, Dh) in `dtype`: bits 16, the stored arrays; bits 8/4, the
    dequantised codes with each row's residual group [base_b, base_b + G) overlaid. Slots at or
    past a row's end hold padding or stale values (the caller masks them)."""
    if kv.bits == 16:
        return store["k"].astype(dtype), store["v"].astype(dtype)
    keys, values = _dequantise(store, kv)
    g, s = kv.group, keys.shape[1]
    slots = jnp.arange(s)
    live = (slots // g == store["end"][:, None] // g)[:, :, None, None]
    at = jnp.broadcast_to(slots % g, (keys.shape[0], s))
    keys = jnp.where(live, _rows_take(store["k_residual"], at).astype(jnp.float32), keys)
    values = jnp.where(live, _rows_take(store["v_residual"], at).astype(jnp.float32), values)
    return keys.astype(dtype), values.astype(dtype)


# ---- SnapKV -----------------------------------------------------------------------------------

def snapkv_votes(probs: jax.Array, window: jax.Array) -> jax.Array:
    """Attention probabilities probs (B, KV, Gq, T, S) of T queries over S slots (Gq query heads per
    kv head) and the observation queries window (B, T) bool -> votes (B, KV, S) f32: each slot's
    probability summed over the row's window queries and the query group."""
    return jnp.einsum("bhgts,bt->bhs", probs.astype(jnp.float32), window.astype(jnp.float32))


def _kept(lengths: np.ndarray, kv: KVSettings) -> np.ndarray:
    """Positions a prompt of each length keeps: min(len, window + ceil(keep * max(len - window, 0))).
    The ceiling allows 1e-9 of float error, so keep 0.3 of 10 positions keeps 3, not 4."""
    prefix = np.maximum(lengths - kv.window, 0)
    return np.minimum(lengths, kv.window + np.ceil(kv.keep * prefix - 1e-9).astype(np.int64))


def snapkv_capacity(prompt_len: int, kv: KVSettings) -> int:
    """Positions per head kept from a prompt of `prompt_len` (the most any row of that bucket keeps)."""
    return int(_kept(np.asarray(prompt_len), kv))


def snapkv_select(votes: jax.Array, lengths: jax.Array, kv: KVSettings) -> tuple[jax.Array, jax.Array]:
    """Votes (B, KV, S) over a prompt bucket of S positions and prompt lengths (B,) -> (index
    (B, KV, K) int32, kept (B,) int32), K = snapkv_capacity(S, kv). Row b keeps its last `window`
    prompt positions and, of the p_b = max(len_b - window, 0) positions before them, each head's
    top ceil(keep * p_b) by pooled votes; padding (>= len_b) is never chosen. index[b, h, :kept_b]
    lists the kept positions in increasing order (the compacted cache keeps sequence order); the
    entries past kept_b are 0.

    Pooling: the votes of positions [0, p_b) (window and padding positions count as 0) are
    averaged over `kernel` neighbours with zero padding at the ends ('same' size). Averaging scores
    a position by how much its neighbourhood is attended, so the kept positions come in short
    spans around what the window reads (the paper's reason to pool: a fact survives with its
    context); it is the reference implementation's default and, unlike max pooling, it does not
    let one sharp vote promote `kernel` positions at equal rank."""
    b, n_kv, s = votes.shape
    lengths = lengths.astype(jnp.int32)
    prefix = jnp.maximum(lengths - kv.window, 0)[:, None, None]
    slots = jnp.arange(s)
    votes = jnp.where(slots < prefix, votes.astype(jnp.float32), 0.0)
    half = kv.kernel // 2
    pooled = jax.lax.reduce_window(votes, 0.0, jax.lax.add, (1, 1, kv.kernel), (1, 1, 1),
                                   ((0, 0), (0, 0), (half, half))) / kv.kernel
    score = jnp.where(slots < prefix, pooled, -jnp.inf)
    score = jnp.where((slots >= prefix) & (slots < lengths[:, None, None]), jnp.inf, score)
    capacity = snapkv_capacity(s, kv)
    kept = jnp.asarray(_kept(np.arange(s + 1), kv), jnp.int32)[jnp.clip(lengths, 0, s)]
    top = jax.lax.top_k(score, capacity)[1]  # window first (inf), then the prefix by pooled votes
    chosen = jnp.arange(capacity) < kept[:, None, None]
    index = jnp.sort(jnp.where(chosen, top, s), axis=-1)
    return jnp.where(chosen, index, 0).astype(jnp.int32), kept


def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, S, KV, Dh) and per-head positions index (B, KV, K) -> (B, K, KV, Dh): head h of row b
    takes x[b, index[b, h, j], h] as its j-th entry."""
    return jnp.take_along_axis(x, jnp.swapaxes(index, 1, 2)[..., None], axis=1)
