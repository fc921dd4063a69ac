"""The small pieces every model module shares: named parameters, the mixed-precision matmul,
RMSNorm. Parameters are stored in `param_dtype` and carry logical axis names (sharding is applied
by the caller's jit through training/sharding.py, so no mesh is needed to build a module);
matmuls take `compute_dtype` inputs and accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def named(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    """`value` as a parameter carrying the logical axis `names`."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float, dtype) -> nnx.Param:
    """A normal-initialised parameter carrying logical axis names; sharding is applied by the
    caller's jit (training/sharding.py), so no mesh is needed to build the module."""
    return named(nnx.initializers.normal(std)(rngs.params(), shape, dtype), names)


def matmul(x: jax.Array, w: jax.Array, dtype, spec: str = "...d,df->...f") -> jax.Array:
    """`compute_dtype` inputs, float32 accumulation and output."""
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = named(jnp.ones((dim,), dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32)
