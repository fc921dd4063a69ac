"""Auxiliary losses of the model modules, one function per term (the LM loss is in train_step.py).

Latent workspace (model/workspace.py), weights in `losses.ws_*`:
  next_latent_loss     MSE of the predictor's output on states[c] against stop_gradient(states[c + 1])
  sparsity_loss        L1 (mean) of the slot-attention weights: each slot takes few tokens
  orthogonality_loss   ||S S^T - I||^2 (mean) on the L2-normalised slots: slots hold different things
  infonce_loss         InfoNCE across the batch between the workspace summary and the answer embedding
  ponder_loss          (batch-mean ACT expected steps - ws_halt_target)^2
`workspace_losses` computes them all from the workspace's aux and states and returns the weighted
sum with each term (and the halting average) for logging. Every term is a float32 scalar, >= 0.

InfoNCE, causally: for a row with an answer, the summary is the one of the state read by the chunk
where the answer starts (states[c_a], written by chunks < c_a only, so before any answer token);
the target is the mean of the answer tokens' input embeddings, under stop-gradient. Rows are left
out when they have no answer, when the answer starts in chunk 0 (states[0] is the same initial
state for every row) or, given segment ids, when states[c_a] belongs to another packed document.

Router (model/router.py), weights `losses.router_z` and `losses.router_entropy`: a z-loss on the
gate logits and the squared shortfall of each gate's usage entropy below the floor; `router_losses`
also returns usage statistics (mean, std, histogram) per gate.

`module_losses` adds up whatever the model's forward pass reported (only modules that are on).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from quietreasoning.config import LossesConfig, ModelConfig
from quietreasoning.model.router import KNN_MAX_LAMBDA, SOFTMAX_GATES

INFONCE_TEMPERATURE = 0.1  # cosine-similarity logits are divided by this


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_latent_loss(aux: dict[str, jax.Array]) -> jax.Array:
    """Mean squared error between the predictor's output on states[c] and stop_gradient(states[c + 1]),
    each slot RMS-normalised first (the slots' scale drifts as the residual updates add up; the
    term asks for the direction of the next state, and stays O(1)), over chunk pairs where
    states[c + 1] was written from states[c] (`ws_next_mask`)."""
    def unit(x):
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    err = jnp.square(unit(aux["ws_next_pred"]) - jax.lax.stop_gradient(unit(aux["ws_next_target"])))
    return _masked_mean(jnp.mean(err, axis=(-2, -1)), aux["ws_next_mask"])


def sparsity_loss(aux: dict[str, jax.Array]) -> jax.Array:
    """Mean L1 of the slot-attention weights over the chunks that wrote. The softmax runs over the
    slots and a null option, so this is the share of the tokens that the slots take, over S:
    lowering it makes each slot take few tokens."""
    return _masked_mean(aux["ws_attn_l1"], aux["ws_chunk_mask"])


def orthogonality_loss(states: jax.Array) -> jax.Array:
    """Mean over entries of (S_n S_n^T - I)^2, S_n the L2-normalised slots of each state (..., S, W);
    0 for orthonormal slots."""
    s = states.astype(jnp.float32)
    s = s * jax.lax.rsqrt(jnp.sum(jnp.square(s), axis=-1, keepdims=True) + 1e-12)
    gram = jnp.einsum("...sw,...tw->...st", s, s)
    return jnp.mean(jnp.square(gram - jnp.eye(s.shape[-2], dtype=jnp.float32)))


def answer_targets(answer_mask: jax.Array, embeddings: jax.Array, chunk: int,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From answer_mask (B, T) (1 on answer tokens) and the input embeddings (B, T, D):
    (answer embedding (B, D): mean of the answer tokens' embeddings, stop-gradient;
     answer chunk (B,) int: the chunk of the first answer token;
     has_answer (B,) bool: the row can take part in InfoNCE, see the module docstring).
    With segment_ids, only the answer tokens of the first answer's document count."""
    answer = answer_mask > 0
    first = jnp.argmax(answer, axis=1)
    answer_chunk = first // chunk
    has_answer = jnp.any(answer, axis=1) & (answer_chunk > 0)
    if segment_ids is not None:
        seg_of = lambda i: jnp.take_along_axis(segment_ids, i[:, None], axis=1)[:, 0]
        answer_seg = seg_of(first)
        answer = answer & (segment_ids == answer_seg[:, None])
        has_answer &= seg_of(jnp.maximum(answer_chunk * chunk - 1, 0)) == answer_seg  # states[c_a]'s owner
    weights = answer.astype(jnp.float32)
    total = jnp.einsum("bt,btd->bd", weights, jax.lax.stop_gradient(embeddings).astype(jnp.float32))
    embedding = total / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
    return embedding, answer_chunk, has_answer


def infonce_loss(summary: jax.Array, answer_embedding: jax.Array, has_answer: jax.Array,
                 temperature: float = INFONCE_TEMPERATURE) -> jax.Array:
    """InfoNCE across the batch: row i's (projected) workspace summary (B, D) must pick its own
    answer embedding (B, D) among those of the other rows with answers (cosine similarity /
    temperature, cross-entropy on the diagonal). Rows without an answer are neither queries nor
    negatives; 0 when fewer than 2 rows have answers. The answer embedding is taken as given
    (stop-gradient): only the summary side trains."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)

    q, a = unit(summary), unit(jax.lax.stop_gradient(answer_embedding))
    logits = (q @ a.T) / temperature
    logits = jnp.where(has_answer[None, :], logits, -1e9)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
    rows = has_answer.astype(jnp.float32)
    n = jnp.sum(rows)
    return jnp.where(n >= 2, jnp.sum(ce * rows) / jnp.maximum(n, 1.0), 0.0)


def ponder_loss(expected_steps: jax.Array, target: float, mask: jax.Array | None = None) -> jax.Array:
    """(mean expected ACT steps - target)^2; the mean runs over the chunks in `mask` (all when None)."""
    mean = jnp.mean(expected_steps) if mask is None else _masked_mean(expected_steps, mask)
    return jnp.square(mean - target)


def workspace_losses(aux: dict[str, jax.Array], states: jax.Array, weights: LossesConfig, cfg: ModelConfig, *,
                     answer_mask: jax.Array | None = None, embeddings: jax.Array | None = None,
                     segment_ids: jax.Array | None = None,
                     temperature: float = INFONCE_TEMPERATURE) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The workspace's weighted auxiliary loss and its parts.

    aux, states: what `Workspace.write` returned. answer_mask (B, T) and embeddings (B, T, D) (the
    input token embeddings, e.g. trunk.embed[inputs]): InfoNCE is 0 when either is None. Pass the
    batch's segment_ids so that InfoNCE skips answers whose chunk state belongs to another document.
    Returns (total, metrics) with metrics ws_next_latent, ws_sparsity, ws_orthogonality,
    ws_infonce, ws_infonce_rows, ws_ponder, ws_halting_avg and ws_total (all float32 scalars)."""
    mask = aux["ws_chunk_mask"]
    terms = {
        "ws_next_latent": next_latent_loss(aux),
        "ws_sparsity": sparsity_loss(aux),
        "ws_orthogonality": orthogonality_loss(states),
        "ws_ponder": ponder_loss(aux["ws_expected_steps"], cfg.ws_halt_target, mask),
    }
    if answer_mask is not None and embeddings is not None:
        answer, chunk, has_answer = answer_targets(answer_mask, embeddings, cfg.ws_chunk, segment_ids)
        query = jnp.take_along_axis(aux["ws_answer_query"], chunk[:, None, None], axis=1)[:, 0]
        terms["ws_infonce"] = infonce_loss(query, answer, has_answer, temperature)
        rows = jnp.sum(has_answer.astype(jnp.float32))
    else:
        terms["ws_infonce"] = rows = jnp.zeros((), jnp.float32)
    total = (weights.ws_next_latent * terms["ws_next_latent"] + weights.ws_sparsity * terms["ws_sparsity"]
             + weights.ws_orthogonality * terms["ws_orthogonality"] + weights.ws_infonce * terms["ws_infonce"]
             + weights.ws_ponder * terms["ws_ponder"])
    metrics = {**terms, "ws_infonce_rows": rows,
               "ws_halting_avg": _masked_mean(aux["ws_expected_steps"], mask), "ws_total": total}
    return total, metrics


# --- router (model/router.py) ----------------------------------------------------------------------

HIST_BINS = 10


def _usage_entropy(name: str, gates: jax.Array, mask: jax.Array) -> jax.Array:
    """Entropy of the batch-mean usage of one gate, as a fraction of its maximum: categorical for
    softmax gates, per-unit Bernoulli (averaged over units) for sigmoid gates."""
    weight = mask[..., None]
    mean = jnp.sum(gates * weight, axis=(0, 1)) / jnp.maximum(jnp.sum(weight), 1.0)
    if name in SOFTMAX_GATES:
        width = mean.shape[-1]
        if width == 1:
            return jnp.ones((), jnp.float32)
        return -jnp.sum(mean * jnp.log(mean + 1e-9)) / math.log(width)
    p = mean / (KNN_MAX_LAMBDA if name == "knn" else 1.0)
    bern = -(p * jnp.log(p + 1e-9) + (1 - p) * jnp.log(1 - p + 1e-9)) / math.log(2)
    return jnp.mean(bern)


def router_losses(gates: dict[str, jax.Array], logits: dict[str, jax.Array], mask: jax.Array,
                  z_weight: float, entropy_weight: float, floor: float):
    """(weighted total, metrics): z-loss, entropy-floor shortfall, and per-gate usage statistics
    (mean, std and a 10-bin histogram over examples and chunks) for the logs. `mask` (B, C) marks
    chunks that hold tokens."""
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    def z_of(name, lg):  # (B, C): log-partition squared for a softmax, logits squared for sigmoids
        return jnp.square(jax.nn.logsumexp(lg, axis=-1)) if name in SOFTMAX_GATES else jnp.sum(jnp.square(lg), -1)

    z = sum(jnp.sum(z_of(name, lg) * mask) for name, lg in logits.items()) / denom
    shortfall = sum(jnp.square(jax.nn.relu(floor - _usage_entropy(name, g, mask))) for name, g in gates.items())
    metrics = {"router_z": z, "router_entropy_shortfall": shortfall}
    for name, g in gates.items():
        w = mask[..., None] * jnp.ones_like(g)
        mean = jnp.sum(g * w) / jnp.maximum(jnp.sum(w), 1.0)
        metrics[f"router_{name}_mean"] = mean
        metrics[f"router_{name}_std"] = jnp.sqrt(jnp.sum(jnp.square(g - mean) * w) / jnp.maximum(jnp.sum(w), 1.0))
        top = KNN_MAX_LAMBDA if name == "knn" else 1.0
        bins = jnp.clip((g / top * HIST_BINS).astype(jnp.int32), 0, HIST_BINS - 1)
        metrics[f"router_{name}_hist"] = jnp.sum(jax.nn.one_hot(bins, HIST_BINS) * w[..., None], axis=(0, 1, 2))
        if name in SOFTMAX_GATES:
            metrics[f"router_{name}_usage"] = jnp.sum(g * w, axis=(0, 1)) / jnp.maximum(jnp.sum(mask), 1.0)
    return z_weight * z + entropy_weight * shortfall, metrics


def retrieval_supervision_loss(logits: jax.Array, mask: jax.Array, retrieve: jax.Array):
    """(loss, metrics): binary cross-entropy of the router's episodic gate toward `retrieve` (B, 1),
    1 where the row's question is about a rare entity (the staged runner's retrieval_supervision
    stage: read the episodic store for the long tail, not for what the weights already hold;
    adaptive retrieval, Mallen et al. 2023). `logits` (B, C, 1) are the gate's logits per chunk and
    `mask` (B, C) marks chunks that hold tokens. Chunk 0 is left out: its gate comes from the
    workspace state before any token was written (causal), the same for every input."""
    z = logits[..., 0]
    w = mask.astype(jnp.float32).at[:, 0].set(0.0)
    target = retrieve.astype(jnp.float32).reshape(-1, 1)
    bce = jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))
    loss = jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)
    decided = (z > 0) == (target > 0.5)
    return loss, {"retrieval_bce": loss,
                  "retrieval_gate_acc": jnp.sum(decided * w) / jnp.maximum(jnp.sum(w), 1.0)}


def module_losses(aux: dict, batch: dict[str, jax.Array], cfg, embeddings: jax.Array | None):
    """(weighted total, metrics) of every auxiliary term the forward pass reported in `aux`
    (Trunk.forward); 0 and no metrics when no module with losses is on. `cfg` is the full Config."""
    total, metrics = jnp.zeros((), jnp.float32), {}
    if "workspace" in aux:
        ws = aux["workspace"]
        t, m = workspace_losses(ws["aux"], ws["states"], cfg.losses, cfg.model, answer_mask=batch.get("answer_mask"),
                                embeddings=embeddings, segment_ids=batch["segment_ids"])
        total, metrics = total + t, metrics | m
    if "router" in aux:
        r = aux["router"]
        t, m = router_losses(r["gates"], r["logits"], r["mask"], cfg.losses.router_z, cfg.losses.router_entropy,
                             cfg.losses.router_entropy_floor)
        total, metrics = total + t, metrics | m
        if "retrieve" in batch and cfg.losses.router_retrieval:
            t, m = retrieval_supervision_loss(r["logits"]["episodic"], r["mask"], batch["retrieve"])
            total, metrics = total + cfg.losses.router_retrieval * t, metrics | m
    return total, metrics
