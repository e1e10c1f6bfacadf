"""Mistakes a user can fix. The `coat` command prints their message alone, without a traceback (`--debug` or
COAT_DEBUG=1 shows it), and exits with `exit_code`: 2 for a bad command line, config or search space, 1 for the
rest (data that is not there, a tracking server that does not answer). Each message names the file, field or
value and the fix."""


class UserError(Exception):
    exit_code = 1


class UsageError(UserError):
    exit_code = 2
