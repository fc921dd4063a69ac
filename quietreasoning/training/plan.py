"""What a config costs, computed without allocating anything: the dry run's figures.

`plan` answers for a device count: parameters, FLOPs per token, the mesh and the bytes of state
each device holds. `scale_plan` answers for a TPU slice (`--tpu-topology 4x4x4`): whether one
training step fits in a chip's HBM (state, gradients and activations), what to change when it
does not, and how long the config's stage plan takes at a stated MFU. Shapes come from
`jax.eval_shape` and `jax.make_jaxpr`; nothing is allocated or compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import Literal

from quietreasoning.config import STAGES, Config, ConfigError
from quietreasoning.model.trunk import flops_per_token
from quietreasoning.training import sharding
from quietreasoning.training.losses import module_losses
from quietreasoning.training.train_step import abstract_train_state, lm_loss, n_params

GiB = 2**30
GB = 10**9


class TpuChip(NamedTuple):
    peak_flops: float  # bf16 peak FLOP/s of one chip (one JAX device: v4 and v5p run their two cores as one)
    hbm_bytes: int     # HBM of one chip
    dims: int          # slice topology dimensions (AxBxC or AxB)
    max_chips: int     # chips in the largest slice one job may use


# Google Cloud TPU docs, system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# peak bf16 compute per chip and HBM per chip as the pages state them (v4 in GiB, the others in GB),
# 3-D slices for v4 and v5p, 2-D for v5e and v6e; the largest slice: a v4 pod (4096 chips), 96 v5p
# cubes (6144 of the pod's 8960 chips), a v5e or v6e pod (256).
TPU_CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip(275e12, 32 * GiB, 3, 4096),
    "v5e": TpuChip(197e12, 16 * GB, 2, 256),
    "v5p": TpuChip(459e12, 95 * GB, 3, 6144),
    "v6e": TpuChip(918e12, 32 * GB, 2, 256),
}
DEFAULT_GENERATION = "v4"  # the seed's machines (SPEC_FACTS Systems: 8-16 TPU v4 chips)

# A planning figure, not a measurement. MaxText publishes 44-71% MFU for large dense models on TPU
# (v5p 64-71%, v5e 46-67%, v6e 44-50%) with fused attention kernels; this trunk materialises its
# attention scores and runs extra modules, so it plans below that.
DEFAULT_MFU = 0.4

_TOPOLOGY = re.compile(r"(?:(?P<gen>[a-z0-9]+):)?(?P<dims>\d+(?:x\d+)*)")
_TOPOLOGY_HELP = ("expected [GENERATION:]AxBxC (v4, v5p) or GENERATION:AxB (v5e, v6e), e.g. 4x4x4, "
                  "v5p:2x2x4 or v5e:4x4; a bare shape means v4")


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


def parse_topology(text: str) -> tuple[str, int]:
    """(generation, chips) of a TPU slice: "4x4x4" (v4), "v4:4x4x4", "v5p:2x2x4", "v5e:4x4".
    Chips is the product of the dimensions; the shape must have the generation's dimensions and
    fit in the generation's largest slice."""
    m = _TOPOLOGY.fullmatch(text.strip().lower())
    if not m:
        raise ConfigError(f"--tpu-topology {text!r}: {_TOPOLOGY_HELP}")
    gen = m["gen"] or DEFAULT_GENERATION
    if gen not in TPU_CHIPS:
        raise ConfigError(f"--tpu-topology {text!r}: unknown TPU generation {gen!r}; "
                          f"use one of {', '.join(TPU_CHIPS)}, e.g. v5p:2x2x4")
    dims = [int(d) for d in m["dims"].split("x")]
    chip = TPU_CHIPS[gen]
    if len(dims) != chip.dims or min(dims) < 1:
        raise ConfigError(f"--tpu-topology {text!r}: {gen} slices have {chip.dims} positive dimensions; "
                          f"{_TOPOLOGY_HELP}")
    chips = math.prod(dims)
    if chips > chip.max_chips:
        raise ConfigError(f"--tpu-topology {text!r}: {chips} chips exceed the largest {gen} slice "
                          f"({chip.max_chips} chips)")
    return gen, chips


def example_topology(generation: str, chips: int) -> str:
    """A slice shape of `chips` (a power of two) for the generation: the smallest dimension doubles
    first, so 4 -> 2x2x1, 16 -> 2x2x4, 64 -> 4x4x4 (v4) and 16 -> 4x4 (v5e)."""
    dims = [1] * TPU_CHIPS[generation].dims
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    ordered = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]
    return "x".join(map(str, ordered))


def _mesh_for(cfg: Config, chips: int) -> tuple[dict[str, int], str]:
    """The mesh for `chips` and a note when it is not the config's own: a config whose mesh.* fix
    another device count keeps its data and tensor sizes (as far as they divide the chips) and
    fills mesh.fsdp with the rest, as mesh.fsdp=-1 would."""
    m = cfg.mesh
    if m.fixed_devices in (None, chips):
        return cfg.mesh_shape(chips), ""
    data = math.gcd(m.data, chips)
    tensor = math.gcd(m.tensor, chips // data)
    sizes = {"data": data, "fsdp": chips // (data * tensor), "tensor": tensor}
    source = getattr(cfg, "_mesh_source", "mesh")
    note = (f"{source} fixes mesh data {m.data} x fsdp {m.fsdp} x tensor {m.tensor} = {m.fixed_devices} "
            f"devices; for {chips} chips mesh.fsdp fills the rest (as mesh.fsdp=-1 does)")
    if (data, tensor) != (m.data, m.tensor):
        note += f", with data {data} and tensor {tensor} so they divide {chips}"
    return sizes, note


def _step_loss(cfg: Config, graphdef):
    """The train step's loss (training/train_step.py loss_fn, one micro-batch): what the backward
    pass differentiates, so what the forward must keep for it."""
    def loss(params, batch):
        model = nnx.merge(graphdef, params)
        h, aux = model.forward(batch["inputs"], batch["segment_ids"], batch["positions"])
        total, _ = lm_loss(model.logits(h), batch["targets"], batch["loss_mask"], cfg.train.z_loss)
        embeddings = jnp.take(model.embed[...], batch["inputs"], axis=0) if "workspace" in aux else None
        extra, _ = module_losses(aux, batch, cfg, embeddings)
        return total + extra
    return loss


def saved_activation_bytes(cfg: Config, graphdef, params, rows: int) -> int:
    """Bytes the forward pass keeps for the backward pass over `rows` rows of `train.seq_len`
    tokens: the residuals of `jax.vjp` of the step's loss, read off its jaxpr (traced, nothing
    run). Parameters passed through are not counted (they are state); everything else is: with
    model.remat=full the stream entering each block, plus what the modules outside the blocks
    (workspace, SSM experts, PKM) and the head keep, plus the bfloat16 copies of the weights used
    outside the blocks."""
    t = cfg.train
    batch = {k: jax.ShapeDtypeStruct((rows, t.seq_len), jnp.int32)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((rows, t.seq_len), jnp.float32)
    closed, (_, vjp_fn) = jax.make_jaxpr(lambda p, b: jax.vjp(_step_loss(cfg, graphdef), p, b),
                                         return_shape=True)(params, batch)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(vjp_fn))
    inputs = set(jaxpr.invars)
    residuals = {v for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:]
                 if not isinstance(v, Literal) and v not in inputs}
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in residuals)


def block_working_bytes(cfg: Config, rows: int, tensor: int) -> int:
    """Bytes one block needs on top of the saved activations while its backward pass runs, per
    device (heads and the SwiGLU width split over `tensor`; T = train.seq_len, b = rows):

      attention   b * heads * T * T scores (the trunk materialises them, no fused kernel):
                  12 bytes each with remat=full (the recomputed probabilities in float32 and
                  bfloat16, their float32 gradient, the bfloat16 score gradient), 6 bytes otherwise
                  (the probabilities are already among the saved activations)
      matmuls     b * T * ((2 heads + 2 kv_heads) * head_dim + 3 d_ff) float32 outputs (q, k, v,
                  attention output, gate, up, inner): 8 bytes each with remat=full (value and
                  gradient), 4 otherwise
    """
    m, t = cfg.model, cfg.train
    full = m.remat == "full"
    heads, kv = -(-m.n_heads // tensor), -(-m.n_kv_heads // tensor)
    scores = rows * heads * t.seq_len * t.seq_len * (12 if full else 6)
    width = (2 * heads + 2 * kv) * m.resolved_head_dim + 3 * -(-m.d_ff // tensor)
    return scores + rows * t.seq_len * width * (8 if full else 4)


@functools.lru_cache(maxsize=4)
def _traced(cfg: Config) -> tuple[dict, int, int]:
    """(abstract train state, saved activation bytes per row, and independent of the rows): the
    expensive part of a plan, kept for a few configs so planning several slices of one model
    traces it once. The residual sizes are affine in the rows, so two traces give both terms."""
    graphdef, _, _, abstract = abstract_train_state(cfg)
    one, two = (saved_activation_bytes(cfg, graphdef, abstract["params"], rows) for rows in (1, 2))
    return abstract, two - one, 2 * one - two


class _Costs:
    """Per-chip figures of a config for any slice and train.grad_accum without a new trace; the
    state bytes are kept per chip count."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # train.grad_accum changes neither trace: leave it out of the cache key
        key = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
        self.abstract, self.saved_per_row, self.saved_fixed = _traced(key)
        self._state: dict[int, tuple | None] = {}

    def state(self, chips: int) -> tuple | None:
        """(mesh, mesh note, param bytes, optimizer bytes) per device; None when a parameter does
        not split over the mesh."""
        if chips not in self._state:
            try:
                mesh, note = _mesh_for(self.cfg, chips)
                sharding.check_divisible(self.abstract, mesh)
                self._state[chips] = (mesh, note, sharding.bytes_per_device(self.abstract["params"], mesh),
                                      sharding.bytes_per_device(self.abstract["opt_state"], mesh))
            except ConfigError:
                self._state[chips] = None
        return self._state[chips]

    def memory(self, chips: int, grad_accum: int) -> dict | None:
        """Per-device bytes of one step on `chips` at `grad_accum`; None when that run cannot be
        laid out (a parameter or the micro-batch does not split over the mesh)."""
        t, state = self.cfg.train, self.state(chips)
        if state is None:
            return None
        mesh, note, params, opt = state
        data_parallel = mesh["data"] * mesh["fsdp"]
        if t.global_batch % grad_accum or (t.global_batch // grad_accum) % data_parallel:
            return None
        rows = t.global_batch // grad_accum // data_parallel
        grads = params * (2 if grad_accum > 1 else 1)  # float32 like the params; + the accumulator
        saved = self.saved_fixed + rows * self.saved_per_row
        working = block_working_bytes(self.cfg, rows, mesh["tensor"])
        return {
            "mesh": mesh, "mesh_note": note, "grad_accum": grad_accum, "rows_per_device": rows,
            "param_bytes_per_device": params, "optimizer_bytes_per_device": opt,
            "gradient_bytes_per_device": grads, "saved_activation_bytes_per_device": saved,
            "working_bytes_per_device": working, "activation_bytes_per_device": saved + working,
            "bytes_per_device": params + opt + grads + saved + working,
        }

    def fitting_accum(self, chips: int, hbm: int, grad_accum: int, any_accum: bool) -> int | None:
        """The smallest train.grad_accum (`grad_accum`, or with `any_accum` any larger one) at
        which a step on `chips` fits `hbm`; None if none does."""
        last = self.cfg.train.global_batch if any_accum else grad_accum
        for k in range(grad_accum, last + 1):
            mem = self.memory(chips, k)
            if mem is not None and mem["bytes_per_device"] <= hbm:
                return k
        return None

    def smallest_slice(self, chips: int, gen: str, grad_accum: int, any_accum: bool) -> tuple[int, int] | None:
        """(chips, grad_accum) of the smallest power-of-two slice of `gen`, at least `chips`, whose
        step fits (at `grad_accum`, or with `any_accum` the smallest larger one that fits there)."""
        chip = TPU_CHIPS[gen]
        n = 1 << (chips - 1).bit_length()
        while n <= chip.max_chips:
            k = self.fitting_accum(n, chip.hbm_bytes, grad_accum, any_accum)
            if k is not None:
                return n, k
            n *= 2
        return None


def scale_plan(cfg: Config, topology: str, mfu: float = DEFAULT_MFU) -> dict:
    """The config on a TPU slice: mesh, parameters, optimizer bytes, what one training step holds
    per chip, whether that fits the chip's HBM, and the stage plan's duration at `mfu`.

    Per chip = params + optimizer state (exact: the abstract train state laid out on the mesh)
    + gradients (float32 like the params; twice that with train.grad_accum > 1, the accumulator)
    + saved activations (`saved_activation_bytes`: the traced residuals of the step's backward pass
    for the b = global_batch / grad_accum / (data * fsdp) rows a chip holds, counted whole, as if
    replicated over `tensor`: an upper bound when tensor > 1) + one block's backward working set
    (`block_working_bytes`). The modules the config switches on are all counted (the stage plan
    switches some off in early stages); episodic memory passed with the batch is not. XLA can
    rematerialise more to fit, so a figure over HBM means the step would depend on it.

    The mesh is `cfg.mesh_shape(chips)`; a config whose mesh fixes another device count keeps data
    and tensor and fills fsdp (`_mesh_for`, said in "mesh_note"). When the step does not fit:
    "fits_with_grad_accum" is the smallest train.grad_accum that fits this slice; "min_chips" the
    smallest power-of-two slice that fits at the config's grad_accum or, when neither that nor a
    larger grad_accum here does, the smallest that fits at some grad_accum
    ("min_chips_grad_accum"); None where there is none.

    Throughput: tokens/s = mfu * peak FLOP/s per chip * chips / training FLOPs per token (the
    trunk's, `flops_per_token`). Days = the tokens of the stages in stages.run (stages.tokens; the
    seed's plan, SPEC_FACTS Stages: 7e9 + 7e9 + 2e9 + 1e9 + 5e8 = 1.75e10) / tokens/s / 86400."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: model FLOPs utilisation is a fraction in (0, 1], e.g. 0.4")
    gen, chips = parse_topology(topology)
    chip = TPU_CHIPS[gen]
    t = cfg.train
    costs = _Costs(cfg)
    try:
        mesh, _ = _mesh_for(cfg, chips)
        sharding.check_divisible(costs.abstract, mesh)  # names the parameter that does not split
    except ConfigError as e:
        raise ConfigError(f"--tpu-topology {topology}: {e}") from None
    mem = costs.memory(chips, t.grad_accum)
    if mem is None:
        raise ConfigError(
            f"--tpu-topology {topology}: train.global_batch={t.global_batch} / train.grad_accum={t.grad_accum} "
            f"rows per micro-batch do not split over mesh data*fsdp={mesh['data'] * mesh['fsdp']}; "
            f"make them a multiple or pick another slice")
    fits = mem["bytes_per_device"] <= chip.hbm_bytes
    here = bigger = None
    if not fits:
        here = costs.fitting_accum(chips, chip.hbm_bytes, t.grad_accum, any_accum=True)
        bigger = costs.smallest_slice(chips, gen, t.grad_accum, any_accum=False)
        if bigger is None and here is None:
            bigger = costs.smallest_slice(chips, gen, t.grad_accum, any_accum=True)
    fpt = flops_per_token(cfg.model, t.seq_len)
    tokens_per_second = mfu * chip.peak_flops * chips / fpt
    plan_tokens = sum(n for stage, n in zip(STAGES, cfg.stages.tokens) if stage in cfg.stages.run)
    whole = {"data": 1, "fsdp": 1, "tensor": 1}
    return {
        "name": cfg.run.name, "topology": topology, "generation": gen, "chips": chips,
        "params": n_params(costs.abstract),
        "param_bytes": sharding.bytes_per_device(costs.abstract["params"], whole),
        "optimizer_bytes": sharding.bytes_per_device(costs.abstract["opt_state"], whole),
        **mem,
        "seq_len": t.seq_len,
        "hbm_bytes": chip.hbm_bytes,
        "fits": fits,
        "headroom_bytes": chip.hbm_bytes - mem["bytes_per_device"],
        "fits_with_grad_accum": here,
        "min_chips": bigger[0] if bigger else None,
        "min_topology": example_topology(gen, bigger[0]) if bigger else None,
        "min_chips_grad_accum": bigger[1] if bigger else None,
        "flops_per_token": fpt,
        "peak_flops_per_chip": chip.peak_flops,
        "mfu": mfu,
        "tokens_per_second": tokens_per_second,
        "plan_tokens": plan_tokens,
        "days": plan_tokens / tokens_per_second / 86400,
    }


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def _gib(n: float) -> str:
    """Bytes in GiB to one decimal (MiB below a tenth of a GiB, where GiB would print 0.0)."""
    return f"{n / GiB:,.1f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:,.1f} MiB"


def format_scale_plan(report: dict) -> str:
    """The report as the dry run prints it: sizes in GiB, the plan in days to one decimal."""
    r, m = report, report["mesh"]
    lines = [f"{r['name']} on TPU {r['generation']} {r['topology'].split(':')[-1]}: {r['chips']} chips, "
             f"mesh data {m['data']} x fsdp {m['fsdp']} x tensor {m['tensor']}"]
    if r["mesh_note"]:
        lines.append(f"  ({r['mesh_note']})")
    verdict = (f"fits, {_gib(r['headroom_bytes'])} spare" if r["fits"]
               else f"does NOT fit, short by {_gib(-r['headroom_bytes'])}")
    lines += [
        f"parameters        {r['params']:,} ({_gib(r['param_bytes'])})",
        f"optimizer state   {_gib(r['optimizer_bytes'])} in all, {_gib(r['optimizer_bytes_per_device'])} per chip",
        f"per chip          params {_gib(r['param_bytes_per_device'])} + optimizer "
        f"{_gib(r['optimizer_bytes_per_device'])} + gradients {_gib(r['gradient_bytes_per_device'])}",
        f"                  + activations {_gib(r['activation_bytes_per_device'])} (saved "
        f"{_gib(r['saved_activation_bytes_per_device'])} + one block's backward "
        f"{_gib(r['working_bytes_per_device'])}; {_rows(r['rows_per_device'])} of {r['seq_len']} tokens, "
        f"train.grad_accum={r['grad_accum']})",
        f"                  = {_gib(r['bytes_per_device'])} of {_gib(r['hbm_bytes'])} HBM: {verdict}",
    ]
    if not r["fits"]:
        lines.append(f"                  fix: {_fixes(r)}")
    lines += [
        f"FLOPs per token   {r['flops_per_token']:.3g} (training, trunk)",
        f"throughput        {r['tokens_per_second']:,.0f} tokens/s at {r['mfu']:.0%} MFU "
        f"({r['peak_flops_per_chip'] / 1e12:g} TFLOP/s bf16 peak per chip)",
        f"stage plan        {r['plan_tokens']:.3g} tokens: {r['days']:.1f} days"
        + (f" ({r['days'] * 24:.1f} hours)" if r["days"] < 1 else ""),
    ]
    return "\n".join(lines)


def _fixes(r: dict) -> str:
    """What makes a step that does not fit fit, from the report's search results."""
    fixes = []
    if r["fits_with_grad_accum"]:
        rows = r["rows_per_device"] * r["grad_accum"] // r["fits_with_grad_accum"]
        fixes.append(f"set train.grad_accum={r['fits_with_grad_accum']} ({_rows(rows)} per chip)")
    if r["min_chips"]:
        with_accum = (f" with train.grad_accum={r['min_chips_grad_accum']}"
                      if r["min_chips_grad_accum"] != r["grad_accum"] else "")
        fixes.append(f"use at least {r['min_chips']} chips (e.g. {r['generation']}:{r['min_topology']}){with_accum}")
    if not fixes:
        largest = TPU_CHIPS[r["generation"]].max_chips
        return (f"no {r['generation']} slice up to {largest} chips holds it at any train.grad_accum; "
                f"shorten train.seq_len or shrink the model")
    return " or ".join(fixes)


def check_fits(report: dict) -> None:
    """Refuses (ConfigError, one line) a slice whose chips cannot hold one training step, saying by
    how much and what would fit."""
    r = report
    if r["fits"]:
        return
    raise ConfigError(
        f"--tpu-topology {r['topology']}: the {r['name']} step needs {_gib(r['bytes_per_device'])} per chip "
        f"({_rows(r['rows_per_device'])} of {r['seq_len']} tokens at train.grad_accum={r['grad_accum']}), "
        f"{r['generation']} chips hold {_gib(r['hbm_bytes'])}: short by {_gib(-r['headroom_bytes'])}; {_fixes(r)}")
