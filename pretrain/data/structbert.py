"""Stage one's samples: `[CLS] A [SEP] B [SEP]` with the whole-word MLM and word-structure corruption
(masking.py) and the sentence-structure (SSO) label, built here.

SSO's three labels share one geometry, so that only reading A and B tells them apart: a pair (P, Q) of
adjacent runs of whole sentences is grown the same way on either side of a sentence boundary and cut to fit;
label 1 is (P, Q), label 2 is (Q, P), label 0 keeps P or Q as A and puts in B's place a span of another document,
as long as the one it replaces, starting at a sentence start and ending at a sentence end exactly when the
replaced one does, from a document about as long as A's. tests/test_sso_layout.py holds a layout-only classifier
to chance.

Every sample is a pure function of (seed, global sample index) (see spans.py); `sampling.StepSampler` turns
(step, accumulation, rank) into global indices.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from pretrain.data import index_cache
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import ObjectiveConfig, shuffle_trigrams, whole_word_mask
from pretrain.data.sampling import pad_side
from pretrain.data.spans import EpochOrder, check_sample_source, chunks, sample_rng
from pretrain.errors import UserError
from pretrain.labels import IGNORE

SSO_RANDOM, SSO_NEXT, SSO_PREVIOUS = 0, 1, 2  # B from another document / B follows A / B precedes A
SAME_SHAPE_TRIES = 64  # documents label 0 looks in for a span shaped like the one it replaces
SAME_SHAPE_SCAN = 256  # sentence starts looked at per document
LENGTH_NEIGHBOURS = 32  # label 0 draws B's document among this many either side of A's in length order
LENGTH_ORDER_STREAM = 4  # seed-sequence tag of the length order's tie-break (spans.py has 1 to 3)


def _cut_to_fit(x: tuple[int, int], y: tuple[int, int], max_tokens: int, rng: np.random.Generator):
    """Shorten two token spans from their tails, the longer first, until together they fit in max_tokens; an odd
    token left to cut from two equal spans comes off a side drawn at random (a fixed side would make which
    segment is longer tell the order apart)."""
    lx, ly = x[1] - x[0], y[1] - y[0]
    excess = lx + ly - max_tokens
    if excess > 0:
        cut = min(excess, abs(lx - ly))
        lx, ly = (lx - cut, ly) if lx >= ly else (lx, ly - cut)
        excess -= cut
        odd = excess % 2 * int(rng.integers(2))
        lx, ly = lx - excess // 2 - odd, ly - (excess + 1) // 2 + odd
    return (x[0], x[0] + lx), (y[0], y[0] + ly)


class StructBertDataset(torch.utils.data.Dataset):
    """Index g (any int >= 0) -> sample of epoch g // num_chunks; len() is one epoch.

    Each epoch visits the chunks (spans.py) in its own order. A chunk is the sample's whole text when SSO is
    off; with SSO it picks the document the pair is drawn from, so documents are visited in proportion to
    their length."""

    def __init__(self, corpus: IndexedCorpus, *, seq_len: int, seed: int, cfg: ObjectiveConfig,
                 cls_id: int, sep_id: int, mask_id: int, pad_id: int, random_ids: np.ndarray):
        cfg.validate()
        if seq_len < 5:
            raise UserError(f"seq_len={seq_len}: must be >= 5 ([CLS] A [SEP] B [SEP] with a token in each)")
        self.random_ids = check_sample_source(corpus, seed, random_ids)
        self.corpus, self.seq_len, self.seed, self.cfg = corpus, seq_len, seed, cfg
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id
        self.max_tokens = seq_len - 3

        (self.unit_start, self.unit_end, _, self.unit_doc,
         self.chunk_first, self.chunk_end) = chunks(corpus, self.max_tokens)
        self.sent_offsets = np.asarray(corpus.sent_offsets, dtype=np.int64)
        self.doc_sents = np.asarray(corpus.doc_offsets, dtype=np.int64)  # first sentence of each document

        def build():
            doc_tokens = np.diff(self.sent_offsets[self.doc_sents])
            # documents in order of length, ties in an order drawn from the seed (not the corpus's)
            tie_break = np.random.default_rng([LENGTH_ORDER_STREAM, seed]).permutation(corpus.num_docs)
            by_length = np.lexsort((tie_break, doc_tokens))
            by_length = by_length[doc_tokens[by_length] > 0]
            doc_rank = np.zeros(corpus.num_docs, dtype=np.int64)
            doc_rank[by_length] = np.arange(len(by_length))
            return dict(chunk_doc=self.unit_doc[self.chunk_first], by_length=by_length, doc_rank=doc_rank)

        derived = index_cache.arrays(corpus, f"structbert{self.max_tokens}-seed{seed}", build)
        self.chunk_doc, self.by_length, self.doc_rank = derived["chunk_doc"], derived["by_length"], derived["doc_rank"]
        self.epoch_permutation = EpochOrder(seed, self.num_chunks, corpus)

    # ---- indexing -------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self.chunk_first)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        epoch, chunk = self.epoch_permutation.locate(int(g))
        return self.build_sample(chunk, sample_rng(self.seed, epoch, chunk))

    def sample_spans(self, g: int) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
        """Token spans of A and B (None for a single segment) and the SSO label of sample g, as __getitem__
        builds them (for audits and `pretrain.samples`)."""
        epoch, chunk = self.epoch_permutation.locate(int(g))
        return self._segments(chunk, sample_rng(self.seed, epoch, chunk))

    # ---- sample construction --------------------------------------------------------------------
    def _segments(self, chunk: int, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
        doc = int(self.chunk_doc[chunk])
        pair = self._adjacent_pair(doc, rng) if self.cfg.sso else None
        if pair is None:  # SSO off, or a document of one sentence: the chunk alone, masked LM and WSO only
            return (int(self.unit_start[self.chunk_first[chunk]]), int(self.unit_end[self.chunk_end[chunk] - 1])), None, IGNORE
        first, second = _cut_to_fit(*pair, self.max_tokens, rng)
        label = int(rng.integers(3))
        if label == SSO_RANDOM and len(self.by_length) < 2:
            label = SSO_NEXT + int(rng.integers(2))  # a corpus of one document: next/previous only
        if label == SSO_NEXT:
            return first, second, label
        if label == SSO_PREVIOUS:
            return second, first, label
        kept, replaced = (first, second) if rng.integers(2) == 0 else (second, first)
        return kept, self._same_shape_span(replaced, doc, rng), label

    def _adjacent_pair(self, doc: int, rng: np.random.Generator):
        """P and Q, adjacent in `doc`, grown the same way on either side of a sentence boundary k: P takes
        sentences k-1, k-2, ... and Q sentences k, k+1, ... while they fit their shares of max_tokens (at least
        one sentence each), the shares being x and max_tokens - x with x uniform. k is next to a token drawn
        uniformly in the document, so it is as likely near its end as near its start. P and Q are mirror
        images of one rule: which of A and B is longer, fuller or cut tells nothing about their order.
        None for a document of one sentence."""
        s0, s1 = int(self.doc_sents[doc]), int(self.doc_sents[doc + 1])
        if s1 - s0 < 2:
            return None
        t = int(rng.integers(self.sent_offsets[s0], self.sent_offsets[s1]))
        k = int(np.searchsorted(self.sent_offsets, t, side="right")) - 1 + int(rng.integers(2))
        k = min(max(k, s0 + 1), s1 - 1)
        share_p = int(rng.integers(1, self.max_tokens))
        boundary, offsets = int(self.sent_offsets[k]), self.sent_offsets
        p_first = min(s0 + int(np.searchsorted(offsets[s0:k], boundary - share_p)), k - 1)
        q_end = max(k + int(np.searchsorted(offsets[k + 1 : s1 + 1], boundary + self.max_tokens - share_p, side="right")), k + 1)
        return (int(offsets[p_first]), boundary), (boundary, int(offsets[q_end]))

    def _same_shape_span(self, like: tuple[int, int], doc: int, rng: np.random.Generator) -> tuple[int, int]:
        """Label 0's stand-in for `like` (a span starting at a sentence start): a span of another document,
        as long, that starts at a sentence start and ends at a sentence end exactly when `like` does. The
        document is drawn among the LENGTH_NEIGHBOURS either side of `doc` in length order, as B's document is
        A's own for labels 1 and 2; the span is looked for from a random sentence of it on. A document without
        such a span is passed over, up to SAME_SHAPE_TRIES draws; then the length alone is kept (the span may
        end mid-sentence), and without any room for it, the longest other document is cut short."""
        length = like[1] - like[0]
        ends_a_sentence = self.corpus.is_sentence_boundary(like[1])
        rank = int(self.doc_rank[doc])
        lo, hi = max(rank - LENGTH_NEIGHBOURS, 0), min(rank + LENGTH_NEIGHBOURS + 1, len(self.by_length))
        fallback = None
        for _ in range(SAME_SHAPE_TRIES):
            other = int(self.by_length[rng.integers(lo, hi)])
            if other == doc:
                continue
            s0, s1 = int(self.doc_sents[other]), int(self.doc_sents[other + 1])
            s = int(rng.integers(s0, s1))
            starts = self.sent_offsets[np.concatenate([np.arange(s, s1), np.arange(s0, s)])[:SAME_SHAPE_SCAN]]
            fits = starts + length <= self.sent_offsets[s1]
            shaped = fits & (self.corpus.is_sentence_boundary(starts + length) == ends_a_sentence)
            if shaped.any():
                start = int(starts[np.argmax(shaped)])
                return start, start + length
            if fallback is None and fits.any():
                fallback = int(starts[np.argmax(fits)])
        if fallback is not None:
            return fallback, fallback + length
        other = int(self.by_length[-1] if self.by_length[-1] != doc else self.by_length[-2])
        start, end = (int(t) for t in self.sent_offsets[self.doc_sents[other : other + 2]])
        return start, min(start + length, end)

    def build_sample(self, chunk: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        span_a, span_b, sso_label = self._segments(chunk, rng)
        tokens, starts = self.corpus.tokens, self.corpus.word_start
        cls, sep = np.array([self.cls_id], np.int64), np.array([self.sep_id], np.int64)
        zero = np.zeros(1, np.int64)
        parts_ids = [cls, tokens[span_a[0] : span_a[1]], sep]
        parts_ws = [zero, starts[span_a[0] : span_a[1]], zero]
        len_a = span_a[1] - span_a[0] + 2
        if span_b is not None:
            parts_ids += [tokens[span_b[0] : span_b[1]], sep]
            parts_ws += [starts[span_b[0] : span_b[1]], zero]
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts_ids])
        word_start = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts_ws])
        token_type = (np.arange(len(ids)) >= len_a).astype(np.int64)
        special = np.zeros(len(ids), dtype=bool)
        special[[0, len_a - 1, len(ids) - 1]] = True

        input_ids, mlm_labels = whole_word_mask(ids, word_start, special, self.cfg, rng, self.mask_id, self.random_ids)
        input_ids, wso_labels = shuffle_trigrams(input_ids, mlm_labels != IGNORE, special, token_type, self.cfg, rng)
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type,
            "mlm_labels": mlm_labels,
            "wso_labels": wso_labels,
            "sso_label": np.array(sso_label, dtype=np.int64),
        }

    # ---- reporting / batching helpers -----------------------------------------------------------
    def stats(self, block: int = 1 << 20) -> dict:
        """Counts of the corpus, its units and chunks; summed a block of chunks at a time, so that reporting them
        (rank 0, at start-up) costs no corpus-sized temporaries."""
        single_unit = units = tokens = 0
        for lo in range(0, self.num_chunks, block):
            first, end = np.asarray(self.chunk_first[lo : lo + block]), np.asarray(self.chunk_end[lo : lo + block])
            per_chunk = end - first
            single_unit += int((per_chunk == 1).sum())
            units += int(per_chunk.sum())
            tokens += int((np.asarray(self.unit_end[end - 1]) - np.asarray(self.unit_start[first])).sum())
        return {
            "num_docs": self.corpus.num_docs,
            "num_sents": self.corpus.num_sents,
            "single_sentence_docs": int((np.diff(self.doc_sents) == 1).sum()),
            "num_units": len(self.unit_start),
            "split_sentences": int(len(self.unit_start) - self.corpus.num_sents),
            "num_chunks": self.num_chunks,
            "single_unit_chunks": single_unit,
            "mean_units_per_chunk": units / self.num_chunks,
            "mean_chunk_tokens": tokens / self.num_chunks,
            "max_tokens": self.max_tokens,
        }

    @property
    def collate_fn(self):
        """Picklable collate for DataLoader (workers)."""
        return partial(collate, pad_id=self.pad_id, max_len=self.seq_len)


def collate(samples: list[dict[str, np.ndarray]], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sample rounded up to a multiple of 8, capped at max_len (sampling.pad_side)."""
    keys = {"input_ids": pad_id, "token_type_ids": 0, "mlm_labels": IGNORE, "wso_labels": IGNORE}
    padded, attention_mask = pad_side(samples, keys, max_len)
    return {**padded, "attention_mask": attention_mask,
            "sso_labels": torch.tensor([int(s["sso_label"]) for s in samples], dtype=torch.int64)}
