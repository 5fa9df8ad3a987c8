"""A real ``redis-server`` for the Redis store's tests, started on a free port.

``redis-server --port N --appendonly yes --appendfsync always --save '' --dir <tmp>``: every
write is in the append-only file, fsynced, before Redis answers it, which is what the store's
``250`` relies on. Without ``redis-server`` (or the ``redis`` package) the tests that need it
are skipped with the reason; under CI (``CI=true``) they fail instead: CI installs both.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from minismtp.message import Message
from minismtp.types import Address, TLSInfo
from tests.helpers.processes import need


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis-server", "apt-get install redis-server")
    assert binary is not None
    try:
        import redis  # noqa: F401
    except ImportError:
        need("the redis package", "pip install -e '.[test]'")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class RedisServer:
    """One ``redis-server`` process; ``restart()`` brings it back on the same port and files."""

    binary: str
    directory: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()

    def start(self, timeout: float = 10.0) -> None:
        for _ in range(5):  # a free port can be taken between our probe and redis' bind
            port = self.port or free_port()
            argv = [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *self.extra,
            ]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            if self._wait_ready(port, timeout):
                self.port = port
                return
            if self.port:  # asked for this port (a restart): no other will do
                break
        raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write; what is in the files is what was fsynced."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, stream: str = "minismtp", **options: Any) -> str:
        query = "&".join(f"{name}={value}" for name, value in {"stream": stream, **options}.items())
        return f"redis://127.0.0.1:{self.port}/0?{query}"

    def client(self) -> Any:
        """A synchronous redis-py client, for the test's own checks."""
        import redis

        return redis.Redis(port=self.port, socket_timeout=10)


TRACE = b"Received: from client.example.org ([127.0.0.1])\r\n\tby mx.test; Thu, 3 Dec 2026\r\n"


def make_message(content: bytes, *, tls: bool = False) -> Message:
    """A Message as the App hands it to a store: our trace header, then ``content``."""
    return Message.from_bytes(
        TRACE + content,
        trace_length=len(TRACE),
        mail_from=Address("alice", "example.org", "alice@example.org"),
        rcpt_to=(Address("bob", "example.com"), Address("carol", "example.com")),
        peer=("127.0.0.1", 40000),
        helo_name="client.example.org",
        tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if tls else None,
        mail_params={"BODY": "8BITMIME"},
        rcpt_params=({}, {"NOTIFY": "NEVER"}),
    )


def new_stream() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each test uses a stream of its own (``stream``)."""
    server = RedisServer(redis_server_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill, stop and restart."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(redis_server_binary(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stream() -> str:
    return new_stream()
