"""Builds the memory tiers' files offline: the kNN-LM datastore, the PKM value table, the episodic store.

    python -m quietreasoning.tools.build_indices knn --keys K.npy --values V.npy --output knn.index --dim D
    python -m quietreasoning.tools.build_indices knn --corpus docs.jsonl --output knn.index --checkpoint CKPT
    python -m quietreasoning.tools.build_indices pkm --path artifacts/pkm_values.npy --checkpoint CKPT
    python -m quietreasoning.tools.build_indices pkm --path artifacts/pkm_values.npy --slots N --dim D --seed S
    python -m quietreasoning.tools.build_indices pkm --path artifacts/pkm_values.npy --check
    python -m quietreasoning.tools.build_indices episodic --corpus docs.jsonl --output DIR --checkpoint CKPT

Every subcommand takes --config PRESET (default tiny) and section.key=value overrides, as train.py
does; the config gives the defaults (IVF-PQ sizes, PKM sizes, the episodic store's settings) and
the model. Terms:
  keys/values  knn: float keys (N, D) and int token ids (N,) as .npy files; entry i of one is entry
               i of the other (memory/knn_lm.py)
  corpus       a .txt file (one document), a .jsonl/.json/.parquet file of records with a "text"
               field, or a folder of them (local corpora, data/sources.py); each document is
               tokenised <bos> text <eos> as the data build does (data/build.py)
  window       a document is cut into windows of train.seq_len input tokens, one per batch row;
               positions restart in each window, so a window does not see the one before it
  model        the trunk of the config, with the parameters of --checkpoint (a step directory,
               e.g. runs/tiny/checkpoints/300), else the training init drawn from train.seed
  episodic key the mean over a document's tokens of the model's final-norm hidden states (the
               last-layer states); the memory's value is the same vector

Bad input (a missing file, a wrong shape or dtype, a width that does not fit) is one line on
stderr naming the file and the fix, and exit code 2. Every output is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from io import BytesIO
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from quietreasoning import cli
from quietreasoning.config import Config, ConfigError, DataError
from quietreasoning.utils import io

ENCODE_CHUNK = 256  # documents tokenised per call


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m quietreasoning.tools.build_indices",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--config", default="tiny",
                       help="preset name or YAML path, applied over configs/base.yaml (default: tiny)")
        s.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
        return s

    def model_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--corpus", default="",
                       help="text to run the model over: .txt, .jsonl/.json/.parquet, or a folder of them")
        s.add_argument("--checkpoint", default="", help="model parameters: a checkpoint step directory "
                                                        "(default: the init from train.seed)")
        s.add_argument("--tokenizer", default="", help="SentencePiece model (default: data.tokenizer)")
        s.add_argument("--max-docs", type=int, default=0, help="read at most this many documents (0: all)")
        s.add_argument("--batch", type=int, default=0, help="rows per model batch (default: train.global_batch)")

    knn = command("knn", "the kNN-LM datastore: a FAISS index over keys plus their next-token values")
    knn.add_argument("--keys", default="", help="float keys (N, D) .npy")
    knn.add_argument("--values", default="", help="int token ids (N,) .npy")
    knn.add_argument("--output", required=True, help="the index file; the values go to OUTPUT.values.npy")
    knn.add_argument("--dim", type=int, default=0, help="the key width D (checked against the keys / the model)")
    knn.add_argument("--index", choices=("ivfpq", "flat"), default="ivfpq", help="ivfpq (default) or exact flat")
    knn.add_argument("--nlist", type=int, default=0, help="IVF cells (default: memory.knn_nlist)")
    knn.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (default: memory.knn_pq_m)")
    knn.add_argument("--nprobe", type=int, default=0, help="cells searched per query (default: memory.knn_nprobe)")
    knn.add_argument("--seed", type=int, default=None, help="training-sample seed (default: train.seed)")
    model_args(knn)

    pkm = command("pkm", "the PKM value table as int8 rows plus float32 per-row scales")
    pkm.add_argument("--path", required=True, help="the int8 .npy; the scales go beside it as .scales.npy")
    pkm.add_argument("--check", action="store_true", help="only validate the existing file's shape and dtype")
    pkm.add_argument("--checkpoint", default="", help="export the trained table of this checkpoint step directory")
    pkm.add_argument("--layer", type=int, default=None,
                     help="with --checkpoint: the block of model.pkm_layers whose table to export (default: the first)")
    pkm.add_argument("--slots", type=int, default=0, help="rows (default: model.pkm_slots)")
    pkm.add_argument("--dim", type=int, default=0, help="value width (default: model.pkm_value_dim)")
    pkm.add_argument("--seed", type=int, default=None, help="fresh init seed (default: train.seed)")

    episodic = command("episodic", "an episodic store of documents' mean-pooled last-layer states")
    episodic.add_argument("--output", required=True, help="the store's directory")
    model_args(episodic)
    return p


@cli.one_line_errors
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cfg = cli.load(args)
    return {"knn": _knn, "pkm": _pkm, "episodic": _episodic}[args.command](args, cfg)


# ----------------------------------------------------------------------------- knn

def _knn(args, cfg: Config) -> int:
    from quietreasoning.memory.knn_lm import KNNDatastore, LMOutputs, build_datastore

    mem = cfg.memory
    sizes = {"nlist": args.nlist or mem.knn_nlist, "pq_m": args.pq_m or mem.knn_pq_m,
             "nprobe": args.nprobe or mem.knn_nprobe}
    if bool(args.keys) != bool(args.values) or bool(args.keys) == bool(args.corpus):
        raise ConfigError("knn: give either --keys K.npy and --values V.npy, or --corpus PATH (to run the model "
                          "over text)")
    if args.keys:
        keys = _load_npy(args.keys, "keys")
        values = _load_npy(args.values, "values")
        if keys.ndim != 2 or keys.dtype.kind != "f":
            raise DataError(f"{args.keys}: keys must be a float (N, D) array, got {keys.dtype} {keys.shape}; "
                            "save the hidden states as float32 rows")
        if args.dim and keys.shape[1] != args.dim:
            raise DataError(f"{args.keys}: keys have width {keys.shape[1]} but --dim {args.dim}; pass --dim "
                            f"{keys.shape[1]} or the keys of the right model")
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise DataError(f"{args.values}: values must be int token ids of shape (N,), got {values.dtype} "
                            f"{values.shape}; save one next-token id per key")
        if len(values) != len(keys):
            raise DataError(f"{args.values}: {len(values)} values for the {len(keys)} keys of {args.keys}; "
                            "give one value per key (row i of each is one entry)")
        if len(values) and (values.min() < 0 or values.max() >= cfg.model.vocab_size):
            raise DataError(f"{args.values}: token ids span [{values.min()}, {values.max()}], outside model.vocab_size="
                            f"{cfg.model.vocab_size}; fix the ids or set model.vocab_size")
        seed = cfg.train.seed if args.seed is None else args.seed
        store = KNNDatastore.from_arrays(keys, values, args.index, seed=seed, progress=True, **sizes)
    else:
        if args.dim and args.dim != cfg.model.d_model:
            raise ConfigError(f"knn: --dim {args.dim} but the model's keys have model.d_model={cfg.model.d_model}; "
                              "drop --dim or pass the model's config")
        documents = corpus_tokens(cfg, args)
        lm = LMOutputs(load_model(cfg, args.checkpoint))
        rows = args.batch or cfg.train.global_batch
        batches = (batch for batch, _ in document_batches(documents, cfg.train.seq_len, rows))
        store = build_datastore(lm, batches, args.index, **sizes)
        if store.size == 0:
            raise DataError(f"{args.corpus}: no position with a next token; give documents with text")
    io.path(args.output).parent.mkdir(parents=True, exist_ok=True)
    store.save(args.output)
    print(f"wrote {args.output} ({store.kind}, {store.size:,} keys of width {store.dim}) and "
          f"{args.output}.values.npy")
    return 0


def _load_npy(path: str, what: str) -> np.ndarray:
    """A .npy array; a local one is memory-mapped (it is read in chunks)."""
    p = io.path(path)
    if not p.exists():
        raise DataError(f"{path}: {what} file not found; give an existing .npy file")
    try:
        if "://" in str(p):
            return np.load(BytesIO(p.read_bytes()), allow_pickle=False)
        return np.load(str(p), mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: {what} are not a readable .npy array ({str(e).splitlines()[0][:120]}); "
                        "save them with numpy.save") from None


# ----------------------------------------------------------------------------- pkm

def _pkm(args, cfg: Config) -> int:
    from quietreasoning.memory.pkm import load_values, save_values, scales_path

    m = cfg.model
    slots, dim = args.slots or m.pkm_slots, args.dim or m.pkm_value_dim
    if args.check:
        q, scales = load_values(args.path)
        if q.shape != (slots, dim):
            raise DataError(f"{args.path}: the table is {q.shape[0]} x {q.shape[1]} but {slots} x {dim} is wanted "
                            "(model.pkm_slots x model.pkm_value_dim, or --slots/--dim); rebuild it for this config")
        print(f"ok: {args.path} holds {q.shape[0]:,} x {q.shape[1]} int8 rows, scales in {scales_path(args.path)}")
        return 0
    if args.checkpoint:
        values = _checkpoint_pkm_values(cfg, args.checkpoint, args.layer)
    else:
        n = math.isqrt(max(slots, 0))
        if slots <= 0 or n * n != slots or dim <= 0:
            raise ConfigError(f"pkm: --slots {slots} must be a perfect square (two sub-key sets of sqrt(N)) and "
                              f"--dim {dim} positive, e.g. --slots {max(n, 1) ** 2}")
        values = _fresh_pkm_values(slots, dim, cfg.train.seed if args.seed is None else args.seed)
    io.path(args.path).parent.mkdir(parents=True, exist_ok=True)
    save_values(args.path, values)
    print(f"wrote {args.path} ({values.shape[0]:,} x {values.shape[1]} int8) and {scales_path(args.path)}")
    return 0


def _fresh_pkm_values(slots: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Normal rows with the model's value init, std 1 / sqrt(dim), drawn chunk by chunk."""
    rng = np.random.default_rng(seed)
    values = np.empty((slots, dim), np.float32)
    for start in tqdm(range(0, slots, chunk), desc="pkm init", unit="chunk", disable=slots <= chunk):
        rows = values[start:start + chunk]
        rows[...] = rng.standard_normal(rows.shape, dtype=np.float32) / np.sqrt(dim)
    return values


def _checkpoint_pkm_values(cfg: Config, checkpoint: str, layer: int | None) -> np.ndarray:
    """The float value table of one PKM layer, read alone from a checkpoint's parameters."""
    import jax
    from flax import nnx

    from quietreasoning.model.trunk import Trunk
    from quietreasoning.training.checkpoint import load_parameters

    blocks = cfg.model.pkm_layers
    if not blocks:
        raise ConfigError("pkm --checkpoint: model.pkm_layers is empty, so the model has no PKM table; pass the "
                          "config the checkpoint was trained with (e.g. model.pkm_layers=[...])")
    block = blocks[0] if layer is None else layer
    if block not in blocks:
        raise ConfigError(f"pkm --layer {block}: not a PKM block; model.pkm_layers={list(blocks)}")
    abstract = nnx.eval_shape(lambda: Trunk(cfg.model, rngs=nnx.Rngs(0)))
    wanted = nnx.All(nnx.Param, nnx.PathContains("slot_values"))
    _, table, _ = nnx.split(abstract, wanted, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    table = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), table)
    restored = load_parameters(checkpoint, table)
    return np.asarray(jax.device_get(restored["pkm"][blocks.index(block)]["slot_values"][...]), np.float32)


# ----------------------------------------------------------------------------- episodic

def _episodic(args, cfg: Config) -> int:
    from quietreasoning.memory.episodic import EpisodicStore
    from quietreasoning.memory.knn_lm import LMOutputs

    if cfg.model.resolved_episodic_dim != cfg.model.d_model:
        raise ConfigError(f"episodic: model.episodic_dim={cfg.model.episodic_dim} but the keys are last-layer states "
                          f"of width model.d_model={cfg.model.d_model}; set model.episodic_dim=0")
    store = EpisodicStore.from_config(cfg)
    sources: list[str] = []
    documents = corpus_tokens(cfg, args, sources)
    lm = LMOutputs(load_model(cfg, args.checkpoint))
    rows = args.batch or cfg.train.global_batch
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    merged = 0

    def write(docs: list[int]) -> None:
        nonlocal merged
        if docs:
            keys = np.stack([sums.pop(d) / counts.pop(d) for d in docs])
            merged += store.write(keys, keys, source=[sources[d] for d in docs]).merged

    for batch, row_doc in document_batches(documents, cfg.train.seq_len, rows):
        hidden = lm(batch)["hidden"]
        real = batch["segment_ids"] > 0
        for r in np.flatnonzero(row_doc >= 0):
            d = int(row_doc[r])
            sums[d] = sums.get(d, 0.0) + hidden[r][real[r]].sum(axis=0, dtype=np.float64)
            counts[d] = counts.get(d, 0) + int(real[r].sum())
        last = int(row_doc.max())
        write(sorted(d for d in sums if d < last))  # a document's windows are consecutive: these are complete
    write(sorted(sums))
    if not sources:
        raise DataError(f"{args.corpus}: no document with text; give files with non-empty documents")
    store.save(args.output)
    print(f"wrote {args.output}: {len(store):,} memories from {len(sources):,} documents ({merged:,} merged as "
          f"near-duplicates, cosine > memory.episodic_dedupe={store.dedupe}; {store.kind} index, width {store.dim})")
    return 0


# ----------------------------------------------------------------------------- shared: model and corpus

def load_model(cfg: Config, checkpoint: str):
    """The config's trunk with the parameters of `checkpoint` (a step directory), or the training
    init from train.seed when it is empty."""
    import jax
    from flax import nnx

    from quietreasoning.model.trunk import Trunk
    from quietreasoning.training.checkpoint import load_parameters

    if not checkpoint:
        return Trunk(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.train.seed)))
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Trunk(cfg.model, rngs=nnx.Rngs(0))), nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    return nnx.merge(graphdef, load_parameters(checkpoint, params), rest)


def corpus_tokens(cfg: Config, args, sources: list[str] | None = None) -> Iterator[np.ndarray]:
    """<bos> text <eos> ids of each document of args.corpus, in order; appends "bucket#i" names to
    `sources` as it reads. The corpus path and the tokenizer are checked now, the text read lazily."""
    from quietreasoning.data.sources import local_buckets
    from quietreasoning.utils.tokenizer import load_tokenizer

    if not args.corpus:
        raise ConfigError(f"{args.command}: --corpus PATH is required to run the model over text")
    name = args.tokenizer or cfg.data.tokenizer
    if not name:
        raise ConfigError(f"{args.command}: no tokenizer; pass --tokenizer PATH (e.g. data/tiny/tokenizer.model) "
                          "or set data.tokenizer")
    tokenizer = load_tokenizer(name)
    tokenizer.check_fits(cfg.model.vocab_size, f"--tokenizer {name}")
    buckets = local_buckets(args.corpus, "--corpus")
    limit = args.max_docs if args.max_docs > 0 else None
    docs = itertools.islice(((b.name, i, doc) for b in buckets.values()
                             for i, doc in enumerate(b.read(limit or sys.maxsize, cfg.train.seed))), limit)
    return _encoded(docs, tokenizer, limit, sources)


def _encoded(docs, tokenizer, limit: int | None, sources: list[str] | None) -> Iterator[np.ndarray]:
    from quietreasoning.data.build import encode

    bar = tqdm(desc="documents", unit="doc", total=limit, dynamic_ncols=True)
    while chunk := list(itertools.islice(docs, ENCODE_CHUNK)):
        if sources is not None:
            sources.extend(f"{bucket}#{i}" for bucket, i, _ in chunk)
        for ids, _ in encode(tokenizer, [doc for _, _, doc in chunk]):
            yield ids
        bar.update(len(chunk))
    bar.close()


def document_batches(documents: Iterable[np.ndarray], seq_len: int, rows: int
                     ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(batch, row_doc): batches of `rows` windows in the train step's layout (inputs, targets,
    segment_ids, positions, loss_mask), and for each row the index of its document (-1: a padding
    row, which only the last batch has). Row j of a window holds input tokens [s, s + seq_len) of
    its document and their next tokens; padding positions have segment 0 and loss_mask 0."""
    def empty():
        return {"inputs": np.zeros((rows, seq_len), np.int32), "targets": np.zeros((rows, seq_len), np.int32),
                "segment_ids": np.zeros((rows, seq_len), np.int32), "positions": np.zeros((rows, seq_len), np.int32),
                "loss_mask": np.zeros((rows, seq_len), np.float32)}, np.full(rows, -1)

    batch, row_doc = empty()
    r = 0
    for d, ids in enumerate(documents):
        for s in range(0, max(len(ids) - 1, 1), seq_len):  # a window needs one input token at least
            window = ids[s:s + seq_len + 1]
            n = min(len(window), seq_len)
            batch["inputs"][r, :n] = window[:n]
            batch["targets"][r, :len(window) - 1] = window[1:]
            batch["segment_ids"][r, :n] = 1
            batch["positions"][r, :n] = np.arange(n)
            batch["loss_mask"][r, :len(window) - 1] = 1.0
            row_doc[r] = d
            r += 1
            if r == rows:
                yield batch, row_doc
                batch, row_doc = empty()
                r = 0
    if r:
        yield batch, row_doc


if __name__ == "__main__":
    sys.exit(main())
