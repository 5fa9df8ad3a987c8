"""The network server's lifecycle: listeners, the clock, shutdown.

It runs on any anyio backend (asyncio, asyncio with uvloop, trio) and never parses SMTP
itself: each connection is served by the driver in :mod:`minismtp.connection`, which feeds
what it reads to a :class:`~minismtp.protocol.Engine`, hands the engine's events to the App,
and writes out the engine's replies, a pipelined batch at a time.

What the server layer owns, because it owns the clock and the sockets:

- an idle timeout per command (RFC 5321 4.5.3.2.7; ``421 4.4.2``);
- while message content streams in, a minimum data rate instead (Postfix's
  ``smtpd_min_data_rate``): the deadline starts at the idle timeout and every chunk read
  extends it by ``len(chunk) / min_data_rate`` seconds, up to the idle timeout again, so an
  upload that keeps flowing at that rate is never cut while a trickle is;
- a cap on the duration of a whole session;
- which connections it takes (:mod:`minismtp.admission`): a bound on concurrent connections
  (past it, ``421 4.7.0`` and close at once) and one on those from each client address, and
  under stress shorter idle and data-rate deadlines, as Postfix does;
- STARTTLS (RFC 3207) and implicit TLS on a second port (RFC 8314);
- graceful shutdown: stop accepting, let transactions in progress finish within a grace
  period, answer ``421 4.3.2`` to what remains, then let the App drain its channel.

Bytes move through a small transport (a "wire", see :mod:`minismtp.wires`) so that each
event loop gets its fastest path, chosen once in :func:`serve`; the driver is the same on all
of them.

Use it as ``async with serve(app, host, port) as server:``, or through the seed's
:class:`SmtpServer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketListener
from anyio.streams.memory import MemoryObjectReceiveStream

from minismtp.admission import Admission
from minismtp.app import App
from minismtp.config import ServerConfig
from minismtp.connection import Connection, serve_connection
from minismtp.host import FastPath, ServableApp
from minismtp.metrics import Metrics
from minismtp.replies import SHUTTING_DOWN
from minismtp.tls import TLSConfig
from minismtp.types import Message, Reply
from minismtp.unix import UnixSocket, bind_unix_socket
from minismtp.wires import StartSession, Wire, accept_streams, peer_address, running_asyncio

if sys.version_info < (3, 11):
    # anyio installs it below 3.11; mypy checks as 3.10 where it may not be installed.
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:  # imported on the asyncio path only: trio need not load asyncio (~1.4 MB)
    import asyncio

log = logging.getLogger("minismtp.server")

# The clock's own: anyio.current_time() looks the backend up on every call.
_now = time.monotonic


@attrs.define(eq=False)
class Server:
    """A running server: what ``serve()`` gives. Stop it with :meth:`stop`."""

    app: ServableApp
    config: ServerConfig = attrs.field(factory=ServerConfig)
    tls: TLSConfig | None = None
    require_tls: bool = False
    metrics: Metrics = attrs.field(factory=Metrics)
    addresses: list[tuple[str, int]] = attrs.field(factory=list)
    tls_addresses: list[tuple[str, int]] = attrs.field(factory=list)
    #: The unix-domain sockets listened on, by path.
    unix_paths: list[str] = attrs.field(factory=list)
    _listeners: list[tuple[SocketListener, bool]] = attrs.field(factory=list)
    _connections: set[Connection] = attrs.field(factory=set)
    #: True once :meth:`stop` has begun (read it, do not set it). A plain attribute, not a
    #: property: every connection looks at it before each event.
    stopping: bool = attrs.field(default=False, init=False)
    _stopped: anyio.Event = attrs.field(factory=anyio.Event)
    _idle: anyio.Event | None = None
    _accepting: anyio.CancelScope | None = None
    _clock: anyio.CancelScope | None = None
    _asyncio_servers: list[asyncio.Server] = attrs.field(factory=list)
    _admission: Admission = attrs.field(init=False)
    #: The idle timeout in force: ``config.idle_timeout``, or ``stress_idle_timeout`` while
    #: :attr:`under_stress`. The admission's, kept here as a plain attribute: every read of
    #: every connection looks at it.
    idle_timeout: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._admission = Admission(self.config, self._stress_changed)
        self.idle_timeout = self._admission.idle_timeout

    @property
    def port(self) -> int:
        """The port of the plain listener (the bound one, also when asked for port 0)."""
        return self.addresses[0][1]

    @property
    def tls_port(self) -> int | None:
        """The port of the implicit TLS listener, if there is one."""
        return self.tls_addresses[0][1] if self.tls_addresses else None

    @property
    def mail_rx(self) -> MemoryObjectReceiveStream[Message]:
        """The receiving end of the App's message channel (the seed's name for it)."""
        return self.app.messages

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self._admission.active

    @property
    def under_stress(self) -> bool:
        """More than ``config.stress_threshold`` of the connections are taken, or were a
        stress timeout ago: shorter idle and data-rate deadlines (:mod:`minismtp.admission`)."""
        return self._admission.under_stress

    def reload_tls(self) -> bool:
        """Read the certificate and key again for new connections (the CLI's SIGHUP)."""
        return self.tls.reload() if self.tls is not None else False

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully; returns once every connection is closed.

        Accepting stops at once and idle sessions get ``421 4.3.2``; a session inside a mail
        transaction may finish it within ``grace`` seconds (``config.shutdown_grace`` by
        default), then it gets the 421 too. Calling it again waits for the first call.
        """
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        grace = self.config.shutdown_grace if grace is None else grace
        try:
            if self._accepting is not None:
                self._accepting.cancel()
            for asyncio_server in self._asyncio_servers:
                asyncio_server.close()  # closes the listening socket too
            with anyio.CancelScope(shield=True):
                for listener, _ in self._listeners:
                    await listener.aclose()
            for connection in list(self._connections):
                if not connection.engine.in_transaction:
                    connection.interrupt(SHUTTING_DOWN)
            if not await self._wait_closed(grace):
                log.info("closing %d connection(s) still busy after %g s", self.connections, grace)
                self.abort()
                if not await self._wait_closed(self.config.shutdown_cancel_after):
                    for connection in list(self._connections):
                        connection.cancel()
                    await self._wait_closed(None)
        finally:
            if self._clock is not None:
                self._clock.cancel()
            self._stopped.set()

    def abort(self) -> None:
        """Answer ``421 4.3.2`` to every session now, in a transaction or not."""
        for connection in list(self._connections):
            connection.interrupt(SHUTTING_DOWN)

    async def _wait_closed(self, within: float | None) -> bool:
        with anyio.move_on_after(within):
            while self._admission.active:
                self._idle = anyio.Event()
                await self._idle.wait()
            return True
        return False

    # -- the clock --------------------------------------------------------------------------

    async def _watch_clocks(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Time out the sessions whose read or write has taken too long.

        One task looks at every session's deadline a few times per timeout, instead of a
        cancel scope around every read and write: a scope costs several microseconds on each
        of them, a deadline kept as a float costs nothing, and a timeout that fires a tenth
        of its length late is still the same timeout.
        """
        config = self.config
        period = min(config.idle_timeout, config.stress_idle_timeout)
        if config.max_session_duration is not None:
            period = min(period, config.max_session_duration)
        period = max(0.01, min(1.0, period / 10))
        admission = self._admission
        with anyio.CancelScope() as self._clock:
            task_status.started()
            while True:
                await anyio.sleep(period)
                now = _now()
                for connection in list(self._connections):
                    if connection.deadline <= now:
                        connection.time_out()
                if admission.under_stress:
                    admission.watch_stress(now)

    # -- accepting ------------------------------------------------------------------------

    async def _accept_all(
        self, on_asyncio: bool, start: StartSession, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Accept on every listener, each through the path ``serve()`` chose for the loop."""
        stream_listeners = self._listeners
        accept = accept_streams
        if self.config.transport == "auto" and on_asyncio:
            from minismtp.asyncio_wire import serve_protocol

            # Plain listeners get the Protocol path. Implicit TLS keeps anyio's streams: the
            # ClientHello may come with the connection, before start_tls() could take it.
            stream_listeners = [(lst, tls) for lst, tls in self._listeners if tls]
            for listener, implicit_tls in self._listeners:
                if not implicit_tls:
                    sock = listener.extra(SocketAttribute.raw_socket)
                    self._asyncio_servers.append(await serve_protocol(self, sock))
        elif self.config.transport == "auto":
            from minismtp.trio_wire import accept_sockets

            accept = accept_sockets  # on trio, its socket itself
        async with anyio.create_task_group() as accepting:
            self._accepting = accepting.cancel_scope
            for listener, implicit_tls in stream_listeners:
                accepting.start_soon(accept, self, listener, implicit_tls, start)
            task_status.started()

    def admit(self, peer: tuple[str, int]) -> Reply | None:
        """Count the connection from ``peer`` in; or the reply that refuses it (the refusal
        noted): all ``max_connections`` are taken, or ``max_connections_per_address`` from
        its address (behind a PROXY balancer, from the client its header names: counted in
        :meth:`handle` once the header is read). Every accept path calls it; :meth:`handle`
        counts the connection out."""
        return self._admission.admit(peer)

    def _stress_changed(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        if self._admission.under_stress:
            # The reads under way end as if they had begun under stress: idle clients go first.
            for connection in self._connections:
                connection.hurry(idle_timeout)

    async def handle(
        self,
        wire: Wire,
        peer: tuple[str, int],
        local: tuple[str, int],
        implicit_tls: bool,
        fast_path: FastPath | None = None,
    ) -> None:
        """Serve an admitted connection (see :func:`~minismtp.connection.serve_connection`)."""
        metrics = self.metrics
        admission = self._admission
        # Behind a PROXY balancer every peer is the balancer: the per-address limit counts
        # the client its header names, once the driver has read it.
        client = admission.client_slot() if admission.by_client else None
        admit_client = client.take if client is not None else None
        metrics.connection_opened()
        try:
            await serve_connection(self, wire, peer, local, implicit_tls, fast_path, admit_client)
        finally:
            metrics.connection_closed()
            if client is not None:
                client.release()
            admission.release(peer)
            if not admission.active and self._idle is not None:
                self._idle.set()

    def track(self, connection: Connection) -> None:
        self._connections.add(connection)

    def untrack(self, connection: Connection) -> None:
        self._connections.discard(connection)


async def _bind(
    host: str | None, port: int, implicit_tls: bool
) -> list[tuple[SocketListener, bool]]:
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    listeners: list[tuple[SocketListener, bool]] = []
    for listener in multi.listeners:
        assert isinstance(listener, SocketListener)
        listeners.append((listener, implicit_tls))
    return listeners


@contextlib.asynccontextmanager
async def serve(
    app: ServableApp,
    host: str | None = "127.0.0.1",
    port: int | None = 25,
    *,
    tls: TLSConfig | None = None,
    tls_port: int | None = None,
    require_tls: bool = False,
    config: ServerConfig | None = None,
    metrics: Metrics | None = None,
    sockets: Sequence[socket.socket] = (),
    tls_sockets: Sequence[socket.socket] = (),
    unix: str | os.PathLike[str] | None = None,
    unix_mode: int | None = None,
    lmtp: bool = False,
) -> AsyncIterator[Server]:
    """Serve ``app`` on ``host:port`` (and implicit TLS on ``tls_port``) for the ``with`` block.

    The listeners are bound before the App's startup hooks run (a port in use fails fast
    with :class:`OSError`). Leaving the block stops the server gracefully unless
    :meth:`Server.stop` already did; leaving it with an exception stops it at once.

    ``unix`` also listens on a unix-domain socket at that path (``port=None``: on it alone),
    with the permissions ``unix_mode``; a stale socket file is replaced, one a live server
    listens on raises :class:`~minismtp.unix.SocketInUse`, and the file goes when the server
    stops. ``lmtp`` serves LMTP (RFC 2033) instead of SMTP (``ServerConfig.lmtp``).

    ``sockets`` and ``tls_sockets`` are listening sockets bound already (a worker process
    inherits them from ``minismtp run --workers``; unix-domain ones too); with them, ``port``,
    ``tls_port`` and ``unix`` are not bound. The counters go to ``metrics``, by default the
    App's own (``app.metrics``) if it has one.
    """
    if lmtp:
        config = attrs.evolve(config or ServerConfig(), lmtp=True)
    if port is None and unix is None and not sockets:
        raise ValueError("nothing to listen on: give a port, a unix socket path, or sockets")
    if (tls_port is not None or tls_sockets) and tls is None:
        raise ValueError("implicit TLS (tls_port) needs a certificate")
    if require_tls and tls is None:
        raise ValueError("require_tls needs a certificate")
    if metrics is None:
        metrics = getattr(app, "metrics", None)
    if not isinstance(metrics, Metrics):
        metrics = Metrics()
    server = Server(app, config or ServerConfig(), tls, require_tls, metrics)
    bound_unix: UnixSocket | None = None
    try:
        if sockets:
            for sock in sockets:
                server._listeners.append((await SocketListener.from_socket(sock), False))
            for sock in tls_sockets:
                server._listeners.append((await SocketListener.from_socket(sock), True))
        else:
            if port is not None:
                server._listeners += await _bind(host, port, False)
            if tls_port is not None:
                server._listeners += await _bind(host, tls_port, True)
            if unix is not None:
                bound_unix = await anyio.to_thread.run_sync(bind_unix_socket, unix, unix_mode)
                listener = await SocketListener.from_socket(bound_unix.socket)
                server._listeners.append((listener, False))
        for listener, implicit_tls in server._listeners:
            if listener.extra(SocketAttribute.family) == socket.AF_UNIX:
                server.unix_paths.append(str(listener.extra(SocketAttribute.local_address)))
                continue
            address = peer_address(listener.extra(SocketAttribute.local_address))
            (server.tls_addresses if implicit_tls else server.addresses).append(address)
        on_asyncio = running_asyncio()  # the one place the loop is looked at
        async with app.serving(), anyio.create_task_group() as connections:
            await connections.start(server._watch_clocks)
            start_session: StartSession = connections.start_soon
            if not on_asyncio:
                from minismtp.trio_wire import session_nursery

                start_session = await connections.start(session_nursery, server._stopped)
            await connections.start(server._accept_all, on_asyncio, start_session)
            try:
                yield server
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await server.stop(grace=0)
                raise
            await server.stop()
    except BaseExceptionGroup as group:
        # On trio a KeyboardInterrupt lands in whichever task runs (often a session's) and
        # leaves through three task groups; it leaves serve() bare, as it does on asyncio.
        leaf = _sole_exit(group)
        if leaf is None:
            raise
        raise leaf from None
    finally:
        with anyio.CancelScope(shield=True):
            for listener, _ in server._listeners:
                await listener.aclose()
        if bound_unix is not None:
            bound_unix.close()  # the socket file goes with the server that made it


def _sole_exit(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit that is all ``group`` holds, however nested."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner if isinstance(inner, KeyboardInterrupt | SystemExit) else None


@attrs.define
class SmtpServer:
    """The seed's API: ``async with SmtpServer(host, port, domain).start() as listening:``.

    ``timeout`` is the idle timeout per command in seconds, ``buffer_size`` the size of each
    read, ``certs_path``/``key_path`` a PEM certificate (chain) and key for STARTTLS. Without
    an ``app``, a plain :class:`~minismtp.app.App` named ``domain`` accepts everything and
    puts each message on ``listening.mail_rx``; an App given keeps its own hostname.
    ``lmtp=True`` serves LMTP instead (RFC 2033: LHLO, a reply per recipient after the data).
    """

    host: str
    port: int
    domain: str
    timeout: float | None = None
    buffer_size: int | None = None
    certs_path: str | os.PathLike[str] | None = None
    key_path: str | os.PathLike[str] | None = None
    app: ServableApp | None = None
    lmtp: bool = False  # LMTP (RFC 2033) instead of SMTP
    _running: AbstractAsyncContextManager[Server] | None = attrs.field(default=None, init=False)

    def start(self) -> AbstractAsyncContextManager[Server]:
        defaults = ServerConfig()
        config = ServerConfig(
            idle_timeout=self.timeout if self.timeout is not None else defaults.idle_timeout,
            read_size=self.buffer_size or defaults.read_size,
        )
        tls = TLSConfig(self.certs_path, self.key_path) if self.certs_path is not None else None
        app = self.app if self.app is not None else App(hostname=self.domain)
        return serve(app, self.host, self.port, tls=tls, config=config, lmtp=self.lmtp)

    async def __aenter__(self) -> Server:
        self._running = self.start()
        return await self._running.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        running, self._running = self._running, None
        assert running is not None
        return await running.__aexit__(exc_type, exc, traceback)


__all__: Sequence[str] = [
    "ServableApp",
    "Server",
    "ServerConfig",
    "SmtpServer",
    "serve",
]
