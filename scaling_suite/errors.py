"""One exception type for every user-facing error.

The CLI catches `SuiteError`, prints its message as a single line prefixed with ``error:`` and
exits with status 2, so bad input never produces a traceback. Raise it as early as possible
(before data loads or training starts) and keep the message to one line that says what was wrong
and what would be accepted.
"""


class SuiteError(Exception):
    """A problem the user can fix (bad flag, missing data, unreachable store)."""

    def __init__(self, message: str):
        # One line, always: multi-line causes (tracebacks, server replies) are folded.
        super().__init__(" ".join(str(message).split()))
