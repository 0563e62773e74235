"""The StructBERT training dataset: chunks of whole sentences, turned into `[CLS] A [SEP] B [SEP]` samples.

Every sample is a pure function of (seed, global sample index): the index picks the epoch and the
position in that epoch's chunk permutation, and the sample's rng is seeded from (seed, epoch, chunk).
So batches do not depend on the number of DataLoader workers, the world size or where a run resumed;
`StepSampler` turns (step, accumulation, rank) into global indices.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import torch

from pretrain.errors import UserError
from pretrain.indexed import IndexedCorpus
from pretrain.objectives import IGNORE, ObjectiveConfig, shuffle_trigrams, whole_word_mask

SSO_RANDOM, SSO_NEXT, SSO_PREVIOUS = 0, 1, 2  # B from another document / B follows A / B precedes A
_PERM_STREAM, _SAMPLE_STREAM = 1, 2  # seed-sequence tags: numpy treats [s, e] and [s, e, 0] as the same seed


def _units(corpus: IndexedCorpus, max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _pack_chunks(unit_start, unit_end, unit_doc, doc_unit_offsets, max_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Greedy per-document packing: a chunk takes whole units while their total stays <= max_tokens.
    Returns chunk first unit and end unit (exclusive)."""
    # units are contiguous in the token stream, so "fits" is a search over unit ends
    fit_end = np.searchsorted(unit_end, unit_start + max_tokens, side="right")
    next_unit = np.minimum(fit_end, doc_unit_offsets[unit_doc + 1]).tolist()
    first = []
    u, n = 0, len(unit_start)
    while u < n:  # a loop over chunks, not units
        first.append(u)
        u = next_unit[u]
    first = np.asarray(first, dtype=np.int64)
    end = np.append(first[1:], n).astype(np.int64)
    return first, end


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


class EpochOrder:
    """The order in which epoch `e` visits n items: a permutation drawn from (seed, e) alone, cached for the
    current epoch (consecutive sample indices are almost always in one epoch)."""

    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self._epoch, self._perm = -1, None

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([_PERM_STREAM, self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm


class StructBertDataset(torch.utils.data.Dataset):
    """Index g (any int >= 0) -> sample of epoch g // num_chunks; len() is one epoch."""

    def __init__(self, corpus: IndexedCorpus, *, seq_len: int, seed: int, cfg: ObjectiveConfig,
                 cls_id: int, sep_id: int, mask_id: int, pad_id: int, random_ids: np.ndarray):
        cfg.validate()
        if seq_len < 5:
            raise UserError(f"seq_len={seq_len}: must be >= 5 ([CLS] A [SEP] B [SEP] with a token in each)")
        if seed < 0:
            raise UserError(f"seed={seed}: must be >= 0")
        if corpus.num_tokens == 0:
            raise UserError("the corpus has no tokens")
        self.random_ids = np.asarray(random_ids, dtype=np.int64)
        if self.random_ids.ndim != 1 or len(self.random_ids) == 0:
            raise UserError("random_ids: need a non-empty 1-d array of token ids for MLM random replacement")
        self.corpus, self.seq_len, self.seed, self.cfg = corpus, seq_len, seed, cfg
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id
        self.max_tokens = seq_len - 3

        self.unit_start, self.unit_end, self.doc_unit_offsets = _units(corpus, self.max_tokens)
        self.unit_doc = np.repeat(np.arange(corpus.num_docs), np.diff(self.doc_unit_offsets))
        self.chunk_first, self.chunk_end = _pack_chunks(
            self.unit_start, self.unit_end, self.unit_doc, self.doc_unit_offsets, self.max_tokens)
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
        g = int(g)
        if g < 0:
            raise IndexError(f"sample index {g}: must be >= 0")
        epoch, position = divmod(g, self.num_chunks)
        chunk = int(self.epoch_permutation(epoch)[position])
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, chunk])
        return self.build_sample(chunk, rng)

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
    """Pad to the longest sample rounded up to a multiple of 8 (tensor-core friendly), capped at max_len."""
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // 8) * 8
    if max_len is not None:
        width = max(longest, min(width, max_len))

    def pad(key: str, value: int) -> torch.Tensor:
        out = np.full((len(samples), width), value, dtype=np.int64)
        for i, s in enumerate(samples):
            out[i, : len(s[key])] = s[key]
        return torch.from_numpy(out)

    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    return {
        "input_ids": pad("input_ids", pad_id),
        "token_type_ids": pad("token_type_ids", 0),
        "attention_mask": torch.arange(width)[None, :] < lengths[:, None],
        "mlm_labels": pad("mlm_labels", IGNORE),
        "wso_labels": pad("wso_labels", IGNORE),
        "sso_labels": torch.tensor([int(s["sso_label"]) for s in samples], dtype=torch.int64),
    }


class StepSampler(torch.utils.data.Sampler):
    """Batch sampler: for step t and accumulation a, rank r gets global indices
    t*GB + a*(micro_batch*world_size) + r*micro_batch + j, j < micro_batch, GB = micro*accum*world.
    A step covers range(t*GB, (t+1)*GB) whatever the world size; resuming = start_step. Steps run from
    start_step up to max_steps (exclusive; an absolute step number), forever when max_steps is None."""

    def __init__(self, *, micro_batch: int, grad_accum: int, world_size: int, rank: int,
                 start_step: int = 0, max_steps: int | None = None):
        for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
            if value < 1:
                raise UserError(f"{name}={value}: must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank}: must be in [0, world_size={world_size})")
        if start_step < 0:
            raise UserError(f"start_step={start_step}: must be >= 0")
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.start_step, self.max_steps = start_step, max_steps
        self.global_batch = micro_batch * grad_accum * world_size

    def __iter__(self) -> Iterator[list[int]]:
        t = self.start_step
        while self.max_steps is None or t < self.max_steps:
            for a in range(self.grad_accum):
                base = t * self.global_batch + (a * self.world_size + self.rank) * self.micro_batch
                yield list(range(base, base + self.micro_batch))
            t += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("StepSampler without max_steps is infinite")
        return max(0, self.max_steps - self.start_step) * self.grad_accum


def eval_batches(num_samples: int, micro_batch: int, world_size: int, rank: int) -> list[list[int]]:
    """Validation micro batches for `rank`: positions r, r+W, ... of epoch 0 (global index = position).
    num_samples is rounded down to a multiple of world_size so every rank runs the same number of
    batches (collective forwards, e.g. ZeRO-3, must not wait for a rank that has finished)."""
    per_rank = num_samples // world_size
    mine = list(range(rank, per_rank * world_size, world_size))
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
