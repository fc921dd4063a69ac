"""The model's read of the episodic store: the residual stream cross-attends to memory tokens that
a host-side search retrieved (memory/episodic.py searches, memory/retrieval.py builds the arrays).

Terms:
  memory tokens   M vectors of width E = model.resolved_episodic_dim per example, (B, M, E)
                  float: what the retrieved entries hold, made into vectors by the caller (e.g.
                  the final-norm hidden states of retrieved facts' tokens, memory/retrieval.py)
  memory mask     (B, M) bool: True for a real memory token, False for padding (fewer entries
                  found, shorter facts). A masked token changes nothing; a row whose tokens are
                  all masked reads exactly zero
  read            multi-head cross-attention, n_heads heads of head_dim (the trunk's): queries
                  from the RMS-normalised residual stream x (B, T, D), keys and values from the
                  RMS-normalised memory tokens; the heads' outputs are projected back to D by
                  w_o, initialised small (the std of the trunk's output projections) so a new read
                  barely moves a trained trunk
  gate            the trunk adds x + gate * read(x, memory) before block model.episodic_layer;
                  gate is the router's "episodic" gate of the token's chunk (model/router.py)
                  when the router is on, else 1

Memory tokens carry no sequence position (no RoPE): they come from the store, the same for every
position of an example, never from the sequence itself, so the read keeps the trunk causal.
`memory=None` means "no retrieval for this call": the trunk skips the read (a model with
model.episodic=false has no read, and passing it memory is an error).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ConfigError, DataError, ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, param


def episodic_read_param_count(cfg: ModelConfig) -> int:
    """Parameters of the read (0 when model.episodic is off): the two norms D + E, queries
    D h dh, keys and values 2 E h dh, output h dh D."""
    if not cfg.episodic:
        return 0
    d, e, hd = cfg.d_model, cfg.resolved_episodic_dim, cfg.n_heads * cfg.resolved_head_dim
    return d + e + d * hd + 2 * e * hd + hd * d


def check_memory(cfg: ModelConfig, batch: int, memory, memory_mask) -> None:
    """One-line errors for memory that does not fit the model or the batch (raised while tracing)."""
    if not cfg.episodic:
        raise ConfigError("memory was passed to a model with model.episodic=false; set model.episodic=true "
                          "or leave memory out")
    e = cfg.resolved_episodic_dim
    if memory.ndim != 3 or memory.shape[0] != batch or memory.shape[2] != e:
        raise DataError(f"memory of shape {tuple(memory.shape)} must be (batch={batch}, M, model.episodic_dim={e}): "
                        "one row of memory tokens per example")
    if memory_mask is not None and tuple(memory_mask.shape) != tuple(memory.shape[:2]):
        raise DataError(f"memory_mask of shape {tuple(memory_mask.shape)} must be {tuple(memory.shape[:2])}: "
                        "one flag per memory token")


class EpisodicRead(nnx.Module):
    """x (B, T, D), memory (B, M, E), memory_mask (B, M) bool or None (all real) -> read (B, T, D)
    float32, which the trunk adds (times its gate) to the residual stream."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, e, h, dh = cfg.d_model, cfg.resolved_episodic_dim, cfg.n_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.n_heads, self.head_dim = h, dh
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.token_norm = RMSNorm(d, cfg.norm_eps, pdt)
        self.memory_norm = RMSNorm(e, cfg.norm_eps, pdt)
        self.w_q = param(rngs, (d, h * dh), ("embed", "heads"), cfg.init_std, pdt)
        self.w_k = param(rngs, (e, h * dh), ("embed", "heads"), cfg.init_std, pdt)
        self.w_v = param(rngs, (e, h * dh), ("embed", "heads"), cfg.init_std, pdt)
        self.w_o = param(rngs, (h * dh, d), ("heads", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x: jax.Array, memory: jax.Array, memory_mask: jax.Array | None = None) -> jax.Array:
        b, t, _ = x.shape
        m, h, dh = memory.shape[1], self.n_heads, self.head_dim
        q = matmul(self.token_norm(x), self.w_q[...], self.dtype).reshape(b, t, h, dh)
        mem = self.memory_norm(memory)
        k = matmul(mem, self.w_k[...], self.dtype).reshape(b, m, h, dh)
        v = matmul(mem, self.w_v[...], self.dtype).reshape(b, m, h, dh)
        scores = jnp.einsum("bthd,bmhd->bhtm", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        valid = jnp.ones((b, m), bool) if memory_mask is None else memory_mask.astype(bool)
        scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        # a row without a real memory token reads zero, not the mean of its padding
        probs = jax.nn.softmax(scores, axis=-1) * jnp.any(valid, axis=-1)[:, None, None, None]
        out = jnp.einsum("bhtm,bmhd->bthd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).reshape(b, t, h * dh)
        return matmul(out, self.w_o[...], self.dtype)
