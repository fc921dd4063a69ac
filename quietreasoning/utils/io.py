"""The one I/O layer: every file path (local or gs://) goes through etils.epath."""

from __future__ import annotations

import os

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it), or a cloud URL (gs://...) as given."""
    p = os.fspath(p)
    return epath.Path(p if "://" in p else os.path.abspath(p))


def atomic_write_text(p: str | os.PathLike, text: str) -> None:
    """Writes to a temporary name, then renames over `p`: a reader never sees half a file."""
    dst = path(p)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(dst)


def atomic_write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes (npy arrays, FAISS indexes)."""
    dst = path(p)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(dst)
