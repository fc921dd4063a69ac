"""The data build: mixture -> cleaning -> tokenizer -> TFRecord shards + manifest.json.

    python -m quietreasoning.data build --output-dir data/tiny            # the embedded corpus
    python -m quietreasoning.data build --output-dir DIR --source local:PATH --docs 20000

Rerunning the same command into the same directory skips what is complete: the tokenizer
already saved there is reused, and shards whose sha256 matches the manifest are not rewritten.
A directory built with other settings is refused rather than mixed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm

from quietreasoning.config import DataConfig, DataError
from quietreasoning.data.shards import (FORMAT, ROLES, TOKENIZER, WRITE_FIX, ShardWriter, read_manifest,
                                        verified_shards, write_manifest)
from quietreasoning.utils import io
from quietreasoning.utils.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

ENCODE_CHUNK = 256


def settings(data: DataConfig, vocab_size: int, seed: int) -> dict[str, Any]:
    """What decides the bytes of a build (a rerun with other settings must not reuse its shards)."""
    keys = ("corpus", "mixture", "local_buckets", "docs", "lang_threshold", "blocklist", "dedup_threshold",
            "minhash_perm", "records_per_shard", "compression", "tokenizer", "tokenizer_type")
    out = {k: getattr(data, k) for k in keys}
    out.update(mixture=list(data.mixture), local_buckets=list(data.local_buckets), vocab_size=vocab_size, seed=seed)
    return out


def encode(tokenizer: Tokenizer, docs: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """<bos> text <eos> ids per document, with per-token roles for documents with marked parts."""
    out: list = [None] * len(docs)
    plain = [i for i, d in enumerate(docs) if not d.parts]
    for i, ids in zip(plain, tokenizer.encode_batch([docs[i].text for i in plain])):
        out[i] = (np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int64), None)
    for i, d in enumerate(docs):
        if d.parts:
            ids, roles = [tokenizer.bos_id], [ROLES["text"]]
            for role, text in d.parts:
                piece = tokenizer.encode(text)
                ids += piece
                roles += [ROLES[role]] * len(piece)
            ids.append(tokenizer.eos_id)
            roles.append(ROLES["text"])
            out[i] = (np.array(ids, np.int64), np.array(roles, np.int64))
    return out


def build(data: DataConfig, output_dir: str, *, vocab_size: int, seed: int = 0, progress: bool = True,
          log=print) -> dict[str, Any]:
    """Builds (or completes) the shards in `output_dir`; returns the manifest."""
    from quietreasoning.data.clean import Cleaner
    from quietreasoning.data.sources import documents

    t0 = time.perf_counter()
    out = io.path(output_dir)
    with io.write_errors(out, DataError, "choose an --output-dir that can be created and written"):
        out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # what a killed build was writing
        stale.unlink()
    wanted = settings(data, vocab_size, seed)
    previous = read_manifest(out)
    if previous is not None and previous.get("build") != wanted:
        changed = [f"{k}: {previous.get('build', {}).get(k)!r} -> {v!r}" for k, v in wanted.items()
                   if previous.get("build", {}).get(k) != v]
        raise DataError(f"{out}: holds a build with other settings ({'; '.join(changed)}); choose another "
                        "--output-dir or delete that directory")
    finished = verified_shards(out, previous)
    if previous and previous.get("complete") and len(finished) == len(previous["shards"]):
        log(f"{out}: already complete ({len(finished)} shards verified); nothing to do")
        return previous

    cleaner = Cleaner.from_config(data, seed)
    stream = documents(data, seed)
    kept = list(cleaner.filter(tqdm(stream, total=data.docs, desc="read+clean", unit="doc", disable=not progress)))
    stats = cleaner.stats
    for bucket, s in stats.items():
        if s["read"] and not s["kept"]:
            raise DataError(f"bucket '{bucket}': all {s['read']} documents were dropped ({s['dropped']}); "
                            "loosen data.lang_threshold / data.dedup_threshold or check that bucket's source")
    if not kept:
        raise DataError(f"data.corpus={data.corpus}: no documents survived cleaning; check the source and --docs")

    tok_path = out / TOKENIZER
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
        with io.write_errors(tok_path, DataError, WRITE_FIX):
            tokenizer.save(tok_path)
    elif tok_path.exists():  # an interrupted build already trained it: the finished shards used it
        tokenizer = load_tokenizer(str(tok_path))
    else:
        t = time.perf_counter()
        tokenizer = train_tokenizer((d.text for d in kept), vocab_size, data.tokenizer_type, seed=seed)
        with io.write_errors(tok_path, DataError, WRITE_FIX):
            tokenizer.save(tok_path)
        log(f"trained a {data.tokenizer_type} tokenizer, {tokenizer.vocab_size} tokens, in {time.perf_counter() - t:.1f} s")
    tokenizer.check_fits(vocab_size, "--vocab-size")

    def manifest(shards, complete: bool) -> dict[str, Any]:
        buckets = {b: dict(s, records=0, tokens=0) for b, s in stats.items()}
        for sh in shards:
            buckets[sh["bucket"]]["records"] += sh["records"]
            buckets[sh["bucket"]]["tokens"] += sh["tokens"]
        return {"format": FORMAT, "complete": complete, "build": wanted, "tokenizer": TOKENIZER,
                "vocab_size": tokenizer.vocab_size, "buckets": buckets, "shards": shards,
                "records": sum(s["records"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "seconds": round(time.perf_counter() - t0, 2)}

    writer = ShardWriter(out, data.records_per_shard, data.compression, finished,
                         on_shard=lambda shards: write_manifest(out, manifest(shards, complete=False)))
    try:
        # which documents land in shards an earlier run finished: those are counted, not re-encoded
        nth: dict[str, int] = {}
        skip = []
        for d in kept:
            skip.append(writer.shard_name(d.bucket, nth.get(d.bucket, 0)) in finished)
            nth[d.bucket] = nth.get(d.bucket, 0) + 1
        bar = tqdm(total=len(kept), desc="tokenize+write", unit="doc", disable=not progress)
        for lo in range(0, len(kept), ENCODE_CHUNK):
            chunk = range(lo, min(lo + ENCODE_CHUNK, len(kept)))
            encoded = iter(encode(tokenizer, [kept[i] for i in chunk if not skip[i]]))
            for i in chunk:
                writer.add(kept[i].bucket, *((None,) if skip[i] else next(encoded)))
            bar.update(len(chunk))
        bar.close()
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    result = manifest(shards, complete=True)
    write_manifest(out, result)
    return result
