"""The router: a small planner that reads the workspace summary of each chunk and emits gates
that turn modules up or down for the tokens of that chunk.

Gates, per example and per chunk (so they stay causal: chunk c's gates come from the state
that chunks < c wrote):
  ssm       (B, C, n_experts)   sigmoid: the weight of each SSM expert's residual update
  pkm       (B, C, 1)           sigmoid: product-key memory reads
  episodic  (B, C, 1)           sigmoid: episodic-store reads
  knn       (B, C, 1)           kNN-LM interpolation weight lambda in [0, KNN_MAX_LAMBDA]
  adapters  (B, C, n_adapters)  softmax: the mixture over the adapter bank
A gate for a module that is not built is still produced (and regularised) but read by nothing.

Two terms keep it from collapsing: a z-loss on the logits (they stay small, so gates stay
trainable), and an entropy floor: when the batch's mean usage of a gate (its average over
examples and chunks) has entropy below `losses.router_entropy_floor` of the maximum, the
shortfall is penalised, so the router cannot send every input the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from quietreasoning.config import ModelConfig
from quietreasoning.model.layers import RMSNorm, matmul, named, param

KNN_MAX_LAMBDA = 0.5  # the seed's kNN-LM interpolation range [0, 0.5]


def gate_widths(cfg: ModelConfig) -> dict[str, int]:
    return {"ssm": max(len(cfg.ssm_layers), 1), "pkm": 1, "episodic": 1, "knn": 1,
            "adapters": max(len(cfg.adapters), 1)}


SOFTMAX_GATES = ("adapters",)


def router_param_count(cfg: ModelConfig) -> int:
    if not cfg.router:
        return 0
    w, hdn, n = cfg.ws_dim, cfg.router_hidden, sum(gate_widths(cfg).values())
    return w + w * hdn + hdn + hdn * n + n


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.widths = tuple(gate_widths(cfg).items())  # (name, width) pairs: a module's static fields stay hashable
        n = sum(width for _, width in self.widths)
        self.norm = RMSNorm(cfg.ws_dim, cfg.norm_eps, pdt)
        self.w_in = param(rngs, (cfg.ws_dim, cfg.router_hidden), ("ws_embed", "gates"), 1 / math.sqrt(cfg.ws_dim), pdt)
        self.b_in = named(jnp.zeros((cfg.router_hidden,), pdt), ("gates",))
        self.w_out = param(rngs, (cfg.router_hidden, n), ("gates", None), cfg.init_std, pdt)
        self.b_out = named(jnp.zeros((n,), pdt), (None,))

    def __call__(self, summary: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """summary (B, C, ws_dim) -> (gates, logits), each {name: (B, C, width)} in float32."""
        h = jax.nn.gelu(matmul(self.norm(summary), self.w_in[...], self.dtype) + self.b_in[...])
        flat = matmul(h, self.w_out[...], self.dtype) + self.b_out[...]
        logits, gates, start = {}, {}, 0
        for name, width in self.widths:
            z = flat[..., start:start + width]
            start += width
            logits[name] = z
            if name in SOFTMAX_GATES:
                gates[name] = jax.nn.softmax(z, axis=-1)
            elif name == "knn":
                gates[name] = KNN_MAX_LAMBDA * jax.nn.sigmoid(z)
            else:
                gates[name] = jax.nn.sigmoid(z)
        return gates, logits
