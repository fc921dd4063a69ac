"""The tokenizer: SentencePiece, trained in-process on the cleaned mixture, loaded from a file
(local or gs://), or fetched from the Hugging Face Hub by name.

Every tokenizer this project makes has the same special ids: <pad>=0 <bos>=1 <eos>=2 <unk>=3
<bot>=4 <eot>=5 (think-block delimiters), then the 256 byte pieces (`byte_fallback`, so no text
is ever unknown), then learned pieces. Text round-trips exactly: no whitespace folding, no
Unicode normalisation (code keeps its indentation). A hub tokenizer that lacks <bot>/<eot>
gets them appended after its own vocabulary.
"""

from __future__ import annotations

import io as _io
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from quietreasoning.config import DataError
from quietreasoning.utils import io
from quietreasoning.utils.hub import require_hub

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
THINK = ("<bot>", "<eot>")
MIN_VOCAB = len(SPECIAL) + len(THINK) + 256 + 16  # specials, byte pieces, and a few merges


class Tokenizer:
    """A SentencePiece model plus the think symbols; `vocab_size` counts both."""

    def __init__(self, model_proto: bytes, source: str):
        self.source = source
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        n = self.sp.get_piece_size()
        # ids of <bot>/<eot>: the model's own if it has them, else appended after its vocabulary
        self.extra: dict[str, int] = {}
        for sym in THINK:
            own = self.sp.piece_to_id(sym)
            if own == self.sp.unk_id() and sym != self.sp.id_to_piece(own):
                self.extra[sym] = n + len(self.extra)
        self.vocab_size = n + len(self.extra)
        self.pad_id = max(self.sp.pad_id(), 0)  # models without a pad piece pad with id 0
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.bot_id, self.eot_id = (self.extra.get(s, self.sp.piece_to_id(s)) for s in THINK)

    def encode(self, text: str) -> list[int]:
        if not self.extra:
            return self.sp.encode(text)
        out: list[int] = []  # split on the appended symbols, which the model cannot see
        for piece in _split_keep(text, tuple(self.extra)):
            out.extend([self.extra[piece]] if piece in self.extra else self.sp.encode(piece))
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self.extra:
            return self.sp.encode(texts, num_threads=min(4, os.cpu_count() or 1))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        reverse = {v: k for k, v in self.extra.items()}
        out, run = [], []
        for i in map(int, ids):
            if i in reverse:
                out.append(self.sp.decode(run))
                out.append(reverse[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model file under a temporary name, then renames it into place."""
        io.atomic_write_bytes(path, self.proto)

    def check_fits(self, vocab_size: int, where: str) -> None:
        """A model whose vocabulary differs from this tokenizer's is an error now, not a crash later."""
        if vocab_size != self.vocab_size:
            raise DataError(
                f"{where}: model.vocab_size={vocab_size} but the tokenizer {self.source} has {self.vocab_size} "
                f"tokens; set model.vocab_size={self.vocab_size} or rebuild the data with --vocab-size {vocab_size}")


def _split_keep(text: str, symbols: tuple[str, ...]) -> Iterator[str]:
    """`text` cut around every occurrence of `symbols`, keeping them as their own pieces."""
    start = i = 0
    while i < len(text):
        hit = next((s for s in symbols if text.startswith(s, i)), None)
        if hit:
            if i > start:
                yield text[start:i]
            yield hit
            i = start = i + len(hit)
        else:
            i += 1
    if start < len(text):
        yield text[start:]


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_type: str = "bpe", *,
                    max_lines: int = 300_000, seed: int = 0) -> Tokenizer:
    """Trains SentencePiece in-process on the lines of `texts` (documents); nothing touches disk."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size}: a byte-fallback tokenizer needs at least {MIN_VOCAB} tokens "
                        "(6 specials + 256 bytes + merges); raise model.vocab_size")

    def lines() -> Iterator[str]:
        for doc in texts:
            for line in doc.split("\n"):
                if line.strip():
                    yield line

    model = _io.BytesIO()
    spm.set_random_generator_seed(seed + 1)  # the sentence sampling: same text, same tokenizer
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece=SPECIAL[0],
            bos_piece=SPECIAL[1], eos_piece=SPECIAL[2], unk_piece=SPECIAL[3], user_defined_symbols=list(THINK),
            remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True,
            split_digits=True, input_sentence_size=max_lines, shuffle_input_sentence=True,
            max_sentence_length=16384, num_threads=min(4, os.cpu_count() or 1),
            minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary larger than the text can fill
        raise DataError(f"tokenizer training failed ({str(e).splitlines()[-1][:200]}); adjust --vocab-size "
                        "or give it more text (--docs)") from None
    return Tokenizer(model.getvalue(), f"trained ({model_type}, {vocab_size})")


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A SentencePiece model file (local or gs://), or a hub repository holding `tokenizer.model`
    (e.g. mistralai/Mistral-7B-v0.1)."""
    p = io.path(name_or_path)
    if p.exists():
        try:
            return Tokenizer(p.read_bytes(), str(name_or_path))
        except RuntimeError:
            raise DataError(f"{name_or_path}: not a SentencePiece model file; point data.tokenizer at a "
                            "tokenizer.model (e.g. DIR/tokenizer.model from `python -m quietreasoning.data build`)") from None
    if "://" in str(name_or_path) or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise DataError(f"{name_or_path}: tokenizer file not found; give an existing tokenizer.model path, a hub "
                        "name like mistralai/Mistral-7B-v0.1, or leave data.tokenizer empty to train one")
    require_hub(f"tokenizer '{name_or_path}'",
                "pass a local tokenizer.model path, or leave data.tokenizer empty to train one on the data")
    from huggingface_hub import hf_hub_download
    try:
        local = hf_hub_download(repo_id=str(name_or_path), filename="tokenizer.model")
    except Exception as e:  # gated repo, missing file, network drop: the user needs the name and the way out
        raise DataError(f"tokenizer '{name_or_path}': cannot fetch tokenizer.model from the hub "
                        f"({type(e).__name__}); check the name and access, or pass a local path") from None
    return Tokenizer(open(local, "rb").read(), str(name_or_path))
