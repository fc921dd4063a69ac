"""TFRecord shards and their manifest.

A record is one document: `tokens` (int64 ids, <bos> ... <eos>) and, for documents with marked
parts, `roles` (one int64 per token: 0 text, 1 question, 2 rationale, 3 answer). Shards hold one
bucket each (`<bucket>-00000.tfrecord`), are written under a temporary name and renamed when
complete, and are listed in `manifest.json` with their records, tokens, bytes and sha256. The
manifest is rewritten (atomically) after every shard, so an interrupted build leaves finished
shards that a rerun verifies and skips; a write that fails (a full disk) is one line naming the
file, with the finished shards and the last manifest left as they were.

Checks, cheapest first: the reader, at start, that every shard the pattern selects is listed, is
there and has its listed size (data/reader.py); TFRecord's per-record CRC while reading; `verify`
(`python -m quietreasoning.data verify DIR`), every shard's sha256; a rerun of the build rewrites
whatever fails its sha256.
"""

from __future__ import annotations

import contextlib
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
# what a failed write of the build says to do
WRITE_FIX = ("free space there (or build into another directory) and rerun the same build command: the shards "
             "already finished are kept")


def _tf():
    """TensorFlow, imported only on the data path (it costs seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf
    return tf


def example(tokens: np.ndarray, roles: np.ndarray | None) -> bytes:
    tf = _tf()
    feature = {"tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens))}
    if roles is not None:
        feature["roles"] = tf.train.Feature(int64_list=tf.train.Int64List(value=roles))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def read_manifest(directory) -> dict[str, Any] | None:
    """The manifest of `directory`, None when it has none; a truncated or garbled one is a DataError."""
    p = io.path(directory) / MANIFEST
    if not p.exists():
        return None
    fix = "copy it again, or delete it and rerun the build command (every shard is then rebuilt)"
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: corrupt manifest ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: corrupt manifest (not UTF-8 text); {fix}") from None
    shards = m.get("shards") if isinstance(m, dict) else None
    if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("records"), int)
            and isinstance(e.get("sha256"), str) for e in shards):
        raise DataError(f"{p}: not a shard manifest (an object whose 'shards' lists path, records and sha256 of "
                        f"each shard); {fix}")
    return m


def write_manifest(directory, manifest: dict[str, Any]) -> None:
    p = io.path(directory) / MANIFEST
    with io.write_errors(p, DataError, f"{WRITE_FIX}; the previous {MANIFEST} is kept"):
        io.atomic_write_text(p, json.dumps(manifest, indent=1) + "\n")



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
                with self._write_errors(name):
                    shard["writer"] = _tf().io.TFRecordWriter(os.fspath(tmp), options=self.compression or None)
            self._open[bucket] = shard
        return self._open[bucket]

    def _write_errors(self, name: str):
        """A failed write of shard `name` (TensorFlow's errors or OSError) as one DataError naming it."""
        return io.write_errors(self.directory / name, DataError, WRITE_FIX, kinds=(OSError, _tf().errors.OpError))

    def add(self, bucket: str, tokens: np.ndarray | None, roles: np.ndarray | None = None) -> None:
        """One document; `tokens` may be None when it lands in a finished shard (whose counts come
        from its manifest entry)."""
        shard = self._current(bucket)
        if shard["writer"] is not None:
            with self._write_errors(shard["name"]):
                shard["writer"].write(example(tokens, roles))
            shard["tokens"] += len(tokens)
        shard["records"] += 1
        if shard["records"] >= self.records_per_shard:
            self._finish(bucket)

    def _finish(self, bucket: str) -> None:
        shard = self._open[bucket]
        if shard["writer"] is None:
            self.shards.append(self.finished[shard["name"]])
        else:
            dst = self.directory / shard["name"]
            with self._write_errors(shard["name"]):  # on failure the shard stays open, for abort() to delete
                shard["writer"].close()
                shard["writer"] = None
                shard["tmp"].replace(dst)
            self.shards.append({"path": shard["name"], "bucket": bucket, "records": shard["records"],
                                "tokens": shard["tokens"], "bytes": dst.stat().length, "sha256": io.sha256(dst)})
        del self._open[bucket]
        self._index[bucket] = self._index.get(bucket, 0) + 1
        if self.on_shard:
            self.on_shard(self.shards)

    def close(self) -> list[dict[str, Any]]:
        for bucket in sorted(self._open):
            if self._open[bucket]["records"]:
                self._finish(bucket)
            else:
                shard = self._open.pop(bucket)
                self._drop(shard)
        return self.shards

    def abort(self) -> None:
        """Drops the half-written shards (an error stopped the build): nothing partial remains."""
        for shard in self._open.values():
            self._drop(shard)
        self._open.clear()

    @staticmethod
    def _drop(shard: dict[str, Any]) -> None:
        """Closes a shard's writer and deletes its temporary file; a writer that fails to close (its
        disk is full) is dropped all the same."""
        if shard["writer"] is not None:
            with contextlib.suppress(Exception):  # the file goes next; the error that stopped the build is raised
                shard["writer"].close()
        if "tmp" in shard:
            shard["tmp"].unlink(missing_ok=True)


def verified_shards(directory, manifest: dict[str, Any] | None) -> dict[str, dict]:
    """The shards of an earlier (possibly interrupted) build whose files exist and match their sha256."""
    if not manifest:
        return {}
    out = {}
    for entry in manifest.get("shards", []):
        p = io.path(directory) / entry["path"]
        if p.exists() and io.sha256(p) == entry["sha256"]:
            out[entry["path"]] = entry
    return out


def verify(directory) -> dict[str, Any]:
    """Checks a built directory against its manifest: the build finished, every listed shard is there
    with its size and sha256, and no shard file is unlisted. Returns the manifest; the first problem
    is a DataError naming the file and the fix."""
    d = io.path(directory)
    m = read_manifest(d)
    if m is None:
        raise DataError(f"{d}: no {MANIFEST}; build the shards with `python -m quietreasoning.data build "
                        f"--output-dir {directory}`")
    if not m.get("complete"):
        raise DataError(f"{d / MANIFEST}: the build did not finish; rerun the same build command to complete it "
                        "(finished shards are kept)")
    rebuild = (f"copy it again, or rerun the build command into {directory} (it rewrites each shard that fails its "
               "sha256)")
    for entry in m["shards"]:
        p = d / entry["path"]
        if not p.exists():
            raise DataError(f"{p}: listed in {MANIFEST} but missing; {rebuild}")
        size = p.stat().length
        if "bytes" in entry and size != entry["bytes"]:
            raise DataError(f"{p}: {size} bytes but {MANIFEST} lists {entry['bytes']} (truncated or partly copied); "
                            f"{rebuild}")
        if io.sha256(p) != entry["sha256"]:
            raise DataError(f"{p}: sha256 differs from the one in {MANIFEST} (the file changed after the build); "
                            f"{rebuild}")
    listed = {entry["path"] for entry in m["shards"]}
    unlisted = sorted(p.name for p in d.glob("*.tfrecord*") if p.name not in listed)
    if unlisted:
        raise DataError(f"{d / unlisted[0]}: a shard file not listed in {MANIFEST}; remove it, or rebuild the "
                        "directory")
    return m
