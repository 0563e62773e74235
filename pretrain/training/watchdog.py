"""The hang watchdog: a thread on every rank that, when no step finishes in time, writes the rank's Python stacks
into run.dir/stacks/rank<R>.txt and exits with status 4 (errors.EXIT_HUNG), so that a job script can requeue.

The limit for a step is `dist.watchdog_s`; null (the default) derives it from the measured step time:
max(FLOOR_S, FACTOR x the slowest of the first MEASURED_STEPS steps after the first), never more than
PHASE_SHARE x dist.timeout_s. The first step (warm-up, allocation), an evaluation and a save or load (the
functions marked `long_phase`) are not steps: they get PHASE_SHARE x dist.timeout_s each, and are not measured.

Why below dist.timeout_s: when one rank hangs, its peers wait in their next collective, which gives up after
dist.timeout_s with a gloo/NCCL error (a line, exit 5, and no stacks). The watchdog's clock starts at the last
finished step (or at the start of a phase), before that collective was entered, and its limit is shorter, so
every rank's watchdog fires first and the stacks show where each rank was.

Each rank's watchdog fires on its own clock (every rank finished the same last step within moments of the others);
a rank that fired waits GRACE_S before it exits, so that its peers have written their stacks before the launcher,
seeing the first exit, terminates them.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import sys
import threading
import time

from pretrain.errors import EXIT_HUNG
from pretrain.training import run_lock

FLOOR_S = 60.0
FACTOR = 10.0
MEASURED_STEPS = 5
PHASE_SHARE = 0.9
GRACE_S = 2.0
POLL_S = 0.25

_ACTIVE: Watchdog | None = None


class Watchdog:
    def __init__(self, run_dir: str, rank: int, command: str, step_limit_s: float | None, timeout_s: float):
        self.run_dir, self.rank, self.command = run_dir, rank, command
        self.fixed = step_limit_s
        self.phase_limit = PHASE_SHARE * timeout_s
        self.slowest, self.measured = 0.0, 0
        self.last_step: int | None = None
        self._lock = threading.Lock()
        self._depth = 0  # nested long phases
        self._long_in_interval = True  # the interval up to the first beat is the first step: not measured
        self._since = time.monotonic()
        self._what, self._limit = "the first step", self.phase_limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def step_limit(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.measured == 0:
            return self.phase_limit
        return min(self.phase_limit, max(FLOOR_S, FACTOR * self.slowest))

    def beat(self, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._long_in_interval and self.measured < MEASURED_STEPS:
                self.slowest = max(self.slowest, now - self._since)
                self.measured += 1
            self.last_step, self._since, self._long_in_interval = step, now, False
            self._what, self._limit = f"step {step + 1}", self.step_limit()
        _stall_if_asked(step, self.rank)

    @contextlib.contextmanager
    def phase(self, name: str):
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._saved = (self._since, self._what, self._limit)
                self._since, self._what, self._limit = time.monotonic(), name, self.phase_limit
            self._long_in_interval = True
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:  # back to the step it interrupted, its clock restarted
                    self._since, self._what, self._limit = time.monotonic(), self._saved[1], self._saved[2]

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                late = time.monotonic() - self._since > self._limit
                what, limit = self._what, self._limit
            if late:
                self._fire(what, limit)

    def _fire(self, what: str, limit: float) -> None:
        stacks = os.path.join(self.run_dir, "stacks")
        os.makedirs(stacks, exist_ok=True)
        path = os.path.join(stacks, f"rank{self.rank}.txt")
        after = "" if self.last_step is None else f" after step {self.last_step}"
        limit_s = f"{limit:.1f}".rstrip("0").rstrip(".")
        with open(path, "w") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {self.rank}, pid {os.getpid()}: {what} did not "
                    f"finish in {limit_s} s{after}\n")  # fmt: skip
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        if self.rank == 0:
            print(f"{self.command}: error: hung: {what} did not finish in {limit_s} s{after} (watchdog, "
                  f"dist.watchdog_s); every rank's Python stacks are in {stacks}/; exiting {EXIT_HUNG} (a requeue "
                  "resumes from the newest complete checkpoint)", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(GRACE_S)
        run_lock.release_held()
        os._exit(EXIT_HUNG)


def _stall_if_asked(step: int, rank: int) -> None:
    """Fault injection for the tests of a hang: PRETRAIN_STALL_AT=<step>:<rank> stops that rank for ever after
    that step (its peers then wait in their next collective)."""
    spec = os.environ.get("PRETRAIN_STALL_AT")
    if spec and spec == f"{step}:{rank}":
        print(f"PRETRAIN_STALL_AT={spec}: rank {rank} stalls after step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def arm(run_dir: str, rank: int, command: str, step_limit_s: float | None, timeout_s: float) -> Watchdog:
    """Start this rank's watchdog (once its model is built: the first step is timed from here)."""
    global _ACTIVE
    disarm()
    _ACTIVE = Watchdog(run_dir, rank, command, step_limit_s, timeout_s)
    return _ACTIVE


def beat(step: int) -> None:
    """A step finished (the loop calls it once per step)."""
    if _ACTIVE is not None:
        _ACTIVE.beat(step)


def disarm() -> None:
    """No more steps (the loop is over)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None


def long_phase(name: str):
    """Decorator: a function that is not a step (an evaluation, a save, a load) gets the phase limit."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if _ACTIVE is None:
                return fn(*args, **kwargs)
            with _ACTIVE.phase(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
