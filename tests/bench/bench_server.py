"""What minismtp's own Python costs per message, without sockets.

The real server (its wire, the connection task, the App with the benchmark's two middleware,
the INFO log line) is fed by a fake transport: each reply the server writes makes the fake
client hand over its next command, as a client waiting for every reply would (four round
trips per message, or two with ``--pipelining``). What is left out is only the kernel: the
read and write system calls, the same for any server. On asyncio and uvloop the fake is an
``asyncio.Transport`` under ``ProtocolWire`` (the client's bytes come on the next loop
iteration); on trio it is a socket under ``TrioSocketWire`` (the bytes are there at the
session's next read, as on a busy server; trio's scheduler still runs in between).
The figure is the process's CPU time (all its threads), best of three: on a shared machine
the wall clock would count the time others took.

    python -m tests.bench.bench_server [--loop uvloop|asyncio|trio] [--messages N] [--pipelining]
    python -m tests.bench.bench_server --profile   # cProfile, top 25 by own time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from minismtp import logs
from minismtp.asyncio_wire import Accept, ProtocolWire
from minismtp.server import Server, ServerConfig
from minismtp.trio_wire import TrioSocketWire
from tests.bench.minismtp_app import app, bare

BODY = b"Subject: x\r\n\r\n" + (b"y" * 98 + b"\r\n") * 10


class FakeTransport:
    """Enough of ``asyncio.Transport`` for ``ProtocolWire``; writes drive the client."""

    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def write(self, data: bytes) -> None:
        self.client.replied(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.client.closed.set()

    abort = close


class FakeSocket:
    """Enough of a non-blocking socket for ``TrioSocketWire``; sends drive the client."""

    def __init__(self, messages: int, pipelining: bool) -> None:
        self.client = FakeClient(self.feed, messages, pipelining)
        self.inbox = b""
        self.readable: Any = None  # a trio.Event while the wire waits for readiness

    def feed(self, chunk: bytes) -> None:
        self.inbox += chunk
        if self.readable is not None:
            self.readable.set()

    def recv(self, size: int) -> bytes:
        if not self.inbox:
            raise BlockingIOError
        data, self.inbox = self.inbox[:size], self.inbox[size:]
        return data

    def send(self, data: bytes | memoryview) -> int:
        self.client.replied(bytes(data))
        return len(data)

    async def wait_readable(self) -> None:
        import trio

        if self.inbox:
            await trio.lowlevel.checkpoint()
            return
        self.readable = trio.Event()
        try:
            await self.readable.wait()
        finally:
            self.readable = None

    def fileno(self) -> int:
        return 0 if not self.client.closed.is_set() else -1

    def close(self) -> None:  # called when the server closes
        self.client.closed.set()


async def _wait_readable(sock: socket.socket) -> None:
    await sock.wait_readable()  # type: ignore[attr-defined]


async def _wait_writable(sock: socket.socket) -> None:
    raise AssertionError("the fake socket takes every write")


def _notify_closing(sock: socket.socket) -> None:
    pass  # no trio registration to drop: the fake socket is waited on with an Event


class FakeClient:
    def __init__(self, deliver: Callable[[bytes], object], messages: int, pipelining: bool) -> None:
        self.deliver = deliver
        self.closed = anyio.Event()
        mail = b"MAIL FROM:<a@example.org>\r\n"
        rcpt = b"RCPT TO:<b@example.com>\r\n"
        content = BODY + b".\r\n"
        if pipelining:
            per_message = [mail + rcpt + b"DATA\r\n", content]
            replies = [3, 1]
        else:
            per_message = [mail, rcpt, b"DATA\r\n", content]
            replies = [1, 1, 1, 1]
        self.script = [b"EHLO client.example.org\r\n"]
        self.expect = [1, 1]  # greeting, EHLO
        for _ in range(messages):
            self.script += per_message
            self.expect += replies
        self.script.append(b"QUIT\r\n")
        self.expect.append(1)
        self.step = 0
        self.pending = self.expect[0]

    def replied(self, data: bytes) -> None:
        self.pending -= sum(line[3:4] == b" " for line in data.split(b"\r\n"))  # final lines
        if self.pending <= 0 and self.step < len(self.script):
            chunk = self.script[self.step]
            self.step += 1
            self.pending = self.expect[self.step]
            self.deliver(chunk)


def _asyncio_session(
    server: Server, tasks: TaskGroup, messages: int, pipelining: bool
) -> FakeClient:
    wire = ProtocolWire(Accept(server), server.config.read_size, server.config.turn_size)
    loop = asyncio.get_running_loop()
    client = FakeClient(
        lambda chunk: loop.call_soon(wire.data_received, chunk), messages, pipelining
    )
    wire.connection_made(FakeTransport(client))  # type: ignore[arg-type]
    return client


def _trio_session(server: Server, tasks: TaskGroup, messages: int, pipelining: bool) -> FakeClient:
    import trio

    sock = FakeSocket(messages, pipelining)
    wire = TrioSocketWire(
        sock,  # type: ignore[arg-type]
        server.config.read_size,
        _wait_readable,
        _wait_writable,
        trio.lowlevel.checkpoint,
        _notify_closing,
        _notify_closing,
    )
    # What trio_wire.accept_sockets does once it has the connection.
    server.admit(("127.0.0.1", 40000))
    tasks.start_soon(server.handle, wire, ("127.0.0.1", 40000), ("127.0.0.1", 25), False)
    return sock.client


async def run(messages: int, pipelining: bool, sessions: int, use_bare: bool) -> float:
    target = bare if use_bare else app
    # Every session comes from 127.0.0.1: no per-address limit.
    server = Server(target, ServerConfig(max_connections_per_address=0))
    new_session = _asyncio_session if _running_asyncio() else _trio_session
    async with target.serving(), anyio.create_task_group() as tasks:
        clients = []
        started = time.process_time()
        for _ in range(sessions):
            clients.append(new_session(server, tasks, messages // sessions, pipelining))
        for client in clients:
            await client.closed.wait()
        elapsed = time.process_time() - started
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["uvloop", "asyncio", "trio"], default="uvloop")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument("--bare", action="store_true", help="the App without middleware")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # The CLI's logging, into /dev/null: the cost of the lines, not of the terminal.
    sys.stderr = open(os.devnull, "w")
    logs.configure(args.log_level)
    backend = "trio" if args.loop == "trio" else "asyncio"
    backend_options = {} if backend == "trio" else {"use_uvloop": args.loop == "uvloop"}

    def once() -> float:
        return anyio.run(
            run,
            args.messages,
            args.pipelining,
            args.sessions,
            args.bare,
            backend=backend,
            backend_options=backend_options,
        )

    once()  # warm up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        once()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    best = min(once() for _ in range(3))
    print(f"{best / args.messages * 1e6:.1f} µs of Python per message ({args.loop})")


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
