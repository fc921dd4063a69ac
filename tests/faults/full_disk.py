"""A disk that fills up, for the fault tests.

`fill_disk(monkeypatch, budget, names)` makes every write to a file whose name matches `names`
(an fnmatch pattern) count against `budget` bytes: writes through Python file objects opened by
etils.epath (the one I/O layer, utils/io.py, and everything that uses it) and TensorFlow's
TFRecordWriter (the shards). The write that crosses the budget writes what fits and fails as a
real full disk does: OSError errno 28 without a filename from a Python write, and TensorFlow's
ResourceExhaustedError '<path>; No space left on device' from a TFRecord write. Files whose names
do not match are written freely. `monkeypatch.undo()` gives the disk its room back.
"""

from __future__ import annotations

import errno
import fnmatch
import os

from quietreasoning.utils import io

TFRECORD_FRAMING = 16  # bytes around each record: length, its CRC, the data's CRC


class FullDisk:
    def __init__(self, budget: int, names: str):
        self.left = budget
        self.names = names
        self.failed: list[str] = []  # the files whose write hit the limit

    def take(self, path, n: int) -> int:
        """How many of `n` bytes for `path` still fit; records `path` when not all of them."""
        if not fnmatch.fnmatch(os.path.basename(os.fspath(path)), self.names):
            return n
        fit = max(0, min(n, self.left))
        self.left -= fit
        if fit < n:
            self.failed.append(os.fspath(path))
        return fit


class _File:
    """A file object whose writes draw on the disk's budget."""

    def __init__(self, f, path, disk: FullDisk):
        self._f, self._path, self._disk = f, path, disk

    def write(self, data):
        fit = self._disk.take(self._path, len(data))
        if fit < len(data):
            self._f.write(data[:fit])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, budget: int, names: str = "*") -> FullDisk:
    """Installs a disk with `budget` bytes left for files named like `names` (see the module docstring)."""
    import tensorflow as tf

    disk = FullDisk(budget, names)
    path_cls = type(io.path("/"))
    real_open = path_cls.open

    def open_(self, mode="r", **kw):
        f = real_open(self, mode, **kw)
        return _File(f, self, disk) if any(c in mode for c in "wa") else f

    real_writer = tf.io.TFRecordWriter

    class TFRecordWriter:
        def __init__(self, path, options=None):
            self._path, self._w = path, real_writer(path, options=options)

        def write(self, record: bytes) -> None:
            if disk.take(self._path, len(record) + TFRECORD_FRAMING) < len(record) + TFRECORD_FRAMING:
                raise tf.errors.ResourceExhaustedError(None, None, f"{self._path}; No space left on device")
            self._w.write(record)

        def flush(self) -> None:
            self._w.flush()

        def close(self) -> None:
            self._w.close()

    monkeypatch.setattr(path_cls, "open", open_)
    monkeypatch.setattr(tf.io, "TFRecordWriter", TFRecordWriter)
    return disk
