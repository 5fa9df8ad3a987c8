"""What minismtp's own Python costs per message on the asyncio/uvloop path, without sockets.

The real server (``ProtocolWire``, the connection task, the App with the benchmark's two
middleware, the INFO log line) is fed by a fake transport: each reply the server writes makes
the fake client hand over its next command on the next loop iteration, as a client waiting
for every reply would (four round trips per message, or two with ``--pipelining``). What is
left out is only the kernel: the read and write system calls, the same for any server.

    python -m tests.bench.bench_server [--loop uvloop|asyncio] [--messages N] [--pipelining]
    python -m tests.bench.bench_server --profile   # cProfile, top 25 by own time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from typing import Any

import anyio

from minismtp import logs
from minismtp.asyncio_wire import ProtocolWire
from minismtp.server import Server, ServerConfig
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


class FakeClient:
    def __init__(self, wire: ProtocolWire, messages: int, pipelining: bool) -> None:
        self.wire = wire
        self.loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
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
            self.loop.call_soon(self.wire.data_received, chunk)


async def run(messages: int, pipelining: bool, sessions: int, use_bare: bool) -> float:
    target = bare if use_bare else app
    server = Server(target, ServerConfig())
    async with target.serving():
        clients = []
        started = time.perf_counter()
        for _ in range(sessions):
            wire = ProtocolWire(server._protocol_connection_made, server.config.read_size)
            client = FakeClient(wire, messages // sessions, pipelining)
            wire.connection_made(FakeTransport(client))  # type: ignore[arg-type]
            clients.append(client)
        for client in clients:
            await client.closed.wait()
        elapsed = time.perf_counter() - started
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
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
    backend_options = {"use_uvloop": args.loop == "uvloop"}

    def once() -> float:
        return anyio.run(
            run,
            args.messages,
            args.pipelining,
            args.sessions,
            args.bare,
            backend="asyncio",
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


if __name__ == "__main__":
    main()
