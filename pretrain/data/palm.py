"""Stage two's (PALM / PLUG) samples: a contiguous span of one document, its first part the encoder's
context and the rest the decoder's target (sampling.LengthGroupedStepSampler batches them by length).

Encoder and decoder lengths are drawn uniformly per sample (PLUG), inside the bounds of the config.
As in stage one, every sample is a pure function of (seed, global sample index) (spans.py), so batches do not
depend on DataLoader workers, the world size or where a run resumed. Masked LM on the encoder is on for
indices < mlm_until, which makes the switch a function of the index, not of the step the trainer is in.
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Sequence

import numpy as np
import torch

from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import IGNORE, MaskingConfig, whole_word_mask
from pretrain.data.sampling import pad_side
from pretrain.data.spans import EpochOrder, check_sample_source, chunks, sample_rng
from pretrain.errors import UserError


def check_range(name: str, value: Sequence[int]) -> tuple[int, int]:
    """[lo, hi] from a list, tuple or Hydra ListConfig of two integers (palm.src_len, palm.tgt_len)."""
    try:
        shown = list(value)
        lo, hi = (operator.index(v) for v in shown)
    except (TypeError, ValueError):
        shown, lo, hi = value, 0, -1
    if not 4 <= lo <= hi:
        raise UserError(f"palm.{name}={shown}: need [lo, hi] with 4 <= lo <= hi")
    return lo, hi


class PalmDataset(torch.utils.data.Dataset):
    """Index g (any int >= 0) -> sample of epoch g // num_anchors; len() is one epoch.

    Anchors are spans.py chunks (whole sentences packed to about the mean span length) of every
    document with >= 2 tokens. A sample starts at a random unit (sentence, or piece of a long sentence) of
    its anchor's chunk, so an anchor gives a different context/target cut in each epoch, and runs on past
    the chunk as far as its drawn lengths need, never past the document's end."""

    def __init__(self, corpus: IndexedCorpus, *, src_len: Sequence[int], tgt_len: Sequence[int], seed: int,
                 mlm_cfg: MaskingConfig, mlm_until: int, cls_id: int, sep_id: int, mask_id: int, pad_id: int,
                 random_ids: np.ndarray, snap: float = 0.25):
        self.src_len, self.tgt_len = check_range("src_len", src_len), check_range("tgt_len", tgt_len)
        mlm_cfg.validate()
        if mlm_until < 0:
            raise UserError(f"mlm_until={mlm_until}: must be >= 0 (0 = no masked LM)")
        if not 0 <= snap <= 1:
            raise UserError(f"palm.snap={snap}: must be in [0, 1] (share of a part's length)")
        self.random_ids = check_sample_source(corpus, seed, random_ids)
        self.corpus, self.seed, self.mlm_cfg, self.mlm_until, self.snap = corpus, seed, mlm_cfg, mlm_until, snap
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id

        mean_src, mean_tgt = sum(self.src_len) // 2, sum(self.tgt_len) // 2
        self.chunk_tokens = mean_src + mean_tgt - 3  # context + target of a mean sample, specials excluded
        (self.unit_start, self.unit_end, self.doc_unit_offsets, self.unit_doc,
         chunk_first, chunk_end) = chunks(corpus, self.chunk_tokens)
        self.sent_offsets = np.asarray(corpus.sent_offsets, dtype=np.int64)
        self.doc_tokens = self.sent_offsets[np.asarray(corpus.doc_offsets, dtype=np.int64)]  # [num_docs + 1]
        doc_len = np.diff(self.doc_tokens)
        keep = doc_len[self.unit_doc[chunk_first]] >= 2  # one token cannot be both context and target
        self.anchor_first, self.anchor_end = chunk_first[keep], chunk_end[keep]
        self.dropped_docs = int((doc_len < 2).sum())
        if self.num_anchors == 0:
            raise UserError(f"the corpus has no document of 2 or more tokens ({self.dropped_docs} shorter ones)")
        self.epoch_permutation = EpochOrder(seed, self.num_anchors)

    # ---- indexing -------------------------------------------------------------------------------
    @property
    def num_anchors(self) -> int:
        return len(self.anchor_first)

    def __len__(self) -> int:
        return self.num_anchors

    def _span(self, g: int) -> tuple[np.random.Generator, int, int, int]:
        """The sample's rng and its token span: context [start, split), target [split, end)."""
        epoch, anchor = self.epoch_permutation.locate(g)
        rng = sample_rng(self.seed, epoch, anchor)
        # the lengths come first, so they do not depend on how later draws are made
        ls = int(rng.integers(self.src_len[0], self.src_len[1] + 1))
        lt = int(rng.integers(self.tgt_len[0], self.tgt_len[1] + 1))
        unit = int(rng.integers(self.anchor_first[anchor], self.anchor_end[anchor]))
        doc = int(self.unit_doc[unit])
        start, doc_start, doc_end = int(self.unit_start[unit]), int(self.doc_tokens[doc]), int(self.doc_tokens[doc + 1])
        ctx_len, tgt_len = ls - 2, lt - 1  # room left by [CLS] ctx [SEP] and [CLS] tgt / tgt [SEP]
        need = ctx_len + tgt_len
        if doc_end - start < need:
            if doc_end - doc_start >= need:  # start earlier, at the latest unit that leaves enough room
                u0, u1 = int(self.doc_unit_offsets[doc]), int(self.doc_unit_offsets[doc + 1])
                k = int(np.searchsorted(self.unit_start[u0:u1], doc_end - need, side="right")) - 1
                start = int(self.unit_start[u0 + k])
            else:  # the whole document, shared between the two parts as Ls : Lt
                start, total = doc_start, doc_end - doc_start
                share = int(round(total * ls / (ls + lt)))
                ctx_len = min(max(share, 1, total - tgt_len), ctx_len, total - 1)
                tgt_len = total - ctx_len
        split = self._snap(start, start + ctx_len)
        end = self._snap(split, min(split + tgt_len, doc_end))
        return rng, start, split, end

    def _snap(self, lo: int, hi: int) -> int:
        """hi moved back to the last sentence end in (lo, hi] within snap * (hi - lo) tokens, if there is one:
        parts that end where a sentence ends are what the model will be asked to write."""
        last = int(self.sent_offsets[np.searchsorted(self.sent_offsets, hi, side="right") - 1])
        return last if last > lo and hi - last <= int(self.snap * (hi - lo)) else hi

    def lengths(self, g: int) -> tuple[int, int]:
        """(encoder length, decoder length) of sample g, without building it (for length grouping)."""
        _, start, split, end = self._span(int(g))
        return split - start + 2, end - split + 1

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        g = int(g)
        rng, start, split, end = self._span(g)
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
        return {"enc_input_ids": enc_input, "mlm_labels": mlm_labels,
                "dec_input_ids": np.concatenate([cls, target]), "dec_labels": np.concatenate([target, sep])}

    # ---- reporting / batching helpers -----------------------------------------------------------
    def stats(self, probe: int = 1000) -> dict:
        """Counts, and mean lengths over the first `probe` samples of epoch 0."""
        sizes = np.array([self.lengths(g) for g in range(min(probe, self.num_anchors))])
        return {"num_docs": self.corpus.num_docs, "num_anchors": self.num_anchors, "dropped_docs": self.dropped_docs,
                "chunk_tokens": self.chunk_tokens, "mean_enc_len": float(sizes[:, 0].mean()),
                "mean_dec_len": float(sizes[:, 1].mean())}

    @property
    def collate_fn(self):
        """Picklable collate for DataLoader (workers)."""
        return partial(collate_palm, pad_id=self.pad_id, enc_max_len=self.src_len[1], dec_max_len=self.tgt_len[1])


def collate_palm(samples: list[dict[str, np.ndarray]], pad_id: int, enc_max_len: int | None = None,
                 dec_max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the encoder and the decoder side each to its longest sample rounded up to a multiple of 8,
    capped at the side's max length (positions past it may not exist in the model)."""
    enc, enc_mask = pad_side(samples, {"enc_input_ids": pad_id, "mlm_labels": IGNORE}, enc_max_len)
    dec, dec_mask = pad_side(samples, {"dec_input_ids": pad_id, "dec_labels": IGNORE}, dec_max_len)
    return {**enc, "enc_attention_mask": enc_mask, **dec, "dec_attention_mask": dec_mask}
