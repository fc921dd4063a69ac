"""TFRecord shards and their manifest.

A record is one document: `tokens` (int64 ids, <bos> ... <eos>) and, for documents with marked
parts, `roles` (one int64 per token: 0 text, 1 question, 2 rationale, 3 answer). Shards hold one
bucket each (`<bucket>-00000.tfrecord`), are written under a temporary name and renamed when
complete, and are listed in `manifest.json` with their records, tokens and sha256. The manifest is
rewritten (atomically) after every shard, so an interrupted build leaves finished shards that a
rerun verifies and skips.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from quietreasoning.config import DataError
from quietreasoning.utils import io

ROLES = {"text": 0, "question": 1, "rationale": 2, "answer": 3}
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = 1


def _tf():
    """TensorFlow, imported only on the data path (it costs seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf
    return tf


def sha256(path) -> str:
    h = hashlib.sha256()
    with io.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def example(tokens: np.ndarray, roles: np.ndarray | None) -> bytes:
    tf = _tf()
    feature = {"tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens))}
    if roles is not None:
        feature["roles"] = tf.train.Feature(int64_list=tf.train.Int64List(value=roles))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def read_manifest(directory) -> dict[str, Any] | None:
    p = io.path(directory) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: corrupt manifest ({e.msg} at line {e.lineno}); delete it and rerun the build") from None


def write_manifest(directory, manifest: dict[str, Any]) -> None:
    io.atomic_write_text(io.path(directory) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


class ShardWriter:
    """Appends documents to per-bucket shards; a shard listed in `finished` (from an earlier,
    interrupted run, already verified) is counted but not rewritten."""

    def __init__(self, directory, records_per_shard: int, compression: str = "",
                 finished: dict[str, dict] | None = None, on_shard=None):
        self.directory = io.path(directory)
        self.records_per_shard = records_per_shard
        self.compression = compression
        self.finished = finished or {}
        self.on_shard = on_shard  # called with the shard list after each shard completes
        self.shards: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}  # bucket -> the shard being filled
        self._index: dict[str, int] = {}

    def _name(self, bucket: str, index: int) -> str:
        return f"{bucket}-{index:05d}.tfrecord" + (".gz" if self.compression == "GZIP" else "")

    def shard_name(self, bucket: str, nth: int) -> str:
        """The shard that the `nth` record of `bucket` goes to."""
        return self._name(bucket, nth // self.records_per_shard)

    def _current(self, bucket: str) -> dict[str, Any]:
        if bucket not in self._open:
            index = self._index.get(bucket, 0)
            name = self._name(bucket, index)
            shard = {"name": name, "bucket": bucket, "records": 0, "tokens": 0, "writer": None}
            if name not in self.finished:
                tmp = self.directory / f".{name}.tmp-{os.getpid()}"
                shard["tmp"] = tmp
                shard["writer"] = _tf().io.TFRecordWriter(os.fspath(tmp), options=self.compression or None)
            self._open[bucket] = shard
        return self._open[bucket]

    def add(self, bucket: str, tokens: np.ndarray | None, roles: np.ndarray | None = None) -> None:
        """One document; `tokens` may be None when it lands in a finished shard (whose counts come
        from its manifest entry)."""
        shard = self._current(bucket)
        if shard["writer"] is not None:
            shard["writer"].write(example(tokens, roles))
            shard["tokens"] += len(tokens)
        shard["records"] += 1
        if shard["records"] >= self.records_per_shard:
            self._finish(bucket)

    def _finish(self, bucket: str) -> None:
        shard = self._open.pop(bucket)
        self._index[bucket] = self._index.get(bucket, 0) + 1
        if shard["writer"] is None:
            self.shards.append(self.finished[shard["name"]])
        else:
            shard["writer"].close()
            dst = self.directory / shard["name"]
            shard["tmp"].replace(dst)
            self.shards.append({"path": shard["name"], "bucket": bucket, "records": shard["records"],
                                "tokens": shard["tokens"], "sha256": sha256(dst)})
        if self.on_shard:
            self.on_shard(self.shards)

    def close(self) -> list[dict[str, Any]]:
        for bucket in sorted(self._open):
            if self._open[bucket]["records"]:
                self._finish(bucket)
            else:
                shard = self._open.pop(bucket)
                if shard["writer"] is not None:
                    shard["writer"].close()
                    shard["tmp"].unlink(missing_ok=True)
        return self.shards

    def abort(self) -> None:
        """Drops the half-written shards (an error stopped the build): nothing partial remains."""
        for shard in self._open.values():
            if shard["writer"] is not None:
                shard["writer"].close()
                shard["tmp"].unlink(missing_ok=True)
        self._open.clear()


def verified_shards(directory, manifest: dict[str, Any] | None) -> dict[str, dict]:
    """The shards of an earlier (possibly interrupted) build whose files exist and match their sha256."""
    if not manifest:
        return {}
    out = {}
    for entry in manifest.get("shards", []):
        p = io.path(directory) / entry["path"]
        if p.exists() and sha256(p) == entry["sha256"]:
            out[entry["path"]] = entry
    return out
