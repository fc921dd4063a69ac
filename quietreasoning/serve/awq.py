"""Weight quantisation of the trunk for serving: activation-aware scaling (AWQ, Lin et al. 2023,
"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration") and plain
round-to-nearest (RTN), the baseline AWQ is measured against.

Terms, with the config keys (cfg.serve) that set them:

  W       a matmul weight as the trunk stores it, (d_in, d_out), used as y = x W
  bits    serve.awq_bits   8 or 4: each weight becomes an integer code in [0, 2^bits - 1]
  group   serve.awq_group  input channels (rows of W) of one output channel (column) that share a
                           scale and a zero point. When it does not divide d_in, the largest divisor
                           of d_in below it is used instead (`resolve_group`; the report lists the
                           group each input width got)
  codes   uint8; int4 codes are packed two per byte along the rows (row 2i in the low nibble, row
          2i + 1 in the high nibble; an odd last row is paired with a zero nibble)
  scale, zero   per (group, output channel): asymmetric min/max quantisation with the range widened
          to include 0, scale = (max - min) / (2^bits - 1) as float32 and the zero point
          z = round(-min / scale) an integer code (uint8). A weight w becomes
          q = round(w / scale) + z and reads back as (q - z) * scale, within scale / 2 of w.
  s       AWQ's per-input-channel scale (d_in,): W is quantised as Q(diag(s) W) and its input is
          divided by s, x W ~ (x / s) Q(diag(s) W). Input channels with large activations get s > 1,
          so their weights lose less to rounding. s = a^alpha normalised to geometric mean 1, where
          a is the channel's mean |activation| on the calibration tokens (floored at STAT_FLOOR
          times the mean over channels, so a dead channel cannot get an extreme 1 / s)
  alpha   searched over serve.awq_grid values i / grid in [0, 1) per matrix group, minimising the
          mean squared error || X W - (X / s) Q(diag(s) W) ||^2 on sampled calibration rows X;
          alpha = 0 is s = 1, which is RTN, so AWQ never does worse than RTN on those rows

Where 1 / s goes (folded exactly, so the float model computes the same function, up to rounding):
  wq, wk, wv     share one s, searched jointly; 1 / s multiplies the attention RMSNorm's scale
  w_gate, w_up   share one s, searched jointly; 1 / s multiplies the MLP RMSNorm's scale
  w_down         its input silu(x w_gate) * (x w_up) is linear in each column of w_up, so 1 / s
                 divides the columns of w_up (searched before w_gate / w_up, which then see them)
  wo             its input is the attention output, which is linear in v. With grouped KV heads a
                 channel of v feeds every query head of its group, so s is tied over those query
                 heads (one value per (kv head, head channel), from their averaged activations) and
                 1 / s divides the columns of wv (searched before wq / wk / wv). This is exact.
Scaling a column of a matrix commutes with its quantisation (each column has its own scales), so
these folds do not disturb the matrices they land in.

Adapters kept unmerged (model.router on, see `serving_config`): each LoRA pair reads the input of
its matrix and adds to its output, y = x W + c x A B, so the folds carry over to it exactly. Where
a matrix's input is divided by s (the reader: W -> diag(s) W), its A gets the same rows, A -> diag(s) A,
and (x / s) diag(s) A = x A; where a matrix's output columns are divided by s (the writer: wv for
wo, w_up for w_down), its B columns are divided too, so the whole output x W + c x A B is divided by
s. The IA3 vectors multiply outputs channel by channel (k, v, the SwiGLU inner activation): a
diagonal scale commutes with the diagonal s, so (v / s) * l = (v * l) / s and (h / s) * l = (h * l) / s
and no fold crosses them. Every fold therefore stays exact with the adapters unmerged, whatever
the gates; the adapters themselves stay float and their output carries no rounding error, so the
search measures the base matmul's error alone, on the inputs the adapted, gated model produces.

What is quantised: the seven block matmuls above. The embedding, the output head, the norms and
every module's weights (workspace, SSM experts, router, episodic read, PKM queries, keys and
output) stay in the param dtype. The PKM value tables are stored in their int8 serving form
(memory/pkm.py `quantize_rows`: int8 rows with a float32 scale per row). LoRA / IA3 adapters are
merged into the base weights first (model/adapters.py `merge`), with a fixed selection, when no
router gates them; when model.router gates them per token, the adapter bank stays as it is, in the
param dtype (its factors are small next to the matmuls they adapt).

Compute: on CPU (and in this code everywhere) there is no int4 / int8 matmul kernel. Weights ship
and rest quantised (the bundle on disk, `weight_bytes`); `dequantize_into` turns them back into
param-dtype weights when a model is loaded, and the matmuls run in the compute dtype as usual.
What serving gains here is storage and transfer, and the accuracy figures are those a real
low-bit kernel would give.

Calibration: `calibration_batches` draws serve.awq_calib_batches batches from the training batch
stream (training/input.py). `calibrate` runs the float model over them (without episodic
retrieval; unmerged adapters read the gates the router gives them, as in the trunk) and, per block,
takes each matmul input's mean |activation| over the real tokens and keeps up to `search_tokens`
sampled token rows for the alpha search.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from quietreasoning.config import AWQ_BITS, Config, ConfigError, DataError, ModelConfig
from quietreasoning.memory.pkm import dequantize_rows, quantize_rows
from quietreasoning.model.adapters import merge
from quietreasoning.model.trunk import Trunk, attention_mask

METHODS = ("awq", "rtn")
SEARCH_TOKENS = 4096  # calibration token rows (over all batches) the alpha search measures errors on
STAT_FLOOR = 0.01     # a channel's activation statistic is at least this times the mean over channels
ATTN = ("wq", "wk", "wv", "wo")
MLP = ("w_gate", "w_up", "w_down")


# ----------------------------------------------------------------------------- storage

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One matrix W (d_in, d_out) in `bits`-bit codes (see the module docstring).

    codes   uint8 (d_in, d_out) for 8 bits; (ceil(d_in / 2), d_out) packed for 4 bits
    scales  float32 (d_in / group, d_out)
    zeros   uint8 (d_in / group, d_out): the integer code of 0.0
    """
    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def group(self) -> int:
        return self.shape[0] // self.scales.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """A PKM value table in its int8 serving form: values int8 (N, d_v), scales float32 (N,)."""
    values: jax.Array
    scales: jax.Array


def _is_quantized(x) -> bool:
    return isinstance(x, (QuantizedWeight, QuantizedRows))


def resolve_group(d_in: int, group: int) -> int:
    """The input channels per scale for a matrix with `d_in` rows: `group` when it divides d_in,
    else the largest divisor of d_in below it (e.g. d_in 96, group 64 -> 48)."""
    if group <= 0:
        raise ConfigError(f"serve.awq_group={group} must be positive")
    return max(g for g in range(1, min(group, d_in) + 1) if d_in % g == 0)


def pack_int4(codes: jax.Array) -> jax.Array:
    """uint8 codes in [0, 15], (d_in, d_out) -> (ceil(d_in / 2), d_out): row 2i in the low nibble,
    row 2i + 1 in the high nibble (a zero nibble pairs an odd last row)."""
    if codes.shape[0] % 2:
        codes = jnp.concatenate([codes, jnp.zeros((1, *codes.shape[1:]), codes.dtype)])
    return codes[0::2] | (codes[1::2] << 4)


def unpack_int4(packed: jax.Array, rows: int) -> jax.Array:
    """The inverse of `pack_int4`: the first `rows` rows of codes."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=1).reshape(-1, *packed.shape[1:])[:rows]


def _check_bits(bits: int) -> None:
    if bits not in AWQ_BITS:
        raise ConfigError(f"weight bits={bits} must be one of {AWQ_BITS} (serve.awq_bits)")


def _codes(w: jax.Array, bits: int, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unpacked codes (d_in, d_out) uint8, scales and zeros (d_in / g, d_out) of W for group g."""
    d_in, d_out = w.shape
    levels = 2 ** bits - 1
    wg = w.astype(jnp.float32).reshape(d_in // group, group, d_out)
    lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
    scales = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
    zeros = jnp.round(-lo / scales)
    codes = jnp.clip(jnp.round(wg / scales[:, None]) + zeros[:, None], 0, levels)
    return codes.reshape(d_in, d_out).astype(jnp.uint8), scales, zeros.astype(jnp.uint8)


def _values(codes: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    """Float32 weights (d_in, d_out) from unpacked codes and their scales and zeros."""
    d_in, d_out = codes.shape
    n_groups = scales.shape[0]
    q = codes.astype(jnp.float32).reshape(n_groups, d_in // n_groups, d_out)
    return ((q - zeros.astype(jnp.float32)[:, None]) * scales[:, None]).reshape(d_in, d_out)


def quantize_weight(w: jax.Array, bits: int, group: int) -> QuantizedWeight:
    """W (d_in, d_out) -> its `bits`-bit codes with per-(group, output channel) scales and zeros;
    the group is `resolve_group(d_in, group)`."""
    _check_bits(bits)
    if w.ndim != 2:
        raise ConfigError(f"quantize_weight: W must be a (d_in, d_out) matrix, got shape {w.shape}")
    codes, scales, zeros = _codes(w, bits, resolve_group(w.shape[0], group))
    return QuantizedWeight(pack_int4(codes) if bits == 4 else codes, scales, zeros, bits, tuple(w.shape))


def dequantize_weight(q: QuantizedWeight) -> jax.Array:
    """The float32 matrix (d_in, d_out) the codes stand for."""
    codes = unpack_int4(q.codes, q.shape[0]) if q.bits == 4 else q.codes
    return _values(codes, q.scales, q.zeros)


def fake_quantize(w: jax.Array, bits: int, group: int) -> jax.Array:
    """dequantize_weight(quantize_weight(w, bits, group)) without the packing: W as it is served."""
    return _values(*_codes(w, bits, resolve_group(w.shape[0], group)))


def weight_bytes(tree) -> int:
    """Bytes of every array in `tree` (quantised or not): what the weights take at rest."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def matmul_bytes(tree) -> int:
    """Bytes of the seven block matmuls of a parameter tree, float or quantised."""
    return weight_bytes([[b["attn"][k] for k in ATTN] + [b["mlp"][k] for k in MLP] for b in tree["blocks"].values()])


def quantize_params(params: dict, bits: int, group: int) -> dict:
    """A trunk's parameter dict with the seven block matmuls (each block's "attn" / "mlp" entries)
    as QuantizedWeight and the PKM value tables as QuantizedRows; everything else as given, an
    unmerged adapter bank (each block's "adapters") included. Round-to-nearest: AWQ folds its
    scales into `params` before calling this."""
    _check_bits(bits)

    def block(p: dict) -> dict:
        out = dict(p)
        out["attn"] = {k: quantize_weight(v, bits, group) if k in ATTN else v for k, v in p["attn"].items()}
        out["mlp"] = {k: quantize_weight(v, bits, group) if k in MLP else v for k, v in p["mlp"].items()}
        return out

    out = dict(params)
    out["blocks"] = {i: block(p) for i, p in params["blocks"].items()}
    if "pkm" in params:
        out["pkm"] = {j: {**layer, "slot_values": QuantizedRows(*quantize_rows(layer["slot_values"]))}
                      for j, layer in params["pkm"].items()}
    return out


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize_tree(tree: dict, dtype) -> dict:
    """`tree` with every quantised leaf dequantised to `dtype` (one program, not op by op)."""
    def restore(leaf):
        if isinstance(leaf, QuantizedWeight):
            return dequantize_weight(leaf).astype(dtype)
        if isinstance(leaf, QuantizedRows):
            return dequantize_rows(leaf.values, leaf.scales).astype(dtype)
        return leaf
    return jax.tree.map(restore, tree, is_leaf=_is_quantized)


def dequantize_into(model: Trunk, tree: dict) -> None:
    """Sets `model` (a Trunk of the serving config, e.g. `empty_trunk`) to the weights `tree` stands
    for: each QuantizedWeight dequantised and cast to the param dtype, the rest as stored. PKM layers
    take their int8 rows as they are (the layer switches to its int8 serving form)."""
    floats = _dequantize_tree(tree, jnp.dtype(model.cfg.param_dtype))
    tables = {j: layer["slot_values"] for j, layer in tree.get("pkm", {}).items()
              if isinstance(layer["slot_values"], QuantizedRows)}
    for j in tables:
        if model.pkm[j].slot_values is None:  # already in int8 form: no float table to fill
            del floats["pkm"][j]["slot_values"]
    nnx.update(model, floats)
    for j, rows in tables.items():
        model.pkm[j].quantize()
        model.pkm[j].set_values(rows.values, rows.scales)


# ----------------------------------------------------------------------------- the serving model

def serving_config(cfg: Config) -> Config:
    """The config of the served model. Without a router, `cfg` with model.adapters = (): the adapters
    live merged in the base weights (a fixed selection is a plain block again). With model.router
    on, `cfg` as it is: the router mixes the adapters per token, which no fixed merge computes, so
    the served model keeps the adapter bank and the router (the router's width also counts the
    adapters)."""
    if cfg.model.router:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapters=()))


def adapters_kept(cfg: Config) -> bool:
    """Whether the served model keeps its adapters unmerged (model.router gates them)."""
    return bool(cfg.model.adapters) and cfg.model.router


def empty_trunk(model_cfg: ModelConfig) -> Trunk:
    """A Trunk whose parameters are shapes only (nothing allocated), to fill with `nnx.update` or
    `dequantize_into`."""
    return nnx.eval_shape(lambda: Trunk(model_cfg, rngs=nnx.Rngs(0)))


def merged_params(model: Trunk, cfg: Config, adapter: str | Sequence[float] | None = None) -> dict:
    """The parameters of the served model (a Trunk of `serving_config(cfg)`) as a pure dict: the
    model's adapters merged into the base weights (model/adapters.py `merge`), `adapter` naming one
    adapter or giving one weight per adapter; None is the uniform mixture, which is what the trunk
    computes when no router gates it. A model without adapters, or one whose router gates them
    (`adapters_kept`: the bank stays unmerged), comes back as it is."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not cfg.model.adapters:
        return params
    if adapters_kept(cfg):
        if adapter is not None:
            raise ConfigError(f"adapter={adapter!r}: model.router gates the adapters per token, so the export keeps "
                              "them unmerged and cannot fix a selection; pass adapter=None")
        return params
    n = len(cfg.model.adapters)
    select = adapter if isinstance(adapter, str) else tuple(adapter) if adapter is not None else (1.0 / n,) * n
    return jax.jit(merge, static_argnums=(1, 2))(params, cfg.model, select)  # one program, not op by op


def adapter_report(cfg: Config, params: dict, adapter: str | Sequence[float] | None = None) -> dict | None:
    """What the export did with the adapters, for the report and the bundle's manifest: None when
    the model has none; {"names", "merged": True, "select": the name, the weights or "uniform"}
    when they were merged; {"names", "merged": False, "bytes"} when the served model keeps the
    bank unmerged (`adapters_kept`), bytes being what the bank takes in the param dtype. `params`
    is `merged_params`' result."""
    if not cfg.model.adapters:
        return None
    names = list(cfg.model.adapters)
    if adapters_kept(cfg):
        return {"names": names, "merged": False,
                "bytes": weight_bytes([b["adapters"] for b in params["blocks"].values()])}
    return {"names": names, "merged": True, "select": "uniform" if adapter is None else adapter}


def calibration_batches(cfg: Config, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `n` (default serve.awq_calib_batches) batches of the training stream for `cfg`
    (training/input.py: the synthetic language or the TFRecord shards), as host arrays. One
    process: calibration runs where the export runs, on the whole global batch."""
    from quietreasoning.training import sharding
    from quietreasoning.training.input import batches

    n = cfg.serve.awq_calib_batches if n is None else n
    stream = batches(cfg, sharding.batch_sharding(sharding.make_mesh(cfg)), log=tqdm.write)
    return [{k: np.asarray(v) for k, v in stream.next().items()} for _ in range(n)]


# ----------------------------------------------------------------------------- calibration

INPUTS = ("qkv", "o", "gate_up", "down")  # the four matmul inputs of a block, named by their readers


def _adapter_gates(model: Trunk, aux: dict, tokens: int) -> list[jax.Array | None]:
    """The adapter gates each block reads in `Trunk.forward` (aux: its aux): from block ws_layer on
    the router's per-chunk gates repeated over each chunk's `tokens` / n_chunks tokens (B, T, n);
    None (the uniform mixture) before it, and everywhere without adapters or a router."""
    cfg = model.cfg
    if not cfg.adapters or model.router is None:
        return [None] * cfg.n_layers
    chunks = aux["router"]["gates"]["adapters"]  # (B, C, n)
    per_token = jnp.repeat(chunks, tokens // chunks.shape[1], axis=1)
    return [per_token if i >= cfg.ws_layer else None for i in range(cfg.n_layers)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _block_activations(graphdef, state, tokens, segment_ids, positions, rows):
    """Per block and input: (sum of |activation| over real tokens (d,), the activations at the
    flat token indices `rows` (n, d)); and the number of real tokens. The blocks' adapters (if the
    model has them) take part, with the gates the trunk gives them."""
    model = nnx.merge(graphdef, state)
    _, aux = model.forward(tokens, segment_ids, positions, block_inputs=True)
    mask = attention_mask(segment_ids)
    real = (segment_ids > 0).astype(jnp.float32)[..., None]
    out = []
    for block, x, gates in zip(model.blocks, aux["block_inputs"], _adapter_gates(model, aux, tokens.shape[1])):
        bank = block.adapters
        a = block.attn_norm(x)
        o = block.attn.mix(a, positions, mask, bank, gates)
        # the block's own residual (its attention again: the jit computes the shared mix once)
        m = block.mlp_norm(x + block.attn(a, positions, mask, bank, gates))
        h = block.mlp.inner(m, bank, gates)
        acts = dict(zip(INPUTS, (a, o, m, h)))
        out.append({k: (jnp.sum(jnp.abs(v) * real, axis=(0, 1)), v.reshape(-1, v.shape[-1])[rows])
                    for k, v in acts.items()})
    return out, jnp.sum(real)


def calibrate(model: Trunk, batches: Sequence[dict], *, search_tokens: int = SEARCH_TOKENS,
              seed: int = 0) -> list[dict[str, tuple[jax.Array, jax.Array]]]:
    """Per block, for each of INPUTS: (mean |activation| per channel over the real tokens (segment
    id > 0) of `batches`, sampled activation rows (about `search_tokens` over all batches, d)), as
    `model` computes them: the served model, its adapters merged or kept (see `serving_config`)."""
    if not batches:
        raise DataError("AWQ calibration got no batches; pass calibration_batches(cfg) "
                        "(serve.awq_calib_batches > 0) or use method='rtn'")
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    per_batch = -(-search_tokens // len(batches))
    sums, rows, count = None, [], 0.0
    for batch in tqdm(batches, desc="AWQ calibration", unit="batch", leave=False):
        seg = np.asarray(batch["segment_ids"])
        real = np.flatnonzero(seg.reshape(-1) > 0)
        pick = np.sort(rng.choice(real, size=min(per_batch, real.size), replace=False))
        acts, n = _block_activations(graphdef, state, jnp.asarray(batch["inputs"]), jnp.asarray(seg),
                                     jnp.asarray(batch["positions"]), jnp.asarray(pick, jnp.int32))
        count += float(n)
        batch_sums = [{k: s for k, (s, _) in block.items()} for block in acts]
        sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        rows.append([{k: r for k, (_, r) in block.items()} for block in acts])
    if count == 0:
        raise DataError("AWQ calibration batches hold no real tokens (every segment id is 0); check the data")
    return [{k: (sums[i][k] / count, jnp.concatenate([r[i][k] for r in rows])) for k in INPUTS}
            for i in range(len(sums))]


# ----------------------------------------------------------------------------- the scale search

@functools.partial(jax.jit, static_argnames=("bits", "group", "grid"))
def search_scale(x: jax.Array, stat: jax.Array, w: jax.Array, *, bits: int, group: int, grid: int):
    """AWQ's search for one matrix group: x (n, d_in) sampled inputs, stat (d_in,) mean |input| per
    channel, w (d_in, d_out). Returns (s (d_in,), alpha, mean squared output error with s, the same
    error for round-to-nearest (alpha = 0), mean squared output of x w)."""
    hi = jax.lax.Precision.HIGHEST
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    ref = jnp.dot(x, w, precision=hi)
    log_stat = jnp.log(jnp.maximum(stat, STAT_FLOOR * jnp.mean(stat)))

    def scales(alpha):
        log_s = alpha * log_stat
        return jnp.exp(log_s - jnp.mean(log_s))  # geometric mean 1

    def error(alpha):
        s = scales(alpha)
        wq = fake_quantize(w * s[:, None], bits, group) / s[:, None]
        return jnp.mean(jnp.square(jnp.dot(x, wq, precision=hi) - ref))

    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    errors = jax.lax.map(error, alphas)
    best = jnp.argmin(errors)
    return scales(alphas[best]), alphas[best], errors[best], errors[0], jnp.mean(jnp.square(ref))


def awq_fold(params: dict, acts: list[dict], model_cfg: ModelConfig, bits: int, group: int,
             grid: int) -> tuple[dict, list[dict[str, Any]]]:
    """Searches s for each matrix group of each block (see the module docstring) and folds it in:
    the returned params compute the same function as `params` in float, with the quantised matrices
    pre-scaled (and, when a block keeps its adapter bank, its LoRA factors rescaled to match). Also
    returns one report row per block and matrix group (alpha, relative output errors of AWQ and RTN
    on the sampled rows)."""
    h, kv, dh = model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.resolved_head_dim
    g = h // kv
    f32 = jnp.float32
    out, report = dict(params), []
    out["blocks"] = {}
    for i, p in params["blocks"].items():
        w = {k: v.astype(f32) for part in ("attn", "mlp") for k, v in p[part].items()}
        bank = p.get("adapters")
        lora = {t: {k: v.astype(f32) for k, v in ab.items()} for t, ab in bank["lora"].items()} if bank else {}
        act = acts[i]

        def search(name: str, stat: jax.Array, keys: tuple[str, ...]) -> jax.Array:
            x = jnp.concatenate([w[k] for k in keys], axis=1)
            s, alpha, err, rtn, power = search_scale(act[name][1], stat, x, bits=bits, group=group, grid=grid)
            report.append({"block": i, "matrices": name, "alpha": float(alpha),
                           "awq_error": float(err / power), "rtn_error": float(rtn / power)})
            return s

        def scale_inputs(keys: tuple[str, ...], s: jax.Array) -> None:
            """The input of `keys` is divided by s: their rows, and their LoRA A rows, times s."""
            for k in keys:
                w[k] = w[k] * s[:, None]
                if k in lora:
                    lora[k]["a"] = lora[k]["a"] * s[None, :, None]

        def divide_outputs(key: str, s: jax.Array) -> None:
            """The output of `key` divided by s: its columns, and its LoRA B columns."""
            w[key] = w[key] / s[None, :]
            if key in lora:
                lora[key]["b"] = lora[key]["b"] / s[None, None, :]

        # wo: s tied over the query heads sharing a kv head, folded into the columns of wv
        stat = jnp.mean(act["o"][0].reshape(kv, g, dh), axis=1)
        s = search("o", jnp.broadcast_to(stat[:, None], (kv, g, dh)).reshape(-1), ("wo",))
        scale_inputs(("wo",), s)
        divide_outputs("wv", s.reshape(kv, g, dh)[:, 0].reshape(-1))
        # w_down: folded into the columns of w_up
        s = search("down", act["down"][0], ("w_down",))
        scale_inputs(("w_down",), s)
        divide_outputs("w_up", s)
        block = dict(p)
        # wq | wk | wv and w_gate | w_up: one s each, folded into the RMSNorm before them
        for name, keys, norm in (("qkv", ("wq", "wk", "wv"), "attn_norm"), ("gate_up", ("w_gate", "w_up"), "mlp_norm")):
            s = search(name, act[name][0], keys)
            scale_inputs(keys, s)
            scale = p[norm]["scale"]
            block[norm] = {"scale": (scale.astype(f32) / s).astype(scale.dtype)}
        for part in ("attn", "mlp"):
            block[part] = {k: w[k].astype(v.dtype) for k, v in p[part].items()}
        if bank:
            block["adapters"] = {**bank, "lora": {t: {k: v.astype(bank["lora"][t][k].dtype) for k, v in ab.items()}
                                                  for t, ab in lora.items()}}
        out["blocks"][i] = block
    return out, report


# ----------------------------------------------------------------------------- the whole model

def quantize_model(model: Trunk, cfg: Config, calib_batches: Sequence[dict] | None, bits: int, *,
                   method: str = "awq", adapter: str | Sequence[float] | None = None,
                   search_tokens: int = SEARCH_TOKENS) -> tuple[dict, dict[str, Any]]:
    """The quantised parameter tree of `model` (see `quantize_params`; fill a Trunk of
    `serving_config(cfg)` with it through `dequantize_into`) and a report: method, bits, the group
    each input width got, the adapters (`adapter_report`: merged, or kept unmerged and in float),
    per-block search results (AWQ), and the bytes in float (the served model in its param dtype)
    and quantised, of all weights and of the block matmuls.

    method "awq" calibrates on `calib_batches` (e.g. `calibration_batches(cfg)`) and searches the
    scales (serve.awq_grid alphas); "rtn" rounds the weights as they are (no batches needed).
    `adapter` selects the adapters to merge first (see `merged_params`; None when the router gates
    them and they stay unmerged: AWQ then folds its scales into their LoRA factors too)."""
    _check_bits(bits)
    if method not in METHODS:
        raise ConfigError(f"quantize_model: method={method!r} must be one of {METHODS}")
    srv, serving = cfg.serve, serving_config(cfg)
    params = merged_params(model, cfg, adapter)
    float_bytes, float_matmuls = weight_bytes(params), matmul_bytes(params)
    m = serving.model
    widths = sorted({m.d_model, m.n_heads * m.resolved_head_dim, m.d_ff})
    report: dict[str, Any] = {
        "method": method, "bits": bits, "group": srv.awq_group,
        "groups": {str(d): resolve_group(d, srv.awq_group) for d in widths},
        "adapters": adapter_report(cfg, params, adapter),
    }
    if method == "awq":
        float_model = empty_trunk(m)
        nnx.update(float_model, params)
        acts = calibrate(float_model, calib_batches or [], search_tokens=search_tokens, seed=cfg.train.seed)
        params, layers = awq_fold(params, acts, m, bits, srv.awq_group, srv.awq_grid)
        report.update(grid=srv.awq_grid, calib_batches=len(calib_batches), calib_rows=int(acts[0]["qkv"][1].shape[0]),
                      layers=layers)
    tree = jax.jit(quantize_params, static_argnums=(1, 2))(params, bits, srv.awq_group)
    report.update(float_bytes=float_bytes, quantized_bytes=weight_bytes(tree), matmul_float_bytes=float_matmuls,
                  matmul_quantized_bytes=matmul_bytes(tree))
    return tree, report
