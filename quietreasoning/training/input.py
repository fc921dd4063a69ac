"""The batch stream the trainer reads, by `data.source`: the synthetic language (batch i is a pure
function of the seed and i) or packed TFRecord shards (each host reads its own share). Either way
`position()` is what a checkpoint records, and passing it back resumes the exact stream.

On a multi-host run every process builds only the rows of the global batch that its own devices
hold, and the global arrays are assembled from those local rows; no host ever holds the whole batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from quietreasoning.config import Config, DataError
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.training.train_step import BATCH_KEYS


def local_rows(batch_sh: NamedSharding, global_batch: int, seq_len: int) -> np.ndarray:
    """The sorted indices of the global batch's rows that this process's devices hold under
    `batch_sh` (all rows on one host; a contiguous or interleaved subset on many)."""
    held = np.zeros(global_batch, bool)
    for index in batch_sh.addressable_devices_indices_map((global_batch, seq_len)).values():
        held[index[0]] = True
    return np.flatnonzero(held)


def put_local_rows(local: dict[str, np.ndarray], rows: np.ndarray, global_batch: int,
                   batch_sh: NamedSharding) -> dict[str, jax.Array]:
    """Global (global_batch, ...) arrays from this process's `rows` of them (`local[k][i]` is
    global row `rows[i]`): each local device gets its shard cut from the local rows."""
    where = np.full(global_batch, -1)
    where[rows] = np.arange(len(rows))

    def shard(x: np.ndarray, index: tuple) -> np.ndarray:  # index: this device's slices of the global array
        return x[where[np.arange(global_batch)[index[0]]]][(slice(None), *index[1:])]

    return {k: jax.make_array_from_callback((global_batch, *x.shape[1:]), batch_sh,
                                            lambda index, x=np.asarray(x): shard(x, index))
            for k, x in local.items()}


class SyntheticBatches:
    """Batch i of the synthetic language; each process builds only its own rows of it, so the
    global batch is the same whatever the number of hosts."""

    def __init__(self, cfg: Config, batch_sh: NamedSharding, position: Any = None):
        self.cfg, self.batch_sh = cfg, batch_sh
        self.data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
        self.index = int(position or 0)
        t = cfg.train
        self.rows = local_rows(batch_sh, t.global_batch, t.seq_len)
        self.only = None if len(self.rows) == t.global_batch else self.rows

    def next(self) -> dict[str, jax.Array]:
        t = self.cfg.train
        local = self.data.batch(self.index, t.global_batch, t.seq_len, self.only)
        self.index += 1
        return put_local_rows(local, self.rows, t.global_batch, self.batch_sh)

    def position(self) -> int:
        return self.index


class ShardBatches:
    """Packed rows from TFRecord shards. Each host reads its own files (or every host-count-th
    document, see data/reader.py) into the rows of the global batch that its devices hold, so the
    global batch depends on the number of hosts: a 2-host run does not see the batches a 1-host run
    does, and a checkpoint's position resumes only on the same number of hosts. The mesh must give
    every host its own, equal share of the rows (the data axes spread across hosts)."""

    def __init__(self, cfg: Config, batch_sh: NamedSharding, position: Any = None, log=print):
        from quietreasoning.data.reader import ShardReader

        t, hosts = cfg.train, jax.process_count()
        if t.global_batch % hosts:
            raise DataError(f"train.global_batch={t.global_batch} does not split over {hosts} hosts; make it a multiple")
        self.batch_sh, self.global_batch = batch_sh, t.global_batch
        self.rows = local_rows(batch_sh, t.global_batch, t.seq_len)
        if len(self.rows) != t.global_batch // hosts:
            raise DataError(f"mesh {dict(batch_sh.mesh.shape)}: host {jax.process_index()} holds {len(self.rows)} of "
                            f"the {t.global_batch} rows of the global batch, not its own {t.global_batch // hosts}; "
                            "to read TFRecord shards per host, spread mesh.data or mesh.fsdp across the hosts "
                            "(keep mesh.tensor within one host)")
        self.reader = ShardReader(cfg.data.pretrain_pattern, t.seq_len, len(self.rows), seed=t.seed,
                                  process_index=jax.process_index(), process_count=hosts,
                                  skip_corrupt=cfg.data.skip_corrupt, rationale_weight=cfg.losses.rationale, log=log)
        vocab = self.reader.manifest["vocab_size"]
        if vocab != cfg.model.vocab_size:
            raise DataError(f"data.pretrain_pattern={cfg.data.pretrain_pattern!r}: the shards were tokenized with a "
                            f"{vocab}-token vocabulary but model.vocab_size={cfg.model.vocab_size}; set "
                            f"model.vocab_size={vocab} or rebuild the shards with --vocab-size {cfg.model.vocab_size}")
        if position is not None:
            saved = np.asarray(position["hosts"], np.int64).reshape(-1, 3)
            if len(saved) != hosts:
                raise DataError(f"the checkpoint's data position was saved by {len(saved)} hosts, this run has {hosts}; "
                                "resume on the same number of hosts, or start a new run (run.name)")
            self.reader.restore(saved[jax.process_index()])

    def next(self) -> dict[str, jax.Array]:
        local = self.reader.next_batch()
        return put_local_rows({k: local[k] for k in BATCH_KEYS}, self.rows, self.global_batch, self.batch_sh)

    def position(self) -> dict[str, Any]:
        mine = self.reader.position()
        if jax.process_count() == 1:
            return {"hosts": [mine.tolist()]}
        from jax.experimental import multihost_utils
        return {"hosts": np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3).tolist()}


def batches(cfg: Config, batch_sh: NamedSharding, position: Any = None, log=print):
    """The configured stream, resumed at `position` (from a checkpoint) when given."""
    if cfg.data.source == "tfrecord":
        return ShardBatches(cfg, batch_sh, position, log)
    return SyntheticBatches(cfg, batch_sh, position)
