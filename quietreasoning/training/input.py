"""The batch stream the trainer reads, by `data.source`: the synthetic language (batch i is a pure
function of the seed and i) or packed TFRecord shards (each host reads its own share). Either way
`position()` is what a checkpoint records, and passing it back resumes the exact stream.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from quietreasoning.config import Config, DataError
from quietreasoning.data.synthetic import SyntheticLanguage
from quietreasoning.training.train_step import BATCH_KEYS, put_batch


class SyntheticBatches:
    def __init__(self, cfg: Config, batch_sh: NamedSharding, position: Any = None):
        self.cfg, self.batch_sh = cfg, batch_sh
        self.data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
        self.index = int(position or 0)

    def next(self) -> dict[str, jax.Array]:
        t = self.cfg.train
        batch = self.data.batch(self.index, t.global_batch, t.seq_len)
        self.index += 1
        return put_batch(batch, self.batch_sh)

    def position(self) -> int:
        return self.index


class ShardBatches:
    def __init__(self, cfg: Config, batch_sh: NamedSharding, position: Any = None, log=print):
        from quietreasoning.data.reader import ShardReader

        t, hosts = cfg.train, jax.process_count()
        if t.global_batch % hosts:
            raise DataError(f"train.global_batch={t.global_batch} does not split over {hosts} hosts; make it a multiple")
        self.batch_sh = batch_sh
        self.reader = ShardReader(cfg.data.pretrain_pattern, t.seq_len, t.global_batch // hosts, seed=t.seed,
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
        return {k: jax.make_array_from_process_local_data(self.batch_sh, local[k]) for k in BATCH_KEYS}

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
