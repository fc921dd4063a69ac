"""The decoder trunk: token embedding, RMSNorm, RoPE attention with grouped KV heads and
segment-aware causal masking, SwiGLU, and an output head (tied or untied).

Parameters are stored in `param_dtype` (float32) and carry logical axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`); matmuls take `compute_dtype` inputs and
accumulate in float32. Logits come out in float32, ready for the z-loss.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.memory.episodic_read import EpisodicRead, check_memory, episodic_read_param_count
from quietreasoning.memory.pkm import ProductKeyMemory, pkm_param_count
from quietreasoning.model.adapters import AdapterBank, adapter_param_count
from quietreasoning.model.layers import RMSNorm, matmul, param
from quietreasoning.model.router import Router, router_param_count
from quietreasoning.model.ssm import SSMExpert, ssm_param_count
from quietreasoning.model.workspace import Workspace, workspace_param_count

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on (B, T, H, Dh) with per-token positions (B, T) (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, half)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(B, 1, T, T) boolean: a token sees only its own segment (0 = padding), and, when `causal`,
    only positions up to its own (False: bidirectional within the segment, for encoders)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        t = segment_ids.shape[1]
        same = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & same
    return same[:, None]


class KVCache(NamedTuple):
    """Every layer's keys and values for up to S tokens of B rows, written left to right.

    keys, values  (n_layers, B, S, n_kv_heads, head_dim) in the compute dtype, after RoPE
    valid         (B, S) bool: the slot holds a token the row attends to (False: padding, a
                  skipped latent step, or not yet written)
    length        () int32: slots written so far; the next tokens go at [length, length + T)
    """
    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    length: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, dh
        self.theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.wq = param(rngs, (d, h * dh), ("embed", "heads"), cfg.init_std, pdt)
        self.wk = param(rngs, (d, kv * dh), ("embed", "kv"), cfg.init_std, pdt)
        self.wv = param(rngs, (d, kv * dh), ("embed", "kv"), cfg.init_std, pdt)
        self.wo = param(rngs, (h * dh, d), ("heads", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 adapter: AdapterBank | None = None, gates: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None):
        """x (B, T, D) -> (B, T, D). With `cache` = (keys, values, start), the layer's cache (B, S, KV, Dh)
        and where the T new tokens go: their keys and values are written at [start, start + T), the
        queries attend over the whole cache (`mask` is then (B, 1, T, S)), and the result is
        (output, (keys, values)) with the updated cache."""
        b, t, _ = x.shape
        h, kv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = matmul(x, self.wq[...], self.dtype)
        k = matmul(x, self.wk[...], self.dtype)
        v = matmul(x, self.wv[...], self.dtype)
        if adapter is not None:  # LoRA on each projection; IA3 on keys and values before RoPE (it folds into wk, wv)
            q = q + adapter.delta("wq", x, gates)
            k = adapter.rescale("k", k + adapter.delta("wk", x, gates), gates)
            v = adapter.rescale("v", v + adapter.delta("wv", x, gates), gates)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kv, dh), v.reshape(b, t, kv, dh)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if cache is not None:
            keys, values, start = cache
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
            k, v = keys, values
        q = q.reshape(b, t, kv, h // kv, dh)  # query groups share a kv head
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).reshape(b, t, h * dh)
        y = matmul(out, self.wo[...], self.dtype)
        y = y if adapter is None else y + adapter.delta("wo", out, gates)
        return y if cache is None else (y, (k, v))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x: jax.Array, adapter: AdapterBank | None = None, gates: jax.Array | None = None) -> jax.Array:
        gate = matmul(x, self.w_gate[...], self.dtype)
        up = matmul(x, self.w_up[...], self.dtype)
        if adapter is not None:
            gate, up = gate + adapter.delta("w_gate", x, gates), up + adapter.delta("w_up", x, gates)
        inner = jax.nn.silu(gate) * up
        if adapter is not None:  # IA3 on the inner activation (it folds into the rows of w_down)
            inner = adapter.rescale("ff", inner, gates)
        y = matmul(inner, self.w_down[...], self.dtype)
        return y if adapter is None else y + adapter.delta("w_down", inner, gates)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        # the adapter bank (model/adapters.py); none when model.adapters is empty
        self.adapters = AdapterBank(cfg, rngs=rngs) if cfg.adapters else None

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 gates: jax.Array | None = None) -> jax.Array:
        """gates (B, T, n_adapters) weight the adapters per token; None: their uniform mixture."""
        x = x + self.attn(self.attn_norm(x), positions, mask, self.adapters, gates)
        return x + self.mlp(self.mlp_norm(x), self.adapters, gates)

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, kv) -> tuple[jax.Array, tuple]:
        """The block over new tokens with the layer's KV cache (see Attention): (x, updated (keys, values))."""
        y, kv = self.attn(self.attn_norm(x), positions, mask, self.adapters, None, kv)
        x = x + y
        return x + self.mlp(self.mlp_norm(x), self.adapters, None), kv


def _run_block(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array,
               gates: jax.Array | None) -> jax.Array:
    return block(x, positions, mask, gates)


class Trunk(nnx.Module):
    """tokens (B, T) int32, segment_ids (B, T) (0 = padding), positions (B, T) -> logits (B, T, V) f32.

    The modules of the model config sit around the blocks, each built only when it is on (off, the
    trunk is the bare transformer, bit for bit):
      workspace  written from the residual stream before block `ws_layer` (chunk by chunk), read
                 before each block in `ws_read_layers`
      router     gates from the workspace summary of each chunk, for the tokens of that chunk
      ssm        an SSM expert after each block in `ssm_layers`: x + gate * expert(x)
      pkm        a product-key memory read after each block in `pkm_layers` (after the expert
                 there, if any): x + gate * pkm(x)
      adapters   inside every block; gated by the router from block `ws_layer` on, the uniform
                 mixture before it (no gate exists there yet)
      episodic   a cross-attention read of retrieved memory tokens before block `episodic_layer`
                 (memory/episodic_read.py): x + gate * read(x, memory), when forward is given memory
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.compute_dtype)
        # a tied table is also the output matrix: give it the weights' scale, or the first logits are huge
        embed_std = cfg.init_std if cfg.tie_embeddings else 1.0
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), embed_std, pdt)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
        self.workspace = Workspace(cfg, rngs=rngs) if cfg.workspace else None
        self.router = Router(cfg, rngs=rngs) if cfg.router else None
        self.ssm = nnx.List([SSMExpert(cfg, rngs=rngs) for _ in cfg.ssm_layers])
        self.pkm = nnx.List([ProductKeyMemory(cfg, rngs=rngs) for _ in cfg.pkm_layers])
        self.episodic = EpisodicRead(cfg, rngs=rngs) if cfg.episodic else None
        if cfg.remat == "none":
            self._block_fn = _run_block
        else:
            self._block_fn = nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat])

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings (B, T, D) in float32."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)

    def forward(self, tokens: jax.Array | None, segment_ids: jax.Array, positions: jax.Array, *,
                embeddings: jax.Array | None = None, causal: bool = True, memory: jax.Array | None = None,
                memory_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """(final-norm hidden states (B, T, D) f32, aux): aux holds what the switched-on modules
        report for their losses and logs ("workspace": states and aux, "router": gates, logits, mask,
        "pkm_slots": per PKM layer the slots its heads read, (B, T, pkm_heads, pkm_topk) int32).

        `embeddings` (B, T, D) replace the token lookup (soft prompts, latent thoughts; `tokens` is
        then unused); `causal=False` lets every token see its whole segment (an encoder).
        `memory` (B, M, model.resolved_episodic_dim) and `memory_mask` (B, M) bool (None: all real)
        are the retrieved memory tokens the episodic read attends to; memory None means no
        retrieval for this call, and the read is skipped."""
        cfg = self.cfg
        if memory is not None:
            check_memory(cfg, segment_ids.shape[0], memory, memory_mask)
        x = self.embed_tokens(tokens) if embeddings is None else embeddings.astype(jnp.float32)
        mask = attention_mask(segment_ids, causal)
        reads = {layer: j for j, layer in enumerate(cfg.ws_read_layers)}
        experts = {layer: j for j, layer in enumerate(cfg.ssm_layers)}
        memories = {layer: j for j, layer in enumerate(cfg.pkm_layers)}
        aux: dict[str, Any] = {}
        states = adapter_gates = ssm_gates = pkm_gates = episodic_gates = None
        for i, block in enumerate(self.blocks):
            if self.workspace is not None:
                if i == cfg.ws_layer:
                    states, ws_aux = self.workspace.write(x, segment_ids)
                    aux["workspace"] = {"states": states, "aux": ws_aux}
                    if self.router is not None:
                        gates, logits = self.router(self.workspace.summary(states))
                        aux["router"] = {"gates": gates, "logits": logits, "mask": ws_aux["ws_chunk_mask"]}
                        per_token = {k: jnp.repeat(g, cfg.ws_chunk, axis=1) for k, g in gates.items()}
                        adapter_gates = per_token["adapters"] if cfg.adapters else None
                        ssm_gates, pkm_gates = per_token["ssm"], per_token["pkm"]
                        episodic_gates = per_token["episodic"]
                if i in reads:
                    x = x + self.workspace.read(reads[i], x, states, segment_ids)
            if memory is not None and i == cfg.episodic_layer:
                delta = self.episodic(x, memory, memory_mask)
                x = x + (delta if episodic_gates is None else episodic_gates * delta)
            x = self._block_fn(block, x, positions, mask, adapter_gates)
            if i in experts:
                j = experts[i]
                delta = self.ssm[j](x, segment_ids)
                x = x + (delta if ssm_gates is None else ssm_gates[..., j:j + 1] * delta)
            if i in memories:
                delta, slots = self.pkm[memories[i]](x)
                aux.setdefault("pkm_slots", []).append(slots)
                x = x + (delta if pkm_gates is None else pkm_gates * delta)
        return self.final_norm(x), aux

    def empty_cache(self, batch: int, size: int) -> KVCache:
        """A KV cache with room for `size` tokens per row (see KVCache)."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.resolved_head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((batch, size), bool),
                       jnp.zeros((), jnp.int32))

    def extend(self, embeddings: jax.Array, positions: jax.Array, valid: jax.Array, cache: KVCache,
               *, layers: bool = False) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
        """Runs T new inputs after what `cache` holds: embeddings (B, T, D) (embed_tokens of token ids,
        or latent thoughts), positions (B, T), valid (B, T) (False: padding, seen by no one). Token i
        of row b sees the row's valid cache slots and valid new tokens up to itself. Returns
        (final-norm hidden states (B, T, D) f32, the cache with the new tokens written), and with
        `layers` also the residual stream after every block (n_layers, B, T, D).

        A prefill plus one-token steps give what `forward` gives on the whole sequence (up to float
        rounding). The cached path runs the trunk, the adapters (their uniform mixture) and PKM;
        the workspace, router and SSM experts read whole chunks or carry a scan state, so a model
        with them on runs its think blocks through `forward` instead."""
        cfg = self.cfg
        if cfg.workspace or cfg.router or cfg.ssm_layers:
            raise ValueError("Trunk.extend: the KV cache serves the trunk, adapters and PKM; switch off "
                             "model.workspace, model.router and model.ssm_layers for cached decoding and latent "
                             "training, or run the sequence through Trunk.forward")
        t = embeddings.shape[1]
        start = cache.length
        cache_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))
        slots = jnp.arange(cache.valid.shape[1])
        causal = slots[None, :] <= start + jnp.arange(t)[:, None]  # (T, S)
        mask = (causal[None] & cache_valid[:, None, :])[:, None]  # (B, 1, T, S)
        memories = {layer: j for j, layer in enumerate(cfg.pkm_layers)}
        x = embeddings.astype(jnp.float32)
        keys, values, stream = [], [], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block.cached(x, positions, mask, (cache.keys[i], cache.values[i], start))
            keys.append(k)
            values.append(v)
            if i in memories:
                x = x + self.pkm[memories[i]](x)[0]
            stream.append(x)
        cache = KVCache(jnp.stack(keys), jnp.stack(values), cache_valid, start + t)
        if layers:
            return self.final_norm(x), cache, jnp.stack(stream)
        return self.final_norm(x), cache

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """Final-norm hidden states (B, T, D) in float32."""
        return self.forward(tokens, segment_ids, positions)[0]

    def logits(self, h: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            return matmul(h, self.embed[...], self.dtype, "...d,vd->...v")
        return matmul(h, self.head[...], self.dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.logits(self.hidden(tokens, segment_ids, positions))


def param_count(cfg: ModelConfig) -> int:
    """The closed-form parameter count of the whole model for `cfg`: the trunk plus every module
    that is on."""
    return (trunk_param_count(cfg) + adapter_param_count(cfg) + workspace_param_count(cfg)
            + len(cfg.ssm_layers) * ssm_param_count(cfg) + router_param_count(cfg) + pkm_param_count(cfg)
            + episodic_read_param_count(cfg))


def trunk_param_count(cfg: ModelConfig) -> int:
    """The closed-form parameter count of the bare transformer (embeddings, blocks, head)."""
    d, h, kv, dh, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
    attn = d * h * dh + 2 * d * kv * dh + h * dh * d
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else d * v
    return v * d + cfg.n_layers * per_layer + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the bare trunk: 6 x matmul parameters plus
    attention, 12 * n_layers * n_heads * head_dim * seq_len (the PaLM appendix-B accounting, no
    causal discount). The modules' work is not counted: MFU measures the dense model's useful work,
    and what the modules cost shows up as a lower MFU (bench/module_overhead.py measures it)."""
    d, v = cfg.d_model, cfg.vocab_size
    matmul_params = trunk_param_count(cfg) - v * d - (2 * cfg.n_layers + 1) * d  # gathers and norms are not matmuls
    if cfg.tie_embeddings:
        matmul_params += v * d  # the tied table is used as the output matmul
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params + attn
