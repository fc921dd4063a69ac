"""What a config costs, computed without allocating anything: the dry run's figures."""

from __future__ import annotations

from quietreasoning.config import Config
from quietreasoning.model.trunk import flops_per_token
from quietreasoning.training import sharding
from quietreasoning.training.train_step import abstract_train_state, n_params


def plan(cfg: Config, n_devices: int) -> dict:
    """Exact parameter count (from `jax.eval_shape`), training FLOPs per token, the mesh for
    `n_devices`, and the bytes of params + optimizer state each device holds on that mesh."""
    axis_sizes = cfg.mesh_shape(n_devices)
    _, _, _, abstract = abstract_train_state(cfg)
    sharding.check_divisible(abstract, axis_sizes)
    params_bytes = sharding.bytes_per_device(abstract["params"], axis_sizes)
    opt_bytes = sharding.bytes_per_device(abstract["opt_state"], axis_sizes)
    t = cfg.train
    fpt = flops_per_token(cfg.model, t.seq_len)
    return {
        "params": n_params(abstract),
        "flops_per_token": fpt,
        "flops_per_step": fpt * t.global_batch * t.seq_len,
        "mesh": axis_sizes,
        "devices": n_devices,
        "bytes_per_device": params_bytes + opt_bytes,
        "param_bytes_per_device": params_bytes,
        "optimizer_bytes_per_device": opt_bytes,
        "tokens_per_step": t.global_batch * t.seq_len,
    }
