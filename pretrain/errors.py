"""User-facing errors: one line, naming the file, field or value, and a non-zero exit.

Exit statuses are a contract with the job scripts (launch/slurm/train.sbatch requeues by them):
  2  EXIT_USER_ERROR  bad input or configuration: rerunning the same command fails the same way (never requeued)
  3  EXIT_DIVERGED    the run stopped itself on a divergence it may not roll back (never requeued: it would diverge
                      again; the line says what to try)
  4  EXIT_HUNG        the watchdog saw no step finish in time; the ranks wrote their stacks (a requeue may help)
  5  EXIT_PEER_LOST   a rank lost its peers or its launcher (a requeue resumes from the newest intact checkpoint)
Any other non-zero status is a crash (requeued up to the job's limit).
"""
import sys
import time
from contextlib import contextmanager

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_HUNG = 4
EXIT_PEER_LOST = 5
NEVER_REQUEUED = (EXIT_USER_ERROR, EXIT_DIVERGED)


class UserError(Exception):
    """Bad input or configuration. Its message is printed as one line and the process exits 2."""

    exit_status = EXIT_USER_ERROR


class RunStopped(UserError):
    """The run stopped itself for a reason that is not a configuration error (a divergence, a lost peer): one line,
    and the exit status the subclass names."""


class Diverged(RunStopped):
    exit_status = EXIT_DIVERGED


class PeerLost(RunStopped):
    exit_status = EXIT_PEER_LOST


def number_setting(value, message: str) -> float:
    """A setting's value as a float: a number or its string (Hydra gives `1e-3` as a string), never a bool; else
    a UserError with `message`, one line naming the setting and what it must be."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(message) from None


# Every rank raises the same configuration error or divergence stop at about the same moment, and the launcher
# (srun --kill-on-bad-exit, deepspeed's runner) stops the others as soon as one exits: if a silent rank exited
# first, nobody would print the line. So rank 0 reports at once and the other ranks wait first, long enough for
# rank 0's exit and the launcher's teardown on a loaded machine (5 s was not, with two test runs sharing two
# cores); a rank still alive then has an error of its own (a file only it reads) and reports it too.
DEFERRED_REPORT_S = 30.0


@contextmanager
def exit_on_user_error(prog: str, rank: int = 0):
    """Turn a UserError into `prog: error: <message>` on stderr and its exit status (2 for bad input)."""
    try:
        yield
    except UserError as e:
        if rank != 0:
            time.sleep(DEFERRED_REPORT_S)
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
