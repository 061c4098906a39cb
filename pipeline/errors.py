"""The one exception type users see.

Anything raised as :class:`KdError` is bad input or a refused operation: the CLI prints its
message on one line and exits with code 2, without a traceback. Every other exception is a bug.
"""


class KdError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
