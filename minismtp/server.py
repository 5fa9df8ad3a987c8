"""The network server: listeners, one task per connection driving the engine, TLS, limits.

It runs on any anyio backend (asyncio, asyncio with uvloop, trio) and never parses SMTP
itself: each connection feeds what it reads to a :class:`~minismtp.protocol.Engine`, hands the
engine's events to the App, and writes out the engine's replies, a pipelined batch at a time.

What this layer owns, because it owns the clock and the sockets:

- an idle timeout per command (RFC 5321 4.5.3.2.7; ``421 4.4.2``);
- while message content streams in, a minimum data rate instead (Postfix's
  ``smtpd_min_data_rate``): the deadline starts at the idle timeout and every chunk read
  extends it by ``len(chunk) / min_data_rate`` seconds, up to the idle timeout again, so an
  upload that keeps flowing at that rate is never cut while a trickle is;
- a cap on the duration of a whole session;
- a bound on concurrent connections (past it, ``421 4.7.0`` and close at once);
- STARTTLS (RFC 3207) and implicit TLS on a second port (RFC 8314);
- graceful shutdown: stop accepting, let transactions in progress finish within a grace
  period, answer ``421 4.3.2`` to what remains, then let the App drain its channel.

Bytes move through a small transport (a "wire", see :mod:`minismtp.wires`) so that each
event loop gets its fastest path; the session logic is the same on all of them.

Use it as ``async with serve(app, host, port) as server:``, or through the seed's
:class:`SmtpServer`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard, cast

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketListener
from anyio.streams.memory import MemoryObjectReceiveStream

from minismtp.app import App
from minismtp.events import Connect, Event, Mail
from minismtp.ids import new_id
from minismtp.logs import InfoLine, transaction_line
from minismtp.metrics import Metrics
from minismtp.protocol import NEED_DATA, Closed, Engine, Limits, NeedData, StartTLS
from minismtp.proxy import LOOPBACK, IPNetwork, ProxyError, is_trusted, read_proxy_header
from minismtp.tls import TLSConfig, TLSHandshakeFailed
from minismtp.types import Message, Reply, Session
from minismtp.wires import StreamWire, TrioSocketWire, Wire

if sys.version_info < (3, 11):
    # anyio installs it below 3.11; mypy checks as 3.10 where it may not be installed.
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:  # imported on the asyncio path only: trio need not load asyncio (~1.4 MB)
    import asyncio

    from minismtp.asyncio_wire import ProtocolWire

# How _accept starts a session's task: a task group's or a nursery's start_soon.
_StartSession = Callable[..., object]
# The sessions' task name: trio would format one from the function for every connection.
_SESSION = "minismtp session"

log = logging.getLogger("minismtp.server")
_transaction_line = InfoLine(log)

IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TALKED_FIRST = Reply(554, "5.5.1", "Protocol error: talked before greeting")

_NEVER = float("inf")
_BACKLOG = 65536  # connections the kernel may queue before accept(), as in anyio's listeners
# Session deadlines are ours alone (set here, checked by our clock task), so the cheapest
# monotonic clock will do: anyio.current_time() looks the backend up on every call.
_now = time.monotonic


class ServableApp(Protocol):
    """What the server needs of an App (:class:`minismtp.app.App` is one)."""

    hostname: str
    limits: Limits

    async def __call__(self, event: Event, /) -> Reply: ...

    def serving(self) -> AbstractAsyncContextManager[Any]: ...

    @property
    def messages(self) -> MemoryObjectReceiveStream[Message]: ...


@attrs.frozen
class ServerConfig:
    """Timeouts and limits of the network layer (the SMTP limits are the App's ``limits``)."""

    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: the server waits 5 minutes per command
    min_data_rate: float = 500.0  # bytes/s during DATA/BDAT, as Postfix; 0: the idle timeout
    max_session_duration: float | None = 3600.0
    max_connections: int = 1000
    shutdown_grace: float = 30.0  # seconds a transaction in progress gets to finish
    # After the grace period and the 421s, how long sessions get to end before they are
    # cancelled outright (a client that stopped reading, an App call that hangs).
    shutdown_cancel_after: float = 5.0
    read_size: int = 64 * 1024
    # "auto": an asyncio Protocol on asyncio/uvloop, the socket with trio's own waits on trio;
    # "stream": anyio streams everywhere (the portable path, for comparison and debugging).
    transport: Literal["auto", "stream"] = "auto"
    # The PROXY protocol (v1 and v2): each connection must start with a header from one of
    # the trusted proxies, naming the client; anything else is closed without a greeting.
    proxy_protocol: bool = False
    proxy_trusted: tuple[IPNetwork, ...] = LOOPBACK
    proxy_timeout: float = 5.0  # a proxy sends its header at once


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
    _listeners: list[tuple[SocketListener, bool]] = attrs.field(factory=list)
    _connections: set[_Connection] = attrs.field(factory=set)
    _active: int = 0  # accepted and not yet closed, TLS handshakes included
    _stopping: bool = False
    _stopped: anyio.Event = attrs.field(factory=anyio.Event)
    _idle: anyio.Event | None = None
    _accepting: anyio.CancelScope | None = None
    _clock: anyio.CancelScope | None = None
    _refused: int = 0  # connections refused since the last log line about it
    _asyncio_tasks: set[asyncio.Task[None]] = attrs.field(factory=set)  # the Protocol path's
    _asyncio_servers: list[asyncio.Server] = attrs.field(factory=list)
    _refusals_logged_at: float = float("-inf")

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
        return self._active

    @property
    def stopping(self) -> bool:
        return self._stopping

    def reload_tls(self) -> bool:
        """Read the certificate and key again for new connections (the CLI's SIGHUP)."""
        return self.tls.reload() if self.tls is not None else False

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully; returns once every connection is closed.

        Accepting stops at once and idle sessions get ``421 4.3.2``; a session inside a mail
        transaction may finish it within ``grace`` seconds (``config.shutdown_grace`` by
        default), then it gets the 421 too. Calling it again waits for the first call.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
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
                log.info("closing %d connection(s) still busy after %g s", self._active, grace)
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
            while self._active:
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
        period = config.idle_timeout
        if config.max_session_duration is not None:
            period = min(period, config.max_session_duration)
        period = max(0.01, min(1.0, period / 10))
        with anyio.CancelScope() as self._clock:
            task_status.started()
            while True:
                await anyio.sleep(period)
                now = _now()
                for connection in list(self._connections):
                    if connection.deadline <= now:
                        connection.time_out()

    # -- accepting ------------------------------------------------------------------------

    async def _accept_all(
        self, start_session: _StartSession, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        stream_listeners = self._listeners
        if self.config.transport == "auto" and _running_asyncio():
            # Plain listeners get the Protocol path. Implicit TLS keeps anyio's streams: the
            # ClientHello may come with the connection, before start_tls() could take it.
            stream_listeners = [(lst, tls) for lst, tls in self._listeners if tls]
            import asyncio

            from minismtp.asyncio_wire import ProtocolWire

            loop = asyncio.get_running_loop()
            for listener, implicit_tls in self._listeners:
                if not implicit_tls:
                    sock = listener.extra(SocketAttribute.raw_socket)
                    factory = functools.partial(
                        ProtocolWire, self._protocol_connection_made, self.config.read_size
                    )
                    # create_server() listens again, by default with a queue of 100: too short
                    # for a burst of clients (a full queue drops handshakes, and a client whose
                    # last ACK was dropped waits for a greeting that never comes).
                    asyncio_server = await loop.create_server(factory, sock=sock, backlog=_BACKLOG)
                    self._asyncio_servers.append(asyncio_server)
        # On trio (anyio's other backend), its socket itself, unless asked for the streams.
        accept = self._accept
        if self.config.transport == "auto" and not _running_asyncio():
            accept = self._accept_sockets
        async with anyio.create_task_group() as accepting:
            self._accepting = accepting.cancel_scope
            for listener, implicit_tls in stream_listeners:
                accepting.start_soon(accept, listener, implicit_tls, start_session)
            task_status.started()

    async def _accept(
        self, listener: SocketListener, implicit_tls: bool, start_session: _StartSession
    ) -> None:
        read_size = self.config.read_size
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
            peer = _ip_address(stream.extra(SocketAttribute.remote_address))
            if not self._admit(peer):
                # Answered here, not in a new task, so a flood costs no unbounded work.
                with anyio.move_on_after(1.0):
                    # On the implicit TLS port a plaintext reply would be noise: just close.
                    if not implicit_tls:
                        with contextlib.suppress(anyio.BrokenResourceError, OSError):
                            await stream.send(bytes(TOO_MANY_CONNECTIONS))
                await anyio.aclose_forcefully(stream)
                continue
            local = _ip_address(stream.extra(SocketAttribute.local_address))
            wire = StreamWire(stream, read_size)
            start_session(self._handle, wire, peer, local, implicit_tls, name=_SESSION)

    async def _accept_sockets(
        self, listener: SocketListener, implicit_tls: bool, start_session: _StartSession
    ) -> None:
        """trio's accept: on the listening socket itself, for :class:`TrioSocketWire`.

        anyio's accept() would wrap each connection in two objects the wire does not use and
        ask the kernel for its addresses three times more (``extra()`` builds its table of
        attributes, with a ``getpeername()``, on every call); accept() gives the peer's.
        """
        from trio import ClosedResourceError, lowlevel

        sock = listener.extra(SocketAttribute.raw_socket)  # non-blocking: trio's
        read_size = self.config.read_size
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
            peer = _ip_address(address)
            if not self._admit(peer):
                # Answered here, not in a new task, so a flood costs no unbounded work. A new
                # connection's buffer takes the line at once, or the client is gone.
                if not implicit_tls:  # on the TLS port a plaintext reply would be noise
                    with contextlib.suppress(OSError):
                        connection.send(bytes(TOO_MANY_CONNECTIONS))
                connection.close()
                continue
            local = _ip_address(connection.getsockname())
            wire = TrioSocketWire.over_socket(connection, read_size)
            start_session(self._handle, wire, peer, local, implicit_tls, name=_SESSION)

    async def _trio_sessions(self, *, task_status: anyio.abc.TaskStatus[_StartSession]) -> None:
        """Where the sessions run on trio: a nursery of the server's own, without anyio's
        per-task bookkeeping (a handle and a wrapping coroutine, ~1.4 KB per connection).
        It stays open until stop() has seen every session end."""
        import trio

        async with trio.open_nursery() as nursery:
            task_status.started(nursery.start_soon)
            await self._stopped.wait()

    def _protocol_connection_made(self, wire: ProtocolWire, transport: asyncio.Transport) -> None:
        """The asyncio path's accept: called from ``connection_made``."""
        peer = _ip_address(transport.get_extra_info("peername"))
        if self._stopping:
            transport.abort()
            return
        if not self._admit(peer):
            transport.write(bytes(TOO_MANY_CONNECTIONS))
            transport.close()
            return
        local = _ip_address(transport.get_extra_info("sockname"))
        # A plain asyncio task, not one of the task group's: anyio's bookkeeping (a handle, a
        # cancel scope and an event per task) would cost 2 KB per connection, and the server
        # ends every session itself (stop() waits for them all).
        task = wire.loop.create_task(self._handle(wire, peer, local, False))
        self._asyncio_tasks.add(task)  # the loop itself keeps only a weak reference
        task.add_done_callback(self._asyncio_tasks.discard)

    def _admit(self, peer: tuple[str, int]) -> bool:
        """Count the connection from ``peer`` in; False (the refusal noted) when all
        ``max_connections`` are taken."""
        if self._active >= self.config.max_connections:
            self._note_refusal(peer)
            return False
        self._active += 1
        return True

    def _note_refusal(self, peer: tuple[str, int]) -> None:
        # One line per ten seconds at most: a flood must not flood the log as well.
        self._refused += 1
        now = _now()
        if now - self._refusals_logged_at >= 10.0:
            log.warning(
                "refused %d connection(s), the last from %s: %d open (--max-connections)",
                self._refused,
                peer[0],
                self._active,
            )
            self._refused = 0
            self._refusals_logged_at = now

    async def _handle(
        self, wire: Wire, peer: tuple[str, int], local: tuple[str, int], implicit_tls: bool
    ) -> None:
        metrics = self.metrics
        metrics.connection_opened()
        connection: _Connection | None = None
        try:
            if self.config.proxy_protocol:
                addresses = await self._read_proxy_header(wire, peer, local)
                if addresses is None:
                    return
                peer, local = addresses
            session = Session(id=new_id(), hostname=self.app.hostname, peer=peer, local=local)
            engine = Engine(
                session,
                self.app.limits,
                tls_available=self.tls is not None,
                require_tls=self.require_tls,
            )
            connection = _Connection(self, wire, engine)
            self._connections.add(connection)
            with connection.cancel_scope:
                await connection.run(implicit_tls)
            if connection.cancel_scope.cancelled_caught:
                await connection.say_goodbye()
        except Exception:
            # A bug in one session must not take the server down with it.
            log.exception("session from %s failed", peer[0])
        finally:
            if connection is not None:
                self._connections.discard(connection)
                connection.transactions_ended()
            await wire.aclose()
            metrics.connection_closed()
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    async def _read_proxy_header(
        self, wire: Wire, peer: tuple[str, int], local: tuple[str, int]
    ) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """The PROXY protocol step, before the engine and before any TLS handshake.

        Gives the client's address and the one it connected to, as the proxy says; or None
        when the connection is to be closed without a greeting (logged). Whatever followed the
        header goes back to the wire, for the engine or the implicit TLS handshake.
        """
        config = self.config
        if not is_trusted(peer[0], config.proxy_trusted):
            self.metrics.proxy_errors += 1
            log.warning("connection from %s closed: not a trusted proxy (--proxy-trusted)", peer[0])
            return None
        try:
            header, rest = await read_proxy_header(wire.receive, config.proxy_timeout)
        except (ProxyError, anyio.ClosedResourceError, OSError) as exc:
            self.metrics.proxy_errors += 1
            log.info("connection from %s closed: %s", peer[0], exc)
            return None
        if rest:
            wire.unread(rest)
        return header.peer(peer), header.local(local)


@attrs.frozen
class _AppCall:
    """An App call that did not finish at once: awaiting this finishes it in the caller's task.

    The call was started by hand (``call.send(None)``) and stopped at ``waiting_on``, what its
    innermost await waits for (a future, a trio trap). Awaiting passes that on to the task's
    scheduler, then sends or throws the outcome into the call, until it returns.
    """

    event: Event
    call: Coroutine[Any, Any, Reply]
    waiting_on: Any

    def __await__(self) -> Generator[Any, Any, Reply]:
        call, waiting_on = self.call, self.waiting_on
        while True:
            try:
                try:
                    sent = yield waiting_on
                except BaseException as exc:  # cancellation included: passed on
                    waiting_on = call.throw(exc)
                else:
                    waiting_on = call.send(sent)
            except StopIteration as done:
                return cast(Reply, done.value)


class _Flush:
    """The replies are written, but the transport is full: wait until it takes them."""


_FLUSH = _Flush()

_Step = NeedData | _AppCall | _Flush | Event | StartTLS | Closed | BaseException


@attrs.define(eq=False)
class _Connection:
    """One client connection: the driving loop of the engine, with its clocks.

    The task waits in one of three ways: for the client's bytes (``_reading``), for a write
    to go out, or for the App. ``deadline`` is when the read or the write must be over;
    the server's clock calls :meth:`time_out` past it. The App is given all the time it
    takes (until a shutdown runs out of patience).
    """

    server: Server
    wire: Wire
    engine: Engine
    cancel_scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    deadline: float = _NEVER
    _reading: bool = False
    _timeout_reply: Reply = IDLE_TIMEOUT  # what a read that times out is answered
    _closing: Reply | None = None  # why the session is being ended from our side
    _session_deadline: float = attrs.field(init=False)
    _receiving: bool = False  # inside DATA/BDAT content at the last read
    _data_credit: float = 0.0  # seconds the content may still take (the data-rate deadline)
    _transaction_started: float = 0.0
    _read_started: float = 0.0
    _idle_timeout: float = attrs.field(init=False)  # the config's, read once per session
    _min_data_rate: float = attrs.field(init=False)
    _step: _Step | None = None  # what the task must do next, left by _read_inline
    _task: asyncio.Task[Any] | None = None  # the connection's task (asyncio only)
    _reading_inline: bool = False  # the task waits in _receive: _read_inline may take bytes

    def __attrs_post_init__(self) -> None:
        config = self.server.config
        cap = config.max_session_duration
        self._session_deadline = _now() + cap if cap is not None else _NEVER
        self._idle_timeout = config.idle_timeout
        self._min_data_rate = config.min_data_rate

    def interrupt(self, reply: Reply) -> None:
        """End the session with ``reply``: now if it waits for the client, else at its next
        read (an App call or a write in progress is let finish)."""
        self._closing = reply
        if self._reading:
            self.cancel_scope.cancel()

    def cancel(self) -> None:
        """End the session at once, whatever it is doing, without a last reply."""
        self._closing = None
        self.cancel_scope.cancel()

    def time_out(self) -> None:
        self.deadline = _NEVER
        if self._reading:
            self.interrupt(self._timeout_reply)
        else:
            # A write that does not go out: the client stopped reading, no reply would reach it.
            session = self.engine.session
            log.info("session %s from %s stopped reading", session.id, session.peer_host)
            self.cancel()

    async def say_goodbye(self) -> None:
        """After an interruption: the last reply, if the client will take it."""
        reply = self._closing
        if reply is None:
            return
        if reply is not SHUTTING_DOWN:
            session = self.engine.session
            log.info("session %s from %s: %s", session.id, session.peer_host, reply)
        self.engine.close(reply)
        with (
            anyio.move_on_after(1.0),
            contextlib.suppress(
                anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError
            ),
        ):
            await self.wire.send(self.engine.data_to_send())

    async def run(self, implicit_tls: bool) -> None:
        engine = self.engine
        session = engine.session
        try:
            if implicit_tls and not await self._start_tls(implicit=True):
                return
            if _is_protocol_wire(self.wire) and self.wire.can_enter_task:
                self._task = self.wire.current_task()
                self.wire.inline_reader = self._read_inline
            while True:
                step, self._step = self._step or self._advance(), None
                if step is NEED_DATA:
                    out = engine.data_to_send()
                    if out and not self.wire.write_nowait(out):
                        await self._send(b"")  # the transport is full: wait until it takes it
                    data = await self._receive()
                    if data is not None:
                        engine.receive_data(data)
                elif isinstance(step, _AppCall):
                    self._answer(step.event, await step)
                elif step is _FLUSH:
                    await self._send(b"")
                elif isinstance(step, Connect):
                    reply = await self.server.app(step)
                    engine.respond(reply)
                    delay = session.extras.get("greeting_delay")
                    if delay and 200 <= reply.code < 300:
                        await self._delay_greeting(float(delay))
                elif isinstance(step, StartTLS):
                    await self._send(engine.data_to_send())
                    if not await self._start_tls():
                        return
                elif isinstance(step, BaseException):
                    raise step  # from _read_inline, which runs outside this task
                else:
                    assert isinstance(step, Closed)
                    await self._send(engine.data_to_send())
                    return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            log.debug("session %s: connection lost: %r", session.id, exc)
        finally:
            if _is_protocol_wire(self.wire):
                self.wire.inline_reader = None

    def _advance(self) -> _Step:
        """Drive the engine as far as it goes without waiting.

        Stops when the engine needs the client's bytes (its replies are queued), or at what
        must be awaited: an App call that did not finish at once (most finish at once: the
        hooks and middleware of a typical App await nothing), the greeting, TLS, the end.
        """
        engine = self.engine
        server = self.server
        app = server.app
        while True:
            if server._stopping and not engine.in_transaction:
                engine.close(SHUTTING_DOWN)  # no-op once the engine is closed
            event = engine.next_event()
            if engine.finished:
                self.transactions_ended()
            if event is NEED_DATA or not isinstance(event, Event) or isinstance(event, Connect):
                return event
            call = app(event)
            try:
                waiting_on = call.send(None)
            except StopIteration as done:
                self._answer(event, done.value)
                continue
            return _AppCall(event, call, waiting_on)

    def _answer(self, event: Event, reply: Reply) -> None:
        self.engine.respond(reply)
        if isinstance(event, Mail):
            self._transaction_started = _now()

    def _read_inline(self, data: bytes) -> bool:
        """Take ``data`` from the asyncio Protocol's callback, while the task waits for it.

        The session goes on right here, without waking its task, for as long as it does not
        have to wait: the usual command, its App call and the reply cost no task switch. What
        must be awaited is left to the task (``_step``). False: not taken, the task will read
        it. App code run from here sees this connection's task as the current one.
        """
        if not self._reading_inline or self._closing is not None:
            return False
        wire: ProtocolWire = self.wire  # type: ignore[assignment]  # the only one calling this
        task = self._task
        try:
            wire.enter_task(task)  # type: ignore[arg-type]  # set before inline_reader
        except RuntimeError:  # called from within some task after all: the usual way then
            return False
        try:
            self._end_read(data)
            self.engine.receive_data(data)
            step = self._advance()
            if step is NEED_DATA:
                out = self.engine.data_to_send()
                if out and not wire.write_nowait(out):
                    self._step = _FLUSH  # the transport is full: the task waits for it
                else:
                    self._begin_read()
                    return True
            else:
                self._step = step
        except BaseException as exc:  # raised in the task, not in the loop
            self._step = exc
        finally:
            wire.leave_task(task)  # type: ignore[arg-type]
        self._reading_inline = False
        wire.wake()
        return True

    async def _send(self, out: bytes) -> None:
        # A client that does not read its replies must not hold the slot forever.
        self.deadline = _now() + self._idle_timeout
        try:
            await self.wire.send(out)
        finally:
            self.deadline = _NEVER

    async def _receive(self) -> bytes | None:
        """The client's next bytes (``b""`` at its EOF), or None when there are none to feed:
        the engine was closed instead (the server is shutting down), or :meth:`_read_inline`
        fed them and left a step to the task."""
        if self._closing is not None:
            self.engine.close(self._closing)
            return None
        self._begin_read()
        self._reading_inline = True
        try:
            data = await self.wire.receive()
        finally:
            self._reading_inline = False
            if self._step is None:
                self._reading = False
                self.deadline = _NEVER
        if self._step is not None:
            return None
        self._end_read(data)
        return data

    def _begin_read(self) -> None:
        """Set the deadline of the read about to start (the server's clock enforces it)."""
        started = self._read_started = _now()
        if self._min_data_rate and self.engine.receiving_data:
            if not self._receiving:
                self._receiving = True
                self._data_credit = self._idle_timeout
            deadline, reply = started + self._data_credit, DATA_TOO_SLOW
        else:
            self._receiving = False
            deadline, reply = started + self._idle_timeout, IDLE_TIMEOUT
        if self._session_deadline < deadline:
            deadline, reply = self._session_deadline, SESSION_TOO_LONG
        self.deadline = deadline
        self._timeout_reply = reply
        self._reading = True

    def _end_read(self, data: bytes) -> None:
        self._reading = False
        self.deadline = _NEVER
        self.server.metrics.bytes_received += len(data)
        if self._receiving:
            credit = self._data_credit - (_now() - self._read_started)
            credit += len(data) / self._min_data_rate
            self._data_credit = min(self._idle_timeout, credit)

    async def _delay_greeting(self, delay: float) -> None:
        """Hold the greeting back for ``delay`` seconds; a client that talks first is refused.

        This is the hook for "early talker" checks (spambots that do not wait for the 220):
        an ``on_connect`` hook or middleware sets ``session.extras["greeting_delay"]`` to a
        number of seconds. If the client sends anything before the delay is over, it gets
        ``554 5.5.1 Protocol error: talked before greeting`` instead of the greeting and the
        connection is closed; otherwise the greeting goes out and the session goes on.
        """
        deadline = _now() + delay
        data: bytes | None = None
        self._reading = True  # the server may interrupt the wait
        try:
            # uvloop's timers round to the millisecond and may fire a little early: the
            # monotonic clock decides, so the greeting is held back the full delay.
            while data is None and (left := deadline - _now()) > 0:
                with anyio.move_on_after(left):
                    data = await self.wire.receive()
        finally:
            self._reading = False
        if data is None:
            return  # a quiet client: the greeting goes out
        self.engine.data_to_send()  # the greeting is never sent
        session = self.engine.session
        if data:
            log.info("session %s from %s talked before the greeting", session.id, session.peer_host)
            self.engine.close(TALKED_FIRST)
        else:
            self.engine.close()

    async def _start_tls(self, implicit: bool = False) -> bool:
        """The handshake, for STARTTLS or on the implicit TLS port; False if it failed."""
        tls = self.server.tls
        assert tls is not None, "the engine offers STARTTLS only with a certificate"
        session = self.engine.session
        try:
            info = await self.wire.start_tls(tls)
        except TLSHandshakeFailed as exc:
            log.info(
                "session %s: TLS handshake with %s failed: %s", session.id, session.peer_host, exc
            )
            return False
        self.server.metrics.tls_sessions += 1
        if implicit:
            # The session starts encrypted, before the greeting: nothing to reset.
            session.tls = info
        else:
            self.engine.tls_started(info)
        return True

    def transactions_ended(self) -> None:
        """Count and log the transactions the engine has ended since the last call.

        The engine reports every one, whoever ended it: the App's answer to the content, a
        refusal of its own (too big, bad line endings), an RSET or a lost connection (no
        reply code: abandoned). One INFO line each.
        """
        engine = self.engine
        finished, engine.finished = engine.finished, []
        metrics = self.server.metrics
        session = engine.session
        for transaction in finished:
            code = transaction.reply_code
            if code is None:
                metrics.transactions_abandoned += 1
            else:
                metrics.transaction_finished(code)
            if log.isEnabledFor(logging.INFO):
                duration = _now() - self._transaction_started
                _transaction_line(transaction_line(session, transaction, duration))


def _running_asyncio() -> bool:
    asyncio = sys.modules.get("asyncio")  # not imported: not running (trio need not load it)
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _is_protocol_wire(wire: Wire) -> TypeGuard[ProtocolWire]:
    # Its module is imported on the asyncio path only: no module, no ProtocolWire.
    module = sys.modules.get("minismtp.asyncio_wire")
    return module is not None and isinstance(wire, module.ProtocolWire)


def _ip_address(address: Any) -> tuple[str, int]:
    if isinstance(address, tuple):
        if len(address) == 4 and address[3]:  # IPv6 with a scope (link-local), as anyio says it
            return (f"{address[0].split('%')[0]}%{address[3]}", int(address[1]))
        return (str(address[0]), int(address[1]))
    return (str(address), 0)  # a UNIX socket path


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
    port: int = 25,
    *,
    tls: TLSConfig | None = None,
    tls_port: int | None = None,
    require_tls: bool = False,
    config: ServerConfig | None = None,
    metrics: Metrics | None = None,
    sockets: Sequence[socket.socket] = (),
    tls_sockets: Sequence[socket.socket] = (),
) -> AsyncIterator[Server]:
    """Serve ``app`` on ``host:port`` (and implicit TLS on ``tls_port``) for the ``with`` block.

    The listeners are bound before the App's startup hooks run (a port in use fails fast
    with :class:`OSError`). Leaving the block stops the server gracefully unless
    :meth:`Server.stop` already did; leaving it with an exception stops it at once.

    ``sockets`` and ``tls_sockets`` are listening sockets bound already (a worker process
    inherits them from ``minismtp run --workers``); with them, ``port`` and ``tls_port`` are
    not bound. The counters go to ``metrics``, by default the App's own (``app.metrics``) if
    it has one.
    """
    if (tls_port is not None or tls_sockets) and tls is None:
        raise ValueError("implicit TLS (tls_port) needs a certificate")
    if require_tls and tls is None:
        raise ValueError("require_tls needs a certificate")
    if metrics is None:
        metrics = getattr(app, "metrics", None)
    if not isinstance(metrics, Metrics):
        metrics = Metrics()
    server = Server(app, config or ServerConfig(), tls, require_tls, metrics)
    try:
        if sockets:
            for sock in sockets:
                server._listeners.append((await SocketListener.from_socket(sock), False))
            for sock in tls_sockets:
                server._listeners.append((await SocketListener.from_socket(sock), True))
        else:
            server._listeners += await _bind(host, port, False)
            if tls_port is not None:
                server._listeners += await _bind(host, tls_port, True)
        for listener, implicit_tls in server._listeners:
            address = _ip_address(listener.extra(SocketAttribute.local_address))
            (server.tls_addresses if implicit_tls else server.addresses).append(address)
        async with app.serving(), anyio.create_task_group() as connections:
            await connections.start(server._watch_clocks)
            start_session: _StartSession = connections.start_soon
            if not _running_asyncio():
                start_session = await connections.start(server._trio_sessions)
            await connections.start(server._accept_all, start_session)
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
    """

    host: str
    port: int
    domain: str
    timeout: float | None = None
    buffer_size: int | None = None
    certs_path: str | os.PathLike[str] | None = None
    key_path: str | os.PathLike[str] | None = None
    app: ServableApp | None = None
    _running: AbstractAsyncContextManager[Server] | None = attrs.field(default=None, init=False)

    def start(self) -> AbstractAsyncContextManager[Server]:
        defaults = ServerConfig()
        config = ServerConfig(
            idle_timeout=self.timeout if self.timeout is not None else defaults.idle_timeout,
            read_size=self.buffer_size or defaults.read_size,
        )
        tls = TLSConfig(self.certs_path, self.key_path) if self.certs_path is not None else None
        app = self.app if self.app is not None else App(hostname=self.domain)
        return serve(app, self.host, self.port, tls=tls, config=config)

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


__all__: Sequence[str] = ["ServableApp", "Server", "ServerConfig", "SmtpServer", "serve"]
