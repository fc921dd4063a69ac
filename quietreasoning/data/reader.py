"""Packed, per-host training batches from TFRecord shards, with a position that restores exactly.

Each host reads its own files (`jax.process_index()`-th of every `process_count()`; with fewer
files than hosts, every host reads all files and keeps every `process_count()`-th document).
Within an epoch the host's files are put in a seeded order and read round-robin, one document
from each in turn, so a batch mixes buckets. Documents are packed back to back into rows of
`seq_len + 1` tokens (a document that does not fit continues in the next row as a new segment);
inputs/targets are the row shifted by one, with segment ids, per-segment positions, a loss mask
(targets inside the same segment; rationale tokens weighted by `losses.rationale`) and an answer
mask. The position is three integers, (epoch, document index in the epoch's order, token offset
into that document): restoring it yields exactly the batches an uninterrupted run reads next.

At start every shard the pattern selects is checked against the manifest beside it: listed, present
and of its listed size. A shard that fails, or a record that fails its CRC while reading, is a
DataError naming the file, or with data.skip_corrupt a warning, and its records are counted in
`corrupt_records` and skipped.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from quietreasoning.config import DataError
from quietreasoning.data.shards import MANIFEST, ROLES, _tf, read_manifest

PARSE_BATCH = 256


def _glob(pattern: str) -> list[str]:
    tf = _tf()
    if "://" not in pattern:
        pattern = os.path.abspath(pattern)
    return sorted(tf.io.gfile.glob(pattern))


def check_shards(files: list[str], pattern: str, skip_corrupt: bool = False, log: Callable = print
                 ) -> tuple[list[str], list[int], dict[str, Any], int]:
    """(files, records per file, the first manifest, records skipped): the files matched by `pattern`
    checked against the manifest beside them. The manifest must exist and be complete and list every
    file; a shard it lists that the pattern selects but that is missing, or whose size differs from
    the listed one, is a DataError, or with `skip_corrupt` a warning (its records are skipped)."""
    manifests: dict[str, dict[str, dict]] = {}
    first: dict[str, Any] | None = None
    for f in files:
        directory = os.path.dirname(f)
        if directory in manifests:
            continue
        m = read_manifest(directory)
        if m is None:
            raise DataError(f"{directory}: no {MANIFEST} beside the shards matched by {pattern!r}; "
                            "build them with `python -m quietreasoning.data build --output-dir DIR`")
        if not m.get("complete"):
            raise DataError(f"{directory}/{MANIFEST}: the build did not finish; rerun the same build command "
                            "to complete it (finished shards are kept)")
        manifests[directory] = {e["path"]: e for e in m["shards"]}
        first = first or m
    entries = []
    for f in files:
        entry = manifests[os.path.dirname(f)].get(os.path.basename(f))
        if entry is None:
            raise DataError(f"{f}: not listed in {os.path.dirname(f)}/{MANIFEST}; remove it or rebuild the directory")
        entries.append(entry)
    present, selects = set(files), pattern if "://" in pattern else os.path.abspath(pattern)
    problems = [(os.path.join(d, name), entry, f"listed in {d}/{MANIFEST} but missing")
                for d, listed in manifests.items() for name, entry in listed.items()
                if os.path.join(d, name) not in present and fnmatch.fnmatchcase(os.path.join(d, name), selects)]
    sized = [(f, e) for f, e in zip(files, entries) if "bytes" in e]
    tf = _tf()
    with ThreadPoolExecutor(16) as pool:  # one stat per shard: round trips add up on gs://
        sizes = list(pool.map(lambda fe: tf.io.gfile.stat(fe[0]).length, sized))
    problems += [(f, e, f"{size} bytes but its {MANIFEST} lists {e['bytes']} (truncated or partly copied)")
                 for (f, e), size in zip(sized, sizes) if size != e["bytes"]]
    if problems and not skip_corrupt:
        path, _, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {what}{more}; copy it again, rerun the build into {os.path.dirname(path)} (it "
                        "rewrites what is missing or fails its sha256), or set data.skip_corrupt=true to skip it")
    skipped = 0
    for path, entry, what in problems:
        skipped += int(entry["records"])
        log(f"warning: {path}: {what}; skipping its {entry['records']} records (data.skip_corrupt=true)")
    bad = {path for path, _, _ in problems}
    keep = [i for i, f in enumerate(files) if f not in bad]
    return [files[i] for i in keep], [int(entries[i]["records"]) for i in keep], first or {}, skipped


def cursors(counts: list[int], k: int) -> list[int]:
    """Records already taken from each file after `k` documents of round-robin reading (files in
    the given order; a file drops out when exhausted)."""
    c = np.asarray(counts)
    lo, hi = 0, int(c.max(initial=0))  # the largest full round r with sum(min(c, r)) <= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(c, mid).sum() <= k:
            lo = mid
        else:
            hi = mid - 1
    taken = np.minimum(c, lo)
    rest = k - int(taken.sum())
    alive = np.flatnonzero(c > lo)
    taken[alive[:rest]] += 1
    return taken.tolist()


def round_robin(counts: list[int], taken: list[int]) -> Iterator[int]:
    """The file index of each next document: one from each file holding records in turn, going on
    from `taken` records already read per file (see `cursors`)."""
    taken = list(taken)
    r = min((t for t, c in zip(taken, counts) if c > t), default=None)
    while r is not None and any(c > r for c in counts):
        for j, c in enumerate(counts):
            if c > r and taken[j] == r:  # files at r + 1 already had their turn in this round
                taken[j] += 1
                yield j
        r += 1


class ShardReader:
    """`next_batch()` -> this host's rows of the global batch (numpy); `position()` / `restore()`."""

    def __init__(self, pattern: str, seq_len: int, rows: int, *, seed: int, process_index: int = 0,
                 process_count: int = 1, skip_corrupt: bool = False, rationale_weight: float = 1.0, log=print):
        files = _glob(pattern)
        if not files:
            raise DataError(f"data.pretrain_pattern={pattern!r} matches no files; check the path, or build shards "
                            "with `python -m quietreasoning.data build --output-dir DIR`")
        self.skip_corrupt, self.rationale_weight, self.log = skip_corrupt, rationale_weight, log
        files, counts, self.manifest, self.corrupt_records = check_shards(files, pattern, skip_corrupt, log)
        if not files:
            raise DataError(f"data.pretrain_pattern={pattern!r}: every shard it matches failed its checks (see the "
                            "warnings above); copy them again or rebuild")
        if len(files) >= process_count:  # file sharding
            self.files, self.counts = files[process_index::process_count], counts[process_index::process_count]
            self.keep_every, self.keep_offset = 1, 0
        else:  # fewer files than hosts: record sharding
            self.files, self.counts = files, counts
            self.keep_every, self.keep_offset = process_count, process_index
        if sum(self.counts) == 0:
            raise DataError(f"data.pretrain_pattern={pattern!r}: the shards hold no records; rebuild with more --docs")
        self.seq_len, self.rows, self.seed = seq_len, rows, seed
        self.restore(np.zeros(3, np.int64))

    # --- the position ---------------------------------------------------------------------------
    def position(self) -> np.ndarray:
        """(epoch, document index in the epoch's order, token offset into that document)."""
        return np.array([self.epoch, self.k, self.offset], np.int64)

    def restore(self, position) -> None:
        epoch, k, offset = (int(v) for v in np.asarray(position).reshape(3))
        self.epoch, self.k, self.offset = epoch, k, offset
        self._doc = None
        self._stream = self.documents(epoch, k)

    # --- documents in this host's order -----------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def documents(self, epoch: int = 0, k: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(k, tokens, roles) from document k of `epoch` on; rolls into the next epochs."""
        while True:
            order = self._order(epoch)
            counts = [self.counts[j] for j in order]
            start = cursors(counts, k)
            readers = {}
            for j in round_robin(counts, start):
                if j not in readers:
                    readers[j] = self._records(self.files[order[j]], start[j], counts[j])
                doc = next(readers[j], None)  # None: the rest of a corrupt shard that was skipped
                if doc is not None and (k % self.keep_every) == self.keep_offset:
                    yield k, doc[0], doc[1]
                k += 1
            epoch, k = epoch + 1, 0
            self.epoch = epoch

    def _records(self, path: str, skip: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The records of one shard from record `skip` on; a corrupt record either stops the run
        (naming shard and record) or, with data.skip_corrupt, ends this shard and is counted."""
        tf = _tf()
        compression = "GZIP" if path.endswith(".gz") else ""
        index = skip
        while index < count:
            ds = tf.data.TFRecordDataset(path, compression_type=compression).skip(index).batch(PARSE_BATCH)
            ds = ds.map(_parse)
            try:
                for tokens, lengths, roles, role_lengths in ds.as_numpy_iterator():
                    bounds = np.concatenate([[0], np.cumsum(lengths)])
                    rbounds = np.concatenate([[0], np.cumsum(role_lengths)])
                    for i in range(len(lengths)):
                        toks = tokens[bounds[i]:bounds[i + 1]]
                        rl = roles[rbounds[i]:rbounds[i + 1]]
                        yield toks, (rl if len(rl) == len(toks) else np.zeros_like(toks))
                        index += 1
                if index < count:  # fewer records than the manifest says: a truncated shard
                    raise tf.errors.DataLossError(None, None, "the file ends early")
                return
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                bad = self._first_bad(path, compression, index)
                if bad > index:  # good records before the bad one, inside the failed parse batch
                    for toks, rl in self._records_exact(path, compression, index, bad):
                        yield toks, rl
                        index += 1
                detail = str(e).splitlines()[0][:120]
                if not self.skip_corrupt:
                    raise DataError(f"{path}: corrupt record {bad} ({detail}); rebuild this shard (rerun the build: "
                                    "it rewrites what fails its sha256) or set data.skip_corrupt=true") from None
                lost = count - bad
                self.corrupt_records += lost
                self.log(f"warning: {path}: corrupt record {bad} ({detail}); skipping the last {lost} records "
                         f"of this shard ({self.corrupt_records} skipped so far)")
                return

    def _records_exact(self, path, compression, start, stop):
        tf = _tf()
        ds = tf.data.TFRecordDataset(path, compression_type=compression).skip(start).take(stop - start)
        for tokens, lengths, roles, role_lengths in ds.batch(1).map(_parse).as_numpy_iterator():
            yield tokens, (roles if len(roles) == len(tokens) else np.zeros_like(tokens))

    def _first_bad(self, path, compression, start) -> int:
        """The index of the first record at or after `start` that cannot be read."""
        tf = _tf()
        index = start
        try:
            for _ in tf.data.TFRecordDataset(path, compression_type=compression).skip(start).batch(1).map(_parse):
                index += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
            pass
        return index

    # --- packing ----------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, np.ndarray]:
        length = self.seq_len + 1
        tokens = np.zeros((self.rows, length), np.int32)
        segs = np.zeros((self.rows, length), np.int32)
        pos = np.zeros((self.rows, length), np.int32)
        roles = np.zeros((self.rows, length), np.int32)
        for r in range(self.rows):
            fill, seg = 0, 0
            while fill < length:
                if self._doc is None:
                    self.k, *self._doc = next(self._stream)
                toks, rl = self._doc
                take = min(length - fill, len(toks) - self.offset)
                seg += 1
                span = slice(fill, fill + take)
                tokens[r, span] = toks[self.offset:self.offset + take]
                roles[r, span] = rl[self.offset:self.offset + take]
                segs[r, span] = seg
                pos[r, span] = np.arange(take)
                fill += take
                self.offset += take
                if self.offset >= len(toks):
                    self._doc, self.offset = None, 0
                    self.k += 1
        weight = np.where(roles[:, 1:] == ROLES["rationale"], self.rationale_weight, 1.0)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segs[:, :-1],
            "positions": pos[:, :-1],
            "loss_mask": ((segs[:, 1:] == segs[:, :-1]) * weight).astype(np.float32),
            "answer_mask": (roles[:, :-1] == ROLES["answer"]).astype(np.float32),
        }


def _parse(serialized):
    # traced by tf.data: take the module already imported (_tf() would trace its environment setup)
    tf = sys.modules["tensorflow"]
    spec = {"tokens": tf.io.RaggedFeature(tf.int64), "roles": tf.io.RaggedFeature(tf.int64)}
    parsed = tf.io.parse_example(serialized, spec)
    return (parsed["tokens"].flat_values, parsed["tokens"].row_lengths(),
            parsed["roles"].flat_values, parsed["roles"].row_lengths())
