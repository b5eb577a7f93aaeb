"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, an option out of range, a checkpoint from another
configuration) raises :class:`RayflowError`. The command line turns it into one line on stderr and exit code 2,
so a user never sees a traceback from deep inside torch for their own mistake.
"""

from __future__ import annotations


class RayflowError(Exception):
    """A problem with the user's input, reported as one line and exit code 2 by the CLI."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`RayflowError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RayflowError(message)
