"""Stage-two (PALM / PLUG) samples: a contiguous span of one document, its first part the encoder's
context and the rest the decoder's target; the batch sampler that groups them by length.

Encoder and decoder lengths are drawn uniformly per sample (PLUG), inside the bounds of the config.
As in dataset.py, every sample is a pure function of (seed, global sample index), so batches do not
depend on DataLoader workers, the world size or where a run resumed. Masked LM on the encoder is on for
indices < mlm_until, which makes the switch a function of the index, not of the step the trainer is in.
"""
from __future__ import annotations

import math
import operator
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pretrain.dataset import _SAMPLE_STREAM, EpochOrder, _pack_chunks, _units
from pretrain.errors import UserError
from pretrain.indexed import IndexedCorpus
from pretrain.objectives import IGNORE, ObjectiveConfig, whole_word_mask

_POOL_STREAM = 3  # seed-sequence tag of the sampler's pool-step order (1 and 2 are the dataset's)


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

    Anchors are the dataset.py chunks (whole sentences packed to about the mean span length) of every
    document with >= 2 tokens. A sample starts at a random unit (sentence, or piece of a long sentence) of
    its anchor's chunk, so an anchor gives a different context/target cut in each epoch, and runs on past
    the chunk as far as its drawn lengths need, never past the document's end."""

    def __init__(self, corpus: IndexedCorpus, *, src_len: Sequence[int], tgt_len: Sequence[int], seed: int,
                 mlm_cfg: ObjectiveConfig, mlm_until: int, cls_id: int, sep_id: int, mask_id: int, pad_id: int,
                 random_ids: np.ndarray, snap: float = 0.25):
        self.src_len, self.tgt_len = check_range("src_len", src_len), check_range("tgt_len", tgt_len)
        mlm_cfg.validate("palm.mlm")
        if seed < 0:
            raise UserError(f"seed={seed}: must be >= 0")
        if mlm_until < 0:
            raise UserError(f"mlm_until={mlm_until}: must be >= 0 (0 = no masked LM)")
        if not 0 <= snap <= 1:
            raise UserError(f"palm.snap={snap}: must be in [0, 1] (share of a part's length)")
        if corpus.num_tokens == 0:
            raise UserError("the corpus has no tokens")
        self.random_ids = np.asarray(random_ids, dtype=np.int64)
        if self.random_ids.ndim != 1 or len(self.random_ids) == 0:
            raise UserError("random_ids: need a non-empty 1-d array of token ids for MLM random replacement")
        self.corpus, self.seed, self.mlm_cfg, self.mlm_until, self.snap = corpus, seed, mlm_cfg, mlm_until, snap
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id

        mean_src, mean_tgt = sum(self.src_len) // 2, sum(self.tgt_len) // 2
        self.chunk_tokens = mean_src + mean_tgt - 3  # context + target of a mean sample, specials excluded
        self.unit_start, self.unit_end, self.doc_unit_offsets = _units(corpus, self.chunk_tokens)
        self.unit_doc = np.repeat(np.arange(corpus.num_docs), np.diff(self.doc_unit_offsets))
        chunk_first, chunk_end = _pack_chunks(self.unit_start, self.unit_end, self.unit_doc,
                                              self.doc_unit_offsets, self.chunk_tokens)
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

    def _plan(self, g: int) -> tuple[np.random.Generator, int, int, int]:
        """The sample's rng and its token span: context [start, split), target [split, end)."""
        if g < 0:
            raise IndexError(f"sample index {g}: must be >= 0")
        epoch, position = divmod(g, self.num_anchors)
        anchor = int(self.epoch_permutation(epoch)[position])
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, anchor])
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
        _, start, split, end = self._plan(int(g))
        return split - start + 2, end - split + 1

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        g = int(g)
        rng, start, split, end = self._plan(g)
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

    def side(keys: dict[str, int], max_len: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        lengths = [len(s[next(iter(keys))]) for s in samples]
        width = -(-max(lengths) // 8) * 8
        if max_len is not None:
            width = max(max(lengths), min(width, max_len))
        out = {}
        for key, fill in keys.items():
            padded = np.full((len(samples), width), fill, dtype=np.int64)
            for i, s in enumerate(samples):
                padded[i, : len(s[key])] = s[key]
            out[key] = torch.from_numpy(padded)
        return out, torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]

    enc, enc_mask = side({"enc_input_ids": pad_id, "mlm_labels": IGNORE}, enc_max_len)
    dec, dec_mask = side({"dec_input_ids": pad_id, "dec_labels": IGNORE}, dec_max_len)
    return {**enc, "enc_attention_mask": enc_mask, **dec, "dec_attention_mask": dec_mask}


class LengthGroupedStepSampler(torch.utils.data.Sampler):
    """Batch sampler like dataset.StepSampler (step t owns global indices [t*GB, (t+1)*GB)), except that
    the samples of a pool of `group_steps` consecutive steps are regrouped by length: sorted by
    enc + dec length, cut into GB-sized pool-steps in that order (the ranks of a step get similar lengths,
    so little of a step is padding), and the pool-steps shuffled so training does not go from short to long.
    Pools never straddle boundary_step (the MLM switch), so with mlm_until = boundary_step * GB each sample
    is trained in the phase its index says. A pool is never cut at max_steps, so the batches of a step do not
    depend on max_steps; the pool-steps a run does not reach are simply not used."""

    def __init__(self, lengths: Callable[[int], tuple[int, int]], *, micro_batch: int, grad_accum: int,
                 world_size: int, rank: int, start_step: int = 0, max_steps: int | None = None,
                 group_steps: int = 50, seed: int = 0, boundary_step: int | None = None):
        for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size),
                            ("group_steps", group_steps)):
            if value < 1:
                raise UserError(f"{name}={value}: must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank}: must be in [0, world_size={world_size})")
        for name, value in (("start_step", start_step), ("seed", seed), ("boundary_step", boundary_step)):
            if value is not None and value < 0:
                raise UserError(f"{name}={value}: must be >= 0")
        self.lengths = lengths
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.start_step, self.max_steps = start_step, max_steps
        self.group_steps, self.seed, self.boundary_step = group_steps, seed, boundary_step
        self.global_batch = micro_batch * grad_accum * world_size
        self._pool_start, self._pool = -1, None

    def pool_bounds(self, t: int) -> tuple[int, int]:
        """[first, end) steps of the pool holding step t: [0, K), [K, 2K), ... cut at boundary_step, then
        [boundary_step, boundary_step + K), ..."""
        k, b = self.group_steps, self.boundary_step
        if b is None or t < b:
            first = t // k * k
            return first, first + k if b is None else min(first + k, b)
        first = b + (t - b) // k * k
        return first, first + k

    def _pool_steps(self, first: int, end: int) -> np.ndarray:
        """[end - first, grad_accum * world_size, micro_batch] global indices, in the pool's step order."""
        gb = self.global_batch
        indices = np.arange(first * gb, end * gb)
        enc, dec = np.array([self.lengths(int(g)) for g in indices]).T
        # Encoder and decoder lengths are drawn independently, so one sort key cannot group both: sort by the
        # encoder's, then by the decoder's within runs of ~sqrt(pool) steps (in simulation ~9% padding, against
        # 25-35% for a sort by the sum). Runs count whole steps, so a step's samples do not depend on the world size.
        run = gb * max(1, round(math.sqrt(end - first)))
        by_enc = np.argsort(enc, kind="stable")
        order = np.concatenate([r[np.argsort(dec[r], kind="stable")] for r in np.split(by_enc, range(run, len(by_enc), run))])
        ordered = indices[order]
        steps = ordered.reshape(end - first, self.grad_accum * self.world_size, self.micro_batch)
        return steps[np.random.default_rng([_POOL_STREAM, self.seed, first]).permutation(end - first)]

    def step_batches(self, t: int) -> list[list[int]]:
        """This rank's micro batches of step t, accumulation-major."""
        first, end = self.pool_bounds(t)
        if first != self._pool_start:
            self._pool, self._pool_start = self._pool_steps(first, end), first
        step = self._pool[t - first]
        return [step[a * self.world_size + self.rank].tolist() for a in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[int]]:
        t = self.start_step
        while self.max_steps is None or t < self.max_steps:
            yield from self.step_batches(t)
            t += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("LengthGroupedStepSampler without max_steps is infinite")
        return max(0, self.max_steps - self.start_step) * self.grad_accum
