"""trio's path: the connection's socket itself as the wire, and its accept.

Measured against anyio's streams (:class:`~minismtp.wires.StreamWire`) on trio, this path
costs about a quarter less server CPU per small message (figures in ``tests/bench/README.md``);
``ServerConfig(transport="stream")`` uses the streams instead.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Awaitable, Callable

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

from minismtp.tls import TLSConfig, TLSHandshakeFailed
from minismtp.types import TLSInfo
from minismtp.wires import (
    SESSION,
    Acceptor,
    StartSession,
    StreamWire,
    log,
    next_read_size,
    peer_address,
)

_WaitFor = Callable[[socket.socket], Awaitable[None]]


@attrs.define(eq=False)
class TrioSocketWire:
    """trio: the connection's non-blocking socket, driven with trio's own waits.

    A read first yields to the other sessions, then takes what the socket holds: on a busy
    server the client has answered by the time the session's turn comes round again, so the
    read costs one system call, where waiting for readiness costs an ``epoll_ctl`` more and
    trying first (trio's sockets) a failed ``recv`` more. Only a read that finds the socket
    empty waits for readiness (on Linux through :mod:`minismtp.trio_readiness`: no system
    call per wait, and less memory per idle connection); the next one tries again, as
    waiting first after an empty read turned most reads into waits under load (the figures
    behind these choices are in ``tests/bench/README.md``).

    A write goes out at once, without yielding (the session yields at its next read), and
    waits only while the kernel's buffer is full, so memory stays bounded by one batch of
    replies. Yields and waits are trio's checkpoints: the connection's cancel scope
    interrupts a read or a blocked write. The wire holds the accepted socket alone (anyio's
    stream over it would add two trio objects and their guards per connection); a TLS
    handshake wraps it in anyio's stream then, and the bytes go through anyio's TLS stream
    over the same socket.
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
    _next_read: int = 0  # see next_read_size

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
                self._next_read = next_read_size(self.read_size, len(data))
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


def _ignore(sock: socket.socket) -> None:
    pass


async def accept_sockets(
    acceptor: Acceptor, listener: SocketListener, implicit_tls: bool, start: StartSession
) -> None:
    """trio's accept: on the listening socket itself, for :class:`TrioSocketWire`.

    anyio's accept() would wrap each connection in two objects the wire does not use and
    ask the kernel for its addresses three times more (``extra()`` builds its table of
    attributes, with a ``getpeername()``, on every call); accept() gives the peer's.
    """
    from trio import ClosedResourceError, lowlevel

    sock = listener.extra(SocketAttribute.raw_socket)  # non-blocking: trio's
    read_size = acceptor.config.read_size
    while True:
        try:
            connection, address = sock.accept()
        except BlockingIOError:
            try:
                await lowlevel.wait_readable(sock)
            except ClosedResourceError:  # stop() closed the listener
                return
            continue
        except OSError as exc:
            if sock.fileno() < 0:
                return
            # Out of file descriptors or similar: back off rather than spin.
            log.error("accept() failed: %s", exc)
            await anyio.sleep(0.1)
            continue
        connection.setblocking(False)
        if connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = peer_address(address)
        refusal = acceptor.admit(peer)
        if refusal is not None:
            # Answered here, not in a new task, so a flood costs no unbounded work. A new
            # connection's buffer takes the line at once, or the client is gone.
            if not implicit_tls:  # on the TLS port a plaintext reply would be noise
                with contextlib.suppress(OSError):
                    connection.send(bytes(refusal))
            connection.close()
            continue
        local = peer_address(connection.getsockname())
        wire = TrioSocketWire.over_socket(connection, read_size)
        start(acceptor.handle, wire, peer, local, implicit_tls, name=SESSION)


async def session_nursery(stopped: anyio.Event, *, task_status: TaskStatus[StartSession]) -> None:
    """Where the sessions run on trio: a nursery of the server's own, without anyio's
    per-task bookkeeping (a handle and a wrapping coroutine per connection).
    It stays open until ``stopped`` (the server has seen every session end)."""
    import trio

    async with trio.open_nursery() as nursery:
        task_status.started(nursery.start_soon)
        await stopped.wait()


__all__ = ["TrioSocketWire", "accept_sockets", "session_nursery"]
