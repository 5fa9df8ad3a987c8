"""The wires over real sockets: what the session loop relies on, from trio's socket wire and
from anyio's streams (the portable path) alike. (The asyncio Protocol wire is driven by the
loop, not over a stream: the server's tests cover it on asyncio and uvloop.)"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream
from anyio.streams.tls import TLSStream

from minismtp.tls import TLSConfig
from minismtp.trio_wire import TrioSocketWire
from minismtp.wires import StreamWire, Wire
from tests.helpers.certs import Certificates

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


def trio_socket_wire(stream: SocketStream, read_size: int) -> TrioSocketWire:
    """The server's wire on trio, over the socket of anyio's stream (the wire closes it)."""
    return TrioSocketWire.over_socket(stream.extra(SocketAttribute.raw_socket), read_size)


WIRES: dict[str, tuple[str, Callable[[SocketStream, int], Wire]]] = {
    "asyncio-stream": ("asyncio", StreamWire),
    "trio-stream": ("trio", StreamWire),
    "trio-socket": ("trio", trio_socket_wire),  # trio's alone
}


@pytest.fixture(params=list(WIRES), scope="module")
def wire_case(request: pytest.FixtureRequest) -> tuple[str, Callable[[SocketStream, int], Wire]]:
    return WIRES[request.param]


@pytest.fixture(scope="module")
def anyio_backend(wire_case: tuple[str, Any]) -> str:
    return wire_case[0]


@pytest.fixture
def make_wire(wire_case: tuple[str, Callable[[SocketStream, int], Wire]]) -> Callable[..., Wire]:
    """``make_wire(stream, read_size=65536)``: the wire under test over the server's end."""
    factory = wire_case[1]
    return lambda stream, read_size=65536: factory(stream, read_size)


@asynccontextmanager
async def connection() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    """A TCP connection on 127.0.0.1: (the server's end, the client's end)."""
    listener = await SocketListener.from_socket(socket.create_server(("127.0.0.1", 0)))
    async with listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        async with client, await listener.accept() as server:
            yield server, client


async def receive_until_eof(wire: Wire) -> bytes:
    chunks = []
    while chunk := await wire.receive():
        chunks.append(chunk)
    return b"".join(chunks)


async def test_eof_mid_command(make_wire: Callable[..., Wire]) -> None:
    """What came before the client closed its side, then b"" (and b"" again)."""
    async with connection() as (server, client):
        wire = make_wire(server)
        await client.send(b"MAIL FROM:<a@exa")
        await client.send_eof()
        with anyio.fail_after(5):
            assert await receive_until_eof(wire) == b"MAIL FROM:<a@exa"
            assert await wire.receive() == b""


async def test_reset_connection_is_a_broken_resource(make_wire: Callable[..., Wire]) -> None:
    async with connection() as (server, client):
        wire = make_wire(server)
        # SO_LINGER 0: close() sends a RST, as a client that crashed or timed out may.
        raw = client.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()
        with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError):
            await wire.receive()


async def test_small_reads_of_a_big_upload_lose_nothing(make_wire: Callable[..., Wire]) -> None:
    """Reads that fill the buffer every time (a message streaming in) and the EOF after them."""
    data = bytes(range(256)) * 4096  # 1 MiB
    async with connection() as (server, client):
        wire = make_wire(server, 1000)

        async def upload() -> None:
            await client.send(data)
            await client.send_eof()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(upload)
                assert await receive_until_eof(wire) == data


async def test_reads_grow_while_the_socket_has_more(make_wire: Callable[..., Wire]) -> None:
    """A read that fills the read size is followed by larger ones (up to four times: fewer
    reads per megabyte while a message streams in); a short read brings the size back."""
    async with connection() as (server, client):
        wire = make_wire(server, 1000)
        with anyio.fail_after(10):
            await client.send(b"x" * 20_000)  # on loopback, in the server's buffer on return
            sizes = [len(await wire.receive()) for _ in range(6)]
            assert sizes == [1000, 4000, 4000, 4000, 4000, 3000]
            await client.send(b"y" * 500)  # short of the read size: the message has ended
            assert len(await wire.receive()) == 500
            await client.send(b"z" * 3000)
            assert len(await wire.receive()) == 1000


async def test_a_waiting_receive_is_cancelled(make_wire: Callable[..., Wire]) -> None:
    """The session's timeouts and shutdown cancel its scope: a read that waits must end."""
    async with connection() as (server, client):
        wire = make_wire(server)
        for _ in range(3):  # the socket wire yields, tries the socket, then waits
            with anyio.fail_after(5), anyio.move_on_after(0.05) as scope:
                await wire.receive()
            assert scope.cancelled_caught
        await client.send(b"NOOP\r\n")
        with anyio.fail_after(5):
            assert await wire.receive() == b"NOOP\r\n"


async def test_a_cancelled_receive_takes_no_bytes(make_wire: Callable[..., Wire]) -> None:
    async with connection() as (server, client):
        wire = make_wire(server)
        await client.send(b"EHLO client.example\r\n")
        with anyio.fail_after(5):
            assert await wire.receive() == b"EHLO client.example\r\n"
            await client.send(b"NOOP\r\n")
            with anyio.CancelScope() as scope:
                scope.cancel()
                await wire.receive()
            assert scope.cancelled_caught
            assert await wire.receive() == b"NOOP\r\n"


async def test_send_waits_for_a_client_that_does_not_read(make_wire: Callable[..., Wire]) -> None:
    """Backpressure: a write bigger than the kernel's buffers waits for the client (nothing
    piles up in the server), a cancelled one ends, and once the client reads, all of it and
    nothing else arrives, in order."""
    data = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's buffers hold
    async with connection() as (server, client):
        wire = make_wire(server)
        with anyio.fail_after(5), anyio.move_on_after(0.2) as stalled:
            await wire.send(data)
        assert stalled.cancelled_caught  # the client reads nothing: the write cannot finish
        received = bytearray()
        while len(received) < MIB:
            received += await client.receive()
        assert data.startswith(received)  # a prefix went out before the cancellation

    async with connection() as (server, client):
        wire = make_wire(server)

        async def read_all() -> None:
            while len(received) < len(data):
                received.extend(await client.receive())

        received = bytearray()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read_all)
                await wire.send(data)
        assert received == data


async def test_write_nowait_leaves_the_rest_to_send(make_wire: Callable[..., Wire]) -> None:
    """The session writes each batch of replies without waiting; what the transport does not
    take at once goes out with the next send(), first and in order, once the client reads."""
    data = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's buffers hold
    async with connection() as (server, client):
        wire = make_wire(server)
        with anyio.fail_after(5):
            took = wire.write_nowait(b"250 OK\r\n")
            assert took is isinstance(wire, TrioSocketWire)  # a stream's writes all wait
            if not took:
                await wire.send(b"")
            assert await client.receive() == b"250 OK\r\n"
        assert not wire.write_nowait(data)
        assert not wire.write_nowait(b"221 Bye\r\n")  # behind the rest, not before it

        async def read_all() -> None:
            while len(received) < len(data) + 9:
                received.extend(await client.receive())

        received = bytearray()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read_all)
                await wire.send(b"")
        assert received == data + b"221 Bye\r\n"


async def test_unread_bytes_come_first(make_wire: Callable[..., Wire]) -> None:
    """What followed a PROXY header in the same segment is read before the socket."""
    async with connection() as (server, client):
        wire = make_wire(server)
        wire.unread(b"EHLO client.example\r\n")
        await client.send(b"NOOP\r\n")
        with anyio.fail_after(5):
            assert await wire.receive() == b"EHLO client.example\r\n"
            assert await wire.receive() == b"NOOP\r\n"


@pytest.mark.parametrize("hello_unread", [False, True], ids=["starttls", "after-header"])
async def test_start_tls(
    make_wire: Callable[..., Wire], certs: Certificates, hello_unread: bool
) -> None:
    """The handshake over the wire (STARTTLS, implicit TLS), also when the start of the
    ClientHello was read already and given back (it came with a PROXY header); then the
    session's bytes go encrypted both ways."""
    tls = TLSConfig(certs.cert_path, certs.key_path, handshake_timeout=5)
    async with connection() as (server, client):
        wire = make_wire(server)

        async def client_side() -> None:
            stream = await TLSStream.wrap(
                client, hostname="localhost", ssl_context=certs.client_context()
            )
            assert await stream.receive() == b"220 ready\r\n"
            await stream.send(b"EHLO client.example\r\n")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client_side)
                if hello_unread:
                    wire.unread(await wire.receive())
                info = await wire.start_tls(tls)
                await wire.send(b"220 ready\r\n")
                assert await wire.receive() == b"EHLO client.example\r\n"
        assert info.version.startswith("TLSv1.")


class Source(ByteStream):
    """Gives out ``lengths`` octets read by read, recording the size of each request."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.requested: list[int] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.requested.append(max_bytes)
        return b"x" * min(self.lengths.pop(0), max_bytes)

    async def send(self, item: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_reads_grow_while_they_come_back_full_and_shrink_after() -> None:
    """A message streaming in fills every read: the wire then asks for four times as much, and
    goes back to the configured size once a read comes back short (a command, a reply)."""
    source = Source([100, 400, 300, 10, 50])
    wire = StreamWire(source, read_size=100)
    received = [len(await wire.receive()) for _ in range(5)]
    assert received == [100, 400, 300, 10, 50]
    assert source.requested == [100, 400, 400, 400, 100]
