"""AdamW with linear warm-up and cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from quietreasoning.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def decay_mask(params):
    """Decay matrices only: norms (vectors) keep their scale."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                    weight_decay=t.weight_decay, mask=decay_mask),
    )
