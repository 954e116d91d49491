"""The one exception type for mistakes a user can fix (bad path, bad option, wrong checkpoint).

The command line prints its message as a single line and exits non-zero without a traceback;
library callers can catch it like any other exception.
"""


class UserError(Exception):
    """A user-facing mistake: the message says what is wrong and how to fix it, in one line."""
