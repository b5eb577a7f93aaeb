"""rayflow.progress: whole lines in a log file, tqdm unchanged on a terminal."""

from __future__ import annotations

import io

from rayflow import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_at_most_one_per_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 1e9)  # no refresh between the first and the last line
    log = io.StringIO()
    for _ in progress.tqdm(range(300), desc="reflow: train", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2 and all(line.startswith("reflow: train") for line in lines)
    assert "0/300" in lines[0] and "300/300" in lines[1]

    log = io.StringIO()
    for _ in progress.tqdm(range(5), desc="x", file=log, mininterval=0, miniters=1):
        pass
    counts = [line.split("|")[-1].split()[0] for line in log.getvalue().splitlines()]
    # every redraw a whole line of its own (closing the bar repeats the last one)
    assert list(dict.fromkeys(counts)) == [f"{i}/5" for i in range(6)]


def test_a_terminal_keeps_tqdm_redraws():
    term = _Terminal()
    for _ in progress.tqdm(range(3), desc="x", file=term, mininterval=0):
        pass
    assert "\r" in term.getvalue()


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    for _ in progress.tqdm(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ""
