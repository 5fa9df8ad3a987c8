"""The asyncio and uvloop path: a plain ``asyncio.Protocol`` as the wire, and its accept.

A module of its own so that trio never imports asyncio (about 1.4 MB of memory).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Callable
from typing import cast

import anyio
import attrs

from minismtp.config import TURN_SIZE
from minismtp.tls import TLSConfig, TLSHandshakeFailed, tls_info
from minismtp.types import TLSInfo
from minismtp.wires import Acceptor, peer_address

# Connections the kernel may queue before accept(), as in anyio's listeners. create_server()
# listens again, by default with a queue of 100: too short for a burst of clients (a full
# queue drops handshakes, and a client whose last ACK was dropped waits for a greeting that
# never comes).
BACKLOG = 65536


class ProtocolWire(asyncio.Protocol):
    """A plain ``asyncio.Protocol`` (asyncio and uvloop): the loop calls it with each chunk
    and the connection task takes whatever has arrived, without a stream layer in between.

    Reading pauses while ``read_size`` bytes wait unread, so memory stays bounded; writes
    wait for the transport's buffer to drain (``pause_writing``/``resume_writing``). After
    every ``turn_size`` bytes read, reading also pauses until the event loop's next turn
    (:data:`~minismtp.config.TURN_SIZE`). The bytes are counted across turns, not per turn:
    knowing where a turn ends would cost a callback per read, and a client that sends less
    than ``turn_size`` per turn loses at most one turn per ``turn_size`` bytes by it.
    """

    def __init__(
        self,
        on_connection_made: Callable[[ProtocolWire, asyncio.Transport], None],
        read_size: int,
        turn_size: int = TURN_SIZE,
    ) -> None:
        self._on_connection_made = on_connection_made
        self._limit = read_size
        self._turn_size = self._turn_left = turn_size
        self._yielding = False  # reading paused until the next turn
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
        #: it took the chunk (the fast path, :mod:`minismtp.inline`).
        self.inline_reader: Callable[[bytes], bool] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # -- the loop's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._on_connection_made(self, self._transport)

    def data_received(self, data: bytes) -> None:
        self._turn_left -= len(data)
        if self._turn_left < 0 and not self._yielding:
            self._yield_turn()
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

    def _yield_turn(self) -> None:
        # uvloop would go on reading this socket (libuv: up to 32 reads in a row) and the
        # fast path feed it all to the engine before the loop serves anyone else.
        self._yielding = True
        if self._transport is not None:
            self._transport.pause_reading()  # a no-op if paused already
        self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._yielding = False
        self._turn_left = self._turn_size
        if not self._paused and not self._lost and self._transport is not None:
            self._transport.resume_reading()

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
        chunks = self._take_queued()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _take_queued(self) -> list[bytes]:
        """The chunks queued so far, which leave room to read again."""
        chunks, self._chunks, self._size = self._chunks, [], 0
        if self._paused and self._transport is not None:
            self._paused = False
            if not self._yielding:
                self._transport.resume_reading()
        return chunks

    def unread(self, data: bytes) -> None:
        self._chunks.insert(0, data)
        self._size += len(data)

    def wake(self) -> None:
        """Make the receive() in progress return ``b""`` now: the fast path has left the
        task a step (see :mod:`minismtp.inline`, invariant 3); not the client's EOF."""
        self._woken = True
        self._wake_reader()

    def write_nowait(self, data: bytes) -> bool:
        """Write ``data`` out; False if the caller must then wait, as :meth:`send` would."""
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
        self._take_queued()
        if self._lost or self._transport is None:
            raise TLSHandshakeFailed("connection lost")
        try:
            with anyio.fail_after(tls.handshake_timeout):
                transport = await self.loop.start_tls(
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


@attrs.define(eq=False)
class Accept:
    """The asyncio path's accept, called from each new ``ProtocolWire``'s ``connection_made``.

    Each session runs in a plain asyncio task, not one of a task group's: anyio's bookkeeping
    (a handle, a cancel scope and an event per task) would cost memory per connection, and the
    server ends every session itself (its ``stop()`` waits for them all).
    """

    acceptor: Acceptor
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set)  # the loop keeps weak ones

    def __call__(self, wire: ProtocolWire, transport: asyncio.Transport) -> None:
        from minismtp.inline import InlinePath, start_task  # it imports this module

        acceptor = self.acceptor
        peer = peer_address(transport.get_extra_info("peername"))
        if acceptor.stopping:
            transport.abort()
            return
        refusal = acceptor.admit(peer)
        if refusal is not None:
            transport.write(bytes(refusal))
            transport.close()
            return
        local = peer_address(transport.get_extra_info("sockname"))
        path = InlinePath.new(wire, acceptor.config.inline)
        task = start_task(wire.loop, acceptor.handle(wire, peer, local, False, path), path)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def serve_protocol(acceptor: Acceptor, sock: socket.socket) -> asyncio.Server:
    """Serve the plain (not implicit TLS) listening ``sock`` through ``ProtocolWire``s."""
    config = acceptor.config
    factory = functools.partial(ProtocolWire, Accept(acceptor), config.read_size, config.turn_size)
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, sock=sock, backlog=BACKLOG)
