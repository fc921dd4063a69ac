"""AdamW with linear warm-up and cosine decay, global-norm clipping and a weight-decay mask.

`train.trainable=adapters` freezes everything outside the blocks' `adapters` (model/adapters.py):
frozen parameters get a zero update and no Adam moments, and clipping sees only the adapters.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from quietreasoning.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def _under(path, name: str) -> bool:
    """Whether a pytree path passes through the attribute / key `name`."""
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)


def decay_mask(params):
    """Decay matrices only: norms and IA3 scales (vectors, stacked one per adapter) keep their scale,
    and so do PKM value rows (a row not read for a while would otherwise decay away)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not _under(path, "ia3") and not _under(path, "slot_values"), params)


def adapter_labels(params):
    """'adapters' for each parameter under an `adapters` attribute, 'frozen' for the rest; one
    label per variable (a prefix of the params tree), so frozen ones are dropped whole."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "adapters" if _under(path, "adapters") else "frozen",
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                    weight_decay=t.weight_decay, mask=decay_mask),
    )
    if t.trainable == "adapters":
        return optax.multi_transform({"adapters": adamw, "frozen": optax.set_to_zero()}, adapter_labels)
    return adamw
