"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys"), written from
the paper's equations, and the int8 form of its value table for serving.

A PKM layer reads a table of N value rows (slots) with a sparse, exact top-k lookup whose cost
grows with sqrt(N), not N. Terms, with the config keys that set them:

  N    model.pkm_slots        slots: rows of the value table, N = n^2
  n    cfg.pkm_sub_keys       sub-keys per half; slot (i, j) has index i * n + j and the key
                              [c1_i ; c2_j], the concatenation of one sub-key from each half
  h    model.pkm_heads        read heads: each has its own query and its own two sub-key tables;
                              all heads read the one shared value table
  k    model.pkm_topk         slots read per head
  d_k  model.pkm_key_dim      query width per head, q = [q1 ; q2] with halves of d_k / 2
  d_v  model.pkm_value_dim    value width, projected back to d_model by the output matrix
  tau  model.pkm_temperature  softmax temperature over the k read scores

The read, per token x (d_model) and head:
  q      = RMSNorm(W_q x), each half normalised on its own (the paper uses BatchNorm; a per-token
           norm keeps the layer causal and independent of the other rows of the batch)
  a, I   = top-k of q1 . c1_i over the n sub-keys of half 1;  b, J = the same for half 2
  score(i, j) = a_i + b_j = q . [c1_i ; c2_j]. The top-k of all N product scores lies among the
           k^2 pairs I x J (a slot outside them is beaten by k pairs that are), so the k^2
           candidate sums are re-ranked to the final top-k slots S and scores s
  w      = softmax(s / tau)
  read   = sum over heads of sum_{slot in S} w_slot * V[slot]       (d_v)
  out    = W_o read                                                 (d_model)
Per token and head that costs 2 n (d_k / 2) multiply-adds for the sub-key scores, k^2 sums and
k gathered rows: no product over all N keys or values is ever formed. Gradients reach the
sub-keys through the selected scores, and the value table only in the rows that were read.

Int8 serving form: `quantize_rows` stores each value row as int8 with one float32 scale per row
(max |row| / 127, symmetric), so a row comes back within scale / 2 of each entry;
`ProductKeyMemory.quantize()` swaps the module's float table for that form, after which a read
gathers k int8 rows per head and dequantises only those. `save_values` / `load_values` keep the
table on disk as an int8 `.npy` at `path` and its scales at `path` with `.scales.npy` in place of
`.npy` (e.g. pkm_values.npy and pkm_values.scales.npy), each written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import math
import os
from io import BytesIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quietreasoning.config import DataError, ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, param
from quietreasoning.utils import io

INT8_MAX = 127


class ServingRows(nnx.Variable):
    """Int8 slot values or their per-row scales: serving storage, never trained (not a Param)."""


def pkm_param_count(cfg: ModelConfig) -> int:
    """Parameters of every PKM layer in `model.pkm_layers` (0 when none): per layer the query
    matrix d_model h d_k, its norm d_k / 2, sub-keys h n d_k, values N d_v, output d_v d_model."""
    d, h, dk, dv = cfg.d_model, cfg.pkm_heads, cfg.pkm_key_dim, cfg.pkm_value_dim
    per_layer = d * h * dk + dk // 2 + h * cfg.pkm_sub_keys * dk + cfg.pkm_slots * dv + dv * d
    return len(cfg.pkm_layers) * per_layer


def quantize_rows(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float rows (N, d_v) -> (int8 rows (N, d_v), float32 scales (N,)), symmetric per row:
    scale = max |row| / 127 (1 for an all-zero row), q = round(row / scale)."""
    v = jnp.asarray(values, jnp.float32)
    peak = jnp.max(jnp.abs(v), axis=-1)
    scales = jnp.where(peak > 0, peak / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(v / scales[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scales


def dequantize_rows(q: jax.Array, scales: jax.Array) -> jax.Array:
    """Int8 rows (..., d_v) and their scales (...) -> float32 rows."""
    return q.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def scales_path(path: str | os.PathLike) -> str:
    """Where the per-row scales of the int8 table at `path` live: `.npy` becomes `.scales.npy`."""
    p = os.fspath(path)
    return (p[:-len(".npy")] if p.endswith(".npy") else p) + ".scales.npy"


def _write_npy(path: str, array: np.ndarray) -> None:
    buf = BytesIO()
    np.save(buf, array, allow_pickle=False)
    io.atomic_write_bytes(path, buf.getvalue())


def save_values(path: str | os.PathLike, values) -> None:
    """Quantizes float value rows (N, d_v) with `quantize_rows` and writes the int8 rows to `path`
    (a `.npy`) and the float32 scales beside it (`scales_path`), each under a temporary name
    renamed into place."""
    values = np.asarray(values)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
        raise DataError(f"{path}: PKM values must be float rows (slots, value_dim), got {values.dtype} "
                        f"{values.shape}; pass the model's slot_values table")
    q, scales = quantize_rows(values)
    _write_npy(scales_path(path), np.asarray(scales, np.float32))
    _write_npy(os.fspath(path), np.asarray(q, np.int8))


def _read_npy(path: str, what: str) -> np.ndarray:
    p = io.path(path)
    if not p.exists():
        raise DataError(f"{path}: PKM {what} not found; write them with "
                        "`python -m quietreasoning.tools.build_indices pkm --path <file>.npy`")
    try:
        with p.open("rb") as f:
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: PKM {what} are not a readable .npy ({e}); rebuild them with "
                        "`python -m quietreasoning.tools.build_indices pkm`") from None


def load_values(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The int8 rows (N, d_v) at `path` and their float32 scales (N,) beside it (`scales_path`)."""
    q = _read_npy(os.fspath(path), "values")
    scales = _read_npy(scales_path(path), "scales")
    if q.dtype != np.int8 or q.ndim != 2:
        raise DataError(f"{path}: PKM values must be int8 rows (slots, value_dim), got {q.dtype} {q.shape}; "
                        "write them with quietreasoning.memory.pkm.save_values")
    if scales.dtype != np.float32 or scales.shape != q.shape[:1]:
        raise DataError(f"{scales_path(path)}: PKM scales must be float32 of shape ({q.shape[0]},) to match "
                        f"{path}, got {scales.dtype} {scales.shape}; write both with save_values")
    return q, scales


def slot_usage(slots: jax.Array, n_slots: int) -> jax.Array:
    """The fraction of the `n_slots` slots that `slots` (any shape, int) reads at least once: the
    paper's memory usage, low when the keys collapse onto a few slots."""
    hits = jnp.zeros((n_slots,), jnp.int32).at[slots.reshape(-1)].add(1)
    return jnp.mean(hits > 0)


class ProductKeyMemory(nnx.Module):
    """x (B, T, d_model) float32 -> (delta (B, T, d_model) float32, slots (B, T, h, k) int32).

    The caller adds `delta` (times its gate) to the residual stream; `slots` are the value rows
    each head read, for usage statistics. Storage: `slot_values` (N, d_v), a float Param trained
    like any other; after `quantize()`, `slot_values_int8` and `slot_scales` instead."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dk, dv, n = cfg.d_model, cfg.pkm_heads, cfg.pkm_key_dim, cfg.pkm_value_dim, cfg.pkm_sub_keys
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.heads, self.half, self.n_sub, self.topk = h, dk // 2, n, cfg.pkm_topk
        self.n_slots, self.value_dim = cfg.pkm_slots, dv
        self.temperature = cfg.pkm_temperature
        self.w_query = param(rngs, (d, h * dk), ("embed", "pkm_query"), cfg.init_std, pdt)
        self.query_norm = RMSNorm(dk // 2, cfg.norm_eps, pdt)
        # (head, half, sub-key, d_k / 2): unit-norm-ish keys against unit-RMS query halves give O(1) scores
        self.sub_keys = param(rngs, (h, 2, n, dk // 2), (None, None, "pkm_keys", None), 1 / math.sqrt(dk // 2), pdt)
        self.slot_values = param(rngs, (cfg.pkm_slots, dv), ("pkm_values", None), 1 / math.sqrt(dv), pdt)
        self.slot_values_int8: ServingRows | None = nnx.data(None)  # the int8 form, set by quantize()
        self.slot_scales: ServingRows | None = nnx.data(None)
        self.w_out = param(rngs, (dv, d), (None, "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def lookup(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, d_model) -> (weights (B, T, h, k) float32 summing to 1 per head, slots (B, T, h, k) int32)."""
        b, t, _ = x.shape
        h, n, k = self.heads, self.n_sub, self.topk
        q = self.query_norm(matmul(x, self.w_query[...], self.dtype).reshape(b * t, h, 2, self.half))
        # one (tokens, n) score matrix per head and half, so each top-k runs over contiguous rows
        q = q.transpose(1, 2, 0, 3).reshape(2 * h, b * t, self.half)
        keys = self.sub_keys[...].reshape(2 * h, n, self.half)
        top, sub = jax.lax.top_k(matmul(q, keys, self.dtype, "gxf,gnf->gxn"), k)
        top, sub = top.reshape(h, 2, b * t, k), sub.reshape(h, 2, b * t, k)
        candidates = (top[:, 0, :, :, None] + top[:, 1, :, None, :]).reshape(h, b * t, k * k)
        scores, best = jax.lax.top_k(candidates, k)
        slots = jnp.take_along_axis(sub[:, 0], best // k, axis=-1) * n + jnp.take_along_axis(sub[:, 1], best % k, axis=-1)
        weights = jax.nn.softmax(scores / self.temperature, axis=-1)

        def per_token(a):  # (h, B T, k) -> (B, T, h, k)
            return a.transpose(1, 0, 2).reshape(b, t, h, k)
        return per_token(weights), per_token(slots)

    def read(self, weights: jax.Array, slots: jax.Array) -> jax.Array:
        """The weighted sum over heads and read slots of the gathered value rows: (B, T, d_v) float32.
        Only the k rows per head are gathered (and, in the int8 form, dequantised)."""
        b, t = slots.shape[:2]
        slots = slots.reshape(b, t, -1)  # heads x k reads per token, one contraction (no layout copies)

        def gather(table):  # slots are in range by construction: "clip" skips the out-of-range masking
            return jnp.take(table, slots, axis=0, mode="clip")
        if self.slot_values is not None:
            rows = gather(self.slot_values[...]).astype(jnp.float32)
        else:
            rows = dequantize_rows(gather(self.slot_values_int8[...]), gather(self.slot_scales[...]))
        return jnp.einsum("btj,btjv->btv", weights.reshape(b, t, -1), rows)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        weights, slots = self.lookup(x)
        return matmul(self.read(weights, slots), self.w_out[...], self.dtype), slots

    # -- the value table: int8 serving form, and values taken in from outside -----------------

    def quantize(self) -> None:
        """Replaces the float `slot_values` by int8 rows and per-row scales (`quantize_rows`); reads
        then dequantise only the gathered rows. The layer is a serving layer from here on."""
        if self.slot_values is None:
            return
        q, scales = quantize_rows(self.slot_values[...])
        self.slot_values_int8 = ServingRows(q, out_sharding=("pkm_values", None), eager_sharding=False)
        self.slot_scales = ServingRows(scales, out_sharding=("pkm_values",), eager_sharding=False)
        self.slot_values = None

    def set_values(self, values, scales=None) -> None:
        """Takes a value table in: float rows (N, d_v), or int8 rows with their float32 scales (N,) as
        `load_values` returns them (`set_values(*load_values(path))`). It is stored in the module's
        current form: float rows are quantized for an int8 layer, int8 rows dequantised for a float one."""
        values = jnp.asarray(values)
        want = (self.n_slots, self.value_dim)
        if values.shape != want or (scales is not None and jnp.shape(scales) != want[:1]):
            got = values.shape if scales is None else f"{values.shape} with scales {jnp.shape(scales)}"
            raise DataError(f"PKM values {got} do not fit model.pkm_slots={self.n_slots} x "
                            f"model.pkm_value_dim={self.value_dim}; build them for this config")
        quantized = scales is not None
        dtype_ok = values.dtype == jnp.int8 if quantized else jnp.issubdtype(values.dtype, jnp.floating)
        if not dtype_ok:
            raise DataError(f"PKM values of dtype {values.dtype} {'with' if quantized else 'without'} scales: pass "
                            "float rows alone, or int8 rows and their scales as set_values(*load_values(path))")
        if self.slot_values is not None:
            rows = dequantize_rows(values, jnp.asarray(scales)) if quantized else values
            self.slot_values[...] = rows.astype(self.slot_values[...].dtype)
        else:
            q, s = (values, jnp.asarray(scales, jnp.float32)) if quantized else quantize_rows(values)
            self.slot_values_int8[...] = q
            self.slot_scales[...] = s
