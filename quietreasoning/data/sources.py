"""Where the data build's raw documents come from: one mixture over named buckets, any corpus.

    documents(cfg.data, seed)  ->  Document, Document, ...   (the buckets interleaved)

Corpora (data.corpus):
  embedded    the default; no download, found on any Python install:
                prose      docstrings of the standard library, its .txt/.rst files and the
                           language reference topics (pydoc_data.topics)
                code       standard-library source, split into function/class-sized pieces (<= 20 KB)
                reasoning  arithmetic with chain of thought and ProsQA-style graphs (tasks.py)
                facts      PopQA-format questions about made-up entities, drawn by popularity (tasks.py)
  local:PATH  files, local or gs://: PATH/<bucket>.jsonl|.json|.txt|.parquet or PATH/<bucket>/...;
              a single file is one bucket named after its stem. jsonl/json/parquet records carry
              the document in a "text" field; a .txt file is one document.
  hub         the seed's web-scale buckets, streamed with `datasets` (first N documents of each).
data.local_buckets adds (or replaces) buckets from bucket=PATH entries, with any corpus.

Mixture: each corpus has a default {bucket: ratio}; data.mixture, when given, replaces it. Bucket
b gets round(docs * ratio_b / sum of ratios) documents (at least 1), and the buckets are
interleaved in an order drawn from the seed, so every stretch of the output (every shard) mixes
them. Everything is a pure function of (config, seed): sorted file lists, seeded choices,
nothing that depends on hash randomisation.

Failures are one line (SourceError) naming the bucket, the path or key, and the fix: a missing
path, an empty bucket, a file without a "text" column, a hub that cannot be reached. The hub is
checked within seconds, before `datasets` would spend minutes retrying. All checks run, and
every bucket yields its first document, before documents() returns.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import re
import socket
import sysconfig
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from quietreasoning.config import DataConfig, DataError
from quietreasoning.utils import io

log = logging.getLogger(__name__)

ROLES = ("text", "question", "rationale", "answer")  # the same names as shards.ROLES
KINDS = ("prose", "code", "math", "reasoning", "facts")
LOCAL_HINT = "build from local files with --source local:PATH or use --source embedded"


class SourceError(DataError):
    """A data source problem, phrased as one line naming the bucket, the path or key, and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One raw document. `parts` (role, text) spans mark what the writer weighs differently:
    roles text | question | rationale | answer; when present they concatenate to `text`."""
    bucket: str  # mixture bucket name
    kind: str    # prose | code | math | reasoning | facts (cleaning keys on it)
    text: str
    parts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.parts:
            bad = [role for role, _ in self.parts if role not in ROLES]
            if bad:
                raise ValueError(f"bucket {self.bucket!r}: part role {bad[0]!r} is not one of {ROLES}")
            if "".join(t for _, t in self.parts) != self.text:
                raise ValueError(f"bucket {self.bucket!r}: the parts do not concatenate to the text")

    @classmethod
    def from_parts(cls, bucket: str, kind: str, parts) -> Document:
        parts = tuple((str(role), str(text)) for role, text in parts)
        return cls(bucket, kind, "".join(t for _, t in parts), parts)

    @property
    def spans(self) -> tuple[tuple[str, str], ...]:
        """The parts, or the whole text as one 'text' span."""
        return self.parts or (("text", self.text),)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A named source: `read(count, seed)` yields up to `count` documents."""
    name: str
    kind: str
    where: str  # the path or dataset it reads, for messages
    read: Callable[[int, int], Iterator[Document]]
    hosts: tuple[str, ...] = ()  # network hosts it needs (hub buckets), checked before reading


# ----------------------------------------------------------------------------- the mixture

def documents(data_cfg: DataConfig, seed: int, docs: int | None = None) -> Iterator[Document]:
    """The configured corpus's mixture, `docs` (default data.docs) documents split over buckets by
    ratio and interleaved by `seed`. Raises SourceError before returning if a bucket cannot be read."""
    total = data_cfg.docs if docs is None else int(docs)
    if total <= 0:
        raise SourceError(f"docs={total}: ask for at least one document (data.docs or --docs)")
    buckets, ratios = mixture(data_cfg)
    counts = bucket_counts(ratios, total)
    _check_hub([buckets[b] for b in counts])
    streams = {}
    for name, n in counts.items():
        b = buckets[name]
        stream = iter(b.read(n, seed))
        first = next(stream, None)
        if first is None:
            raise SourceError(f"bucket '{name}' ({b.where}) has no documents; add .jsonl/.json/.txt/.parquet "
                              "files with text there, or leave the bucket out of data.mixture")
        streams[name] = itertools.chain([first], stream)
    names = list(counts)
    order = _rng(seed, "interleave").permutation(np.repeat(np.arange(len(names)), [counts[b] for b in names]))
    return _interleave([names[i] for i in order], streams)


def _interleave(order: list[str], streams: dict[str, Iterator[Document]]) -> Iterator[Document]:
    short: collections.Counter = collections.Counter()
    for name in order:
        doc = next(streams[name], None)
        if doc is None:
            short[name] += 1
        else:
            yield doc
    for name, missing in short.items():
        log.warning("bucket '%s' ran out: %d documents fewer than its share of the mixture", name, missing)


def bucket_counts(ratios: dict[str, float], docs: int) -> dict[str, int]:
    """Documents per bucket: round(docs * ratio / sum of ratios), at least 1 for a nonzero ratio."""
    total = sum(ratios.values())
    return {b: max(1, int(docs * r / total + 0.5)) for b, r in ratios.items() if r > 0}


def mixture(data_cfg: DataConfig) -> tuple[dict[str, Bucket], dict[str, float]]:
    """The corpus's buckets (plus data.local_buckets) and the ratios in force."""
    corpus = data_cfg.corpus
    if corpus == "embedded":
        buckets, default = embedded_buckets(), dict(EMBEDDED_MIXTURE)
    elif corpus == "hub":
        buckets, default = hub_buckets(), dict(HUB_MIXTURE)
    elif corpus.startswith("local:") and len(corpus) > 6:
        buckets, default = local_buckets(corpus[6:], "data.corpus"), None
    else:
        raise SourceError(f"data.corpus={corpus!r} must be embedded, hub or local:PATH")
    for name, path in data_cfg.pairs("local_buckets").items():
        buckets[name] = local_bucket(name, path, "data.local_buckets")
    if default is None:
        default = dict.fromkeys(buckets, 1.0)
    given = {b: float(r) for b, r in data_cfg.pairs("mixture").items()}
    ratios = given or default
    for b in ratios:
        if b not in buckets:
            raise SourceError(f"data.mixture: bucket '{b}' is not in corpus {corpus} (its buckets: "
                              f"{', '.join(buckets)}); name one of those or add it with data.local_buckets=[{b}=PATH]")
    unsaid = [] if given else [b for b in buckets if b not in ratios]
    if unsaid:  # data.local_buckets added a bucket to embedded/hub without saying how much of it
        example = ", ".join([*(f"{k}={v}" for k, v in ratios.items()), f"{unsaid[0]}=0.1"])
        raise SourceError(f"data.local_buckets adds bucket '{unsaid[0]}' to corpus {corpus}; give every bucket a "
                          f"ratio in data.mixture, e.g. data.mixture=[{example}]")
    return buckets, ratios


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one purpose: the seed and a stable (crc32, not hash()) code of the name."""
    return np.random.default_rng([int(seed) % 2 ** 32, zlib.crc32(name.encode())])


# ----------------------------------------------------------------------------- embedded corpus

EMBEDDED_MIXTURE = {"prose": 0.35, "code": 0.30, "reasoning": 0.20, "facts": 0.15}
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                       "encodings", "ensurepip"})  # encodings: generated code-page tables
MAX_FILE_BYTES = 1_000_000  # larger standard-library files are generated data, not prose or code
CODE_SKIP = ("pydoc_data/topics.py",)  # the language reference as one string: read as prose instead
CODE_PIECE = 4_000   # a longer file is cut at def/class boundaries into pieces of about this size ...
CODE_CAP = 20_000    # ... and no piece is longer than this (a longer block is cut at a line end)
PROSE_CHUNK = 8_000  # long texts (reference topics, .txt files) are cut at blank lines into chunks
MIN_CHARS = 100      # shorter docstrings and code pieces are left out

# a triple-quoted string opening a block (after a line ending in ':'), or a file (after comments)
_STRING = r'[ \t]*([rRuU]?)(?:"""(.*?)"""|\'\'\'(.*?)\'\'\')'
_BLOCK_DOCSTRING = re.compile(r':[ \t]*(?:#[^\n]*)?\n' + _STRING, re.S)
_MODULE_DOCSTRING = re.compile(r'(?:[ \t]*(?:#[^\n]*)?\n)*' + _STRING, re.S)
_DEF = re.compile(r"(?:@|def |async def |class )")


def embedded_buckets() -> dict[str, Bucket]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "prose": Bucket("prose", "prose", f"docstrings and text files under {stdlib}, pydoc_data.topics",
                        functools.partial(_sample_pool, "prose", "prose", _prose_pool)),
        "code": Bucket("code", "code", f"*.py under {stdlib}",
                       functools.partial(_sample_pool, "code", "code", _code_pool)),
        "reasoning": Bucket("reasoning", "reasoning", "generated (quietreasoning/data/tasks.py)", _read_reasoning),
        "facts": Bucket("facts", "facts", "generated (quietreasoning/data/tasks.py)", _read_facts),
    }


def _too_few(name: str, have: int, want: int) -> SourceError:
    return SourceError(f"embedded bucket '{name}' holds {have} documents but the mixture asks for {want}; lower "
                       "data.docs (or its ratio in data.mixture), or build from local files with --source local:PATH")


def _sample_pool(name: str, kind: str, pool: Callable[[], tuple[str, ...]], count: int,
                 seed: int) -> Iterator[Document]:
    """`count` texts of the pool, chosen and ordered by the seed, none twice."""
    texts = pool()
    if texts and count > len(texts):
        raise _too_few(name, len(texts), count)
    for i in _rng(seed, name).permutation(len(texts))[:count]:
        yield Document(name, kind, texts[i])


def _read_reasoning(count: int, seed: int) -> Iterator[Document]:
    from quietreasoning.data import tasks  # imported here: tasks imports Document from this module
    yield from tasks.reasoning_documents(_rng(seed, "reasoning"), count, "reasoning")


def _read_facts(count: int, seed: int) -> Iterator[Document]:
    """Questions about the world tasks.popqa_records(seed) makes (evaluation rebuilds it from the seed)."""
    from quietreasoning.data import tasks
    records = tasks.popqa_records(seed)
    if count > len(records):
        raise _too_few("facts", len(records), count)
    yield from tasks.fact_documents(records, _rng(seed, "facts"), count, "facts")


@functools.cache
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    """(path under the stdlib, text) of its .py, .txt and .rst files, tests and huge files left out, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for f in sorted(files):
            if not f.endswith((".py", ".txt", ".rst")) or f.startswith(("test_", "_sysconfigdata")):
                continue
            path = os.path.join(folder, f)
            try:
                if os.path.getsize(path) > MAX_FILE_BYTES:
                    continue
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError):
                continue
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    return tuple(out)


@functools.cache
def _prose_pool() -> tuple[str, ...]:
    """Docstrings (at least MIN_CHARS), the .txt/.rst files and the reference topics, in chunks; unique."""
    texts: list[str] = []
    for rel, src in _stdlib_files():
        if rel.endswith(".py"):
            texts += _docstrings(src)
        elif "Grammar" not in rel:  # lib2to3's grammar files are not prose
            texts += _chunks(src, PROSE_CHUNK)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        topics = {}
    for key in sorted(topics):
        texts += _chunks(topics[key], PROSE_CHUNK)
    return tuple(dict.fromkeys(t for t in texts if len(t) >= MIN_CHARS))


def _docstrings(src: str) -> list[str]:
    """The docstrings of a module's source, found by pattern (parsing all of the stdlib takes 8 s)."""
    out = []
    head = _MODULE_DOCSTRING.match(src)
    for m in itertools.chain([head] if head else [], _BLOCK_DOCSTRING.finditer(src)):
        prefix, double, single = m.groups()
        body = double if double is not None else single
        if "\\" in body and prefix.lower() != "r":  # escapes to resolve: let Python read the literal
            quote = '"""' if double is not None else "'''"
            try:
                body = ast.literal_eval(prefix + quote + body + quote)
            except (ValueError, SyntaxError):
                continue
        out.append(inspect.cleandoc(body))
    return out


def _chunks(text: str, limit: int) -> list[str]:
    """`text` cut at blank lines into pieces of at most `limit` characters (a longer paragraph is cut)."""
    out, current = [], ""
    for para in re.split(r"\n[ \t]*\n", text.strip()):
        if current and len(current) + 2 + len(para) > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
        while len(current) > limit:
            out.append(current[:limit])
            current = current[limit:]
    if current.strip():
        out.append(current)
    return [c.strip() for c in out]


@functools.cache
def _code_pool() -> tuple[str, ...]:
    pieces: list[str] = []
    for rel, src in _stdlib_files():
        if rel.endswith(".py") and rel not in CODE_SKIP:
            pieces += _code_pieces(src)
    return tuple(dict.fromkeys(p for p in pieces if len(p.strip()) >= MIN_CHARS))


def _code_pieces(src: str) -> list[str]:
    """A file up to CODE_PIECE as it is; a bigger one cut before its top-level def/class lines (a
    block over CODE_CAP also before its methods), consecutive blocks grouped up to CODE_PIECE."""
    if len(src) <= CODE_PIECE:
        return [src]
    blocks = []
    for block in _blocks(src.splitlines(keepends=True), ""):
        blocks += _blocks(block, "    ") if sum(map(len, block)) > CODE_CAP else [block]
    pieces, current = [], ""
    for block in blocks:
        text = "".join(block)
        if current and len(current) + len(text) > CODE_PIECE:
            pieces.append(current)
            current = ""
        current += text
    pieces.append(current)
    return [_cap(p, CODE_CAP) for p in pieces]


def _blocks(lines: list[str], indent: str) -> list[list[str]]:
    """`lines` cut before each def/class line at `indent`; its decorators and comments go with it."""
    starts = [0]
    for i in range(1, len(lines)):
        decorated = lines[i - 1].startswith(indent + "@")  # the block began at its decorator
        if lines[i].startswith(indent) and _DEF.match(lines[i], len(indent)) and not decorated:
            j = i
            while j - 1 > starts[-1] and lines[j - 1].startswith(indent + "#"):
                j -= 1
            if j > starts[-1]:
                starts.append(j)
    return [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit]


# ----------------------------------------------------------------------------- local corpus

LOADERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}  # datasets' packaged loaders
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # read through by datasets (.zst needs the zstandard package)
FILES_HINT = "a .jsonl/.json/.parquet file with a 'text' field, a .txt file (one document), or a folder of them"


def _data_file(name: str) -> tuple[str, str] | None:
    """(stem, loader) of a data file's name, e.g. 'prose.jsonl.gz' -> ('prose', 'json'); else None."""
    base = name
    for suffix in COMPRESSION:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem, ext = os.path.splitext(base)
    loader = LOADERS.get(ext.lower())
    return (stem, loader) if loader and stem and not name.startswith(".") else None


def _folder_files(folder) -> list[str]:
    """The data files under `folder` and its subfolders, sorted; hidden ones left out."""
    out = []
    for entry in sorted(io.path(folder).iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            out += _folder_files(entry)
        elif _data_file(entry.name):
            out.append(str(entry))
    return out


def local_buckets(path: str, key: str) -> dict[str, Bucket]:
    """Buckets of `local:PATH`: a single data file (a bucket named after its stem), or a folder whose
    data files and subfolders name buckets (PATH/prose.jsonl, PATH/code/*.txt, ...)."""
    p = io.path(path)
    if not p.exists():
        raise SourceError(f"{key}: {path} does not exist; point it at {FILES_HINT}, named after its bucket")
    if p.is_file():
        parsed = _data_file(p.name)
        if not parsed:
            raise SourceError(f"{key}: {path} is not a data file; give {FILES_HINT}")
        return {parsed[0]: local_bucket(parsed[0], path, key)}
    found: dict[str, list] = {}
    for entry in sorted(p.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.setdefault(entry.name, []).append(entry)
        elif _data_file(entry.name):
            found.setdefault(_data_file(entry.name)[0], []).append(entry)
    if not found:
        raise SourceError(f"{key}: {path} holds no bucket files or folders; put <bucket>.jsonl/.json/.txt/.parquet "
                          "files or <bucket>/ folders there")
    return {name: _bucket(name, " + ".join(str(e) for e in entries),
                          [f for e in entries for f in (_folder_files(e) if e.is_dir() else [str(e)])])
            for name, entries in found.items()}


def local_bucket(name: str, path: str, key: str) -> Bucket:
    """One bucket from a data file or a folder of them (a data.local_buckets entry)."""
    p = io.path(path)
    if not p.exists():
        raise SourceError(f"{key}: {name}={path} does not exist; point it at {FILES_HINT}")
    if p.is_file():
        if not _data_file(p.name):
            raise SourceError(f"{key}: {name}={path} is not a data file; give {FILES_HINT}")
        return _bucket(name, path, [str(p)])
    return _bucket(name, path, _folder_files(p))


def kind_of(bucket: str) -> str:
    """A bucket's kind: its name if that is a kind, a hub bucket's kind, a kind it starts with
    ('code_extra' -> code, 'math-web' -> math), else prose."""
    if bucket in KINDS:
        return bucket
    if bucket in HUB_SOURCES:
        return HUB_SOURCES[bucket].kind
    head = re.split(r"[_\-.]", bucket, maxsplit=1)[0]
    return head if head in KINDS else "prose"


def _bucket(name: str, where: str, files: list[str]) -> Bucket:
    return Bucket(name, kind_of(name), where, functools.partial(_read_local, name, kind_of(name), tuple(files)))


def _read_local(name: str, kind: str, files: tuple[str, ...], count: int, seed: int) -> Iterator[Document]:
    """The first `count` documents of `files`, in order (the seed plays no part)."""
    yield from (Document(name, kind, t) for t in itertools.islice(_local_texts(files), count))


def _local_texts(files: tuple[str, ...]) -> Iterator[str]:
    import datasets  # about 2 s to import: only when local files are read

    for loader, group in itertools.groupby(files, key=lambda f: _data_file(os.path.basename(f))[1]):
        group = list(group)
        # .txt files load together (one document each); the others one by one, to name a bad file
        batches = [group] if loader == "text" else [[f] for f in group]
        for batch in batches:
            where = batch[0] if len(batch) == 1 else f"{os.path.dirname(batch[0])} (.txt files)"
            kwargs = {"sample_by": "document"} if loader == "text" else {}
            try:
                ds = datasets.load_dataset(loader, data_files=batch, split="train", streaming=True, **kwargs)
                if ds.column_names is not None and "text" not in ds.column_names:
                    raise SourceError(f"{where}: no 'text' column (it has {', '.join(ds.column_names) or 'none'}); "
                                      "local records need the document in a 'text' field")
                for row in ds:
                    text = row.get("text")
                    if isinstance(text, str) and text.strip():
                        yield text
            except SourceError:
                raise
            except Exception as e:  # corrupt or unreadable file: one line naming it
                raise SourceError(f"{where}: cannot be read as {loader} ({type(e).__name__}: "
                                  f"{_first_line(e)}); fix or remove the file") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# ----------------------------------------------------------------------------- hub corpus

@dataclasses.dataclass(frozen=True)
class HubSource:
    """One hub bucket: what `datasets.load_dataset(..., split="train", streaming=True)` is asked."""
    kind: str
    dataset: str             # the hub id (messages name it; it is load_dataset's path unless `path` is set)
    path: str = ""           # "json" for a dataset read from its shard files by URL (`data_files`)
    name: str | None = None  # the dataset's config
    data_files: tuple[str, ...] = ()
    text_field: str = "text"
    hosts: tuple[str, ...] = ("huggingface.co",)
    swh_blob: bool = False   # rows name a blob_id; the text comes from Software Heritage (The Stack v2)


# RedPajama-V2 and Proof-Pile-2 are script datasets on the hub, which datasets >= 4 cannot run, and
# Dolma's files live off the hub: those read their published .json.gz shards by URL.
_RPV2 = "https://data.together.xyz/redpajama-data-v2/v1.0.0/documents/{}/{:04d}/en_head.json.gz"
_DOLMA = "https://olmo-data.org/dolma-v1_7/{0}/{1}-{2:04d}.json.gz"
HUB_SOURCES = {
    # FineWeb's 10B-token sample (English; FineWeb-2 is the non-English sibling, which the
    # English-only language filter would drop)
    "fineweb": HubSource("prose", "HuggingFaceFW/fineweb", name="sample-10BT"),
    "redpajama_v2": HubSource("prose", "togethercomputer/RedPajama-Data-V2", path="json", text_field="raw_content",
                              data_files=tuple(_RPV2.format(s, i) for s in ("2023-06", "2023-14") for i in range(5)),
                              hosts=("data.together.xyz",)),
    "dolma": HubSource("prose", "allenai/dolma (v1.7 cc_en_head)", path="json", hosts=("olmo-data.org",),
                       data_files=tuple(_DOLMA.format("cc_en_head", "cc_en_head", i) for i in range(5))),
    "openwebmath": HubSource("math", "open-web-math/open-web-math"),
    "proof_pile_2": HubSource("math", "EleutherAI/proof-pile-2 (algebraic-stack, Dolma v1.7 copy)", path="json",
                              hosts=("olmo-data.org",),
                              data_files=tuple(_DOLMA.format("proof_pile_2-algebraic_stack", "algebraic-stack-train", i)
                                               for i in range(4))),
    # gated: accept the terms on the hub and set HF_TOKEN
    "stack_v2": HubSource("code", "bigcode/the-stack-v2-dedup", name="Python", swh_blob=True,
                          hosts=("huggingface.co", "softwareheritage.s3.amazonaws.com")),
}
HUB_MIXTURE = {"fineweb": 0.55, "redpajama_v2": 0.20, "dolma": 0.10, "openwebmath": 0.05, "proof_pile_2": 0.03,
               "stack_v2": 0.07}
SWH_CONTENT = "https://softwareheritage.s3.amazonaws.com/content/{}"  # gzip-compressed file contents


def hub_buckets() -> dict[str, Bucket]:
    return {name: Bucket(name, src.kind, src.dataset, functools.partial(_read_hub, name, src), src.hosts)
            for name, src in HUB_SOURCES.items()}


def _check_hub(buckets: list[Bucket]) -> None:
    """Offline flags or an unreachable host: one line within seconds, naming the first bucket
    that needs it and the local alternative."""
    needs = [b for b in buckets if b.hosts]
    if not needs:
        return
    from quietreasoning.utils import hub

    reason = hub.offline_reason()  # offline flags, then huggingface.co:443 (3 s timeout)
    if reason:
        b = needs[0]
        raise SourceError(f"hub bucket '{b.name}' ({b.where}) is unreachable (offline: {reason}); {LOCAL_HINT}")
    probed = {hub.HUB_HOST[0]}
    for b in needs:
        for host in b.hosts:
            if host in probed:
                continue
            probed.add(host)
            try:
                socket.create_connection((host, 443), timeout=3.0).close()
            except OSError as e:
                raise SourceError(f"hub bucket '{b.name}' ({b.where}) is unreachable ({host}:443: "
                                  f"{e.strerror or type(e).__name__}); {LOCAL_HINT}") from None


def _read_hub(name: str, src: HubSource, count: int, seed: int) -> Iterator[Document]:
    """The first `count` documents of the stream (the seed plays no part)."""
    import datasets

    try:
        ds = datasets.load_dataset(src.path or src.dataset, src.name, data_files=list(src.data_files) or None,
                                   split="train", streaming=True)
        texts = (_swh_text(row) if src.swh_blob else row.get(src.text_field) for row in ds)
        texts = (t for t in texts if isinstance(t, str) and t.strip())
        yield from (Document(name, src.kind, t) for t in itertools.islice(texts, count))
    except Exception as e:
        raise SourceError(f"hub bucket '{name}' ({src.dataset}): {type(e).__name__}: {_first_line(e)}; check access "
                          f"(gated datasets need accepted terms and HF_TOKEN), or {LOCAL_HINT}") from None


def _swh_text(row: dict) -> str:
    """The Stack v2 holds file ids; the contents come from Software Heritage's public S3 bucket."""
    import gzip
    import urllib.request

    with urllib.request.urlopen(SWH_CONTENT.format(row["blob_id"]), timeout=30) as r:
        return gzip.decompress(r.read()).decode(row.get("src_encoding") or "utf-8", errors="replace")
