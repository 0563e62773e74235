"""Stop on request at a step boundary, with a checkpoint: how a job survives preemption and time limits.

A request is SIGUSR1 to any rank (Slurm's `--signal=USR1@<s>` or `scancel --signal=USR1` reach the tasks)
or the stop file appearing in run.dir (a batch script's trap touches it: the `deepspeed` launcher, which
sits between Slurm and the ranks, would not pass the signal on). The ranks agree through an all-reduce,
so all of them stop after the same step.
"""
from __future__ import annotations

import os
import signal
import sys

from pretrain.training.distributed import all_reduce_sum


class StopRequest:
    def __init__(self, path: str):
        self.path = path
        self._signalled = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True  # acted on at the next step boundary, never mid-step

    def clear_stale(self, rank: int) -> None:
        """Rank 0, before the ranks meet: a stop file left from before this run would stop it at once."""
        if rank == 0 and os.path.exists(self.path):
            print(f"pretrain.train: removing {self.path}, left from an earlier run", file=sys.stderr)
            os.remove(self.path)

    def requested(self, also: list[float] = ()) -> tuple[bool, list[float]]:
        """Collective: True on every rank if any rank was signalled or sees the stop file; `also`, host numbers
        summed over the ranks in the same all-reduce (the step's loss for training/health.py: no second one)."""
        local = self._signalled or os.path.exists(self.path)
        stop, *sums = all_reduce_sum([float(local), *also])
        return stop > 0, sums
