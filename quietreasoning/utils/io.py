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


def read_jsonl(p: str | os.PathLike, check, error: type[Exception], kind: str, fix: str) -> list:
    """The records of a jsonl file (local or gs://), one JSON object per non-blank line, each passed
    through `check(record, "file:line")`. A missing file, a line that is not JSON or a file without
    records raises `error` naming the file (and line); `kind` names the format ("a PopQA jsonl
    file") and `fix` says where a good file comes from."""
    import json

    src = path(p)
    if not src.exists():
        raise error(f"{p}: file not found; {fix}")
    records = []
    for n, line in enumerate(src.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}); {kind} holds one JSON object "
                        "per line") from None
        records.append(check(record, f"{p}:{n}"))
    if not records:
        raise error(f"{p}: no records; {kind} holds one JSON object per line")
    return records
