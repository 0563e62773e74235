"""What both stages' samples are cut from, and how an epoch is ordered.

A *unit* is a sentence, or a max_tokens piece of a longer one; a *chunk* is a run of whole units of one
document packed up to max_tokens. Each epoch visits the chunks in a permutation drawn from (seed, epoch), and
each sample draws from its own generator, seeded from (seed, epoch, item): so a sample is a pure function of
(seed, global index), whatever the DataLoader workers, the world size or the step a run resumed at.
"""
from __future__ import annotations

import array

import numpy as np

from pretrain.data import index_cache
from pretrain.data.indexed import IndexedCorpus
from pretrain.errors import UserError

# Seed-sequence tags, one per stream (numpy treats [s, e] and [s, e, 0] as the same seed, so streams are tagged).
PERM_STREAM = 1  # the epoch's permutation
SAMPLE_STREAM = 2  # a sample's own draws
POOL_STREAM = 3  # the length-grouped sampler's order of pool-steps
PACK_BLOCK = 1 << 20  # units per pass of pack_chunks: its jump table is built a block at a time, not corpus-sized


def sample_rng(seed: int, epoch: int, item: int) -> np.random.Generator:
    """The generator of the sample that epoch `epoch` builds from item `item` (a chunk or anchor)."""
    return np.random.default_rng([SAMPLE_STREAM, seed, epoch, item])


def units(corpus: IndexedCorpus, max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every sentence longer than max_tokens into max_tokens pieces. Returns unit start/end token
    offsets and, per document, the offset of its first unit ([num_docs + 1])."""
    sent_start = np.asarray(corpus.sent_offsets[:-1], dtype=np.int64)
    sent_len = np.diff(np.asarray(corpus.sent_offsets, dtype=np.int64))
    pieces = -(-sent_len // max_tokens)  # ceil
    first_piece = np.cumsum(pieces) - pieces
    piece_in_sent = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
    start = np.repeat(sent_start, pieces) + piece_in_sent * max_tokens
    end = np.minimum(start + max_tokens, np.repeat(sent_start + sent_len, pieces))
    sent_unit_offsets = np.concatenate([[0], np.cumsum(pieces)])
    doc_unit_offsets = sent_unit_offsets[np.asarray(corpus.doc_offsets, dtype=np.int64)]
    return start, end, doc_unit_offsets


def pack_chunks(unit_start, unit_end, unit_doc, doc_unit_offsets, max_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Greedy per-document packing: a chunk takes whole units while their total stays <= max_tokens.
    Returns chunk first unit and end unit (exclusive)."""
    n = len(unit_start)
    first = array.array("q")  # 8 bytes a chunk, not a Python int's 36
    block = PACK_BLOCK
    u = 0
    while u < n:
        lo, hi = u, min(u + block, n)
        # units are contiguous in the token stream, so "fits" is a search over unit ends
        fit_end = np.searchsorted(unit_end, np.asarray(unit_start[u:hi]) + max_tokens, side="right")
        next_unit = np.minimum(fit_end, doc_unit_offsets[np.asarray(unit_doc[u:hi]) + 1]).tolist()
        while u < hi:  # a loop over chunks, not units
            first.append(u)
            u = next_unit[u - lo]
    first = np.array(first, dtype=np.int64)
    end = np.append(first[1:], n).astype(np.int64)
    return first, end


def chunks(corpus: IndexedCorpus, max_tokens: int):
    """Units of at most max_tokens and their greedy per-document packing into chunks: (unit_start, unit_end,
    doc_unit_offsets, unit_doc, chunk_first, chunk_end), unit_doc being each unit's document. Cached per
    (corpus, max_tokens) (index_cache.py)."""
    def build():
        unit_start, unit_end, doc_unit_offsets = units(corpus, max_tokens)
        unit_doc = np.repeat(np.arange(corpus.num_docs), np.diff(doc_unit_offsets))
        chunk_first, chunk_end = pack_chunks(unit_start, unit_end, unit_doc, doc_unit_offsets, max_tokens)
        return dict(unit_start=unit_start, unit_end=unit_end, doc_unit_offsets=doc_unit_offsets, unit_doc=unit_doc,
                    chunk_first=chunk_first, chunk_end=chunk_end)  # fmt: skip

    a = index_cache.arrays(corpus, f"chunks{max_tokens}", build)
    return a["unit_start"], a["unit_end"], a["doc_unit_offsets"], a["unit_doc"], a["chunk_first"], a["chunk_end"]


class EpochOrder:
    """The order in which epoch `e` visits n items: a permutation drawn from (seed, e) alone, cached for the
    current epoch (consecutive sample indices are almost always in one epoch). With `corpus`, an epoch's
    permutation is read from the corpus's index cache where it is stored (`store` puts it there)."""

    def __init__(self, seed: int, n: int, corpus: IndexedCorpus | None = None):
        self.seed, self.n, self.corpus = seed, n, corpus
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        build = lambda: {"order": np.random.default_rng([PERM_STREAM, self.seed, epoch]).permutation(self.n)}  # noqa: E731
        if self.corpus is None:
            return build()["order"]
        return index_cache.arrays(self.corpus, f"order-n{self.n}-seed{self.seed}-epoch{epoch}", build)["order"]

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = self._permutation(epoch)
            self._epoch = epoch
        return self._perm

    def store(self, epochs: int) -> None:
        """Put the permutations of the first `epochs` epochs in the index cache (inside index_cache.writing())."""
        for epoch in range(epochs):
            self._permutation(epoch)

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, item) of global sample index g: epoch g // n visits its items in this order."""
        if g < 0:
            raise IndexError(f"sample index {g}: must be >= 0")
        epoch, position = divmod(g, self.n)
        return epoch, int(self(epoch)[position])


def check_sample_source(corpus: IndexedCorpus, seed: int, random_ids) -> np.ndarray:
    """The checks both datasets make of what they are built from; returns random_ids as an int64 array."""
    if seed < 0:
        raise UserError(f"seed={seed}: must be >= 0")
    if corpus.num_tokens == 0:
        raise UserError("the corpus has no tokens")
    random_ids = np.asarray(random_ids, dtype=np.int64)
    if random_ids.ndim != 1 or len(random_ids) == 0:
        raise UserError("random_ids: need a non-empty 1-d array of token ids for MLM random replacement")
    return random_ids
