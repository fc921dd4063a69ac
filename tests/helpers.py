"""Small configs shared by the tests: the tiny preset shrunk further so a step is milliseconds."""

import socket

from quietreasoning.config import load_config

MICRO = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=128", "train.seq_len=32", "train.global_batch=16",
         "train.warmup_steps=2", "train.log_every=1"]


def micro_config(*overrides: str, out_dir=None):
    extra = [f"run.out_dir={out_dir}"] if out_dir is not None else []
    return load_config("tiny", [*MICRO, *extra, *overrides])


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for a test coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
