"""A learnable synthetic language: a deterministic batch stream for training without data.

Each token has a few likely successors (a sparse first-order Markov chain with Dirichlet
weights), documents of random length start with BOS and are packed into rows with segment
ids and per-document positions. Batch `i` is a pure function of (seed, i), so a resumed run
reads exactly the batches an uninterrupted one would. Its entropy rate (the best loss any
model can reach) is far below its unigram entropy, so a model that learns shows it.
"""

from __future__ import annotations

import numpy as np

PAD, BOS = 0, 1


class SyntheticLanguage:
    def __init__(self, vocab_size: int, successors: int = 4, seed: int = 0):
        if vocab_size < 4:
            raise ValueError(f"synthetic language needs vocab_size >= 4, got {vocab_size}")
        rng = np.random.default_rng([seed, 7])
        self.vocab_size, self.seed = vocab_size, seed
        self.succ = rng.integers(BOS + 1, vocab_size, size=(vocab_size, successors))
        probs = rng.dirichlet(np.ones(successors), size=vocab_size)
        self.cum = np.cumsum(probs, axis=1)
        self.probs = probs

    def rows(self, index: int, batch: int, length: int, only: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Packed rows of `length` tokens: (tokens, segment_ids >= 1, positions), all (batch, length).
        `only` (row indices) builds just those rows of the same batch, (len(only), length): the
        random draws are made for the whole batch, so a row never depends on which others are built."""
        rng = np.random.default_rng([self.seed, index])
        doc_lengths = rng.integers(max(2, length // 4), 2 * length, size=(batch, length))
        u = rng.random((batch, length))
        if only is not None:
            doc_lengths, u = doc_lengths[only], u[only]
            batch = len(doc_lengths)
        tokens = np.empty((batch, length), np.int32)
        segs = np.empty((batch, length), np.int32)
        pos = np.empty((batch, length), np.int32)
        remaining = np.zeros(batch, np.int64)
        seg = np.zeros(batch, np.int32)
        p = np.zeros(batch, np.int32)
        prev = np.full(batch, BOS)
        for t in range(length):
            new = remaining == 0
            remaining = np.where(new, doc_lengths[:, t], remaining) - 1
            seg = seg + new
            p = np.where(new, 0, p + 1)
            choice = (u[:, t, None] > self.cum[prev]).sum(axis=1).clip(max=self.succ.shape[1] - 1)
            nxt = self.succ[prev, choice]
            tok = np.where(new, BOS, nxt)
            tokens[:, t], segs[:, t], pos[:, t] = tok, seg, p
            prev = tok
        return tokens, segs, pos

    def batch(self, index: int, batch: int, seq_len: int, only: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Training batch `index`: inputs, targets, segment_ids, positions, loss_mask, answer_mask
        (none: the synthetic language has no answers), each (batch, seq_len); with `only`, just
        those rows of it (what one host of a multi-host run feeds)."""
        tokens, segs, pos = self.rows(index, batch, seq_len + 1, only)
        batch = len(tokens)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segs[:, :-1],
            "positions": pos[:, :-1],
            # a target counts only when it continues the same document
            "loss_mask": (segs[:, 1:] == segs[:, :-1]).astype(np.float32),
            "answer_mask": np.zeros((batch, seq_len), np.float32),
        }

    def unigram_entropy(self, n_batches: int = 8, batch: int = 64, seq_len: int = 256) -> float:
        """Empirical unigram entropy (nats) of the target tokens."""
        counts = np.zeros(self.vocab_size)
        for i in range(n_batches):
            b = self.batch(10**6 + i, batch, seq_len)
            np.add.at(counts, b["targets"][b["loss_mask"] > 0], 1)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def entropy_rate(self, n_batches: int = 8, batch: int = 64, seq_len: int = 256) -> float:
        """The loss floor (nats/token): successor entropy averaged over the observed contexts."""
        h = -(self.probs * np.log(self.probs)).sum(axis=1)
        total, n = 0.0, 0
        for i in range(n_batches):
            b = self.batch(10**6 + i, batch, seq_len)
            ctx = b["inputs"][b["loss_mask"] > 0]
            total, n = total + h[ctx].sum(), n + ctx.size
        return total / n
