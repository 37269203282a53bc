"""Exceptions that carry a message meant for the user.

The command-line entry turns a :class:`UserError` into one line on stderr and exit code 2; every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (exit code 2)."""


class LayoutMismatchError(UserError):
    """Servers and worker disagree on the model layout or the update rule."""


class ServerUnavailableError(UserError):
    """A parameter server could not be reached within the allowed time."""


class WireFormatError(ValueError):
    """Bytes that do not parse as the expected message (answered with INVALID_ARGUMENT)."""


class ClusterError(Exception):
    """The cluster failed while training (a server died, refused a request, timed out).

    Not the user's input at fault: the command line reports it in one line with exit code 1.
    """
