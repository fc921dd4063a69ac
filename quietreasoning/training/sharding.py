"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`embed`, `mlp`, ...). `RULES` says which mesh axis each name
is split over; a name absent from the table (or mapped to None) is replicated. A new mesh
shape is a config change: sizes come from `mesh.*` in the config, with -1 filling the rest.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from quietreasoning.config import Config, ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Activations' batch is split over every data-parallel axis;
# parameters are split over `fsdp` on their model dimension and over `tensor` on the
# dimension tensor parallelism cuts (heads, kv, mlp, vocab).
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": None,
    "length": None,
    # latent workspace: slot width is small next to d_model; heads split like attention heads
    "slots": None,
    "ws_embed": None,
    "ws_heads": ("tensor",),
    # selective SSM experts: the inner channels split like the MLP
    "ssm_inner": ("tensor",),
    "ssm_state": None,
    "ssm_rank": None,
    "conv": None,
    # router and adapters: tiny, replicated
    "gates": None,
    "adapters": None,
    "lora": None,
    # product-key memory: the query width splits like attention heads; the sub-key tables are
    # small and replicated; the value table (3b: 4M rows) splits its rows over fsdp and tensor
    # (a read gathers the local rows and sums over the shards, never the whole table)
    "pkm_query": ("tensor",),
    "pkm_keys": None,
    "pkm_values": ("fsdp", "tensor"),
}


def logical_to_spec(names: tuple[str | None, ...]) -> P:
    """PartitionSpec for a tuple of logical names; a mesh axis may be used only once."""
    used: set[str] = set()
    out = []
    for name in names:
        axes = RULES.get(name) if name else None
        if axes:
            clash = used.intersection(axes)
            if clash:
                raise ValueError(f"logical axes {names} map mesh axis {sorted(clash)} twice; fix RULES")
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (all devices by default), Auto axis types,
    laid out by `jax.make_mesh` to follow the accelerator topology."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.mesh_shape(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _shards(spec: P, axis_sizes: dict[str, int]) -> list[int]:
    """How many ways each dimension of a `spec`-laid-out array is split."""
    return [math.prod(axis_sizes[a] for a in ((axes,) if isinstance(axes, str) else (axes or ())))
            for axes in spec]


def leaf_specs(tree) -> list[P]:
    """PartitionSpec of each array leaf of `tree` (flatten order), from the logical names in its
    variable's `out_sharding` metadata; leaves outside a named variable (counters) are replicated."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    specs = []
    for node in nodes:
        names = node.get_metadata().get("out_sharding") if isinstance(node, nnx.Variable) else None
        specs.append(logical_to_spec(tuple(names)) if names else P())
    return specs


def check_divisible(tree, axis_sizes: dict[str, int]) -> None:
    """Every sharded dimension must divide by its mesh axes: one clear error naming the parameter."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for (path, leaf), spec in zip(leaves, leaf_specs(tree)):
        for dim, axes, n in zip(leaf.shape, spec, _shards(spec, axis_sizes)):
            if dim % n:
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                raise ConfigError(
                    f"mesh: parameter {name} dimension {dim} does not divide over mesh axes "
                    f"{axes} of size {n}; change mesh.* or the model size")


def shardings(mesh: Mesh, tree):
    """A tree shaped like `tree` (variables kept) holding each leaf's NamedSharding."""
    return jax.tree.unflatten(jax.tree.structure(tree), [NamedSharding(mesh, s) for s in leaf_specs(tree)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a (B, T) batch split over every data-parallel axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def bytes_per_device(tree, axis_sizes: dict[str, int]) -> int:
    """Bytes one device holds for the (abstract) `tree` laid out by its logical names (ceil per shard)."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), leaf_specs(tree)):
        shape = [-(-dim // n) for dim, n in zip(leaf.shape, _shards(spec, axis_sizes))]
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
