"""Progress bars that read well both in a terminal and in a log file.

In a terminal this is ``tqdm.auto.tqdm`` unchanged. When the bar's stream is not a terminal (a job's log, a
CI console, ``2> log``), tqdm's carriage-return redraws become thousands of overwritten fragments in the file;
there each refresh is written as one line, at most one every :data:`LOG_INTERVAL_S` seconds, so a log reads as
a short list of progress lines.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm as _tqdm

#: seconds between two progress lines written to a file (a terminal redraws as tqdm usually does)
LOG_INTERVAL_S = 10.0


class _Lines:
    """A stream wrapper that turns tqdm's ``\\r`` redraws into whole lines (empty redraws are dropped)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        return False


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm(*args, **kwargs)``, writing whole lines every ``LOG_INTERVAL_S`` s when not on a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream) and not kwargs.get("disable", False):
        kwargs["file"] = _Lines(stream)
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
    return _tqdm(*args, **kwargs)
