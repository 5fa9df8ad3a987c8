"""One connection's driver: the engine fed from a wire, its events answered by the App.

The same driver runs every connection of the network server (:mod:`minismtp.server`) and
every session of the in-memory :class:`~minismtp.testing.TestClient`. It does not import the
server: what it needs of whoever accepted the connection is the small :class:`Host` interface
(the App, the settings, the TLS certificate, the counters, and whether a shutdown is under
way), so the server's lifecycle and one connection's dialogue can be read apart.

Invariants:

- The driver never parses SMTP: every byte read goes to the engine, every byte written comes
  from it; every event the engine gives that is not its own business (``StartTLS``,
  ``Closed``) goes to the App as it is and the App's reply goes back to the engine.
- The connection waits in one of three ways: for the client's bytes (``_reading``), for a
  write to go out, or for the App. ``deadline`` is when the read or the write must be over;
  the server's clock calls :meth:`Connection.time_out` past it. The App is given all the
  time it takes (until a shutdown runs out of patience).
- A connection whose ``Connect`` event reached the App gets exactly one ``Disconnect``
  (:meth:`Connection.finish`), whatever ended it: QUIT, a timeout, a reset, a shutdown, a
  refusal, an exception. A connection closed before that (the server full, a bad PROXY
  header, too many from the client it names, a failed implicit TLS handshake) gets neither.
- :meth:`Connection.finish` ends the engine's open transaction (``engine.close()``), so what
  the transaction holds is released on every path.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from minismtp.events import Connect, Disconnect, Event, Mail
from minismtp.host import FastPath, Host, ServableApp
from minismtp.ids import new_id
from minismtp.logs import InfoLine, transaction_line
from minismtp.protocol import NEED_DATA, Closed, Engine, NeedData, StartTLS
from minismtp.proxy import proxy_addresses
from minismtp.replies import (
    DATA_TOO_SLOW,
    IDLE_TIMEOUT,
    SESSION_TOO_LONG,
    SHUTTING_DOWN,
    TALKED_FIRST,
)
from minismtp.suspended import Suspended
from minismtp.tls import TLSHandshakeFailed
from minismtp.types import Reply, Session
from minismtp.wires import Wire

# The server's logger: its per-transaction line is what operators grep for.
log = logging.getLogger("minismtp.server")
_transaction_line = InfoLine(log)

_NEVER = float("inf")
# Session deadlines are ours alone (set here, checked by the server's clock task), so the
# cheapest monotonic clock will do: anyio.current_time() looks the backend up on every call.
_now = time.monotonic
# What a lost connection raises, whichever wire carries it.
_LOST = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError)


@attrs.frozen
class _AppCall:
    """An App call that waits: the event it answers and the rest of the call."""

    event: Event
    rest: Suspended


class _Flush:
    """The replies are written, but the transport is full: wait until it takes them."""


_FLUSH = _Flush()

# What the task does next: read, finish an App call, flush, greet, TLS, end; or raise what
# the fast path ran into outside the task.
_Step = NeedData | _AppCall | _Flush | Event | StartTLS | Closed | BaseException


@attrs.define(eq=False)
class Connection:
    """One client connection: the driving loop of the engine, with its clocks."""

    host: Host
    wire: Wire
    engine: Engine
    fast_path: FastPath | None = None
    #: Whether the greeting may be held back (``Session.greeting_delay``): the test client
    #: has no clock to hold it with.
    hold_greeting: bool = True
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
    _step: _Step | None = None  # what the task must do next, left by the fast path
    _waiting_inline: bool = False  # the task waits in _receive: the fast path may feed it
    _app_saw_connect: bool = False  # the App got Connect: it gets Disconnect too

    def __attrs_post_init__(self) -> None:
        config = self.host.config
        cap = config.max_session_duration
        self._session_deadline = _now() + cap if cap is not None else _NEVER
        self._idle_timeout = self.host.idle_timeout
        self._min_data_rate = config.min_data_rate

    @classmethod
    def new(
        cls,
        host: Host,
        wire: Wire,
        peer: tuple[str, int],
        local: tuple[str, int],
        **options: Any,
    ) -> Connection:
        """A connection from ``peer`` to ``local``, with a new session and engine."""
        app = host.app
        if not peer[0]:
            # A unix-domain socket's client has no address: the socket stands for it.
            peer = local
        session = Session(id=new_id(), hostname=app.hostname, peer=peer, local=local)
        engine = Engine(
            session,
            app.limits,
            tls_available=host.tls is not None,
            require_tls=host.require_tls,
            lmtp=host.config.lmtp,
        )
        return cls(host, wire, engine, **options)

    @property
    def session(self) -> Session:
        return self.engine.session

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

    def hurry(self, timeout: float) -> None:
        """The server came under stress: the read under way ends ``timeout`` after it began,
        at the latest, as if it had begun under stress."""
        if self._reading and self.deadline < _NEVER:
            self.deadline = min(self.deadline, self._read_started + timeout)

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
        with anyio.move_on_after(1.0), contextlib.suppress(*_LOST):
            await self.wire.send(self.engine.data_to_send())

    async def run(self, implicit_tls: bool = False) -> None:
        """The dialogue, until the engine closes or the connection is lost."""
        engine = self.engine
        session = engine.session
        app = self.host.app
        try:
            if implicit_tls and not await self._start_tls(implicit=True):
                return
            if self.fast_path is not None:
                self.fast_path.attach(self)
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
                    self._answer(step.event, await step.rest)
                elif step is _FLUSH:
                    await self._send(b"")
                elif isinstance(step, Connect):
                    self._app_saw_connect = True
                    reply = await app(step)
                    engine.respond(reply)
                    delay = session.greeting_delay
                    if delay > 0 and self.hold_greeting and 200 <= reply.code < 300:
                        await self._delay_greeting(delay)
                elif isinstance(step, StartTLS):
                    await self._send(engine.data_to_send())
                    if not await self._start_tls():
                        return
                elif isinstance(step, BaseException):
                    raise step  # from the fast path, which runs outside this task
                else:
                    assert isinstance(step, Closed)
                    await self._send(engine.data_to_send())
                    return
        except _LOST as exc:
            log.debug("session %s: connection lost: %r", session.id, exc)
        finally:
            if self.fast_path is not None:
                self.fast_path.detach()

    async def finish(self) -> None:
        """The end of the connection, on every path: the engine closed (its open transaction
        ends), the transactions counted and logged, and the App's ``Disconnect``."""
        engine = self.engine
        if not engine.closed:
            engine.close()
        self.transactions_ended()
        if not self._app_saw_connect:
            return
        self._app_saw_connect = False  # exactly once
        # Shielded: a connection cancelled at shutdown still tells the App; bounded: a hook
        # that hangs does not hold the shutdown.
        with anyio.move_on_after(self.host.config.shutdown_cancel_after, shield=True):
            await self.host.app(Disconnect(engine.session))

    def _advance(self) -> _Step:
        """Drive the engine as far as it goes without waiting.

        Stops when the engine needs the client's bytes (its replies are queued), or at what
        must be awaited: an App call that did not finish at once, the greeting, TLS, the end.
        """
        engine = self.engine
        host = self.host
        app = host.app
        while True:
            if host.stopping and not engine.in_transaction:
                engine.close(SHUTTING_DOWN)  # no-op once the engine is closed
            event = engine.next_event()
            if engine.finished:
                self.transactions_ended()
            if event is NEED_DATA or not isinstance(event, Event) or isinstance(event, Connect):
                return event
            reply = app.answer_now(event)
            if reply is not None:
                self._answer(event, reply)
                continue
            call = app(event)
            try:
                waiting_on = call.send(None)
            except StopIteration as done:
                self._answer(event, done.value)
                continue
            return _AppCall(event, Suspended(call, waiting_on))

    def _answer(self, event: Event, reply: Reply) -> None:
        self.engine.respond(reply)
        if isinstance(event, Mail):
            self._transaction_started = _now()

    # -- the fast path's entry (see FastPath) -------------------------------------------------

    def feed_nowait(self, data: bytes) -> bool | None:
        """Take ``data`` while the task waits to read, and go on as far as that needs no
        waiting: the usual command, its App call and the reply. None: not taken (the task
        is not waiting in a read the fast path may feed, or the session is ending): the task
        will read it. False: taken, and the task goes on waiting to read. True: taken, and
        the task must now be woken for what is left (its step). Never raises: an exception
        becomes the task's step, raised there."""
        if not self._waiting_inline or self._closing is not None:
            return None
        wire = self.wire
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
                    return False
            else:
                self._step = step
        except BaseException as exc:  # raised in the task, not in the loop
            self._step = exc
        self._waiting_inline = False
        return True

    # -- reads and writes, with their deadlines -----------------------------------------------

    async def _send(self, out: bytes) -> None:
        # A client that does not read its replies must not hold the slot forever.
        self.deadline = _now() + self._idle_timeout
        try:
            await self.wire.send(out)
        finally:
            self.deadline = _NEVER

    async def _receive(self) -> bytes | None:
        """The client's next bytes (``b""`` at its EOF), or None when there are none to feed:
        the engine was closed instead (the server is shutting down), or the fast path fed
        them and left a step to the task (it then wakes the read with ``b""``)."""
        if self._closing is not None:
            self.engine.close(self._closing)
            return None
        self._begin_read()
        self._waiting_inline = self.fast_path is not None
        try:
            data = await self.wire.receive()
        finally:
            self._waiting_inline = False
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
        idle = self._idle_timeout = self.host.idle_timeout  # shorter while under stress
        if self._min_data_rate and self.engine.receiving_data:
            credit = min(self._data_credit, idle) if self._receiving else idle
            self._data_credit = credit
            self._receiving = True
            deadline, reply = started + credit, DATA_TOO_SLOW
        else:
            self._receiving = False
            deadline, reply = started + idle, IDLE_TIMEOUT
        if self._session_deadline < deadline:
            deadline, reply = self._session_deadline, SESSION_TOO_LONG
        self.deadline = deadline
        self._timeout_reply = reply
        self._reading = True

    def _end_read(self, data: bytes) -> None:
        self._reading = False
        self.deadline = _NEVER
        self.host.metrics.bytes_received += len(data)
        if self._receiving:
            credit = self._data_credit - (_now() - self._read_started)
            credit += len(data) / self._min_data_rate
            self._data_credit = min(self._idle_timeout, credit)

    async def _delay_greeting(self, delay: float) -> None:
        """Hold the greeting back for ``delay`` seconds; a client that talks first is refused.

        This is the hook for "early talker" checks (spambots that do not wait for the 220):
        an ``on_connect`` hook or middleware sets ``session.greeting_delay``. If the client
        sends anything before the delay is over, it gets ``554 5.5.1 Protocol error: talked
        before greeting`` instead of the greeting and the connection is closed; otherwise
        the greeting goes out and the session goes on.
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
        tls = self.host.tls
        assert tls is not None, "the engine offers STARTTLS only with a certificate"
        session = self.engine.session
        try:
            info = await self.wire.start_tls(tls)
        except TLSHandshakeFailed as exc:
            log.info(
                "session %s: TLS handshake with %s failed: %s", session.id, session.peer_host, exc
            )
            return False
        self.host.metrics.tls_sessions += 1
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
        metrics = self.host.metrics
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


async def serve_connection(
    host: Host,
    wire: Wire,
    peer: tuple[str, int],
    local: tuple[str, int],
    implicit_tls: bool = False,
    fast_path: FastPath | None = None,
    admit_client: Callable[[tuple[str, int]], Reply | None] | None = None,
) -> None:
    """Serve one accepted connection to its end; the wire is closed on return.

    The PROXY header first when the host expects one (then ``admit_client`` with the client
    it names: a reply refuses the connection, sent and closed), then the dialogue inside the
    connection's cancel scope (timeouts and shutdown cancel it, and a last reply follows),
    then :meth:`Connection.finish`.
    """
    connection: Connection | None = None
    try:
        config = host.config
        if config.proxy_protocol:
            addresses = await proxy_addresses(
                wire, peer, local, config.proxy_trusted, config.proxy_timeout
            )
            if addresses is None:
                host.metrics.proxy_errors += 1
                return
            peer, local = addresses
            refusal = admit_client(peer) if admit_client is not None else None
            if refusal is not None:
                if not implicit_tls:  # on the TLS port a plaintext reply would be noise
                    with anyio.move_on_after(1.0), contextlib.suppress(*_LOST):
                        await wire.send(bytes(refusal))
                return
        connection = Connection.new(host, wire, peer, local, fast_path=fast_path)
        host.track(connection)
        with connection.cancel_scope:
            await connection.run(implicit_tls)
        if connection.cancel_scope.cancelled_caught:
            await connection.say_goodbye()
    except Exception:
        # A bug in one session must not take the server down with it.
        log.exception("session from %s failed", peer[0])
    finally:
        if connection is not None:
            host.untrack(connection)
            try:
                await connection.finish()
            except Exception:
                log.exception("session from %s: ending it failed", peer[0])
        with anyio.CancelScope(shield=True):
            await wire.aclose()


__all__ = ["Connection", "FastPath", "Host", "ServableApp", "serve_connection"]
