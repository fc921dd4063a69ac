"""Forward + backward time of one product-key memory layer with 1M slots (1024^2) against a dense
SwiGLU FFN of the same d_model, on the same tokens in one process (target: PKM <= 1.5x the FFN).

Both layers take the preset's d_model and one train batch of tokens (small: 8 x 512 = 4096,
d_model 512, d_ff 1536); the PKM has 1024^2 slots, 4 heads, top-32, key width 256 and value width
256 (the 3b preset's heads, top-k and value width). Forward + backward is the gradient of a fixed
random projection of the output with respect to the input and every parameter, the value table's
dense (N, d_v) gradient included. After one compile call the layers are timed in turns (FFN, PKM,
FFN, ...), so a shared machine's slow minutes hit both alike; each time is the median of its turns.

One more row, outside the ratio: an AdamW update of the value table, which a train step pays on
top of the layer's forward and backward (it is elementwise over all N rows, read or not).

On CPU the PKM's large temporaries (the 1 GiB dense table gradient, the gathered rows) are fresh
mmap'd pages on every call; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment lets glibc
back them with transparent huge pages, which cuts those page faults. The header line records it.

    python bench/pkm_overhead.py                          # small preset, appends to docs/benchmarks.md
    python bench/pkm_overhead.py --runs 3 --no-append model.compute_dtype=float32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import DOC, append_section  # noqa: E402

from quietreasoning.config import load_config  # noqa: E402
from quietreasoning.memory.pkm import ProductKeyMemory  # noqa: E402
from quietreasoning.model.trunk import SwiGLU  # noqa: E402

PKM_1M = ["model.pkm_slots=1048576", "model.pkm_heads=4", "model.pkm_topk=32", "model.pkm_key_dim=256",
          "model.pkm_value_dim=256"]


def forward_backward(module: nnx.Module, x: jax.Array):
    """A no-argument callable running one jitted forward + backward of `module` on `x`: the gradient
    of sum(output * probe) with respect to x and every parameter."""
    graphdef, params = nnx.split(module, nnx.Param)
    probe = jax.random.normal(jax.random.key(1), x.shape)

    def loss(p, x):
        out = nnx.merge(graphdef, p)(x)
        return jnp.sum((out[0] if isinstance(out, tuple) else out) * probe)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: step(params, x)


def adamw_update(table: jax.Array):
    """A no-argument callable running one jitted AdamW update of `table` with a fresh gradient-shaped
    array (the state is donated and carried, as in a train step)."""
    tx = optax.adamw(1e-3, weight_decay=0.0)
    grad = jnp.full(table.shape, 1e-3, table.dtype)
    carry = {"p": table, "s": tx.init(table)}

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(update, donate_argnums=(0, 1))

    def run():
        carry["p"], carry["s"] = step(carry["p"], carry["s"], grad)
        return carry["p"]
    return run


def timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--runs", type=int, default=7, help="timed turns per layer (after one compile call)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--doc", default=DOC)
    p.add_argument("overrides", nargs="*", help="section.key=value on top of the preset and the 1M-slot PKM")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, [*PKM_1M, *args.overrides])
    m, t = cfg.model, cfg.train
    x = jax.random.normal(jax.random.key(0), (t.global_batch, t.seq_len, m.d_model))
    rngs = nnx.Rngs(0)
    ffn, pkm = SwiGLU(m, rngs=rngs), ProductKeyMemory(m, rngs=rngs)
    layers = {"SwiGLU FFN": forward_backward(ffn, x), "PKM": forward_backward(pkm, x)}
    extra = {"AdamW update of the value table": adamw_update(jnp.copy(pkm.slot_values[...]))}
    params = {name: sum(v.size for v in jax.tree.leaves(nnx.state(mod, nnx.Param)))
              for name, mod in (("SwiGLU FFN", ffn), ("PKM", pkm))}
    params["AdamW update of the value table"] = pkm.slot_values[...].size
    calls = {**layers, **extra}
    compile_s = {name: timed(fn) for name, fn in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(args.runs), desc="turns"):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    median = {name: float(np.median(ts)) for name, ts in times.items()}
    base = median["SwiGLU FFN"]
    tokens = t.global_batch * t.seq_len
    lines = [f"d_model {m.d_model}, d_ff {m.d_ff}, {tokens} tokens ({t.global_batch} x {t.seq_len}), compute "
             f"{m.compute_dtype}; PKM {m.pkm_sub_keys}^2 slots, {m.pkm_heads} heads, top-{m.pkm_topk}, key width "
             f"{m.pkm_key_dim}, value width {m.pkm_value_dim}; median of {args.runs} turns; "
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", "",
             "| layer | params | time (ms) | vs SwiGLU | compile (s) |", "|---|---:|---:|---:|---:|"]
    for name in calls:
        vs = f"{median[name] / base:.2f}x" if name in layers else "(not in ratio)"
        lines.append(f"| {name} | {params[name] / 1e6:.1f}M | {median[name] * 1e3:.1f} | {vs} | {compile_s[name]:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_section(args.doc, f"PKM overhead, {args.preset} preset", "bench/pkm_overhead.py", argv, "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
