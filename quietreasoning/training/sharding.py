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
    """The (data, fsdp, tensor) mesh over `devices` (all devices by default), Auto axis types."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.mesh.shape(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_specs(state: nnx.State) -> nnx.State:
    """PartitionSpec per variable from its `out_sharding` logical names (replicated if none)."""
    def spec(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        return logical_to_spec(tuple(names)) if names else P()
    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_divisible(state: nnx.State, specs, axis_sizes: dict[str, int]) -> None:
    """Every sharded dimension must divide by its mesh axes: one clear error naming the parameter."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(leaves, spec_leaves):
        for dim, axes in zip(leaf.shape, spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            n = math.prod(axis_sizes[a] for a in axes)
            if dim % n:
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                raise ConfigError(
                    f"mesh: parameter {name} dimension {dim} does not divide over mesh axes "
                    f"{axes} of size {n}; change mesh.* or the model size")


def shardings(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a (B, T) batch split over every data-parallel axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def bytes_per_device(abstract_tree, specs, axis_sizes: dict[str, int]) -> int:
    """Bytes one device holds for `abstract_tree` laid out by `specs` (ceil per shard)."""
    total = 0
    leaves = jax.tree.leaves(abstract_tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(leaves, spec_leaves):
        shape = list(leaf.shape)
        for i, axes in enumerate(spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            n = math.prod(axis_sizes[a] for a in axes)
            shape[i] = -(-shape[i] // n)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
