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
from quietreasoning.memory import kv_cache
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
    """What decoding carries between calls of `Trunk.extend`: every layer's keys and values for up to
    S slots of B rows, and the state of the modules that read more than the current token.

    store      one layer's store (memory/kv_cache.py `init_store`: unquantised keys and values, or
               int8/int4 codes with scales) per layer, stacked on a leading n_layers axis
    valid      (B, S) bool: the slot holds a token the row attends to (False: padding, a skipped
               latent step, or not yet written)
    length     (B,) int32: slots row b has written; its next tokens go at [length_b, length_b + T)
    ws         (B, ws_slots, ws_dim) the workspace state the row's next token reads (workspace on)
    ws_buffer  (B, ws_chunk, D) the residual stream entering block ws_layer for the tokens of the
               row's current chunk so far (written into `ws` when the chunk is complete)
    ssm        per SSM expert, its decode state {"conv", "ssm"} (model/ssm.py)
    """
    store: dict
    valid: jax.Array
    length: jax.Array
    ws: jax.Array | None = None
    ws_buffer: jax.Array | None = None
    ssm: tuple = ()


class LayerCache(NamedTuple):
    """One layer's part of a cached call (built by Trunk.extend): its store, where each row's new tokens
    go ([start_b, start_b + T)) and how many slots the row holds afterwards (end), the store's
    settings, whether the cache was empty before this call (`fresh`: the new tokens attend only to
    each other, in full precision), and SnapKV's observation queries (B, T) (None: no votes)."""
    store: dict
    start: jax.Array
    end: jax.Array
    kv: kv_cache.KVSettings
    fresh: bool
    window: jax.Array | None = None


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

    def mix(self, x: jax.Array, positions: jax.Array, mask: jax.Array, adapter: AdapterBank | None = None,
            gates: jax.Array | None = None, cache: LayerCache | None = None):
        """The attention output before the output projection: x (B, T, D) -> (B, T, n_heads * head_dim)
        f32 (what `wo` reads; AWQ calibrates on it). With `cache`, (output, updated store, SnapKV votes
        (B, KV, S) or None) as in __call__."""
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
        store = votes = None
        if cache is not None:
            store = kv_cache.write(cache.store, k, v, cache.start, cache.end, cache.kv)
            if not cache.fresh:  # attend over everything the store holds (dequantised when quantised)
                k, v = kv_cache.read(store, cache.kv, self.dtype)
        q = q.reshape(b, t, kv, h // kv, dh)  # query groups share a kv head
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).reshape(b, t, h * dh)
        if cache is not None and cache.window is not None:
            votes = kv_cache.snapkv_votes(probs, cache.window)
        return out if cache is None else (out, store, votes)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 adapter: AdapterBank | None = None, gates: jax.Array | None = None,
                 cache: LayerCache | None = None):
        """x (B, T, D) -> (B, T, D). With `cache` (LayerCache), the new tokens' keys and values are
        written to the layer's store at [start_b, start_b + T); the queries attend over the whole
        store (`mask` (B, 1, T, S)), or, when the cache is `fresh`, over the new tokens only (`mask`
        (B, 1, T, T)); the result is (output, updated store, SnapKV votes or None)."""
        mixed = self.mix(x, positions, mask, adapter, gates, cache)
        out, store, votes = mixed if cache is not None else (mixed, None, None)
        y = matmul(out, self.wo[...], self.dtype)
        y = y if adapter is None else y + adapter.delta("wo", out, gates)
        return y if cache is None else (y, store, votes)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.n_layers), pdt)

    def inner(self, x: jax.Array, adapter: AdapterBank | None = None, gates: jax.Array | None = None) -> jax.Array:
        """The gated inner activation (B, T, d_ff) f32: what `w_down` reads (AWQ calibrates on it)."""
        gate = matmul(x, self.w_gate[...], self.dtype)
        up = matmul(x, self.w_up[...], self.dtype)
        if adapter is not None:
            gate, up = gate + adapter.delta("w_gate", x, gates), up + adapter.delta("w_up", x, gates)
        inner = jax.nn.silu(gate) * up
        if adapter is not None:  # IA3 on the inner activation (it folds into the rows of w_down)
            inner = adapter.rescale("ff", inner, gates)
        return inner

    def __call__(self, x: jax.Array, adapter: AdapterBank | None = None, gates: jax.Array | None = None) -> jax.Array:
        inner = self.inner(x, adapter, gates)
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

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: LayerCache,
               gates: jax.Array | None = None) -> tuple[jax.Array, dict, jax.Array | None]:
        """The block over new tokens with the layer's cache (see Attention): (x, updated store, votes)."""
        y, store, votes = self.attn(self.attn_norm(x), positions, mask, self.adapters, gates, cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x), self.adapters, gates), store, votes


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
                memory_mask: jax.Array | None = None, block_inputs: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        """(final-norm hidden states (B, T, D) f32, aux): aux holds what the switched-on modules
        report for their losses and logs ("workspace": states and aux, "router": gates, logits, mask,
        "pkm_slots": per PKM layer the slots its heads read, (B, T, pkm_heads, pkm_topk) int32), and
        with `block_inputs` the residual stream entering every block ("block_inputs", a list).

        `embeddings` (B, T, D) replace the token lookup (soft prompts, latent thoughts; `tokens` is
        then unused); `causal=False` lets every token see its whole segment (an encoder).
        `memory` (B, M, model.resolved_episodic_dim) and `memory_mask` (B, M) bool (None: all real)
        are the retrieved memory tokens the episodic read attends to; memory None means no
        retrieval for this call, and the read is skipped."""
        if memory is not None:
            check_memory(self.cfg, segment_ids.shape[0], memory, memory_mask)
        x = self.embed_tokens(tokens) if embeddings is None else embeddings.astype(jnp.float32)
        run = self._run(x, positions, attention_mask(segment_ids, causal), segment_ids, mode="forward",
                        memory=memory, memory_mask=memory_mask, capture=block_inputs)
        if block_inputs:
            run["aux"]["block_inputs"] = run["inputs"]
        return self.final_norm(run["x"]), run["aux"]

    def _run(self, x: jax.Array, positions: jax.Array, mask: jax.Array, segment_ids: jax.Array, *, mode: str,
             memory=None, memory_mask=None, caches: list[LayerCache] | None = None, carry: KVCache | None = None,
             lengths: jax.Array | None = None, capture: bool = False) -> dict[str, Any]:
        """The blocks and the modules around them, for every path (the modules only differ in `mode`):
          "forward"  whole sequences, no cache (Trunk.forward)
          "prefill"  a fresh cache: as forward over rows holding tokens at [0, lengths_b) and padding
                     after them; also returns the modules' decode state after each row's last token
          "step"     new tokens after the cache `carry`; with the workspace or SSM experts on, one token
                     per row, read from and written to the carried state
        `caches` gives each layer its LayerCache (prefill and step). Returns a dict: "x" (before the
        final norm), "aux", "stores" and "votes" per layer, "state" (the modules' decode state),
        "stream" (after every block) and, with `capture`, "inputs" (entering every block)."""
        cfg = self.cfg
        reads = {layer: j for j, layer in enumerate(cfg.ws_read_layers)}
        experts = {layer: j for j, layer in enumerate(cfg.ssm_layers)}
        memories = {layer: j for j, layer in enumerate(cfg.pkm_layers)}
        out: dict[str, Any] = {"aux": {}, "stores": [], "votes": [], "state": {}, "stream": [], "inputs": []}
        aux, state = out["aux"], out["state"]
        states = adapter_gates = ssm_gates = pkm_gates = episodic_gates = None
        for i, block in enumerate(self.blocks):
            if self.workspace is not None:
                if i == cfg.ws_layer:
                    if mode == "step":
                        states = carry.ws[:, None]  # (B, 1, S, W): the state the new token reads
                        state.update(self._workspace_step(x, positions, carry))
                    else:
                        states, ws_aux = self.workspace.write(x, segment_ids)
                        aux["workspace"] = {"states": states, "aux": ws_aux}
                        if mode == "prefill":
                            state.update(self._workspace_carry(x, states, ws_aux, lengths))
                    if self.router is not None:
                        gates, logits = self.router(self.workspace.summary(states))
                        if mode != "step":
                            aux["router"] = {"gates": gates, "logits": logits, "mask": ws_aux["ws_chunk_mask"]}
                        per_chunk = x.shape[1] // states.shape[1]
                        per_token = {k: jnp.repeat(g, per_chunk, axis=1) for k, g in gates.items()}
                        adapter_gates = per_token["adapters"] if cfg.adapters else None
                        ssm_gates, pkm_gates = per_token["ssm"], per_token["pkm"]
                        episodic_gates = per_token["episodic"]
                if i in reads:
                    x = x + self.workspace.read(reads[i], x, states, None if mode == "step" else segment_ids)
            if memory is not None and i == cfg.episodic_layer:
                delta = self.episodic(x, memory, memory_mask)
                x = x + (delta if episodic_gates is None else episodic_gates * delta)
            if capture:
                out["inputs"].append(x)
            if caches is None:
                x = self._block_fn(block, x, positions, mask, adapter_gates)
            else:
                x, store, votes = block.cached(x, positions, mask, caches[i], adapter_gates)
                out["stores"].append(store)
                out["votes"].append(votes)
            if i in experts:
                j, expert = experts[i], self.ssm[experts[i]]
                if mode == "step":
                    delta, expert_state = expert.step(x[:, 0], carry.ssm[j])
                    delta = delta[:, None]
                elif mode == "prefill":
                    delta, expert_state = expert.prefill(x, lengths)
                else:
                    delta = expert(x, segment_ids)
                if mode != "forward":
                    state.setdefault("ssm", []).append(expert_state)
                x = x + (delta if ssm_gates is None else ssm_gates[..., j:j + 1] * delta)
            if i in memories:
                delta, slots = self.pkm[memories[i]](x)
                aux.setdefault("pkm_slots", []).append(slots)
                x = x + (delta if pkm_gates is None else pkm_gates * delta)
            out["stream"].append(x)
        out["x"] = x
        return out

    def _workspace_step(self, x: jax.Array, positions: jax.Array, carry: KVCache) -> dict[str, jax.Array]:
        """One token per row into the workspace's current chunk (x (B, 1, D) entering block ws_layer at
        positions (B, 1)); a row whose token completes its chunk writes the chunk into its state."""
        chunk, rows = self.cfg.ws_chunk, x.shape[0]
        slot = positions[:, 0] % chunk
        buffer = carry.ws_buffer.at[jnp.arange(rows), slot].set(x[:, 0])
        written = self.workspace.update(carry.ws, buffer, jnp.ones((rows, chunk), bool))
        ws = jnp.where((slot == chunk - 1)[:, None, None], written, carry.ws)
        return {"ws": ws, "ws_buffer": buffer}

    def _workspace_carry(self, x: jax.Array, states: jax.Array, ws_aux: dict, lengths: jax.Array) -> dict[str, jax.Array]:
        """After a prefill: the state the token at position lengths_b reads (chunk lengths_b // ws_chunk)
        and that chunk's tokens so far (x (B, T, D) entering block ws_layer)."""
        chunk = self.cfg.ws_chunk
        b, t, d = x.shape
        every = jnp.concatenate([states, ws_aux["ws_next_target"][:, -1:]], axis=1)  # (B, C + 1, S, W)
        current = lengths // chunk
        ws = jnp.take_along_axis(every, current[:, None, None, None], axis=1)[:, 0]
        chunks = x.reshape(b, t // chunk, chunk, d)
        buffer = jnp.take_along_axis(chunks, jnp.minimum(current, t // chunk - 1)[:, None, None, None], axis=1)[:, 0]
        return {"ws": ws, "ws_buffer": buffer}

    def empty_cache(self, batch: int, size: int, kv: kv_cache.KVSettings | None = None) -> KVCache:
        """A cache with room for `size` tokens per row (see KVCache), stored as `kv` says (None:
        unquantised), with the modules' initial decode state."""
        cfg = self.cfg
        kv = kv or kv_cache.KVSettings()
        one = kv_cache.init_store(batch, size, cfg.n_kv_heads, cfg.resolved_head_dim, self.dtype, kv)
        store = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.n_layers, *a.shape)), one)
        slots = (one["k"] if "k" in one else one["k_codes"]).shape[1]  # size rounded up to whole key groups
        ws = ws_buffer = None
        if self.workspace is not None:
            ws = jnp.broadcast_to(self.workspace.slots_init[...].astype(jnp.float32), (batch, cfg.ws_slots, cfg.ws_dim))
            ws_buffer = jnp.zeros((batch, cfg.ws_chunk, cfg.d_model), jnp.float32)
        return KVCache(store, jnp.zeros((batch, slots), bool), jnp.zeros((batch,), jnp.int32), ws, ws_buffer,
                       tuple(expert.init_state(batch) for expert in self.ssm))

    def extend(self, embeddings: jax.Array, positions: jax.Array, valid: jax.Array, cache: KVCache, *,
               kv: kv_cache.KVSettings | None = None, fresh: bool = False, end: jax.Array | None = None,
               window: jax.Array | None = None, memory: jax.Array | None = None, memory_mask: jax.Array | None = None,
               layers: bool = False):
        """Runs T new inputs after what `cache` holds: embeddings (B, T, D) (embed_tokens of token ids,
        or latent thoughts), positions (B, T), valid (B, T) (False: padding, seen by no one). Row b's
        tokens go to slots [length_b, length_b + T); token i sees the row's valid slots and valid new
        tokens up to itself. Returns (final-norm hidden states (B, T, D) f32, the updated cache), then
        with `layers` the residual stream after every block (n_layers, B, T, D), with `window` SnapKV's
        votes (n_layers, B, n_kv_heads, T).

        kv      how the cache's store is kept (the settings it was made with; None: unquantised)
        fresh   the cache is empty: the T tokens attend to each other in full precision (a prefill).
                With the workspace or SSM experts on, a fresh prefill expects each row's tokens at
                [0, end_b) and padding after them (right padding), T a multiple of model.ws_chunk
        end     (B,) slots each row holds after the call (default length + T): a right-padded prefill
                passes the prompt lengths, so the next token overwrites the first padding slot
        window  (B, T) bool, the prefill's SnapKV observation queries (memory/kv_cache.py)
        memory, memory_mask  the episodic read's memory tokens, as in `forward`

        A prefill plus one-token steps give what `forward` gives on the whole sequence (up to float
        rounding and the store's quantisation), with every module on. With the workspace or SSM on,
        a T > 1 call on a non-empty cache runs its tokens one at a time."""
        cfg = self.cfg
        kv = kv or kv_cache.KVSettings()
        rows, t = valid.shape
        if memory is not None:
            check_memory(cfg, rows, memory, memory_mask)
        tokenwise = self.workspace is not None or len(self.ssm) > 0
        if tokenwise and t > 1 and not fresh:
            if layers or window is not None or end is not None:
                raise ValueError("Trunk.extend: with model.workspace or model.ssm_layers on, a multi-token call after "
                                 "the prefill runs token by token and takes no layers/window/end; pass one token")
            return self._extend_tokenwise(embeddings, positions, valid, cache, kv, memory, memory_mask)
        start = cache.length
        end = start + t if end is None else end
        cache_valid = jax.vmap(lambda a, new, s: jax.lax.dynamic_update_slice_in_dim(a, new, s, axis=0))(
            cache.valid, valid, start)
        if fresh:
            mask = attention_mask(valid.astype(jnp.int32))
        else:
            slots = jnp.arange(cache.valid.shape[1])
            last = start[:, None] + jnp.arange(t)[None, :]  # (B, T): the newest slot each token may see
            mask = ((slots[None, None, :] <= last[..., None]) & cache_valid[:, None, :])[:, None]
        caches = [LayerCache(jax.tree.map(lambda a, i=i: a[i], cache.store), start, end, kv, fresh, window)
                  for i in range(cfg.n_layers)]
        run = self._run(embeddings.astype(jnp.float32), positions, mask, valid.astype(jnp.int32),
                        mode="prefill" if fresh else "step", memory=memory, memory_mask=memory_mask, caches=caches,
                        carry=cache, lengths=end)
        state = run["state"]
        new = KVCache(jax.tree.map(lambda *a: jnp.stack(a), *run["stores"]), cache_valid, end,
                      state.get("ws", cache.ws), state.get("ws_buffer", cache.ws_buffer),
                      tuple(state.get("ssm", cache.ssm)))
        result = (self.final_norm(run["x"]), new)
        if layers:
            result += (jnp.stack(run["stream"]),)
        if window is not None:
            result += (jnp.stack(run["votes"]),)
        return result

    def _extend_tokenwise(self, embeddings, positions, valid, cache, kv, memory, memory_mask):
        """A T > 1 call after the prefill with the workspace or SSM experts on: one `extend` per token."""
        def one(carry, xs):
            e, p, v = xs
            h, carry = self.extend(e[:, None], p[:, None], v[:, None], carry, kv=kv, memory=memory,
                                   memory_mask=memory_mask)
            return carry, h[:, 0]

        cache, hs = jax.lax.scan(one, cache, (jnp.moveaxis(embeddings, 1, 0), positions.T, valid.T))
        return jnp.moveaxis(hs, 0, 1), cache

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
