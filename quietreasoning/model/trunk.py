"""The decoder trunk: token embedding, RMSNorm, RoPE attention with grouped KV heads and
segment-aware causal masking, SwiGLU, and an output head (tied or untied).

Parameters are stored in `param_dtype` (float32) and carry logical axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`); matmuls take `compute_dtype` inputs and
accumulate in float32. Logits come out in float32, ready for the z-loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float, dtype) -> nnx.Param:
    """A normal-initialised parameter carrying logical axis names; sharding is applied by the
    caller's jit (training/sharding.py), so no mesh is needed to build the module."""
    value = nnx.initializers.normal(std)(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array, dtype, spec: str = "...d,df->...f") -> jax.Array:
    """`compute_dtype` inputs, float32 accumulation and output."""
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on (B, T, H, Dh) with per-token positions (B, T) (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, half)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """(B, 1, T, T) boolean: causal, and a token sees only its own segment (0 = padding)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, dh
        self.theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.wq = _param(rngs, (d, h * dh), ("embed", "heads"), cfg.init_std, pdt)
        self.wk = _param(rngs, (d, kv * dh), ("embed", "kv"), cfg.init_std, pdt)
        self.wv = _param(rngs, (d, kv * dh), ("embed", "kv"), cfg.init_std, pdt)
        self.wo = _param(rngs, (h * dh, d), ("heads", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h, kv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = matmul(x, self.wq[...], self.dtype).reshape(b, t, h, dh)
        k = matmul(x, self.wk[...], self.dtype).reshape(b, t, kv, dh)
        v = matmul(x, self.wv[...], self.dtype).reshape(b, t, kv, dh)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        q = q.reshape(b, t, kv, h // kv, dh)  # query groups share a kv head
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return matmul(out.reshape(b, t, h * dh), self.wo[...], self.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.silu(matmul(x, self.w_gate[...], self.dtype))
        return matmul(gate * matmul(x, self.w_up[...], self.dtype), self.w_down[...], self.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, mask)
        return x + self.mlp(self.mlp_norm(x))


def _run_block(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    return block(x, positions, mask)


class Trunk(nnx.Module):
    """tokens (B, T) int32, segment_ids (B, T) (0 = padding), positions (B, T) -> logits (B, T, V) f32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.compute_dtype)
        # a tied table is also the output matrix: give it the weights' scale, or the first logits are huge
        embed_std = cfg.init_std if cfg.tie_embeddings else 1.0
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), embed_std, pdt)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
        if cfg.remat == "none":
            self._block_fn = _run_block
        else:
            self._block_fn = nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat])

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """Final-norm hidden states (B, T, D) in float32."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
        mask = attention_mask(segment_ids)
        for block in self.blocks:
            x = self._block_fn(block, x, positions, mask)
        return self.final_norm(x)

    def logits(self, h: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            return matmul(h, self.embed[...], self.dtype, "...d,vd->...v")
        return matmul(h, self.head[...], self.dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.logits(self.hidden(tokens, segment_ids, positions))


def param_count(cfg: ModelConfig) -> int:
    """The closed-form parameter count of the trunk for `cfg`."""
    d, h, kv, dh, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
    attn = d * h * dh + 2 * d * kv * dh + h * dh * d
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else d * v
    return v * d + cfg.n_layers * per_layer + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters plus attention,
    12 * n_layers * n_heads * head_dim * seq_len (the PaLM appendix-B accounting, no causal discount)."""
    d, v = cfg.d_model, cfg.vocab_size
    matmul_params = param_count(cfg) - v * d - (2 * cfg.n_layers + 1) * d  # gathers and norms are not matmuls
    if cfg.tie_embeddings:
        matmul_params += v * d  # the tied table is used as the output matmul
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params + attn
