"""One writer per run directory: `run.dir/run.lock`, taken by rank 0 before anything is written there.

A second `pretrain.train` or `pretrain.finetune` into a directory in use is refused with one line naming the
holder; a holder that died does not lock the directory for ever. The lock must work on NFS and Lustre, where
fcntl/flock locks are unreliable (or off), so it relies only on what those file systems do atomically:

- creating: the lock's content is written into a file of our own and hard-linked to `run.lock`; link() fails
  with EEXIST when the name exists (the classic NFS-safe exclusive create: it works where O_EXCL did not, and the
  file appears whole, never empty). A link whose reply was lost is recognised by the link count of our file.
- a heartbeat: a daemon thread rewrites the lock (written beside it, os.replace'd) every `heartbeat_s`.
- stale: the holder is on this host and its process is gone (or the pid is another process now), its heartbeat is
  older than the lease (`run.lock_lease_s`), or it carries our SLURM_JOB_ID (Slurm requeued this job, perhaps to
  another node). The lease compares the holder's clock with ours: the nodes' clocks must agree to well within
  it (NTP does).
- taking over a stale lock: it is renamed aside (of two starters only one rename succeeds); the one that got it
  checks that what it moved is the lock it judged stale (else it puts it back and looks again), removes it and
  creates its own as above.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from pretrain.errors import UserError

LOCK_NAME = "run.lock"
_ACTIVE: RunLock | None = None  # the lock this process holds, if any


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's start time (psutil): tells a reused pid apart
    started: float  # when the lock was taken (epoch seconds)
    heartbeat: float  # when it was last refreshed (epoch seconds, the holder's clock)
    slurm_job_id: str | None
    command: str
    token: str  # unique per acquisition: host, pid and the time it was taken
    rendezvous: str | None = None  # MASTER_ADDR:MASTER_PORT of the holder's launch: its own ranks share it

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"{self.command} on host {self.host}, pid {self.pid}{job}, since {since}"


def _process_started(pid: int) -> float | None:
    """The start time of process `pid` on this host; None when there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _me(command: str, started: float) -> Holder:
    host, pid = socket.gethostname(), os.getpid()
    return Holder(host, pid, _process_started(pid) or 0.0, started, time.time(), os.environ.get("SLURM_JOB_ID"),
                  command, f"{host}:{pid}:{started!r}", _rendezvous())  # fmt: skip


def _rendezvous() -> str | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def read_holder(path: str) -> Holder | None:
    """The holder a lock file names; None when it is gone or unreadable (a lock is never written partially)."""
    try:
        with open(path, encoding="utf-8") as f:
            return Holder(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(holder: Holder, lease_s: float, now: float | None = None) -> str | None:
    """Why `holder`'s lock may be taken over, or None while it is alive."""
    now = time.time() if now is None else now
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.slurm_job_id == job:
        return f"it is this Slurm job's ({job}): a requeue"
    if holder.host == socket.gethostname():
        started = _process_started(holder.pid)
        if started is None or abs(started - holder.pid_started) > 1.0:
            return f"its process {holder.pid} on this host is gone"
    if now - holder.heartbeat > lease_s:
        return f"its heartbeat is {now - holder.heartbeat:.0f} s old (run.lock_lease_s={lease_s:g})"
    return None


class RunLock:
    """The lock of one run directory, held by this process; `acquire` takes it."""

    def __init__(self, run_dir: str, command: str, lease_s: float):
        self.run_dir, self.command, self.lease_s = run_dir, command, lease_s
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.heartbeat_s = min(5.0, lease_s / 4)
        self.me = _me(command, time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_own(self, suffix: str) -> str:
        """Our content in a file of our own beside the lock (whole, fsync'ed): what link and replace install."""
        tmp = f"{self.path}.{self.me.host}.{self.me.pid}.{suffix}"
        me = dict(self.me.__dict__, heartbeat=time.time())
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self) -> bool:
        """Create the lock with our content if no lock exists; False if one does."""
        tmp = self._write_own("new")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink == 2  # NFS: the link was made and the retried call's reply says EEXIST
        except OSError as e:  # a file system without hard links (some FUSE mounts): exclusive create instead
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_exclusive(tmp)
        finally:
            os.unlink(tmp)

    def _create_exclusive(self, tmp: str) -> bool:
        """O_CREAT|O_EXCL, then our content: a reader may meet the file empty for a moment (read_holder gives
        None, and acquire looks again)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
        return True

    def _take_over(self, seen: Holder) -> None:
        """Remove the stale lock `seen`, unless another starter already replaced it (then leave theirs)."""
        aside = f"{self.path}.stale.{self.me.host}.{self.me.pid}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another starter took it aside first: look again
        moved = read_holder(aside)
        if moved is not None and moved.token != seen.token:  # a fresh lock arrived between our read and rename
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)

    def _remove_if_unreadable_and_old(self) -> None:
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return
        if age > self.lease_s and read_holder(self.path) is None:
            print(f"{self.command}: removing {self.path}: unreadable and {age:.0f} s old", file=sys.stderr)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming its live holder (nothing else is written)."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(10):
            if self._create():
                break
            holder = read_holder(self.path)
            if holder is None:  # removed since, being written (O_EXCL fallback), or unreadable (a damaged disk)
                self._remove_if_unreadable_and_old()
                time.sleep(0.2)
                continue
            why = stale_reason(holder, self.lease_s)
            if why is None:
                raise _in_use(self.run_dir, self.path, holder)
            print(f"{self.command}: taking over {self.path} of {holder.describe()}: {why}", file=sys.stderr)
            self._take_over(holder)
        else:
            raise UserError(f"{self.path}: could not take the lock (other starters keep taking it); try again")
        global _ACTIVE
        _ACTIVE = self
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_holder(self.path)
            if current is None:  # removed by hand (or mid-takeover): put ours back if the name is free
                self._create()
                continue
            if current.token != self.me.token:  # judged stale (a pause longer than the lease) and taken over
                print(f"{self.command}: error: {self.path} was taken over by {current.describe()}: another run "
                      f"writes into run.dir={self.run_dir}; this one stops", file=sys.stderr, flush=True)  # fmt: skip
                os._exit(2)
            try:
                os.replace(self._write_own("beat"), self.path)
            except OSError as e:  # a full or briefly unreachable file system: the lease allows a few misses
                print(f"{self.command}: warning: cannot refresh {self.path}: {e}", file=sys.stderr)

    def release(self) -> None:
        """Remove the lock if it is still ours (at a normal exit, or on the way out of a stop)."""
        global _ACTIVE
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        current = read_holder(self.path)
        if current is not None and current.token == self.me.token:
            os.unlink(self.path)
        if _ACTIVE is self:
            _ACTIVE = None


def _in_use(run_dir: str, path: str, holder: Holder) -> UserError:
    return UserError(f"run.dir={run_dir} is in use by {holder.describe()} ({path}); wait for it to finish, stop it, or"
                     " give another run.dir")  # fmt: skip


def check_free(run_dir: str, lease_s: float) -> None:
    """Raise acquire's UserError if a live holder has run_dir, writing nothing: before a starter reads the run's
    checkpoints, which the holder may be writing or pruning (acquire, later, is what excludes). Every rank checks;
    a holder of the same rendezvous is this launch's own rank 0, which may have taken the lock already."""
    path = os.path.join(run_dir, LOCK_NAME)
    holder = read_holder(path)
    ours = holder is not None and holder.rendezvous is not None and holder.rendezvous == _rendezvous()
    if holder is not None and not ours and stale_reason(holder, lease_s) is None:
        raise _in_use(run_dir, path, holder)


def acquire(run_dir: str, command: str, lease_s: float) -> RunLock:
    lock = RunLock(run_dir, command, lease_s)
    lock.acquire()
    return lock


def release_held() -> None:
    """Release the lock this process holds, if any: for the paths that leave by os._exit (no atexit there)."""
    if _ACTIVE is not None:
        _ACTIVE.release()


def take(run_dir: str, command: str, lease_s: float, rank: int) -> str | None:
    """Rank 0 takes the lock before the ranks join; returns its refusal (None: taken, or not rank 0), which
    `join_agreeing` hands to every rank once they have joined."""
    if rank != 0:
        return None
    try:
        acquire(run_dir, command, lease_s)
    except UserError as e:
        return str(e)
    return None


def join_agreeing(refusal: str | None, world_size: int, join: Callable[[], None]) -> None:
    """Join the ranks (`join`), then stop every rank with rank 0's refusal (a broadcast), before anything is
    written. A refusal comes first: a second run on the first one's run.dir and port hears about the run.dir."""
    from pretrain.training import distributed  # torch: only to join ranks; the lock stays light for helpers

    if refusal is not None and world_size == 1:
        raise UserError(refusal)
    try:
        join()
    except UserError:
        if refusal is not None:
            raise UserError(refusal) from None
        raise
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise UserError(refusal)
