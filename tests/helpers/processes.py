"""A ``minismtp`` subprocess whose output lines are collected as they come."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[2]
LISTENING = r"^minismtp listening on 127\.0\.0\.1:(\d+) \((.+)\)$"


@attrs.define
class Process:
    """A running ``python -m minismtp ...``; ``wait_for`` a line on stdout or stderr."""

    process: subprocess.Popen[str]
    stdout: list[str] = attrs.field(factory=list)
    stderr: list[str] = attrs.field(factory=list)
    port: int = 0
    _changed: threading.Condition = attrs.field(factory=threading.Condition)
    _ended: set[str] = attrs.field(factory=set)

    def collect(self, stream: str) -> None:
        pipe = getattr(self.process, stream)
        lines = getattr(self, stream)
        for line in pipe:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended.add(stream)
            self._changed.notify_all()

    def wait_for(self, stream: str, pattern: str, timeout: float = 15) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._changed:
            while True:
                for line in getattr(self, stream):
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or stream in self._ended:
                    raise AssertionError(f"no {pattern!r} on {stream}:\n{self.output()}")
                self._changed.wait(left)

    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def send_signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.send_signal(signum)
        return self.process.wait(timeout=timeout)


@contextmanager
def minismtp(
    *args: str, env: Mapping[str, str] | None = None, ready: str | None = None
) -> Iterator[Process]:
    """``python -m minismtp ARGS`` until the block ends (then killed if still running).

    ``ready``: a pattern on stdout to wait for first; ``LISTENING`` also sets ``port``.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "minismtp", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,  # a worker of --workers watches it for its parent's end
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Process(process)
    readers = [
        threading.Thread(target=running.collect, args=(stream,), daemon=True)
        for stream in ("stdout", "stderr")
    ]
    for reader in readers:
        reader.start()
    try:
        if ready is not None:
            match = running.wait_for("stdout", ready)
            if ready == LISTENING:
                running.port = int(match.group(1))
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdin is not None
        process.stdin.close()
        for reader in readers:
            reader.join(timeout=5)
