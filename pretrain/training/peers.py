"""No orphans: a rank stops, with one line and status 5 (errors.EXIT_PEER_LOST), when its launcher or its peers
are gone.

The launcher: `deepspeed` starts `python -m deepspeed.launcher.launch`, which starts the ranks; killing the top
`deepspeed` (kill -9, a lost terminal) leaves both below it running, and killing the middle one leaves the ranks.
So each launched rank watches the chain of launchers above it (its parent, and up while the ancestor is a
launcher: deepspeed, torchrun), from a daemon thread that polls every POLL_S; prctl's PR_SET_PDEATHSIG would see
only the parent, and kill without a word. Under srun the parent is slurmstepd, which Slurm tears down with the
job.

The peers: a rank whose peer died (a lost node) fails in its next collective with a gloo/NCCL error;
`lost_peers_as_one_line` turns that into one line at the entry point instead of a traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import psutil
import torch.distributed as dist

from pretrain.errors import EXIT_PEER_LOST
from pretrain.training import run_lock

POLL_S = 0.5
_LAUNCHERS = ("deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner", "torchrun",
              "torch.distributed.run", "torch.distributed.launch")  # fmt: skip


def _launcher_name(cmdline: list[str]) -> str | None:
    """Which launcher a command line is (`python -m deepspeed.launcher.launch ...`, `.../bin/deepspeed ...`)."""
    for i, arg in enumerate(cmdline[:4]):
        name = os.path.basename(arg)
        if name in _LAUNCHERS:
            return name
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in _LAUNCHERS:
            return cmdline[i + 1]
    return None


def launcher_chain() -> list:
    """The processes to watch (psutil.Process): the parent, and its ancestors while they are launchers."""
    chain = []
    try:
        proc = psutil.Process(os.getppid())
        chain.append(proc)
        while _launcher_name(proc.cmdline()) is not None:
            parent = proc.parent()
            if parent is None or parent.pid <= 1 or _launcher_name(parent.cmdline()) is None:
                break
            chain.append(parent)
            proc = parent
    except psutil.Error:
        pass
    return chain


def watch_launcher(command: str, rank: int) -> None:
    """A launched rank (LOCAL_RANK set, a parent that is a launcher) stops when a launcher above it is gone."""
    if "LOCAL_RANK" not in os.environ:
        return
    chain = launcher_chain()
    if not chain or _launcher_name(_cmdline(chain[0])) is None:
        return  # not started by a launcher we know: nothing above it to outlive
    ppid = os.getppid()
    names = {p.pid: _launcher_name(_cmdline(p)) or "its parent" for p in chain}  # a dead one's cmdline is empty

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            gone = next((p for p in chain if not _alive(p)), None)
            if gone is None and os.getppid() == ppid:
                continue
            gone = gone or chain[0]
            print(f"{command}: error: rank {rank}: its launcher (pid {gone.pid}, {names[gone.pid]})"
                  f" is gone; stopping (exit {EXIT_PEER_LOST}): a rerun resumes from the newest complete checkpoint",
                  file=sys.stderr, flush=True)  # fmt: skip
            run_lock.release_held()
            os._exit(EXIT_PEER_LOST)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _alive(proc) -> bool:
    """Running, and not a zombie (a dead launcher whose parent has not reaped it yet)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return [getattr(proc, "_name", None) or "?"]


def _is_peer_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
    )


@contextlib.contextmanager
def lost_peers_as_one_line(command: str, rank: int):
    """At an entry point: a collective that failed because a peer is gone becomes one line and status 5; Ctrl-C
    one line and 130."""
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group: one line each, no trace
        print(f"{command}: interrupted (rank {rank}): a rerun resumes from the newest complete checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(130)
    except Exception as e:
        if not _is_peer_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{command}: error: rank {rank} lost its peers ({type(e).__name__}: {first[:300]}); exiting "
              f"{EXIT_PEER_LOST}: a rerun resumes from the newest complete checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(EXIT_PEER_LOST)
