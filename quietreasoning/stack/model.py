"""The idea-bottleneck stack: text -> one idea vector -> a latent reasoning core -> text.

  encoder    a project trunk run bidirectionally (`causal=False`) over "<task>: <input>"
  pooling    mean over non-pad tokens, or attention pooling (`pool_queries` learned queries each
             pool the tokens, their outputs concatenated: a simplified pooling by multihead attention, Lee et al. 2019)
  compress   an MLP from the pooled width to `latent_dim`: the idea vector z_in
  middle     the latent reasoning core, z_in -> z_out: residual MLP blocks, a tiny transformer over
             `slots` latent slots (the trunk's own blocks at latent width, unmasked), or a GRU cell
             stepped `middle_layers` times with z_in as its input at every step
  expand     an MLP from z_out to `prefix_len` soft-prompt embeddings in the decoder's embedding space
  decoder    a second trunk, causal, reading the prefix and then the target teacher-forced:
             logits at token position i predict target token i (cross-entropy on target tokens only)

Every parameter carries logical axis names (`latent`, `pooled`, `queries` and `prefix` are
replicated by the rules table); matmuls take the trunk's compute dtype and accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, named, param
from quietreasoning.model.trunk import Block, Trunk, attention_mask
from quietreasoning.stack.config import StackConfig


class Dense(nnx.Module):
    """x W + b, W normal with std 1/sqrt(d_in) (unit-scale outputs for unit-scale inputs); the
    trunk config `m` gives the parameter and compute dtypes."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], m: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(m.compute_dtype)
        self.w = param(rngs, (d_in, d_out), names, 1.0 / math.sqrt(d_in), jnp.dtype(m.param_dtype))
        self.b = named(jnp.zeros((d_out,), jnp.dtype(m.param_dtype)), names[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.w[...], self.dtype) + self.b[...]


class MLP(nnx.Module):
    """Dense -> GELU -> Dense."""

    def __init__(self, d_in: int, hidden: int, d_out: int, names: tuple[str, str], m: ModelConfig, *,
                 rngs: nnx.Rngs):
        self.up = Dense(d_in, hidden, (names[0], "mlp"), m, rngs=rngs)
        self.down = Dense(hidden, d_out, ("mlp", names[1]), m, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class AttentionPool(nnx.Module):
    """Each of `queries` learned queries q pools the tokens by softmax over non-pad tokens of
    (h . q) / sqrt(D); the pooled vectors are concatenated: (B, queries * D)."""

    def __init__(self, m: ModelConfig, queries: int, *, rngs: nnx.Rngs):
        self.query = param(rngs, (queries, m.d_model), ("queries", "embed"), 1.0, jnp.dtype(m.param_dtype))

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        scores = jnp.einsum("btd,qd->bqt", h, self.query[...]) / math.sqrt(h.shape[-1])
        weights = jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bqt,btd->bqd", weights, h).reshape(h.shape[0], -1)


def mean_pool(h: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class ResidualMLP(nnx.Module):
    """`layers` blocks z + MLP(RMSNorm(z))."""

    def __init__(self, s: StackConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        self.norms = nnx.List([RMSNorm(s.latent_dim, m.norm_eps, jnp.dtype(m.param_dtype))
                               for _ in range(s.middle_layers)])
        self.mlps = nnx.List([MLP(s.latent_dim, s.hidden, s.latent_dim, ("latent", "latent"), m, rngs=rngs)
                              for _ in range(s.middle_layers)])

    def __call__(self, z: jax.Array) -> jax.Array:
        for norm, mlp in zip(self.norms, self.mlps):
            z = z + mlp(norm(z))
        return z


class SlotTransformer(nnx.Module):
    """z spread over `slots` slots (a linear map plus learned slot embeddings), `layers` trunk
    blocks at latent width with every slot seeing every other, then the mean of the normed slots."""

    def __init__(self, s: StackConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        self.slots = s.slots
        block_cfg = dataclasses.replace(m, d_model=s.latent_dim, n_heads=s.middle_heads, n_kv_heads=s.middle_heads,
                                        head_dim=0, d_ff=s.hidden, n_layers=s.middle_layers, adapters=())
        self.spread = Dense(s.latent_dim, s.slots * s.latent_dim, ("latent", "slots"), m, rngs=rngs)
        self.slot_embed = param(rngs, (s.slots, s.latent_dim), ("slots", "latent"), 1.0, jnp.dtype(m.param_dtype))
        self.blocks = nnx.List([Block(block_cfg, rngs=rngs) for _ in range(s.middle_layers)])
        self.norm = RMSNorm(s.latent_dim, m.norm_eps, jnp.dtype(m.param_dtype))

    def __call__(self, z: jax.Array) -> jax.Array:
        b = z.shape[0]
        x = self.spread(z).reshape(b, self.slots, -1) + self.slot_embed[...]
        segments = jnp.ones((b, self.slots), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(self.slots), (b, self.slots))
        mask = attention_mask(segments, causal=False)
        for block in self.blocks:
            x = block(x, positions, mask)
        return jnp.mean(self.norm(x), axis=1)


class GRUSteps(nnx.Module):
    """h_0 = z_in; h_k = GRU(z_in, h_{k-1}) for k = 1..`layers`; z_out = h_K."""

    def __init__(self, s: StackConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        self.steps = s.middle_layers
        self.x_gates = Dense(s.latent_dim, 3 * s.latent_dim, ("latent", "gates"), m, rngs=rngs)
        self.h_gates = Dense(s.latent_dim, 3 * s.latent_dim, ("latent", "gates"), m, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        xr, xu, xn = jnp.split(self.x_gates(z), 3, axis=-1)
        h = z
        for _ in range(self.steps):
            hr, hu, hn = jnp.split(self.h_gates(h), 3, axis=-1)
            reset, update = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xu + hu)
            h = (1.0 - update) * jnp.tanh(xn + reset * hn) + update * h
        return h


class IdeaStack(nnx.Module):
    """The whole stack for stack settings `s` and the trunks' model config `m` (both trunks alike)."""

    def __init__(self, s: StackConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        self.prefix_len, self.d_model = s.prefix_len, m.d_model
        self.encoder = Trunk(m, rngs=rngs)
        self.decoder = Trunk(m, rngs=rngs)
        self.pool = AttentionPool(m, s.pool_queries, rngs=rngs) if s.pooling == "attention" else None
        pooled = m.d_model * (s.pool_queries if s.pooling == "attention" else 1)
        self.compress = MLP(pooled, s.hidden, s.latent_dim, ("pooled", "latent"), m, rngs=rngs)
        middle = {"mlp": ResidualMLP, "transformer": SlotTransformer, "gru": GRUSteps}[s.middle]
        self.middle = middle(s, m, rngs=rngs)
        self.expand = MLP(s.latent_dim, s.hidden, s.prefix_len * m.d_model, ("latent", "prefix"), m, rngs=rngs)

    def encode(self, tokens: jax.Array, segments: jax.Array) -> jax.Array:
        """The idea vector z_in (B, latent_dim) of tokens (B, T) with segments (B, T) (0 = padding)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, _ = self.encoder.forward(tokens, segments, positions, causal=False)
        mask = segments > 0
        pooled = mean_pool(h, mask) if self.pool is None else self.pool(h, mask)
        return self.compress(pooled)

    def prefix(self, z_in: jax.Array) -> jax.Array:
        """The decoder's soft prompt (B, prefix_len, D) for idea vectors z_in: expand(middle(z_in))."""
        return self.expand(self.middle(z_in)).reshape(z_in.shape[0], self.prefix_len, self.d_model)

    def decode_logits(self, prefix: jax.Array, tokens: jax.Array, segments: jax.Array) -> jax.Array:
        """Logits (B, T, V) at the token positions of [prefix; tokens] (the prefix sees only itself)."""
        b, p = prefix.shape[:2]
        x = jnp.concatenate([prefix, self.decoder.embed_tokens(tokens)], axis=1)
        segs = jnp.concatenate([jnp.ones((b, p), segments.dtype), segments], axis=1)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), segs.shape)
        h, _ = self.decoder.forward(None, segs, positions, embeddings=x, causal=True)
        return self.decoder.logits(h[:, p:])

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Teacher-forced logits (B, Td, V) for a batch of data.encode's arrays."""
        z = self.encode(batch["enc_tokens"], batch["enc_segments"])
        return self.decode_logits(self.prefix(z), batch["dec_inputs"], batch["dec_mask"])

    def generate(self, z_in: jax.Array, length: int, bos_id: int) -> jax.Array:
        """Greedy decoding (B, length) from idea vectors; each step reruns the decoder over the
        prefix and the tokens so far (no cache: the sequences are short)."""
        prefix = self.prefix(z_in)
        b = z_in.shape[0]
        tokens = jnp.zeros((b, length + 1), jnp.int32).at[:, 0].set(bos_id)
        segments = jnp.ones((b, length), jnp.int32)

        def step(i, tokens):
            logits = self.decode_logits(prefix, tokens[:, :-1], segments)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), axis=-1)
            return tokens.at[:, i + 1].set(nxt.astype(jnp.int32))

        return jax.lax.fori_loop(0, length, step, tokens)[:, 1:]
