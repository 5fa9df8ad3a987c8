"""Fairness: a client streaming a large message does not keep the others waiting.

On uvloop a ready socket is read up to 32 times in a row and the fast path feeds every read
to the engine at once; without ``ServerConfig.turn_size`` a few fast uploaders held the loop
for seconds, and a new client waited that long for its greeting (tests/bench/fairness.py).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import pytest

from minismtp.app import App
from minismtp.asyncio_wire import ProtocolWire
from minismtp.server import serve
from tests.helpers.backends import with_uvloop
from tests.helpers.clients import Connect, drain

pytestmark = pytest.mark.anyio

UPLOADS = 4
# Each upload takes about a hundred turns of the loop at one read per turn (the default
# turn_size), where the probe needs a handful; without turn_size, uvloop took each upload in
# a few turns (as much as the kernel had buffered, several MB, per turn).
SIZE = 24 * 1024 * 1024


@pytest.fixture(params=with_uvloop(), scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


# The Protocol wire's own tests: it serves asyncio and uvloop.
on_asyncio = pytest.mark.parametrize(
    "anyio_backend", [b for b in with_uvloop() if b != "trio"], scope="module"
)


def message(n: int) -> bytes:
    line = b"%d" % n + b"x" * 75 + b"\r\n"  # no line starts with a dot: no stuffing
    return b"Subject: upload %d\r\n\r\n" % n + line * (SIZE // len(line))


class Reader:
    """Whole replies off a blocking socket: the uploaders run in threads, outside the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def code(self) -> bytes:
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                assert data, f"closed by the server after {self.buffer!r}"
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            if line[3:4] != b"-":
                return line[:3]


def upload(port: int, content: bytes, streaming: threading.Barrier) -> float:
    """One message over a session of its own, as fast as the server takes it; the time its
    250 came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        replies = Reader(sock)
        assert replies.code() == b"220"
        for line, code in (
            (b"EHLO uploader.example\r\n", b"250"),
            (b"MAIL FROM:<up@example.com>\r\n", b"250"),
            (b"RCPT TO:<rcpt@example.com>\r\n", b"250"),
            (b"DATA\r\n", b"354"),
        ):
            sock.sendall(line)
            assert replies.code() == code
        view = memoryview(content + b".\r\n")
        sock.sendall(view[: 1024 * 1024])
        streaming.wait()  # every upload is under way before the probe connects
        sock.sendall(view[1024 * 1024 :])
        assert replies.code() == b"250"
        done = time.monotonic()
        sock.sendall(b"QUIT\r\n")
        assert replies.code() == b"221"
        return done


async def test_a_new_client_is_served_while_others_stream_large_messages(
    app: App, connect: Connect
) -> None:
    """Greeting, EHLO and QUIT of a new session complete before any of the uploads, which
    each take about a hundred turns of the loop, has ended; the uploads arrive byte for
    byte."""
    contents = [message(n) for n in range(UPLOADS)]
    done: list[float] = []
    streaming = threading.Barrier(UPLOADS + 1, timeout=30)

    async with serve(app, "127.0.0.1", 0) as server:

        async def one(content: bytes) -> None:
            done.append(await anyio.to_thread.run_sync(upload, server.port, content, streaming))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as uploads:
                for content in contents:
                    uploads.start_soon(one, content)
                # In a thread: waiting here would hold up the loop the uploads need.
                await anyio.to_thread.run_sync(streaming.wait)
                async with connect(server.port) as client:
                    assert (await client.reply()).startswith("220")
                    assert (await client.command("EHLO probe.example")).startswith("250")
                    assert (await client.command("QUIT")).startswith("221")
                probed = time.monotonic()
        received = sorted((m.original for m in drain(server)), key=lambda c: c[:20])
    assert probed < min(done), f"the probe ended {probed - min(done):.3f} s after an upload"
    assert received == contents


class Transport(asyncio.Transport):
    """What ProtocolWire asks of a transport, recording when reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.pauses = 0

    def pause_reading(self) -> None:
        self.pauses += self.reading
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def next_turn() -> None:
    """Until the event loop's next turn has begun (what the wire schedules now runs first)."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


def protocol_wire(read_size: int, turn_size: int) -> tuple[ProtocolWire, Transport]:
    wire = ProtocolWire(lambda wire, transport: None, read_size, turn_size)
    transport = Transport()
    wire.connection_made(transport)
    return wire, transport


@on_asyncio
async def test_reading_pauses_after_turn_size_bytes_until_the_next_turn() -> None:
    wire, transport = protocol_wire(read_size=1 << 20, turn_size=1000)
    wire.data_received(b"a" * 600)
    wire.data_received(b"b" * 400)  # exactly turn_size: still reading
    assert transport.reading
    wire.data_received(b"c")
    assert not transport.reading and transport.pauses == 1
    await next_turn()
    assert transport.reading
    wire.data_received(b"d" * 1000)  # the count starts again at each turn it yielded
    assert transport.reading
    wire.data_received(b"e")
    assert not transport.reading and transport.pauses == 2
    await next_turn()
    assert transport.reading
    assert await wire.receive() == b"a" * 600 + b"b" * 400 + b"c" + b"d" * 1000 + b"e"


@on_asyncio
async def test_the_next_turn_leaves_a_full_buffer_paused() -> None:
    """Unread bytes up to read_size keep reading paused after the turn ends, until the
    session takes them; taking them during the paused turn does not resume reading early."""
    wire, transport = protocol_wire(read_size=1000, turn_size=500)
    wire.data_received(b"x" * 600)  # over turn_size; short of read_size
    wire.data_received(b"y" * 400)  # in flight already: now read_size waits unread
    await next_turn()
    assert not transport.reading  # read_size waits unread: the turn's end changes nothing
    assert await wire.receive() == b"x" * 600 + b"y" * 400
    assert transport.reading

    wire, transport = protocol_wire(read_size=1000, turn_size=500)
    wire.data_received(b"z" * 1200)  # both at once
    assert await wire.receive() == b"z" * 1200
    assert not transport.reading  # taken, but this turn is over for the connection
    await next_turn()
    assert transport.reading


@on_asyncio
async def test_a_lost_connection_is_not_resumed() -> None:
    wire, transport = protocol_wire(read_size=1 << 20, turn_size=10)
    wire.data_received(b"x" * 11)
    wire.connection_lost(None)
    await next_turn()
    assert not transport.reading
