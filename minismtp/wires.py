"""Wires: how a connection's bytes move between the socket and the session loop.

Each event loop gets its fastest path behind one small interface (:class:`Wire`): a plain
``asyncio.Protocol`` on asyncio and uvloop, where anyio's stream layer (pausing and resuming
the socket and a checkpoint on every read and write) would cost about twice the CPU per
message; the socket itself on trio, where the stream layer's reads try the system call first
(and fail: the answer to a reply is not there yet) and its writes yield to the scheduler; and
anyio's streams everywhere, as the portable path.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import attrs
from anyio.abc import ByteStream, SocketStream
from anyio.streams.buffered import BufferedByteStream
from anyio.streams.tls import TLSAttribute

from minismtp.tls import TLSConfig, TLSHandshakeFailed, tls_info
from minismtp.types import TLSInfo


class Wire(Protocol):
    """A connection's bytes, whatever carries them."""

    async def receive(self) -> bytes:
        """What the client sent next; ``b""`` once it has closed its side."""

    async def send(self, data: bytes) -> None:
        """Write ``data`` after whatever :meth:`write_nowait` left; wait until it is taken."""

    def write_nowait(self, data: bytes) -> bool:
        """Write ``data`` as far as that takes no waiting; False if some is left, for the
        caller to push with ``await send(b"")``."""

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what comes next (bytes after a PROXY header)."""

    async def start_tls(self, tls: TLSConfig) -> TLSInfo:
        """The server side of a handshake; raises :class:`TLSHandshakeFailed`."""

    async def aclose(self) -> None: ...


@attrs.define(eq=False)
class StreamWire:
    """anyio's streams: every backend (the portable path)."""

    stream: ByteStream
    read_size: int
    _next_read: int = attrs.field(init=False, default=0)  # see _next_read_size
    _unsent: bytes = b""  # from write_nowait(), for the next send()

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive(self._next_read or self.read_size)
        except anyio.EndOfStream:
            return b""
        self._next_read = _next_read_size(self.read_size, len(data))
        return data

    async def send(self, data: bytes) -> None:
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        await self.stream.send(data)

    def write_nowait(self, data: bytes) -> bool:
        self._unsent += data  # a stream's every write may wait
        return False

    def unread(self, data: bytes) -> None:
        # A buffered stream gives them to receive() and to the TLS handshake alike.
        buffered = BufferedByteStream(self.stream)
        buffered.feed_data(data)
        self.stream = buffered

    async def start_tls(self, tls: TLSConfig) -> TLSInfo:
        self.stream = stream = await tls.handshake(self.stream)
        return tls_info(stream.extra(TLSAttribute.ssl_object))

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


_WaitFor = Callable[[socket.socket], Awaitable[None]]


@attrs.define(eq=False)
class TrioSocketWire:
    """trio: the connection's non-blocking socket, driven with trio's own waits.

    A read first yields to the other sessions, then takes what the socket holds: on a busy
    server the client has answered by the time the session's turn comes round again, so the
    read costs one system call, where waiting for readiness costs an ``epoll_ctl`` more and
    trying first (trio's sockets) a failed ``recv`` more. Only a read that finds the socket
    empty waits for readiness (on Linux through :mod:`minismtp.trio_readiness`: no system
    call per wait, and ~700 bytes less per idle connection); the next one tries again
    (waiting first for a few reads after an empty one made a wait out of 60% of the reads
    under load, at about 3 µs more each than a yield, where the empty reads it saved cost
    about 7 µs each but were 5-15% of them).
    A write goes out at once, without yielding (the session yields at its next read), and
    waits only while the kernel's buffer is full, so memory stays bounded by one batch of
    replies. Yields and waits are trio's checkpoints: the connection's cancel scope
    interrupts a read or a blocked write. The wire holds the accepted socket alone (anyio's
    stream over it, two trio objects and their guards, cost ~500 bytes per connection); a
    TLS handshake wraps it in anyio's stream then, and the bytes go through anyio's TLS
    stream over the same socket.
    """

    _socket: socket.socket
    read_size: int
    _wait_readable: _WaitFor
    _wait_writable: _WaitFor
    _checkpoint: Callable[[], Awaitable[None]]
    _notify_closing: Callable[[socket.socket], None]
    _forget: Callable[[socket.socket], None]  # the wire no longer waits on it (TLS from now)
    _pending: bytes = b""  # given back by unread()
    _unsent: bytes = b""  # what the kernel did not take from write_nowait()
    _tls: StreamWire | None = None
    _next_read: int = 0  # see _next_read_size

    @classmethod
    def over_socket(cls, sock: socket.socket, read_size: int) -> TrioSocketWire:
        """Over a connected non-blocking socket, which the wire then owns."""
        from trio import lowlevel  # only ever on trio

        wait_readable: _WaitFor = lowlevel.wait_readable
        forget: Callable[[socket.socket], None] = _ignore
        if hasattr(select, "epoll"):
            from minismtp.trio_readiness import EdgeReadiness

            readiness = EdgeReadiness.current()
            readiness.register(sock)
            wait_readable, forget = readiness.wait_readable, readiness.forget
        return cls(
            sock,
            read_size,
            wait_readable,
            lowlevel.wait_writable,
            lowlevel.checkpoint,
            lowlevel.notify_closing,
            forget,
        )

    async def receive(self) -> bytes:
        if self._tls is not None:
            return await self._tls.receive()
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        await self._checkpoint()
        sock = self._socket
        while True:
            try:
                data = sock.recv(self._next_read or self.read_size)
            except BlockingIOError:
                pass  # waited for below: inside the except block the error (~600 bytes with
                # its traceback) would stay alive as long as the connection sits idle
            except OSError as exc:
                raise anyio.BrokenResourceError(exc) from exc
            else:
                self._next_read = _next_read_size(self.read_size, len(data))
                return data
            await self._wait_readable(sock)

    async def send(self, data: bytes) -> None:
        if self._tls is not None:
            return await self._tls.send(data)
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        sent = self._send_now(data)
        if sent < len(data):
            # The client is slow to read: the rest goes as the kernel takes it.
            view = memoryview(data)[sent:]
            while view:
                await self._wait_writable(self._socket)
                view = view[self._send_now(view) :]

    def write_nowait(self, data: bytes) -> bool:
        if self._tls is not None:
            return self._tls.write_nowait(data)
        if self._unsent:
            self._unsent += data
            return False
        sent = self._send_now(data)
        if sent < len(data):
            self._unsent = data[sent:]
            return False
        return True

    def _send_now(self, data: bytes | memoryview) -> int:
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise anyio.BrokenResourceError(exc) from exc

    def unread(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.unread(data)
        else:
            self._pending = data + self._pending

    async def start_tls(self, tls: TLSConfig) -> TLSInfo:
        self._forget(self._socket)
        try:
            stream = await SocketStream.from_socket(self._socket)
        except ValueError:  # not connected any more: the client has gone
            raise TLSHandshakeFailed("connection lost") from None
        self._tls = wire = StreamWire(stream, self.read_size)
        if self._pending:
            # The ClientHello that came with a PROXY header.
            wire.unread(self._pending)
            self._pending = b""
        return await wire.start_tls(tls)

    async def aclose(self) -> None:
        if self._tls is not None:
            await self._tls.aclose()
        elif self._socket.fileno() >= 0:
            # No other task waits on the socket (only its session reads and writes it), but
            # trio's registration of it must go too: trio asks for this before every close.
            self._notify_closing(self._socket)
            self._socket.close()


def _next_read_size(read_size: int, got: int) -> int:
    """While reads come back full (a message streaming in), ask for four times as much:
    fewer, larger reads cost less per megabyte (10 MB messages on trio: about 0.4 ms/MB less
    CPU); otherwise the usual size (0: ``read_size``), as a small read of a large size costs
    more in malloc."""
    return 4 * read_size if got >= read_size else 0


def _ignore(sock: socket.socket) -> None:
    pass


__all__ = ["StreamWire", "TrioSocketWire", "Wire"]
