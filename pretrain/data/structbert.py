"""Stage one's samples: chunks of whole sentences, turned into `[CLS] A [SEP] B [SEP]` with the
whole-word MLM and word-structure corruption (masking.py) and the sentence-structure label (here).

Every sample is a pure function of (seed, global sample index) (see spans.py); `sampling.StepSampler` turns
(step, accumulation, rank) into global indices.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import IGNORE, ObjectiveConfig, shuffle_trigrams, whole_word_mask
from pretrain.data.sampling import pad_side
from pretrain.data.spans import EpochOrder, check_sample_source, chunks, sample_rng
from pretrain.errors import UserError

SSO_RANDOM, SSO_NEXT, SSO_PREVIOUS = 0, 1, 2  # B from another document / B follows A / B precedes A


def _rebalance_last_chunks(first, end, unit_start, unit_end, unit_doc, max_tokens) -> None:
    """A document's last chunk holding one unit gets no SSO pair; if the chunk before it (same document)
    has >= 3 units, move its last unit over when the two still fit in max_tokens. In place."""
    doc = unit_doc[first]
    n_units = end - first
    is_last = np.append(doc[1:] != doc[:-1], True)
    prev_ok = np.zeros(len(first), dtype=bool)
    prev_ok[1:] = (doc[1:] == doc[:-1]) & (n_units[:-1] >= 3)
    fits = np.zeros(len(first), dtype=bool)
    fits[1:] = unit_end[first[1:]] - unit_start[first[1:] - 1] <= max_tokens  # the moved unit + the lone one
    move = np.flatnonzero(is_last & (n_units == 1) & prev_ok & fits)
    first[move] -= 1
    end[move - 1] -= 1


def _cut_to_fit(x: tuple[int, int], y: tuple[int, int], max_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shorten two token spans from their tails, the longer first, until together they fit in max_tokens."""
    lx, ly = x[1] - x[0], y[1] - y[0]
    excess = lx + ly - max_tokens
    if excess > 0:
        cut = min(excess, abs(lx - ly))
        lx, ly = (lx - cut, ly) if lx >= ly else (lx, ly - cut)
        excess -= cut
        lx, ly = lx - (excess + 1) // 2, ly - excess // 2
    return (x[0], x[0] + lx), (y[0], y[0] + ly)


class StructBertDataset(torch.utils.data.Dataset):
    """Index g (any int >= 0) -> sample of epoch g // num_chunks; len() is one epoch."""

    def __init__(self, corpus: IndexedCorpus, *, seq_len: int, seed: int, cfg: ObjectiveConfig,
                 cls_id: int, sep_id: int, mask_id: int, pad_id: int, random_ids: np.ndarray):
        cfg.validate()
        if seq_len < 5:
            raise UserError(f"seq_len={seq_len}: must be >= 5 ([CLS] A [SEP] B [SEP] with a token in each)")
        self.random_ids = check_sample_source(corpus, seed, random_ids)
        self.corpus, self.seq_len, self.seed, self.cfg = corpus, seq_len, seed, cfg
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id
        self.max_tokens = seq_len - 3

        (self.unit_start, self.unit_end, self.doc_unit_offsets, self.unit_doc,
         self.chunk_first, self.chunk_end) = chunks(corpus, self.max_tokens)
        _rebalance_last_chunks(self.chunk_first, self.chunk_end, self.unit_start, self.unit_end,
                               self.unit_doc, self.max_tokens)
        self.chunk_doc = self.unit_doc[self.chunk_first]
        self.docs_with_units = np.flatnonzero(np.diff(self.doc_unit_offsets) > 0)
        self.epoch_permutation = EpochOrder(seed, self.num_chunks)

    # ---- indexing -------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self.chunk_first)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        epoch, chunk = self.epoch_permutation.locate(int(g))
        return self.build_sample(chunk, sample_rng(self.seed, epoch, chunk))

    # ---- sample construction --------------------------------------------------------------------
    def _span(self, first_unit: int, end_unit: int) -> tuple[int, int]:
        """Token range of units first..end-1 (units of one document are contiguous)."""
        return int(self.unit_start[first_unit]), int(self.unit_end[end_unit - 1])

    def _random_doc_span(self, doc: int, budget: int, rng: np.random.Generator, max_units: int | None = None) -> tuple[int, int]:
        """B for SSO label 0: from a uniformly drawn other document, whole units from a random unit on while
        they fit in budget (the first one truncated if even it does not), so B ends where a sentence ends
        just as it does for labels 1 and 2."""
        others = self.docs_with_units
        j = int(rng.integers(len(others) - 1))
        if others[j] >= doc:  # skip our own document: uniform over the others without resampling
            j += 1
        other = int(others[j])
        u0, u1 = int(self.doc_unit_offsets[other]), int(self.doc_unit_offsets[other + 1])
        start_unit = int(rng.integers(u0, u1))
        start = int(self.unit_start[start_unit])
        fit = int(np.searchsorted(self.unit_end[start_unit:u1], start + budget, side="right"))
        if max_units is not None:
            fit = min(fit, max_units)
        end = int(self.unit_end[start_unit + fit - 1]) if fit else start + budget
        return start, end

    def _segments(self, chunk: int, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
        """Token spans of A and B (None for a single segment) and the SSO label."""
        a, b = int(self.chunk_first[chunk]), int(self.chunk_end[chunk])
        if not self.cfg.sso:
            return self._span(a, b), None, IGNORE
        if b - a < 2:
            return self._single_unit_pair(a, rng)
        split = int(rng.integers(a + 1, b))  # B starts at unit `split`
        label = self._draw_label(rng)
        first, second = self._span(a, split), self._span(split, b)
        if label == SSO_NEXT:
            return first, second, label
        if label == SSO_PREVIOUS:
            return second, first, label
        budget = self.max_tokens - (first[1] - first[0])
        return first, self._random_doc_span(int(self.chunk_doc[chunk]), budget, rng), label

    def _draw_label(self, rng: np.random.Generator) -> int:
        label = int(rng.integers(3))
        if label == SSO_RANDOM and len(self.docs_with_units) < 2:  # nothing to draw from: next/previous only
            label = SSO_NEXT + int(rng.integers(2))
        return label

    def _single_unit_pair(self, unit: int, rng: np.random.Generator):
        """A chunk of one long sentence: paired with the next sentence of its document (the previous one at the
        document's end), or with a sentence of another document for label 0; then both are cut from the tail,
        the longer first, to fit. Every label goes through the same cut, so where a segment ends tells nothing
        about the label. A document of one sentence has no pair: masked LM and word structure only."""
        doc = int(self.unit_doc[unit])
        u0, u1 = int(self.doc_unit_offsets[doc]), int(self.doc_unit_offsets[doc + 1])
        if u1 - u0 < 2:
            return self._span(unit, unit + 1), None, IGNORE
        first_unit = unit if unit + 1 < u1 else unit - 1
        first, second = self._span(first_unit, first_unit + 1), self._span(first_unit + 1, first_unit + 2)
        label = self._draw_label(rng)
        if label == SSO_PREVIOUS:
            first, second = second, first
        elif label == SSO_RANDOM:
            first = self._span(unit, unit + 1)
            second = self._random_doc_span(doc, self.max_tokens, rng, max_units=1)
        return _cut_to_fit(first, second, self.max_tokens) + (label,)

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
    def stats(self) -> dict:
        units_per_chunk = self.chunk_end - self.chunk_first
        chunk_tokens = self.unit_end[self.chunk_end - 1] - self.unit_start[self.chunk_first]
        return {
            "num_docs": self.corpus.num_docs,
            "num_sents": self.corpus.num_sents,
            "num_units": len(self.unit_start),
            "split_sentences": int(len(self.unit_start) - self.corpus.num_sents),
            "num_chunks": self.num_chunks,
            "single_unit_chunks": int((units_per_chunk == 1).sum()),
            "mean_units_per_chunk": float(units_per_chunk.mean()),
            "mean_chunk_tokens": float(chunk_tokens.mean()),
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
