"""Wires: how a connection's bytes move between the socket and the connection's driver.

Each event loop gets its fastest path behind one small interface (:class:`Wire`), each with
the accept path that makes it: a plain ``asyncio.Protocol`` on asyncio and uvloop
(:mod:`minismtp.asyncio_wire`), where anyio's stream layer (pausing and resuming the socket
and a checkpoint on every read and write) costs about twice the CPU per message; the socket
itself on trio (:mod:`minismtp.trio_wire`), where the stream layer's reads try the system call
first (and fail: the answer to a reply is not there yet) and its writes yield to the
scheduler; and anyio's streams everywhere, as the portable path (here). The server picks one
per listener, once, when it starts (``serve()``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import attrs
from anyio.abc import ByteStream, SocketAttribute, SocketListener
from anyio.streams.buffered import BufferedByteStream
from anyio.streams.tls import TLSAttribute

from minismtp.config import ServerConfig
from minismtp.tls import TLSConfig, tls_info
from minismtp.types import Reply, TLSInfo

if TYPE_CHECKING:
    from minismtp.connection import FastPath

log = logging.getLogger("minismtp.server")

# How an accept path starts a session's task: a task group's or a nursery's start_soon.
StartSession = Callable[..., object]
# The sessions' task name: trio would format one from the function for every connection.
SESSION = "minismtp session"


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


class Acceptor(Protocol):
    """What an accept path needs of the server (:class:`minismtp.server.Server` is one)."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def stopping(self) -> bool: ...

    def admit(self, peer: tuple[str, int]) -> Reply | None:
        """Count the connection from ``peer`` in; or the reply that refuses it (the server is
        full, or holds too many from that address)."""

    def handle(
        self,
        wire: Wire,
        peer: tuple[str, int],
        local: tuple[str, int],
        implicit_tls: bool,
        fast_path: FastPath | None = None,
    ) -> Coroutine[Any, Any, None]:
        """Serve the admitted connection to its end (the session's task runs this)."""


@attrs.define(eq=False)
class StreamWire:
    """anyio's streams: every backend (the portable path)."""

    stream: ByteStream
    read_size: int
    _next_read: int = attrs.field(init=False, default=0)  # see next_read_size
    _unsent: bytes = b""  # from write_nowait(), for the next send()

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive(self._next_read or self.read_size)
        except anyio.EndOfStream:
            return b""
        self._next_read = next_read_size(self.read_size, len(data))
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


def next_read_size(read_size: int, got: int) -> int:
    """While reads come back full (a message streaming in), ask for four times as much:
    fewer, larger reads cost less CPU per megabyte; otherwise the usual size (0:
    ``read_size``), as a small read of a large size costs more in malloc."""
    return 4 * read_size if got >= read_size else 0


async def accept_streams(
    acceptor: Acceptor, listener: SocketListener, implicit_tls: bool, start: StartSession
) -> None:
    """The portable accept: anyio's listener, a :class:`StreamWire` per connection."""
    read_size = acceptor.config.read_size
    while True:
        try:
            stream = await listener.accept()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        except OSError as exc:
            # Out of file descriptors or similar: back off rather than spin.
            log.error("accept() failed: %s", exc)
            await anyio.sleep(0.1)
            continue
        peer = peer_address(stream.extra(SocketAttribute.remote_address))
        refusal = acceptor.admit(peer)
        if refusal is not None:
            # Answered here, not in a new task, so a flood costs no unbounded work.
            with anyio.move_on_after(1.0):
                # On the implicit TLS port a plaintext reply would be noise: just close.
                if not implicit_tls:
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await stream.send(bytes(refusal))
            await anyio.aclose_forcefully(stream)
            continue
        local = peer_address(stream.extra(SocketAttribute.local_address))
        wire = StreamWire(stream, read_size)
        start(acceptor.handle, wire, peer, local, implicit_tls, name=SESSION)


def peer_address(address: Any) -> tuple[str, int]:
    """A socket address as the session keeps it: (host, port); a UNIX socket's path, port 0."""
    if isinstance(address, tuple):
        if len(address) == 4 and address[3]:  # IPv6 with a scope (link-local), as anyio says it
            return (f"{address[0].split('%')[0]}%{address[3]}", int(address[1]))
        return (str(address[0]), int(address[1]))
    return (str(address), 0)


def running_asyncio() -> bool:
    """Whether the running event loop is asyncio's (or uvloop's), which picks a wire."""
    asyncio = sys.modules.get("asyncio")  # not imported: not running (trio need not load it)
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


__all__ = [
    "Acceptor",
    "StreamWire",
    "Wire",
    "accept_streams",
    "next_read_size",
    "peer_address",
    "running_asyncio",
]
