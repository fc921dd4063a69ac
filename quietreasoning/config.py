"""The typed, validated configuration.

Loading order: `configs/base.yaml` (every setting, commented), then a preset that overrides
some of it, then `key=value` overrides from the command line. The merged tree is validated
into frozen dataclasses: an unknown key is an error that suggests the nearest valid key, and
impossible combinations are errors naming the key and the file that set it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from quietreasoning.utils import io

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "configs" / "base.yaml"


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the file/key and the fix."""


class DataError(ConfigError):
    """Bad input data (missing, empty or corrupt files, a tokenizer that does not fit the model),
    phrased as one line that names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # 0: d_model // n_heads
    d_ff: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    compute_dtype: str
    param_dtype: str
    remat: str
    workspace: bool
    ws_slots: int
    ws_dim: int
    ws_heads: int
    ws_layer: int
    ws_read_layers: tuple[int, ...]
    ws_chunk: int
    ws_max_steps: int
    ws_halt_target: float
    ssm_layers: tuple[int, ...]
    ssm_state: int
    ssm_conv: int
    ssm_expand: int
    ssm_dt_rank: int  # 0: ceil(d_model / 16)
    router: bool
    router_hidden: int
    adapters: tuple[str, ...]
    lora_rank: int
    lora_alpha: float
    ia3: bool
    pkm_layers: tuple[int, ...]
    pkm_slots: int
    pkm_heads: int
    pkm_topk: int
    pkm_key_dim: int
    pkm_value_dim: int
    pkm_temperature: float
    episodic: bool
    episodic_layer: int
    episodic_slots: int
    episodic_dim: int  # 0: d_model

    @property
    def pkm_sub_keys(self) -> int:
        """Sub-keys per half of the product key set: sqrt(pkm_slots)."""
        return math.isqrt(self.pkm_slots)

    @property
    def resolved_episodic_dim(self) -> int:
        return self.episodic_dim or self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.ssm_dt_rank or -(-self.d_model // 16)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    seq_len: int
    global_batch: int
    grad_accum: int
    seed: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float
    z_loss: float
    log_every: int
    stage: str
    load_parameters_path: str
    trainable: str  # one of TRAINABLE
    max_bad_steps: int
    rollback_lr_scale: float
    max_rollbacks: int


@dataclasses.dataclass(frozen=True)
class LossesConfig:
    ws_next_latent: float
    ws_sparsity: float
    ws_orthogonality: float
    ws_infonce: float
    ws_ponder: float
    router_z: float
    router_entropy: float
    router_entropy_floor: float
    rationale: float
    router_retrieval: float


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int
    fsdp: int
    tensor: int

    @property
    def fixed_devices(self) -> int | None:
        """The device count the sizes name when none is -1, else None."""
        return None if -1 in (self.data, self.fsdp, self.tensor) else self.data * self.fsdp * self.tensor

    def shape(self, n_devices: int, source: str = "mesh") -> dict[str, int]:
        """Axis sizes with a single -1 filled so the product equals `n_devices`; `source` names
        the file that set the sizes in the error."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        known = 1
        for v in sizes.values():
            if v != -1:
                known *= v
        fill = [k for k, v in sizes.items() if v == -1]
        if fill:
            if n_devices % known:
                raise ConfigError(
                    f"{source}: fixed mesh axes multiply to {known}, which does not divide the "
                    f"{n_devices} devices; change mesh.* so one -1 can fill the rest")
            sizes[fill[0]] = n_devices // known
        product = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        if product != n_devices:
            raise ConfigError(
                f"{source}: mesh.data*mesh.fsdp*mesh.tensor = {product} but there are {n_devices} devices; "
                f"set the sizes to multiply to {n_devices} or make one of them -1")
        return sizes


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str  # one of DATA_SOURCES
    synthetic_successors: int
    pretrain_pattern: str
    skip_corrupt: bool
    corpus: str  # embedded | hub | local:PATH
    mixture: tuple[str, ...]  # bucket=ratio
    local_buckets: tuple[str, ...]  # bucket=PATH
    docs: int
    lang_threshold: float
    blocklist: str
    dedup_threshold: float
    minhash_perm: int
    records_per_shard: int
    compression: str
    tokenizer: str
    tokenizer_type: str

    def pairs(self, key: str) -> dict[str, str]:
        """`data.mixture` / `data.local_buckets` entries as {bucket: value} (validated at load)."""
        return dict(entry.split("=", 1) for entry in getattr(self, key))


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    episodic_index: str  # one of EPISODIC_INDEXES
    episodic_capacity: int
    episodic_ttl_days: float
    episodic_dedupe: float
    episodic_nlist: int
    episodic_pq_m: int
    episodic_nprobe: int
    hnsw_m: int
    hnsw_ef_search: int
    surprise_z: float
    surprise_cooldown: int
    knn: bool
    knn_k: int
    knn_temperature: float
    knn_nlist: int
    knn_pq_m: int
    knn_nprobe: int


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    k_max: int
    thoughts_per_step: int
    recipe: str  # one of LATENT_RECIPES
    projection_hidden: int  # 0: d_model
    codi_distill: float
    codi_teacher_ce: float
    sigma: float
    step_cost: float
    kl_weight: float
    verifier_weight: float


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    kv_bits: int  # one of KV_BITS
    kv_group: int
    snapkv_keep: float  # 1.0: SnapKV off
    snapkv_window: int
    snapkv_kernel: int
    awq_bits: int  # one of AWQ_BITS
    awq_group: int
    awq_grid: int
    awq_calib_batches: int


STAGES = ("warmstart_dense_ws", "pkm_adapters", "ssm_light", "latent_distill", "retrieval_supervision",
          "compress_serve")


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    run: tuple[str, ...]                    # the stages run.py runs, a subsequence of STAGES
    tokens: tuple[float, ...]               # token budget of each of STAGES, in order (compress_serve: 0)
    # per stage: overrides (section.key=value) it adds to the ones of the stages before it
    warmstart_dense_ws: tuple[str, ...]
    pkm_adapters: tuple[str, ...]
    ssm_light: tuple[str, ...]
    latent_distill: tuple[str, ...]
    retrieval_supervision: tuple[str, ...]
    compress_serve: tuple[str, ...]
    pkm_temperature_end: float              # pkm_adapters anneals model.pkm_temperature to this
    anneal_segments: int                    # constant-temperature pieces of that anneal
    latent_task: str                        # reasoning task (data/tasks.py) latent_distill trains on
    retrieval_threshold: float              # s_pop below which the router should read the episodic store
    eval_examples: int                      # held-out questions per evaluation after the stages


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str  # "" = <run.out_dir>/checkpoints
    every: int
    max_to_keep: int
    async_save: bool
    fresh_if_unreadable: bool


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str
    out_dir: str
    distributed: bool


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    train: TrainConfig
    losses: LossesConfig
    mesh: MeshConfig
    data: DataConfig
    memory: MemoryConfig
    latent: LatentConfig
    serve: ServeConfig
    stages: StagesConfig
    checkpoint: CheckpointConfig
    run: RunConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mesh_shape(self, n_devices: int) -> dict[str, int]:
        """The mesh axis sizes for `n_devices`; errors name the file that set mesh.*."""
        return self.mesh.shape(n_devices, getattr(self, "_mesh_source", "mesh"))

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.out_dir, self.run.name, "checkpoints")


SECTIONS: dict[str, type] = get_type_hints(Config)
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
DATA_SOURCES = ("synthetic", "tfrecord")
EPISODIC_INDEXES = ("flat", "ivf", "ivfpq", "hnsw")
LATENT_RECIPES = ("coconut", "codi", "stochastic")
KV_BITS = (16, 8, 4)
AWQ_BITS = (8, 4)
TRAINABLE = ("all", "adapters")
COMPRESSION = ("", "GZIP")
TOKENIZER_TYPES = ("bpe", "unigram")


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = io.path(path)
    if not p.exists():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
        raise ConfigError(f"{path}: cannot read the config file ({why}); pass a YAML text file (see configs/)"
                          ) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    except Exception as e:  # a value YAML's constructors reject (date 2020-13-01, !!int x) or deep nesting
        raise ConfigError(f"{path}: malformed YAML: {type(e).__name__}: {_one_line(e)}; fix the value there") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _one_line(e: BaseException) -> str:
    """An exception's message cut to its first line (at most 160 characters)."""
    return (str(e).splitlines() or [""])[0][:160]


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys() + list(SECTIONS), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid sections: {', '.join(SECTIONS)}"
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _merge(tree: dict, layer: dict, source: str, origin: dict[str, str]) -> None:
    """Merges a {section: {key: value}} layer into `tree`, recording which file set each key."""
    for section, values in layer.items():
        if section not in SECTIONS:
            raise _unknown(str(section), source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of key: value")
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in names:
                raise _unknown(f"{section}.{key}", source)
            tree.setdefault(section, {})[key] = value
            origin[f"{section}.{key}"] = source


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"command line: {item!r} is not a section.key=value override (e.g. model.d_model=256)")
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except Exception:  # not YAML, or a value its constructors reject (2020-13-01, !!int x): the text itself
            value = raw
        layer.setdefault(section, {})[name] = value
    return layer


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    if typing.get_origin(typ) is tuple:  # tuple[int, ...] / tuple[str, ...]: a YAML list
        item = typing.get_args(typ)[0]
        if value is None or value == "":
            return ()
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value))
        raise ConfigError(f"{source}: {key}={value!r} must be a list, e.g. {key}=[a, b] (or [] for none)")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        number = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                number = float(value)
        except ValueError:
            pass
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{source}: {key}={value!r} must be a finite float")
    elif typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {key}={value!r} must be {'an' if typ is int else 'a'} {typ.__name__}")


def _build(tree: dict, origin: dict[str, str]) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if f.name not in tree.get(section, {}):
                raise ConfigError(f"{BASE_CONFIG}: '{key}' has no value; base.yaml must list every setting")
            kwargs[f.name] = _coerce(tree[section][f.name], hints[f.name], key, origin[key])
        sections[section] = cls(**kwargs)
    return Config(**sections)


def _validate(cfg: Config, origin: dict[str, str], layers: list[str]) -> None:
    def fail(keys: str | tuple[str, ...], message: str) -> None:
        # blame the last layer that set any of the keys involved (command line > preset > base)
        sources = [origin.get(k, "config") for k in ((keys,) if isinstance(keys, str) else keys)]
        source = max(sources, key=lambda s: layers.index(s) if s in layers else -1)
        raise ConfigError(f"{source}: {message}")

    m, t = cfg.model, cfg.train
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"model.{key}={getattr(m, key)} must be positive")
    if m.head_dim < 0:
        fail("model.head_dim", f"model.head_dim={m.head_dim} must be positive, or 0 for d_model / n_heads")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        fail(("model.n_heads", "model.d_model", "model.head_dim"),
             f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
             "pick a divisor or set model.head_dim")
    if m.n_heads % m.n_kv_heads:
        fail(("model.n_kv_heads", "model.n_heads"),
             f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    if m.resolved_head_dim % 2:
        fail(("model.head_dim", "model.d_model", "model.n_heads"),
             f"head dimension {m.resolved_head_dim} must be even for RoPE (model.head_dim, or d_model / n_heads)")
    for key in ("compute_dtype", "param_dtype"):
        if getattr(m, key) not in DTYPES:
            fail(f"model.{key}", f"model.{key}={getattr(m, key)!r} must be one of {DTYPES}")
    if m.remat not in REMAT:
        fail("model.remat", f"model.remat={m.remat!r} must be one of {REMAT}")
    for key in ("steps", "seq_len", "global_batch", "grad_accum", "log_every"):
        if getattr(t, key) <= 0:
            fail(f"train.{key}", f"train.{key}={getattr(t, key)} must be positive")
    for key in ("rope_theta", "norm_eps", "init_std"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"model.{key}={getattr(m, key)} must be positive")
    for key in ("b1", "b2"):
        if not 0 <= getattr(t, key) < 1:
            fail(f"train.{key}", f"train.{key}={getattr(t, key)} must be in [0, 1)")
    if t.eps <= 0:
        fail("train.eps", f"train.eps={t.eps} must be positive")
    if t.min_lr_ratio > 1:
        fail("train.min_lr_ratio", f"train.min_lr_ratio={t.min_lr_ratio} must be at most 1")
    if not 0 <= t.rollback_lr_scale < 1:
        fail("train.rollback_lr_scale", f"train.rollback_lr_scale={t.rollback_lr_scale} must be in [0, 1) (0 stops "
             "instead of rolling back)")
    for key in ("lr", "warmup_steps", "weight_decay", "clip_norm", "z_loss", "min_lr_ratio", "max_bad_steps",
                "max_rollbacks"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"train.{key}={getattr(t, key)} must not be negative")
    if t.global_batch % t.grad_accum:
        fail(("train.grad_accum", "train.global_batch"),
             f"train.grad_accum={t.grad_accum} does not divide train.global_batch={t.global_batch}")
    for key in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, key)
        if v == 0 or v < -1:
            fail(f"mesh.{key}", f"mesh.{key}={v} must be a positive size or -1 (fill)")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        fail(("mesh.data", "mesh.fsdp", "mesh.tensor"), "at most one mesh axis may be -1")
    if cfg.checkpoint.every <= 0 or cfg.checkpoint.max_to_keep <= 0:
        fail(("checkpoint.every", "checkpoint.max_to_keep"), "checkpoint.every and checkpoint.max_to_keep must be positive")
    if cfg.data.source not in DATA_SOURCES:
        fail("data.source", f"data.source={cfg.data.source!r} is not a known source; use one of {DATA_SOURCES}")
    if cfg.data.source == "synthetic" and m.vocab_size < 4:
        fail(("model.vocab_size", "data.source"), f"model.vocab_size={m.vocab_size}: the synthetic language needs at least 4")
    if cfg.data.synthetic_successors <= 0:
        fail("data.synthetic_successors", "data.synthetic_successors must be positive")
    _validate_modules(cfg, fail)
    _validate_data(cfg, fail)
    _validate_memory(cfg, fail)
    _validate_latent(cfg, fail)
    _validate_serve(cfg, fail)
    _validate_stages(cfg, fail)


def _validate_modules(cfg: Config, fail) -> None:
    m = cfg.model
    for key in ("ws_slots", "ws_dim", "ws_heads", "ws_chunk", "ws_max_steps", "ssm_state", "ssm_conv",
                "ssm_expand", "router_hidden", "lora_rank"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"model.{key}={getattr(m, key)} must be positive")
    if m.ssm_dt_rank < 0:
        fail("model.ssm_dt_rank", f"model.ssm_dt_rank={m.ssm_dt_rank} must be positive, or 0 for ceil(d_model / 16)")
    if m.ws_dim % m.ws_heads:
        fail(("model.ws_heads", "model.ws_dim"), f"model.ws_heads={m.ws_heads} does not divide model.ws_dim={m.ws_dim}")
    if not 1 <= m.ws_halt_target <= m.ws_max_steps:
        fail(("model.ws_halt_target", "model.ws_max_steps"),
             f"model.ws_halt_target={m.ws_halt_target} must lie in [1, model.ws_max_steps={m.ws_max_steps}]")
    if m.workspace and not 0 <= m.ws_layer < m.n_layers:
        fail(("model.ws_layer", "model.n_layers"),
             f"model.ws_layer={m.ws_layer} must name a block in [0, {m.n_layers - 1}]")
    if m.workspace and cfg.train.seq_len % m.ws_chunk:
        fail(("model.ws_chunk", "train.seq_len"),
             f"model.ws_chunk={m.ws_chunk} does not divide train.seq_len={cfg.train.seq_len}")
    for i in m.ws_read_layers:
        if m.workspace and not m.ws_layer <= i < m.n_layers:
            fail(("model.ws_read_layers", "model.ws_layer"),
                 f"model.ws_read_layers has block {i}: reads must lie in [model.ws_layer={m.ws_layer}, "
                 f"{m.n_layers - 1}], after the workspace is written")
    if len(set(m.ssm_layers)) != len(m.ssm_layers) or len(set(m.ws_read_layers)) != len(m.ws_read_layers):
        fail(("model.ssm_layers", "model.ws_read_layers"), "model.ssm_layers and model.ws_read_layers must not repeat a block")
    for i in m.ssm_layers:
        if not 0 <= i < m.n_layers:
            fail(("model.ssm_layers", "model.n_layers"), f"model.ssm_layers has block {i}, outside [0, {m.n_layers - 1}]")
        if m.router and i < m.ws_layer:
            fail(("model.ssm_layers", "model.ws_layer", "model.router"),
                 f"model.ssm_layers has block {i}, below model.ws_layer={m.ws_layer}: its router gate would read "
                 "the workspace before it is written; move the expert up or lower model.ws_layer")
    if m.router and not m.workspace:
        fail(("model.router", "model.workspace"), "model.router=true needs model.workspace=true (it reads the workspace summary)")
    for name in m.adapters:
        if not name.isidentifier():
            fail("model.adapters", f"model.adapters has {name!r}: adapter names must be identifiers")
    if len(set(m.adapters)) != len(m.adapters):
        fail("model.adapters", "model.adapters must not repeat a name")
    for key in ("pkm_heads", "pkm_topk", "pkm_key_dim", "pkm_value_dim", "episodic_slots"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"model.{key}={getattr(m, key)} must be positive")
    if m.pkm_slots <= 0 or m.pkm_sub_keys ** 2 != m.pkm_slots:
        fail("model.pkm_slots", f"model.pkm_slots={m.pkm_slots} must be a perfect square (two sub-key sets of "
             f"sqrt(N)), e.g. {max(m.pkm_sub_keys, 1) ** 2} or {(m.pkm_sub_keys + 1) ** 2}")
    if m.pkm_key_dim % 2:
        fail("model.pkm_key_dim", f"model.pkm_key_dim={m.pkm_key_dim} must be even (the query splits in two halves)")
    if m.pkm_topk > m.pkm_sub_keys:
        fail(("model.pkm_topk", "model.pkm_slots"),
             f"model.pkm_topk={m.pkm_topk} exceeds sqrt(model.pkm_slots)={m.pkm_sub_keys}; lower it or add slots")
    if not m.pkm_temperature > 0:
        fail("model.pkm_temperature", f"model.pkm_temperature={m.pkm_temperature} must be positive")
    if len(set(m.pkm_layers)) != len(m.pkm_layers):
        fail("model.pkm_layers", "model.pkm_layers must not repeat a block")
    for i in m.pkm_layers:
        if not 0 <= i < m.n_layers:
            fail(("model.pkm_layers", "model.n_layers"), f"model.pkm_layers has block {i}, outside [0, {m.n_layers - 1}]")
        if m.router and i < m.ws_layer:
            fail(("model.pkm_layers", "model.ws_layer", "model.router"),
                 f"model.pkm_layers has block {i}, below model.ws_layer={m.ws_layer}: its router gate would read "
                 "the workspace before it is written; move the memory up or lower model.ws_layer")
    if m.episodic_dim < 0:
        fail("model.episodic_dim", f"model.episodic_dim={m.episodic_dim} must be positive, or 0 for d_model")
    if m.episodic and not 0 <= m.episodic_layer < m.n_layers:
        fail(("model.episodic_layer", "model.n_layers"),
             f"model.episodic_layer={m.episodic_layer} must name a block in [0, {m.n_layers - 1}]")
    if m.episodic and m.router and m.episodic_layer < m.ws_layer:
        fail(("model.episodic_layer", "model.ws_layer", "model.router"),
             f"model.episodic_layer={m.episodic_layer} is below model.ws_layer={m.ws_layer}: its router gate would "
             "read the workspace before it is written")
    if cfg.train.trainable not in TRAINABLE:
        fail("train.trainable", f"train.trainable={cfg.train.trainable!r} must be one of {TRAINABLE}")
    if cfg.train.trainable == "adapters" and not m.adapters:
        fail(("train.trainable", "model.adapters"), "train.trainable=adapters but model.adapters is empty; name at least one adapter")
    for f in dataclasses.fields(LossesConfig):
        if getattr(cfg.losses, f.name) < 0:
            fail(f"losses.{f.name}", f"losses.{f.name}={getattr(cfg.losses, f.name)} must not be negative")
    if cfg.losses.router_entropy_floor > 1 or cfg.losses.rationale > 1:
        fail(("losses.router_entropy_floor", "losses.rationale"),
             "losses.router_entropy_floor and losses.rationale are fractions in [0, 1]")


def _validate_data(cfg: Config, fail) -> None:
    d = cfg.data
    if d.source == "tfrecord" and not d.pretrain_pattern:
        fail(("data.source", "data.pretrain_pattern"),
             "data.source=tfrecord needs data.pretrain_pattern (e.g. data/tiny/*.tfrecord*); build shards with "
             "python -m quietreasoning.data build")
    if not (d.corpus in ("embedded", "hub") or (d.corpus.startswith("local:") and len(d.corpus) > 6)):
        fail("data.corpus", f"data.corpus={d.corpus!r} must be embedded, hub or local:PATH")
    for key in ("mixture", "local_buckets"):
        for entry in getattr(d, key):
            name, sep, value = entry.partition("=")
            if not sep or not name or not value:
                fail(f"data.{key}", f"data.{key} entry {entry!r} must read bucket=value")
    for entry in d.mixture:
        try:
            ratio = float(entry.partition("=")[2])
        except ValueError:
            ratio = -1.0
        if not ratio > 0:
            fail("data.mixture", f"data.mixture entry {entry!r}: the ratio must be a positive number")
    for key in ("docs", "minhash_perm", "records_per_shard"):
        if getattr(d, key) <= 0:
            fail(f"data.{key}", f"data.{key}={getattr(d, key)} must be positive")
    for key in ("lang_threshold", "dedup_threshold"):
        if not 0 <= getattr(d, key) <= 1:
            fail(f"data.{key}", f"data.{key}={getattr(d, key)} must be in [0, 1]")
    if d.compression not in COMPRESSION:
        fail("data.compression", f"data.compression={d.compression!r} must be one of {COMPRESSION}")
    if d.tokenizer_type not in TOKENIZER_TYPES:
        fail("data.tokenizer_type", f"data.tokenizer_type={d.tokenizer_type!r} must be one of {TOKENIZER_TYPES}")


def _validate_memory(cfg: Config, fail) -> None:
    mem = cfg.memory
    if mem.episodic_index not in EPISODIC_INDEXES:
        fail("memory.episodic_index", f"memory.episodic_index={mem.episodic_index!r} must be one of {EPISODIC_INDEXES}")
    for key in ("episodic_capacity", "episodic_nlist", "episodic_pq_m", "episodic_nprobe", "hnsw_m", "hnsw_ef_search",
                "knn_k", "knn_nlist", "knn_pq_m", "knn_nprobe"):
        if getattr(mem, key) <= 0:
            fail(f"memory.{key}", f"memory.{key}={getattr(mem, key)} must be positive")
    for key in ("episodic_ttl_days", "knn_temperature"):
        if not getattr(mem, key) > 0:
            fail(f"memory.{key}", f"memory.{key}={getattr(mem, key)} must be positive")
    if not 0 < mem.episodic_dedupe <= 1:
        fail("memory.episodic_dedupe", f"memory.episodic_dedupe={mem.episodic_dedupe} is a cosine in (0, 1]")
    if mem.surprise_cooldown < 0:
        fail("memory.surprise_cooldown", f"memory.surprise_cooldown={mem.surprise_cooldown} must not be negative")
    if mem.episodic_index in ("ivfpq",) and cfg.model.resolved_episodic_dim % mem.episodic_pq_m:
        fail(("memory.episodic_pq_m", "model.episodic_dim"),
             f"memory.episodic_pq_m={mem.episodic_pq_m} must divide the key width {cfg.model.resolved_episodic_dim}")


def _validate_latent(cfg: Config, fail) -> None:
    lat = cfg.latent
    if lat.recipe not in LATENT_RECIPES:
        fail("latent.recipe", f"latent.recipe={lat.recipe!r} must be one of {LATENT_RECIPES}")
    for key in ("k_max", "thoughts_per_step"):
        if getattr(lat, key) <= 0:
            fail(f"latent.{key}", f"latent.{key}={getattr(lat, key)} must be positive")
    if lat.projection_hidden < 0:
        fail("latent.projection_hidden", f"latent.projection_hidden={lat.projection_hidden} must be >= 0 (0 = d_model)")
    if not lat.sigma > 0:
        fail("latent.sigma", f"latent.sigma={lat.sigma} must be positive")
    for key in ("codi_distill", "codi_teacher_ce", "step_cost", "kl_weight", "verifier_weight"):
        if getattr(lat, key) < 0:
            fail(f"latent.{key}", f"latent.{key}={getattr(lat, key)} must not be negative")


def _validate_serve(cfg: Config, fail) -> None:
    srv = cfg.serve
    if srv.kv_bits not in KV_BITS:
        fail("serve.kv_bits", f"serve.kv_bits={srv.kv_bits} must be one of {KV_BITS} (16 = unquantised)")
    if srv.awq_bits not in AWQ_BITS:
        fail("serve.awq_bits", f"serve.awq_bits={srv.awq_bits} must be one of {AWQ_BITS}")
    for key in ("kv_group", "snapkv_window", "awq_group", "awq_grid", "awq_calib_batches"):
        if getattr(srv, key) <= 0:
            fail(f"serve.{key}", f"serve.{key}={getattr(srv, key)} must be positive")
    if not 0 < srv.snapkv_keep <= 1:
        fail("serve.snapkv_keep", f"serve.snapkv_keep={srv.snapkv_keep} must be in (0, 1] (1 = SnapKV off)")
    if srv.snapkv_kernel <= 0 or srv.snapkv_kernel % 2 == 0:
        fail("serve.snapkv_kernel", f"serve.snapkv_kernel={srv.snapkv_kernel} must be a positive odd number")


def _validate_stages(cfg: Config, fail) -> None:
    st = cfg.stages
    unknown = [name for name in st.run if name not in STAGES]
    if unknown:
        fail("stages.run", f"stages.run: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    if list(st.run) != [name for name in STAGES if name in st.run]:
        fail("stages.run", f"stages.run={list(st.run)} must keep the plan's order ({', '.join(STAGES)}), "
                           "each stage once")
    if len(st.tokens) != len(STAGES) or any(x < 0 for x in st.tokens):
        fail("stages.tokens", f"stages.tokens needs {len(STAGES)} budgets >= 0, one per stage in order "
                              f"({', '.join(STAGES)}), got {list(st.tokens)}")
    for name in STAGES:
        for item in getattr(st, name):
            key, sep, _ = item.partition("=")
            section, _, field = key.partition(".")
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else set()
            if not sep or section in ("stages", "run", "checkpoint") or field not in fields:
                fail(f"stages.{name}", f"stages.{name}: {item!r} is not an override of a model, train, losses, "
                                       "data, memory, latent or serve key (section.key=value)")
    if st.anneal_segments <= 0 or st.pkm_temperature_end <= 0:
        fail(("stages.anneal_segments", "stages.pkm_temperature_end"),
             "stages.anneal_segments and stages.pkm_temperature_end must be positive")
    if st.retrieval_threshold < 0 or st.eval_examples <= 0:
        fail(("stages.retrieval_threshold", "stages.eval_examples"),
             "stages.retrieval_threshold must be >= 0 and stages.eval_examples positive")


def load_config(preset: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """base.yaml, then `preset` (a path or a name under configs/), then `key=value` overrides."""
    tree: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    layers = [str(BASE_CONFIG.relative_to(REPO_ROOT))]
    _merge(tree, _read_yaml(BASE_CONFIG), layers[0], origin)
    if preset:
        path = source = str(preset)
        if not path.endswith((".yaml", ".yml")) and "/" not in path:
            path = str(REPO_ROOT / "configs" / f"{path}.yaml")
            source = f"configs/{preset}.yaml"
        layers.append(source)
        _merge(tree, _read_yaml(path), source, origin)
    layers.append("command line")
    _merge(tree, parse_overrides(list(overrides)), "command line", origin)
    cfg = _build(tree, origin)
    _validate(cfg, origin, layers)
    # the device count is known only when the mesh is built: remember which file set mesh.*
    mesh_source = max((origin[f"mesh.{k}"] for k in ("data", "fsdp", "tensor")), key=layers.index)
    object.__setattr__(cfg, "_mesh_source", mesh_source)
    return cfg

