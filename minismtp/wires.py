"""Wires: how a connection's bytes move between the socket and the session loop.

Each event loop gets its fastest path behind one small interface (:class:`Wire`): a plain
``asyncio.Protocol`` on asyncio and uvloop, where anyio's stream layer (pausing and resuming
the socket and a checkpoint on every read and write) would cost about twice the CPU per
message; the socket itself on trio, where the stream layer's reads try the system call first
(and fail: the answer to a reply is not there yet) and its writes yield to the scheduler; and
anyio's streams everywhere, as the portable path.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import anyio
import attrs
from anyio.abc import ByteStream, SocketAttribute, SocketStream
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
    _unsent: bytes = b""  # from write_nowait(), for the next send()

    async def receive(self) -> bytes:
        try:
            return await self.stream.receive(self.read_size)
        except anyio.EndOfStream:
            return b""

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


class ProtocolWire(asyncio.Protocol):
    """A plain ``asyncio.Protocol`` (asyncio and uvloop): the loop calls it with each chunk
    and the connection task takes whatever has arrived, without a stream layer in between.

    Reading pauses while ``read_size`` bytes wait unread, so memory stays bounded; writes
    wait for the transport's buffer to drain (``pause_writing``/``resume_writing``).
    """

    def __init__(
        self, on_connection_made: Callable[[ProtocolWire, asyncio.Transport], None], read_size: int
    ) -> None:
        self._on_connection_made = on_connection_made
        self._limit = read_size
        self._transport: asyncio.Transport | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._eof = False
        self._lost = False
        self._tls = False
        self._reader: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._woken = False
        #: Offered each chunk while the task waits in receive() with nothing queued; True if
        #: it took the chunk (the session's fast path, ``_Connection._read_inline``).
        self.inline_reader: Callable[[bytes], bool] | None = None

    # -- the loop's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._on_connection_made(self, self._transport)

    def data_received(self, data: bytes) -> None:
        inline_reader = self.inline_reader
        if inline_reader is not None and self._reader is not None and not self._chunks:
            if not self._reader.done() and inline_reader(data):
                return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._limit and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # Keep a plain connection open for our last reply; TLS closes on its own.
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._eof = True
        self._wake_reader()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        assert self._loop is not None
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    # -- the connection task's side

    async def receive(self) -> bytes:
        while not self._chunks:
            if self._eof or self._woken:
                self._woken = False
                return b""
            assert self._loop is not None
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def unread(self, data: bytes) -> None:
        self._chunks.insert(0, data)
        self._size += len(data)

    def wake(self) -> None:
        """Make the receive() in progress return ``b""`` now (its caller knows why)."""
        self._woken = True
        self._wake_reader()

    def write_nowait(self, data: bytes) -> bool:
        # The transport takes it all (False: it is over its high-water mark, or lost).
        if self._lost or self._transport is None:
            return False
        self._transport.write(data)
        return self._drained is None

    async def send(self, data: bytes) -> None:
        if self._lost or self._transport is None:
            raise anyio.BrokenResourceError("connection lost")
        self._transport.write(data)
        if self._drained is not None:
            await self._drained
            if self._lost:
                raise anyio.BrokenResourceError("connection lost")

    async def start_tls(self, tls: TLSConfig) -> TLSInfo:
        # Whatever came in the clear after STARTTLS is dropped here, as in the engine.
        self._chunks = []
        self._size = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        if self._lost or self._transport is None:
            raise TLSHandshakeFailed("connection lost")
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(tls.handshake_timeout):
                transport = await loop.start_tls(
                    self._transport,
                    self,
                    tls.context,
                    server_side=True,
                    # Our own deadline decides; this one only backs it up.
                    ssl_handshake_timeout=tls.handshake_timeout + 1,
                )
        except ssl.SSLError as exc:
            raise TLSHandshakeFailed(exc.reason or str(exc)) from None
        except TimeoutError:
            raise TLSHandshakeFailed(f"timed out after {tls.handshake_timeout:g} s") from None
        except (OSError, RuntimeError) as exc:
            raise TLSHandshakeFailed(f"connection lost ({type(exc).__name__})") from None
        if transport is None or self._lost:
            raise TLSHandshakeFailed("connection lost")
        self._transport = transport
        self._tls = True
        return tls_info(transport.get_extra_info("ssl_object"))

    async def aclose(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            # The kernel's buffer is full too: the client is not reading, and close() would
            # wait for it forever.
            transport.abort()
        else:
            transport.close()


_WaitFor = Callable[[socket.socket], Awaitable[None]]


@attrs.define(eq=False)
class TrioSocketWire:
    """trio: the connection's non-blocking socket, driven with trio's own waits.

    A read first yields to the other sessions, then takes what the socket holds: on a busy
    server the client has answered by the time the session's turn comes round again, so the
    read costs one system call, where waiting for readiness costs an ``epoll_ctl`` more and
    trying first (trio's sockets) a failed ``recv`` more. Only a read that finds the socket
    empty waits for readiness; the next one tries again (waiting first for a few reads after
    an empty one made a wait out of 60% of the reads under load, at about 3 µs more each than
    a yield, where the empty reads it saved cost about 7 µs each but were 5-15% of them).
    A write goes out at once, without yielding (the session yields at its next read), and
    waits only while the kernel's buffer is full, so memory stays bounded by one batch of
    replies. Yields and waits are trio's checkpoints: the connection's cancel scope
    interrupts a read or a blocked write. After a TLS handshake the bytes go through anyio's
    TLS stream over the same socket.
    """

    stream: SocketStream  # anyio's, for TLS and for closing
    read_size: int
    _socket: socket.socket
    _wait_readable: _WaitFor
    _wait_writable: _WaitFor
    _checkpoint: Callable[[], Awaitable[None]]
    _pending: bytes = b""  # given back by unread()
    _unsent: bytes = b""  # what the kernel did not take from write_nowait()
    _tls: StreamWire | None = None

    @classmethod
    def over(cls, stream: SocketStream, read_size: int) -> TrioSocketWire:
        from trio import lowlevel  # only ever on trio

        return cls(
            stream,
            read_size,
            stream.extra(SocketAttribute.raw_socket),
            lowlevel.wait_readable,
            lowlevel.wait_writable,
            lowlevel.checkpoint,
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
                return sock.recv(self.read_size)
            except BlockingIOError:
                await self._wait_readable(sock)
            except OSError as exc:
                raise anyio.BrokenResourceError(exc) from exc

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
        self._tls = wire = StreamWire(self.stream, self.read_size)
        if self._pending:
            # The ClientHello that came with a PROXY header.
            wire.unread(self._pending)
            self._pending = b""
        return await wire.start_tls(tls)

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream if self._tls is None else self._tls.stream)


__all__ = ["ProtocolWire", "StreamWire", "TrioSocketWire", "Wire"]
