"""The idea-bottleneck stack's settings: one frozen dataclass, plus the project config of its trunks.

Command-line `key=value` items split by their key:
  bare keys     (latent_dim=128, middle=gru) set a StackConfig field;
  dotted keys   (model.n_layers=4, train.steps=900, run.name=x) go, after `trunk`'s defaults, to
                quietreasoning.config.load_config(`preset`, ...): the encoder and decoder trunks' sizes,
                the optimizer and its schedule (train.*), the run folder (run.*), checkpoints.
Both trunks share that one model config. The default scales the tiny preset down so training takes
minutes on 2 CPU cores; `freeze=lora` adds one LoRA adapter, `stack`, to both trunks.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, get_type_hints

import yaml

from quietreasoning.config import Config, ConfigError, _coerce, load_config
from quietreasoning.utils import io

POOLINGS = ("mean", "attention")
MIDDLES = ("mlp", "transformer", "gru")
FREEZES = ("none", "trunks", "lora")
DATA_KINDS = ("embedded", "samsum", "cnndm")
EMBEDDED_TASKS = ("summary", "qa", "addition")
LORA_ADAPTER = "stack"

# the tiny preset scaled down for minutes on 2 cores; dotted command-line keys apply after these.
# float32 matmuls: on a CPU without native bf16 (these machines' EPYC) the stack's step is about
# 1.6x faster in float32 than with bf16 inputs.
# Defaults chosen on the embedded tasks at 900 steps (held-out cross-entropy with the input's own
# idea vs another input's): attention pooling beat mean pooling on summaries (ROUGE-1 22 vs 17),
# and word dropout 0.3 made the decoder lean on the idea most (QA 2.3 vs 3.7 nats, additions
# 0.9 vs 1.5; without it 2.3 vs 3.2 and 1.0 vs 1.0)
TRUNK_DEFAULTS = ("model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                  "model.d_ff=384", "model.compute_dtype=float32", "train.steps=1200", "train.global_batch=32",
                  "train.lr=2e-3", "train.warmup_steps=50", "train.log_every=25", "checkpoint.every=300",
                  "run.name=stack")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    latent_dim: int = 256          # width of the idea vector z
    prefix_len: int = 16           # soft-prompt embeddings the expansion MLP gives the decoder
    hidden: int = 512              # inner width of the compression, expansion and middle MLPs
    pooling: str = "attention"     # attention (learned queries) | mean (over non-pad tokens)
    pool_queries: int = 4          # pooling=attention: queries, each pooling the tokens (outputs concatenated)
    middle: str = "mlp"            # mlp (residual blocks) | transformer (over slots) | gru (steps)
    middle_layers: int = 2         # MLP blocks, transformer blocks, or GRU steps
    slots: int = 4                 # middle=transformer: latent slots z is spread over
    middle_heads: int = 4          # middle=transformer: attention heads (divides latent_dim)
    word_dropout: float = 0.3      # share of teacher-forced decoder inputs hidden in training (Bowman et al. 2016)
    freeze: str = "none"           # none | trunks (only the bottleneck trains) | lora (+ trunk adapters);
                                   # frozen trunks keep their embeddings and head: use them with init_from
    init_from: str = ""            # a project checkpoint step directory loaded into both trunks
    data: str = "embedded"         # embedded | samsum:DIR | cnndm:DIR (DIR/train.jsonl, DIR/validation.jsonl)
    tasks: tuple[str, ...] = EMBEDDED_TASKS  # embedded tasks trained together
    world: int = 1500              # embedded: people in the generated PopQA world
    additions: int = 3000          # embedded: addition problems (2-3 digits)
    eval_fraction: float = 0.1     # embedded: share of subjects (and additions) held out
    eval_examples: int = 200       # evaluated examples per task at most
    max_examples: int = 20000      # local data: training examples read at most
    tokenizer: str = ""            # a SentencePiece model; "" = train one (model.vocab_size) on the data
    max_input_len: int = 96        # encoder tokens (longer inputs are cut)
    max_target_len: int = 32       # decoder tokens, <bos> or <eos> included
    preset: str = "tiny"           # the trunk preset
    trunk: tuple[str, ...] = TRUNK_DEFAULTS  # dotted overrides of the project config, in order

    @property
    def data_kind(self) -> str:
        return self.data.partition(":")[0]

    @property
    def data_path(self) -> str:
        return self.data.partition(":")[2]

    def project_config(self) -> Config:
        """The trunks' config: `preset`, then `trunk`, then the LoRA adapter when freeze=lora."""
        extra = [f"model.adapters=[{LORA_ADAPTER}]"] if self.freeze == "lora" else []
        return load_config(self.preset, [*self.trunk, *extra])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stack_config(overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None) -> StackConfig:
    """StackConfig from `base` (e.g. the dict a checkpoint recorded; default: the defaults), then
    `overrides`: bare keys set fields, dotted keys are appended to `trunk`."""
    fields = {f.name for f in dataclasses.fields(StackConfig)}
    hints = get_type_hints(StackConfig)
    values: dict[str, Any] = dict(base or {})
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(f"stack checkpoint config: unknown key '{unknown[0]}'; it was written by another "
                          "version of quietreasoning.stack: train a new run")
    values = {k: _coerce(v, hints[k], k, "stack checkpoint config") for k, v in values.items()}
    trunk = list(values.get("trunk", TRUNK_DEFAULTS))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"command line: '{item}' is not a key=value override (e.g. latent_dim=128 or "
                              "model.n_layers=4)")
        if "." in key:
            trunk.append(item)
            continue
        if key not in fields:
            near = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"stack keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"command line: unknown stack key '{key}'; {hint} (trunk keys are dotted, "
                              "e.g. model.d_model=128)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        values[key] = _coerce(value, hints[key], key, "command line")
    values["trunk"] = tuple(trunk)
    cfg = StackConfig(**values)
    validate(cfg)
    return cfg


def validate(s: StackConfig) -> None:
    """One line naming the key and the fix for each impossible setting."""
    def fail(message: str) -> None:
        raise ConfigError(f"stack: {message}")

    for key in ("latent_dim", "prefix_len", "pool_queries", "hidden", "middle_layers", "slots", "middle_heads", "world",
                "additions", "eval_examples", "max_examples", "max_input_len", "max_target_len"):
        if getattr(s, key) <= 0:
            fail(f"{key}={getattr(s, key)} must be positive")
    for key, allowed in (("pooling", POOLINGS), ("middle", MIDDLES), ("freeze", FREEZES)):
        if getattr(s, key) not in allowed:
            fail(f"{key}={getattr(s, key)!r} must be one of {allowed}")
    if s.data_kind not in DATA_KINDS or (s.data_kind == "embedded") != (s.data == "embedded"):
        fail(f"data={s.data!r} must be embedded, samsum:DIR or cnndm:DIR")
    if s.data_kind != "embedded" and not s.data_path:
        fail(f"data={s.data!r}: name the folder holding train.jsonl and validation.jsonl, e.g. "
             f"data={s.data_kind}:DIR")
    bad = [t for t in s.tasks if t not in EMBEDDED_TASKS]
    if bad or not s.tasks or len(set(s.tasks)) != len(s.tasks):
        fail(f"tasks={list(s.tasks)} must list some of {EMBEDDED_TASKS}, each once")
    if s.middle == "transformer" and (s.latent_dim % s.middle_heads or (s.latent_dim // s.middle_heads) % 2):
        fail(f"middle_heads={s.middle_heads} must divide latent_dim={s.latent_dim} into even head widths (RoPE)")
    if not 0 <= s.word_dropout < 1:
        fail(f"word_dropout={s.word_dropout} must lie in [0, 1)")
    if not 0 < s.eval_fraction < 1:
        fail(f"eval_fraction={s.eval_fraction} must lie in (0, 1)")
    if s.max_target_len < 2:
        fail(f"max_target_len={s.max_target_len} must be at least 2 (<bos> and one token)")


def run_dir(cfg: Config):
    """<run.out_dir>/<run.name> (an epath): the tokenizer, metrics, evaluation and pictures of a stack run."""
    return io.path(cfg.run.out_dir) / cfg.run.name
