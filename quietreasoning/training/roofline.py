"""The machine's measured matmul roof: what MFU divides by.

Measured in the same process as the model, every time: shared machines are noisy, so only
ratios taken in one run compare.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_roof(n: int = 2048, dtype=jnp.bfloat16, reps: int = 5, device=None) -> float:
    """Median FLOP/s of an (n, n) @ (n, n) jitted matmul on one device, `dtype` inputs with
    float32 accumulation (the trunk's compute path)."""
    device = device or jax.devices()[0]
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
