"""The one I/O layer: every file path (local or gs://) goes through etils.epath."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it), or a cloud URL (gs://...) as given."""
    p = os.fspath(p)
    return epath.Path(p if "://" in p else os.path.abspath(p))


def atomic_write_text(p: str | os.PathLike, text: str) -> None:
    """Writes to a temporary name, then renames over `p`: a reader never sees half a file. A write
    that fails (a full disk) removes the temporary file, leaves `p` as it was and raises the
    OSError with `p` as its filename."""
    _write_then_rename(path(p), lambda tmp: tmp.write_text(text))


def atomic_write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes (npy arrays, FAISS indexes)."""
    _write_then_rename(path(p), lambda tmp: tmp.write_bytes(data))


def _write_then_rename(dst: epath.Path, write) -> None:
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        tmp.replace(dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(dst)) from e  # named: dst, not tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of space: OSError ENOSPC, or a library's report of it
    (TensorFlow raises ResourceExhaustedError '...; No space left on device')."""
    return isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)


@contextlib.contextmanager
def write_errors(p: str | os.PathLike, error: type[Exception], fix: str,
                 kinds: tuple[type[BaseException], ...] = (OSError,)):
    """Turns a failed write inside the block (an exception of `kinds`) into `error`: one line naming
    `p`, saying whether the disk is full, then `fix` (what to do, what was kept)."""
    try:
        yield
    except kinds as e:
        text = str(e).splitlines()[0][:160] if str(e) else ""
        raise error(f"{p}: {'disk full' if disk_full(e) else 'cannot write'} ({type(e).__name__}: {text}); "
                    f"{fix}") from None


def sha256(p: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path(p).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
