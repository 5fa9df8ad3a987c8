"""Logging for ``minismtp run``: one line per transaction must not cost a system call each.

The server writes one INFO line per mail transaction. Written through a plain
``StreamHandler``, that line cost a quarter of the server's whole CPU time per 1 KB message
(45 of 168 µs, measured with ``tests/bench``), most of it the ``write()`` to stderr per line.

So the CLI logs through :class:`BatchingHandler`, which formats each record at once and
writes the lines out in batches: at most ``interval`` seconds late, at once for a WARNING or
worse, and when the process exits (``logging.shutdown``). A crash that kills the process
outright (SIGKILL, a segfault) loses at most the last ``interval`` seconds of INFO lines.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO


class Formatter(logging.Formatter):
    """The default format, with the date formatted once per second, not once per record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._date},{int(record.msecs):03d}"


class BatchingHandler(logging.Handler):
    """Write formatted lines to ``stream`` in batches (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._lines: list[str] = []
        self._wake = threading.Event()
        self._closed = False
        self._flusher = threading.Thread(
            target=self._flush_every_interval, name="minismtp-log-flusher", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()  # problems show at once, with what led to them

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            lines, self._lines = self._lines, []
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone (closed pipe): nothing left to tell anyone

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()

    def _flush_every_interval(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self.flush()


def configure(level: str) -> None:
    """The CLI's logging: ``level`` and above to stderr, through a :class:`BatchingHandler`."""
    root = logging.getLogger()
    if root.handlers:
        return  # configured already (a sitecustomize, a test harness): as basicConfig does
    handler = BatchingHandler()
    handler.setFormatter(Formatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
