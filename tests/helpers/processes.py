"""``minismtp`` as a real subprocess: one command run to its end, or a server run for a block.

Shared by the CLI, workers, durability, examples and docs tests. The project root is on the
subprocess's ``PYTHONPATH`` (``examples.*`` imports from any directory).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
LISTENING = r"^minismtp listening on 127\.0\.0\.1:(\d+) \((.+)\)$"
UNIX_LISTENING = r"^minismtp listening on unix:(\S+) \((.+)\)$"
LISTENING_TLS = r"^minismtp listening on 127\.0\.0\.1:(\d+) with implicit TLS \((.+)\)$"


def need(what: str, why: str) -> None:
    """Skip the test (fail it under CI, where everything must run) because ``what`` is missing."""
    text = f"{what} is not available ({why})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{text}; CI=true: every test must run", pytrace=False)
    pytest.skip(text)


def project_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: this one, with the project root importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def minismtp(
    *args: str, cwd: Path = ROOT, timeout: float = 60, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m minismtp *args`` run to its end (``wrapper``: a command that runs it)."""
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "minismtp", *args],
        cwd=cwd,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@attrs.define
class Running:
    """A ``minismtp run`` process, its ports, and its output as it comes.

    ``returncode`` is set once the process has ended (at the latest when the ``with`` block of
    :func:`run` ends: SIGTERM, a graceful stop, if it still runs)."""

    process: subprocess.Popen[str]
    port: int = 0
    tls_port: int | None = None
    loop: str = ""
    stdout: list[str] = attrs.field(factory=list)
    stderr: list[str] = attrs.field(factory=list)
    returncode: int | None = None
    _changed: threading.Condition = attrs.field(factory=threading.Condition)
    _ended: set[str] = attrs.field(factory=set)  # streams read to their end

    @classmethod
    def reading(cls, process: subprocess.Popen[str]) -> tuple[Running, list[threading.Thread]]:
        """A Running for ``process``, with a thread collecting each of its output streams."""
        running = cls(process)
        readers = [
            threading.Thread(target=running._collect, args=(stream,), daemon=True)
            for stream in ("stdout", "stderr")
        ]
        for reader in readers:
            reader.start()
        return running, readers

    def _collect(self, stream: str) -> None:
        pipe = getattr(self.process, stream)
        lines = getattr(self, stream)
        for line in pipe:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended.add(stream)
            self._changed.notify_all()

    def wait_for(
        self, stream: str, pattern: str, timeout: float = 30, count: int = 1
    ) -> re.Match[str]:
        """The ``count``-th line of ``stream`` matching ``pattern``, waiting for it to come."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._changed:
            while True:
                matches = [m for line in getattr(self, stream) if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or stream in self._ended:
                    raise AssertionError(f"no {pattern!r} on {stream}: {self.output}")
                self._changed.wait(left)

    def send_signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.send_signal(signum)
        self.returncode = self.process.wait(timeout=timeout)
        return self.returncode

    @property
    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])


def unprivileged() -> tuple[str, ...]:
    """A wrapper that runs a command as an unprivileged user: none when we are not root, else
    ``setpriv`` to the user nobody (skips the test when there is no setpriv)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to run as another user")
    wrapper = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    # A virtual environment under /root (mode 0700) is out of that user's reach.
    probe = subprocess.run(
        [*wrapper, sys.executable, "-c", "import anyio, minismtp"],
        env=project_env(),
        capture_output=True,
        cwd="/",
    )
    if probe.returncode != 0:
        pytest.skip(f"the user nobody cannot run {sys.executable} with minismtp and anyio")
    return wrapper


@contextmanager
def run(*args: str, cwd: Path = ROOT, wrapper: Sequence[str] = (), **env: str) -> Iterator[Running]:
    """``minismtp run --port 0 *args`` in ``cwd``, for the ``with`` block, once it listens.

    ``wrapper``: a command that runs it (``strace -f -o FILE``); ``env``: variables added to
    the subprocess's environment."""
    process = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "minismtp", "run", "--port", "0", *args],
        cwd=cwd,
        env=project_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running, readers = Running.reading(process)
    try:
        first = running.wait_for("stdout", LISTENING)
        running.port, running.loop = int(first.group(1)), first.group(2)
        if "--tls-port" in args:
            running.tls_port = int(running.wait_for("stdout", LISTENING_TLS).group(1))
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            running.returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            running.returncode = process.wait()
        for reader in readers:
            reader.join(timeout=10)


@contextmanager
def spawned(
    *args: str, cwd: Path = ROOT, env: Mapping[str, str] | None = None, ready: str | None = None
) -> Iterator[Running]:
    """``python -m minismtp ARGS`` until the block ends (then killed if still running): any
    subcommand (``run``, ``consume``), for tests that kill and restart processes.

    ``ready``: a pattern on stdout to wait for first; :data:`LISTENING` also sets ``port``.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "minismtp", *args],
        cwd=cwd,
        env=project_env(**(env or {})),
        stdin=subprocess.PIPE,  # a worker of --workers watches it for its parent's end
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running, readers = Running.reading(process)
    try:
        if ready is not None:
            match = running.wait_for("stdout", ready)
            if ready == LISTENING:
                running.port = int(match.group(1))
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        running.returncode = process.wait()
        assert process.stdin is not None
        process.stdin.close()
        for reader in readers:
            reader.join(timeout=5)


def run_on_unix_socket(*args: str, cwd: Path = ROOT) -> AbstractContextManager[Running]:
    """``minismtp run ARGS`` until the block ends, once it listens on its unix socket."""
    return spawned("run", *args, cwd=cwd, ready=UNIX_LISTENING)
