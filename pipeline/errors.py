"""The one exception type users see.

Anything raised as :class:`KdError` is bad input or a refused operation: the CLI prints its
message on one line and exits with code 2, without a traceback. Every other exception is a bug.
"""


class KdError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of another library's exception message, cut to ``limit`` characters:
    what a one-line :class:`KdError` quotes of it."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


class Interrupted(KdError):
    """Work stopped by something other than its input (a dask scheduler that went away, a task
    that killed every worker it ran on): unlike bad input, what is done so far stays, and
    re-running the same command resumes it."""


class StoppedEarly(KeyboardInterrupt):
    """Ctrl-C caught by work that knows what it kept (e.g. the teacher epochs checkpointed so
    far): its message says so, and the CLI prints it in place of its generic note."""
