"""Stage two's (PALM / PLUG) samples: a contiguous span of one document, its first part the encoder's
context and the rest the decoder's target (sampling.LengthGroupedStepSampler batches them by length).

Encoder and decoder lengths are drawn uniformly per sample (PLUG), inside the bounds of the config, and the
sample is cut to them (see PalmDataset); run.json records their histogram (stats()).
As in stage one, every sample is a pure function of (seed, global sample index) (spans.py), so batches do not
depend on DataLoader workers, the world size or where a run resumed. Masked LM on the encoder is on for
indices < mlm_until, which makes the switch a function of the index, not of the step the trainer is in (in a blend,
each source's mlm_until is its own count of the run's samples below the switch: stages/base.py, sources.Blend).
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Sequence

import numpy as np
import torch

from pretrain.data import index_cache
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import MaskingConfig, whole_word_mask
from pretrain.data.sampling import pad_side
from pretrain.data.spans import EpochOrder, check_sample_source, chunks, sample_rng
from pretrain.errors import UserError
from pretrain.labels import IGNORE


def check_range(name: str, value: Sequence[int]) -> tuple[int, int]:
    """[lo, hi] from a list, tuple or Hydra ListConfig of two integers (stage.src_len, stage.tgt_len)."""
    try:
        shown = list(value)
        lo, hi = (operator.index(v) for v in shown)
    except (TypeError, ValueError):
        shown, lo, hi = value, 0, -1
    if not 4 <= lo <= hi:
        raise UserError(f"stage.{name}={shown}: need [lo, hi] with 4 <= lo <= hi")
    return lo, hi


class PalmDataset(torch.utils.data.Dataset):
    """Index g (any int >= 0) -> sample of epoch g // num_anchors; len() is one epoch.

    Anchors are spans.py chunks (whole sentences packed to about the mean span length) of every document with
    >= 2 tokens. A sample draws its encoder and decoder lengths first (PLUG: uniform in stage.src_len and
    stage.tgt_len), then starts at a random unit (sentence, or piece of a long sentence) of its anchor's chunk and
    runs on as far as the lengths need. Where the document is too short for them, the sample moves to a
    document that is long enough (drawn in proportion to its tokens) rather than shrinking: the lengths
    trained on are the drawn ones, up to snapping. Each part's end then moves to the nearest sentence end within
    stage.snap of its length, either way. The target ends with [SEP] only where the document ends: a span cut
    inside running text has no end to learn."""

    def __init__(self, corpus: IndexedCorpus, *, src_len: Sequence[int], tgt_len: Sequence[int], seed: int,
                 mlm_cfg: MaskingConfig, mlm_until: int, cls_id: int, sep_id: int, mask_id: int, pad_id: int,
                 random_ids: np.ndarray, snap: float = 0.25):
        self.src_len, self.tgt_len = check_range("src_len", src_len), check_range("tgt_len", tgt_len)
        mlm_cfg.validate()
        if mlm_until < 0:
            raise UserError(f"mlm_until={mlm_until}: must be >= 0 (0 = no masked LM)")
        if not 0 <= snap <= 0.5:
            raise UserError(f"stage.snap={snap}: must be in [0, 0.5] (share of a part's length)")
        self.random_ids = check_sample_source(corpus, seed, random_ids)
        self.corpus, self.seed, self.mlm_cfg, self.mlm_until, self.snap = corpus, seed, mlm_cfg, mlm_until, snap
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id

        mean_src, mean_tgt = sum(self.src_len) // 2, sum(self.tgt_len) // 2
        self.chunk_tokens = mean_src + mean_tgt - 3  # context + target of a mean sample, specials excluded
        (self.unit_start, self.unit_end, self.doc_unit_offsets, self.unit_doc,
         chunk_first, chunk_end) = chunks(corpus, self.chunk_tokens)
        self.sent_offsets = np.asarray(corpus.sent_offsets, dtype=np.int64)

        def build():
            doc_tokens = corpus.doc_token_offsets  # [num_docs + 1]
            doc_len = np.diff(doc_tokens)
            keep = doc_len[self.unit_doc[chunk_first]] >= 2  # one token cannot be both context and target
            # documents by length, and their tokens counted from the longest down: "a token of a document of at
            # least n tokens" is one draw below tokens_from[searchsorted(by_length_len, n)]
            by_length = np.argsort(doc_len, kind="stable")
            return dict(doc_tokens=doc_tokens, anchor_first=chunk_first[keep], anchor_end=chunk_end[keep],
                        dropped_docs=np.array([(doc_len < 2).sum()]), by_length=by_length,
                        by_length_len=doc_len[by_length], tokens_before=np.concatenate([[0], np.cumsum(doc_len[by_length])]))  # fmt: skip

        derived = index_cache.arrays(corpus, f"palm{self.chunk_tokens}", build)
        self.doc_tokens, self.anchor_first, self.anchor_end = derived["doc_tokens"], derived["anchor_first"], derived["anchor_end"]
        self.dropped_docs = int(derived["dropped_docs"][0])
        if self.num_anchors == 0:
            raise UserError(f"the corpus has no document of 2 or more tokens ({self.dropped_docs} shorter ones)")
        self.by_length, self.by_length_len = derived["by_length"], derived["by_length_len"]
        self.tokens_before = derived["tokens_before"]
        self.epoch_permutation = EpochOrder(seed, self.num_anchors, corpus)

    # ---- indexing -------------------------------------------------------------------------------
    @property
    def num_anchors(self) -> int:
        return len(self.anchor_first)

    def __len__(self) -> int:
        return self.num_anchors

    def sample_spans(self, g: int) -> dict:
        """What sample g is cut from: context [start, split), target [split, end), the drawn lengths and the
        realised ones (with [CLS]/[SEP]), and whether the target reaches its document's end (ends with [SEP])."""
        _, start, split, end, (ls, lt) = self._span(int(g))
        anchor_doc = self.unit_doc[self.anchor_first[self.epoch_permutation.locate(int(g))[1]]]
        return {"start": start, "split": split, "end": end, "drawn": (ls, lt), "realised": (split - start + 2, end - split + 1),
                "ends_document": self._ends_document(end), "moved": bool(self.corpus.document_of(start) != anchor_doc)}  # fmt: skip

    def _span(self, g: int):
        """The sample's rng, its token span (context [start, split), target [split, end)) and drawn lengths."""
        epoch, anchor = self.epoch_permutation.locate(g)
        rng = sample_rng(self.seed, epoch, anchor)
        # the lengths come first, so they do not depend on how later draws are made
        ls = int(rng.integers(self.src_len[0], self.src_len[1] + 1))
        lt = int(rng.integers(self.tgt_len[0], self.tgt_len[1] + 1))
        ctx_len, tgt_len = ls - 2, lt - 1  # room left by [CLS] ctx [SEP] and [CLS] tgt
        need = ctx_len + tgt_len
        unit = int(rng.integers(self.anchor_first[anchor], self.anchor_end[anchor]))
        doc = int(self.unit_doc[unit])
        if self.doc_tokens[doc + 1] - self.doc_tokens[doc] < need:
            unit = self._unit_with_room(need, rng, default=unit)
            doc = int(self.unit_doc[unit])
        start, doc_start, doc_end = int(self.unit_start[unit]), int(self.doc_tokens[doc]), int(self.doc_tokens[doc + 1])
        if doc_end - start < need:
            if doc_end - doc_start >= need:  # start earlier, at the latest unit that leaves enough room
                u0, u1 = int(self.doc_unit_offsets[doc]), int(self.doc_unit_offsets[doc + 1])
                k = int(np.searchsorted(self.unit_start[u0:u1], doc_end - need, side="right")) - 1
                start = int(self.unit_start[u0 + k])
            else:  # no document is long enough: the whole document, shared between the two parts as Ls : Lt
                start, total = doc_start, doc_end - doc_start
                share = int(round(total * ls / (ls + lt)))
                ctx_len = min(max(share, 1, total - tgt_len), ctx_len, total - 1)
                tgt_len = total - ctx_len
        # the context may snap forward only as far as leaves the target its room
        split_hi = min(start + self.src_len[1] - 2, max(doc_end - tgt_len, start + ctx_len), doc_end - 1)
        split = self._snap(start + ctx_len, start + np.array(self.src_len) - 2, cap=split_hi, tol=ctx_len)
        end = self._snap(split + tgt_len, split + np.array(self.tgt_len) - 1, cap=min(split + self.tgt_len[1] - 1, doc_end),
                         tol=tgt_len)  # fmt: skip
        return rng, start, split, end, (ls, lt)

    def _unit_with_room(self, need: int, rng: np.random.Generator, default: int) -> int:
        """The unit holding a token drawn uniformly among the tokens of documents of >= need tokens
        (`default` if there is none)."""
        first = int(np.searchsorted(self.by_length_len, need))
        if first == len(self.by_length):
            return default
        t = int(rng.integers(self.tokens_before[first], self.tokens_before[-1]))
        i = int(np.searchsorted(self.tokens_before, t, side="right")) - 1
        token = int(self.doc_tokens[self.by_length[i]]) + t - int(self.tokens_before[i])
        return int(np.searchsorted(self.unit_start, token, side="right")) - 1

    def _snap(self, at: int, bounds: np.ndarray, cap: int, tol: int) -> int:
        """`at` moved to the nearest sentence end within snap * tol tokens of it (the earlier of two as near) and
        not past `cap`: parts that end where a sentence ends are what the model will be asked to write. Only to
        an end from which the move back would be allowed too, given the drawn range's `bounds` [lo, hi]: lengths
        then move as often up as down, also near the bounds, and the realised lengths keep the drawn
        distribution. (Without it, lengths near a bound could move inwards but not out.)"""
        reach = min(int(self.snap * tol), cap - at)  # as far back as the cap lets it go forward
        i = np.searchsorted(self.sent_offsets, at - reach)
        ends = self.sent_offsets[i : np.searchsorted(self.sent_offsets, at + reach, side="right")]
        lo, hi = int(bounds[0]), int(bounds[1])
        ends = ends[(np.abs(ends - at) <= np.minimum(hi - ends, ends - lo)) | (at < lo) | (at > hi)]
        return int(ends[np.argmin(np.abs(ends - at))]) if len(ends) else min(at, cap)

    def _ends_document(self, end: int) -> bool:
        return bool(self.doc_tokens[np.searchsorted(self.doc_tokens, end)] == end)

    def lengths(self, g: int) -> tuple[int, int]:
        """(encoder length, decoder length) of sample g, without building it (for length grouping)."""
        _, start, split, end, _ = self._span(int(g))
        return split - start + 2, end - split + 1

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        g = int(g)
        rng, start, split, end, _ = self._span(g)
        tokens = self.corpus.tokens
        cls, sep = np.array([self.cls_id], np.int64), np.array([self.sep_id], np.int64)
        target = np.asarray(tokens[split:end], dtype=np.int64)
        enc = np.concatenate([cls, np.asarray(tokens[start:split], dtype=np.int64), sep])
        if g < self.mlm_until:  # drawn after the span, so masking never changes which text a sample holds
            word_start = np.concatenate([[0], np.asarray(self.corpus.word_start[start:split], np.int64), [0]])
            special = np.zeros(len(enc), dtype=bool)
            special[[0, -1]] = True
            enc_input, mlm_labels = whole_word_mask(enc, word_start, special, self.mlm_cfg, rng,
                                                    self.mask_id, self.random_ids)
        else:
            enc_input, mlm_labels = enc, np.full(len(enc), IGNORE, dtype=np.int64)
        last_label = sep if self._ends_document(end) else np.array([IGNORE], np.int64)
        return {"enc_input_ids": enc_input, "mlm_labels": mlm_labels,
                "dec_input_ids": np.concatenate([cls, target]), "dec_labels": np.concatenate([target, last_label])}

    # ---- reporting / batching helpers -----------------------------------------------------------
    def length_report(self, indices) -> dict:
        """length_report of this dataset's samples `indices`."""
        return length_report([(self, g) for g in indices])

    def stats(self, probe: int = 2000) -> dict:
        """Counts, and the length report (length_report) of the first `probe` samples."""
        report = self.length_report(range(probe))
        return {"num_docs": self.corpus.num_docs, "num_anchors": self.num_anchors, "dropped_docs": self.dropped_docs,
                "chunk_tokens": self.chunk_tokens, "mean_enc_len": report["encoder"]["mean_realised"],
                "mean_dec_len": report["decoder"]["mean_realised"], "length_histogram": report,
                "target_ends_document": report["target_ends_document"],
                "moved_to_longer_document": report["moved_to_longer_document"]}  # fmt: skip

    @property
    def collate_fn(self):
        """Picklable collate for DataLoader (workers)."""
        return partial(collate_palm, pad_id=self.pad_id, enc_max_len=self.src_len[1], dec_max_len=self.tgt_len[1])


def length_report(samples: list[tuple[PalmDataset, int]]) -> dict:
    """Over (dataset, index) pairs (one dataset's, or a blend's sources'): the drawn and realised lengths
    (histograms in 8 bins of each side's range, as run.json records them and pretrain.summary prints them), and the
    shares of targets that reach their document's end, of samples moved to a longer document, and of contexts and
    targets ending on a sentence end."""
    first = samples[0][0]
    spans = [(ds, ds.sample_spans(g)) for ds, g in samples]
    drawn, realised = np.array([s["drawn"] for _, s in spans]), np.array([s["realised"] for _, s in spans])
    share = lambda values: float(np.mean(values))  # noqa: E731
    return {"samples": len(spans), "snap": first.snap,
            "encoder": _histogram(drawn[:, 0], realised[:, 0], first.src_len),
            "decoder": _histogram(drawn[:, 1], realised[:, 1], first.tgt_len),
            "target_ends_document": share([s["ends_document"] for _, s in spans]),
            "moved_to_longer_document": share([s["moved"] for _, s in spans]),
            "context_ends_sentence": share([ds.corpus.is_sentence_boundary(s["split"]) for ds, s in spans]),
            "target_ends_sentence": share([ds.corpus.is_sentence_boundary(s["end"]) for ds, s in spans])}  # fmt: skip


def _histogram(drawn: np.ndarray, realised: np.ndarray, bounds: tuple[int, int]) -> dict:
    """Counts of drawn and realised lengths in 8 bins of [lo, hi] (realised ones below lo counted apart)."""
    lo, hi = bounds
    edges = np.unique(np.linspace(lo, hi + 1, 9).round().astype(int))
    return {"edges": edges.tolist(), "drawn": np.histogram(drawn, edges)[0].tolist(),
            "realised": np.histogram(realised, edges)[0].tolist(), "realised_below": int((realised < lo).sum()),
            "mean_drawn": float(drawn.mean()), "mean_realised": float(realised.mean())}


def collate_palm(samples: list[dict[str, np.ndarray]], pad_id: int, enc_max_len: int | None = None,
                 dec_max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the encoder and the decoder side each to its longest sample rounded up to a multiple of 8,
    capped at the side's max length (positions past it may not exist in the model)."""
    enc, enc_mask = pad_side(samples, {"enc_input_ids": pad_id, "mlm_labels": IGNORE}, enc_max_len)
    dec, dec_mask = pad_side(samples, {"dec_input_ids": pad_id, "dec_labels": IGNORE}, dec_max_len)
    return {**enc, "enc_attention_mask": enc_mask, **dec, "dec_attention_mask": dec_mask}
