"""User-facing errors: one line, naming the file, field or value, and a non-zero exit."""
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or configuration. Its message is printed as one line and the process exits 2."""


@contextmanager
def exit_on_user_error(prog: str, quiet: bool = False):
    """Turn a UserError into `prog: error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        if not quiet:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
