"""From training steps to sample indices, and from samples to padded batches.

A step owns the global sample indices [t*GB, (t+1)*GB) (GB = micro_batch x grad_accum x world_size) whatever
the world size, so resuming at step t is starting the sampler there; the datasets make each index a pure
function of the seed (spans.py). Stage two regroups the indices of a pool of steps by length.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch

from pretrain.data.spans import POOL_STREAM
from pretrain.errors import UserError


class StepSampler(torch.utils.data.Sampler):
    """Batch sampler: for step t and accumulation a, rank r gets global indices
    t*GB + a*(micro_batch*world_size) + r*micro_batch + j, j < micro_batch. Steps run from start_step up to
    max_steps (exclusive; an absolute step number), forever when max_steps is None."""

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

    def step_batches(self, t: int) -> list[list[int]]:
        """This rank's micro batches of step t, accumulation-major."""
        bases = (t * self.global_batch + (a * self.world_size + self.rank) * self.micro_batch
                 for a in range(self.grad_accum))  # fmt: skip
        return [list(range(base, base + self.micro_batch)) for base in bases]

    def __iter__(self) -> Iterator[list[int]]:
        t = self.start_step
        while self.max_steps is None or t < self.max_steps:
            yield from self.step_batches(t)
            t += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError(f"{type(self).__name__} without max_steps is infinite")
        return max(0, self.max_steps - self.start_step) * self.grad_accum


class LengthGroupedStepSampler(StepSampler):
    """StepSampler (step t owns global indices [t*GB, (t+1)*GB)), except that the samples of a pool of
    `group_steps` consecutive steps are regrouped by length: sorted by encoder length, then decoder length,
    cut into GB-sized pool-steps in that order (the ranks of a step get similar lengths, so little of a step is
    padding), and the pool-steps shuffled so training does not go from short to long.
    Pools never straddle boundary_step (the MLM switch), so with mlm_until = boundary_step * GB each sample
    is trained in the phase its index says. A pool is never cut at max_steps, so the batches of a step do not
    depend on max_steps; the pool-steps a run does not reach are simply not used."""

    def __init__(self, lengths: Callable[[int], tuple[int, int]], *, micro_batch: int, grad_accum: int,
                 world_size: int, rank: int, start_step: int = 0, max_steps: int | None = None,
                 group_steps: int = 50, seed: int = 0, boundary_step: int | None = None):
        super().__init__(micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, rank=rank,
                         start_step=start_step, max_steps=max_steps)  # fmt: skip
        if group_steps < 1:
            raise UserError(f"group_steps={group_steps}: must be >= 1")
        for name, value in (("seed", seed), ("boundary_step", boundary_step)):
            if value is not None and value < 0:
                raise UserError(f"{name}={value}: must be >= 0")
        self.lengths = lengths
        self.group_steps, self.seed, self.boundary_step = group_steps, seed, boundary_step
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
        return steps[np.random.default_rng([POOL_STREAM, self.seed, first]).permutation(end - first)]

    def step_batches(self, t: int) -> list[list[int]]:
        first, end = self.pool_bounds(t)
        if first != self._pool_start:
            self._pool, self._pool_start = self._pool_steps(first, end), first
        step = self._pool[t - first]
        return [step[a * self.world_size + self.rank].tolist() for a in range(self.grad_accum)]


def eval_batches(num_samples: int, micro_batch: int, world_size: int, rank: int) -> list[list[int]]:
    """Validation micro batches for `rank`: positions r, r+W, ... of epoch 0 (global index = position).
    num_samples is rounded down to a multiple of world_size so every rank runs the same number of
    batches (collective forwards, e.g. ZeRO-3, must not wait for a rank that has finished)."""
    per_rank = num_samples // world_size
    mine = list(range(rank, per_rank * world_size, world_size))
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def pad_side(samples: list[dict[str, np.ndarray]], keys: dict[str, int], max_len: int | None
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """Pad `keys` (name -> fill value; the first one's length is the sample's) to the longest sample rounded up
    to a multiple of 8 (tensor-core friendly), capped at max_len. Returns the tensors and the [B, width] bool
    mask of real tokens."""
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
