"""Mistakes a user can fix. The `coat` command prints their message alone, without a traceback (`--debug` or
COAT_DEBUG=1 shows it), and exits with `exit_code`: 2 for a bad command line, config or search space, 1 for the
rest (data that is not there, a tracking server that does not answer). Each message names the file, field or
value and the fix."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    exit_code = 1


class UsageError(UserError):
    exit_code = 2


@contextmanager
def reported(debug: bool):
    """A user's mistake inside the block (or a file that is not there) as one line, `error: <message>`, and an exit
    with its code; `debug` lets the exception through with its traceback."""
    try:
        yield
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
