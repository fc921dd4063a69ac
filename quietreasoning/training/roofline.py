"""The machine's measured matmul roof: what MFU divides by.

Measured in the same process as the model, every time: shared machines are noisy, so only
ratios taken in one run compare. The roof is the faster of two input dtypes (float32, and
bfloat16 with float32 accumulation): which one wins depends on the CPU (bf16 wins only with
native bf16 instructions), and MFU is measured against the best the machine can do.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

ROOF_DTYPES = ("float32", "bfloat16")


def measure_matmul_roof(n: int = 2048, dtype=jnp.bfloat16, reps: int = 5) -> float:
    """Median FLOP/s of an (n, n) @ (n, n) jitted matmul on one of this process's devices,
    `dtype` inputs with float32 accumulation (the trunk's compute path)."""
    device = jax.local_devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def matmul_roofs(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """FLOP/s per input dtype (float32 accumulation throughout)."""
    return {d: measure_matmul_roof(n, jnp.dtype(d), reps) for d in ROOF_DTYPES}


def machine_roof(n: int = 2048, reps: int = 5) -> float:
    """The best matmul FLOP/s of one device over the input dtypes."""
    return max(matmul_roofs(n, reps).values())
