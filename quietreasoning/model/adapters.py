"""The adapter bank: named LoRA and IA3 adapters on every block, mixed per token by gates.

Each block holds one `AdapterBank` with the adapters `cfg.adapters` (e.g. general, math, code)
stacked on a leading `adapters` axis:

- LoRA (Hu et al. 2021) on the attention projections wq, wk, wv, wo and the SwiGLU projections
  w_gate, w_up, w_down: y = x W + (alpha / rank) x A B, with A normal-initialised and B zero, so
  a fresh adapter changes nothing.
- IA3 (Liu et al. 2022), when `cfg.ia3`: learned scaling vectors (initialised to ones) on the
  keys and values (before RoPE, so they fold into wk / wv) and on the SwiGLU inner activation
  (before w_down, so it folds into the rows of w_down).

Selection: gates (..., A) per token (rows summing to 1, from the router) weight the adapters:
the LoRA update is sum_a g_a (alpha / rank) x A_a B_a and the IA3 scale is sum_a g_a l_a. No
gates means the uniform mixture 1/A. For fixed gates the adapted block is again a plain block,
which is what `merge` computes for export.

With `cfg.adapters` empty no bank is built, no parameter exists and the trunk is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import named

ATTN_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w_gate", "w_up", "w_down")


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, str, str]]:
    """target -> (d_in, d_out, logical name of d_in, of d_out): those of the base weight."""
    d, h, kv, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    return {
        "wq": (d, h * dh, "embed", "heads"),
        "wk": (d, kv * dh, "embed", "kv"),
        "wv": (d, kv * dh, "embed", "kv"),
        "wo": (h * dh, d, "heads", "embed"),
        "w_gate": (d, f, "embed", "mlp"),
        "w_up": (d, f, "embed", "mlp"),
        "w_down": (f, d, "mlp", "embed"),
    }


def ia3_shapes(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """IA3 target -> (width, logical name): keys, values, SwiGLU inner activation."""
    kv_width = cfg.n_kv_heads * cfg.resolved_head_dim
    return {"k": (kv_width, "kv"), "v": (kv_width, "kv"), "ff": (cfg.d_ff, "mlp")}


def adapter_param_count(cfg: ModelConfig) -> int:
    """The closed-form number of adapter parameters in the whole trunk (0 when switched off)."""
    if not cfg.adapters:
        return 0
    lora = sum(cfg.lora_rank * (d_in + d_out) for d_in, d_out, _, _ in lora_shapes(cfg).values())
    ia3 = sum(width for width, _ in ia3_shapes(cfg).values()) if cfg.ia3 else 0
    return cfg.n_layers * len(cfg.adapters) * (lora + ia3)


class LoRA(nnx.Module):
    """Low-rank updates for one projection, one (A, B) pair per adapter: (n, d_in, r), (n, r, d_out)."""

    def __init__(self, cfg: ModelConfig, target: str, *, rngs: nnx.Rngs):
        d_in, d_out, name_in, name_out = lora_shapes(cfg)[target]
        n, r, pdt = len(cfg.adapters), cfg.lora_rank, jnp.dtype(cfg.param_dtype)
        self.scale = cfg.lora_alpha / r
        self.dtype = jnp.dtype(cfg.compute_dtype)
        a = nnx.initializers.normal(cfg.init_std)(rngs.params(), (n, d_in, r), pdt)
        self.a = named(a, ("adapters", name_in, "lora"))
        self.b = named(jnp.zeros((n, r, d_out), pdt), ("adapters", "lora", name_out))

    def __call__(self, x: jax.Array, gates: jax.Array) -> jax.Array:
        """sum_a gates_a * scale * x A_a B_a for x (..., d_in) and gates (..., n); float32 out."""
        h = jnp.einsum("...d,adr->...ar", x.astype(self.dtype), self.a[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        h = h * (self.scale * gates)[..., None]
        return jnp.einsum("...ar,are->...e", h.astype(self.dtype), self.b[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


class AdapterBank(nnx.Module):
    """One block's adapters: `lora[target]` for the seven projections, `ia3[k|v|ff]` (n, width)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not cfg.adapters:
            raise ValueError("AdapterBank needs at least one name in model.adapters")
        self.names = tuple(cfg.adapters)
        n, pdt = len(self.names), jnp.dtype(cfg.param_dtype)
        self.lora = nnx.Dict({t: LoRA(cfg, t, rngs=rngs) for t in ATTN_TARGETS + MLP_TARGETS})
        self.ia3 = nnx.Dict({t: named(jnp.ones((n, width), pdt), ("adapters", name))
                             for t, (width, name) in ia3_shapes(cfg).items()}) if cfg.ia3 else None

    def _gates(self, gates: jax.Array | None, x: jax.Array) -> jax.Array:
        if gates is None:
            n = len(self.names)
            return jnp.full((*x.shape[:-1], n), 1.0 / n, jnp.float32)
        return gates.astype(jnp.float32)

    def delta(self, target: str, x: jax.Array, gates: jax.Array | None) -> jax.Array:
        """The LoRA update to add to `x @ W_target` (float32)."""
        return self.lora[target](x, self._gates(gates, x))

    def rescale(self, target: str, y: jax.Array, gates: jax.Array | None) -> jax.Array:
        """y (..., width) times the gate-weighted IA3 vector for `target`; y itself when IA3 is off."""
        if self.ia3 is None:
            return y
        scale = jnp.einsum("...a,af->...f", self._gates(gates, y), self.ia3[target][...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        return y * scale


# --- export: fold an adapter (or a fixed mixture) into the base weights -----------------------

def _one_hot(cfg: ModelConfig, select: str | Sequence[float]) -> jax.Array:
    names = tuple(cfg.adapters)
    if isinstance(select, str):
        if select not in names:
            raise ValueError(f"adapter {select!r} is not in model.adapters={list(names)}")
        return jnp.zeros((len(names),), jnp.float32).at[names.index(select)].set(1.0)
    gates = jnp.asarray(select, jnp.float32)
    if gates.shape != (len(names),):
        raise ValueError(f"merge gates have shape {gates.shape}; need one weight per adapter {list(names)}")
    return gates


def _set(leaf, value: jax.Array):
    """A new leaf holding `value`: a Variable keeps its metadata (logical names)."""
    return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value


def _fold_block(block: Mapping, gates: jax.Array, cfg: ModelConfig) -> Mapping:
    bank, hi = block["adapters"], jax.lax.Precision.HIGHEST
    scale = cfg.lora_alpha / cfg.lora_rank
    attn, mlp = dict(block["attn"]), dict(block["mlp"])
    w = {t: group[t][...] for group, targets in ((attn, ATTN_TARGETS), (mlp, MLP_TARGETS)) for t in targets}
    for t in w:  # W + scale * sum_a g_a A_a B_a
        a, b = bank["lora"][t]["a"][...], bank["lora"][t]["b"][...]
        w[t] = w[t] + (scale * jnp.einsum("n,ndr,nre->de", gates, a, b, precision=hi)).astype(w[t].dtype)
    if "ia3" in bank:
        mix = {t: jnp.einsum("n,nf->f", gates, bank["ia3"][t][...], precision=hi) for t in ("k", "v", "ff")}
        w["wk"] = w["wk"] * mix["k"][None, :].astype(w["wk"].dtype)  # k = x W diag(l): scale the columns
        w["wv"] = w["wv"] * mix["v"][None, :].astype(w["wv"].dtype)
        w["w_down"] = w["w_down"] * mix["ff"][:, None].astype(w["w_down"].dtype)  # (h l) W = h diag(l) W: rows
    for group, targets in ((attn, ATTN_TARGETS), (mlp, MLP_TARGETS)):
        for t in targets:
            group[t] = _set(group[t], w[t])
    out = {k: v for k, v in block.items() if k != "adapters"}
    out["attn"], out["mlp"] = type(block["attn"])(attn), type(block["mlp"])(mlp)
    return type(block)(out)


def _fold(node, gates: jax.Array, cfg: ModelConfig):
    if not isinstance(node, Mapping):
        return node
    if "adapters" in node:
        return _fold_block(node, gates, cfg)
    return type(node)({k: _fold(v, gates, cfg) for k, v in node.items()})


def merge(params, cfg: ModelConfig, select: str | Sequence[float]):
    """`params` (a trunk's or a block's parameter state: `nnx.state(model, nnx.Param)` or its pure
    dict) with every block's adapters folded into the base weights and removed: the parameters of
    a bare trunk (`cfg` with adapters=()) that computes what the adapted one computes with gates
    fixed to `select` (an adapter name, i.e. a one-hot gate, or one weight per adapter).

    W' = W + (alpha / rank) sum_a g_a A_a B_a on every projection; then IA3 folds into the
    columns of wk / wv and the rows of w_down."""
    return _fold(params, _one_hot(cfg, select), cfg)
