"""The App: hooks, a middleware stack, the terminal handler and the message channel.

An :class:`App` is a handler, ``async (event) -> Reply``. Calling it runs the middleware stack
(the last added runs first, as in Starlette), then the router, which calls the hooks of the
event's stage. The terminal handler writes each :class:`~minismtp.events.DataChunk` into the
transaction's :class:`~minismtp.message.Message` (made at the first chunk, our ``Received:``
header first, in a spool: memory, then a file); at the :class:`~minismtp.events.Data` event it
hands the message over (a store, or the channel) and only then answers
``250 2.0.0 OK queued as <id>``.

The hook registry the App is built on is :mod:`minismtp.hooks`; the hand-over itself,
per-recipient outcomes included, is :mod:`minismtp.handoff`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from minismtp import spool
from minismtp.events import (
    Connect,
    Data,
    DataChunk,
    Disconnect,
    Event,
    Handler,
    Helo,
    Mail,
    Rcpt,
)
from minismtp.handoff import consume, hand_over
from minismtp.hooks import (
    ConnectHook,
    DataChunkHook,
    DataHook,
    HeloHook,
    HookResult,
    Hooks,
    LifespanHook,
    MailHook,
    MessageHook,
    RcptHook,
    call_each,
    resolve,
    resolve_data,
)
from minismtp.ids import new_id
from minismtp.message import Message
from minismtp.metrics import Metrics
from minismtp.middleware import Middleware, MiddlewareFactory, acts_on, build_stacks
from minismtp.outcomes import record_recipient_replies
from minismtp.protocol import Limits
from minismtp.received import received_header
from minismtp.replies import LOCAL_ERROR
from minismtp.spool import Spool
from minismtp.stores import Store
from minismtp.stores.maildir import Maildir
from minismtp.types import Reply, Session, Transaction

logger = logging.getLogger("minismtp.app")

MAIL_OK = Reply(250, "2.1.0", "OK")
RCPT_OK = Reply(250, "2.1.5", "OK")
CHUNK_OK = Reply(250, "2.0.0", "OK")  # a DataChunk taken: the engine sends nothing for it
#: The answer when a chunk cannot be spooled (a full disk): the client keeps the message.
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
DISCONNECTED = Reply(221, "2.0.0", "Closed")  # the answer to Disconnect, which nobody sends

P = ParamSpec("P")
# A stage's hooks, and the App's own answer to its events when there are none.
_Immediate = tuple[list[Any], Callable[[Any], Reply]]


class App(Hooks):
    """An SMTP application: ``App(hostname="mx.example.com")``.

    ``store`` (a :class:`~minismtp.stores.Store`) keeps every accepted message durably before
    the ``250`` (and passes it to ``on_message`` consumers too, if there are any);
    ``maildir=path`` is short for ``store=Maildir(path)``. Without a store, messages go on the
    unbounded channel whose receiving end is :attr:`messages`. ``limits`` (or the shortcuts
    ``max_size``, ``max_recipients`` and ``spool_memory``) are what the server enforces per
    session. A message's content stays in memory up to ``limits.spool_memory`` octets, then
    goes to a file: in the store's ``spool_dir`` (a Maildir's ``tmp/``), else in
    ``spool_dir`` (default: the system's temporary directory).
    """

    # A hand-written __init__: the limit shortcuts and the precomputed replies do not fit
    # attrs' one-field-per-argument model.
    def __init__(
        self,
        hostname: str = "localhost",
        maildir: str | os.PathLike[str] | Maildir | None = None,
        limits: Limits | None = None,
        *,
        store: Store | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        max_size: int | None = None,
        max_recipients: int | None = None,
        spool_memory: int | None = None,
    ) -> None:
        limits = limits or Limits()
        if max_size is not None:
            limits = attrs.evolve(limits, max_message_size=max_size)
        if max_recipients is not None:
            limits = attrs.evolve(limits, max_recipients=max_recipients)
        if spool_memory is not None:
            limits = attrs.evolve(limits, spool_memory=spool_memory)
        self.limits = limits
        if maildir is not None:
            if store is not None:
                raise ValueError("give a store or a maildir, not both")
            store = maildir if isinstance(maildir, Maildir) else Maildir(maildir)
        self.store: Store | None = store
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._spool_where: tuple[Path | None, bool] | None = None  # while serving
        self.hostname = hostname
        super().__init__()  # the hook lists
        self._middleware: list[Middleware[Any]] = []
        # Built at the first event: the stack per event class, and for any other class.
        self._stacks: dict[type[Event], Handler] = {}
        self._stack: Handler | None = None
        # Built with the stacks: per event class, the App's answer when it need not wait.
        self._immediate: dict[type[Event], _Immediate] = {}
        self._routes: dict[type[Event], Callable[[Any], Awaitable[Reply]]] = {
            Connect: self._on_connect,
            Helo: self._on_helo,
            Mail: self._on_mail,
            Rcpt: self._on_rcpt,
            DataChunk: self._on_data_chunk,
            Data: self._on_data,
            Disconnect: self._on_disconnect,
        }
        self._send: MemoryObjectSendStream[Message]
        self._receive: MemoryObjectReceiveStream[Message]
        self._open_channel()
        #: Counters and gauges of this App's server (hook errors are counted here).
        self.metrics = Metrics(channel_depth=self._channel_depth)
        self._serving = False

    # -- configuration ------------------------------------------------------------------------

    @property
    def maildir(self) -> Maildir | None:
        """The store, when it is a Maildir."""
        return self.store if isinstance(self.store, Maildir) else None

    @property
    def hostname(self) -> str:
        return self._hostname

    @hostname.setter
    def hostname(self, hostname: str) -> None:
        self._hostname = hostname
        self._greeting = Reply(220, None, f"{hostname} ESMTP")
        self._lmtp_greeting = Reply(220, None, f"{hostname} LMTP")
        self._helo_reply = Reply(250, None, hostname)
        self._ehlo_replies: dict[tuple[str, ...], Reply] = {}

    @property
    def messages(self) -> MemoryObjectReceiveStream[Message]:
        """The receiving end of the channel of accepted messages (unbounded).

        Without ``on_message`` consumers, accepted messages wait here for the user. When
        :meth:`serving` ends, the sending end is closed: reading goes on until the messages
        accepted so far are consumed, then ends. A new serving period opens a new channel.
        """
        return self._receive

    def add_middleware(
        self, middleware: MiddlewareFactory[P], /, *args: P.args, **options: P.kwargs
    ) -> None:
        """Wrap the App in ``middleware(app, **options)``; the last added runs first."""
        if self._stack is not None:
            raise RuntimeError("cannot add middleware after the App has started handling events")
        self._middleware.append(Middleware(middleware, args, options, acts_on(middleware)))

    # -- the handler --------------------------------------------------------------------------

    async def handle(self, event: Event, *, raise_exceptions: bool = False) -> Reply:
        """Answer ``event``: middleware, then hooks, then (for Data) the hand-over.

        Never raises, except cancellation: an exception from a hook or middleware is logged
        and answered :data:`LOCAL_ERROR`. ``raise_exceptions`` lets it propagate instead (the
        test client uses it, so a failing hook fails the test).
        """
        stack = self._stack or self._build_stack()
        try:
            return await self._stacks.get(type(event), stack)(event)
        except Exception:
            if raise_exceptions:
                raise
            return self._failed(event)

    __call__ = handle

    def answer_now(self, event: Event, *, raise_exceptions: bool = False) -> Reply | None:
        """The reply :meth:`handle` would give ``event``, when the App can give it without
        waiting; else None (then await :meth:`handle`, which has not been called).

        That is so for the events of a stage with no hooks that no middleware acts on (see
        ``acts_on``): a ``DataChunk`` without ``on_data_chunk`` hooks is written into the
        spool, a ``MAIL`` without ``on_mail`` hooks is accepted. The connection driver asks
        here first: an App call that is a coroutine costs a few microseconds even when it
        never waits, and content arrives in several chunks per message.
        """
        if self._stack is None:
            self._build_stack()
        immediate = self._immediate.get(type(event))
        if immediate is None:
            return None
        hooks, answer = immediate
        if hooks:  # registered since the stack was built
            return None
        try:
            return answer(event)
        except Exception:
            if raise_exceptions:
                raise
            return self._failed(event)

    def _failed(self, event: Event) -> Reply:
        self.metrics.hook_errors += 1
        logger.exception(
            "error while handling %s from %s (session %s)",
            type(event).__name__,
            event.session.peer_host,
            event.session.id,
        )
        return LOCAL_ERROR

    def _build_stack(self) -> Handler:
        """Build the middleware once (see :func:`~minismtp.middleware.build_stacks`), and the
        answers given without an App call: at the stages no middleware acts on."""
        self._stacks, self._stack = stacks, stack = build_stacks(
            self._middleware, self._routes, self._route
        )
        self._immediate = {
            kind: immediate
            for kind, immediate in self._answers_without_hooks().items()
            if stacks.get(kind) is self._routes[kind]
        }
        return stack

    def _answers_without_hooks(self) -> dict[type[Event], _Immediate]:
        """Per stage that has them: its hooks, and the App's own answer when there are none."""
        return {
            Helo: (self._helo_hooks, self._greet),
            Mail: (self._mail_hooks, lambda event: MAIL_OK),
            Rcpt: (self._rcpt_hooks, lambda event: RCPT_OK),
            DataChunk: (self._data_chunk_hooks, self._spool_chunk),
        }

    def _route(self, event: Event) -> Awaitable[Reply]:
        # Not a coroutine itself: the hooks' coroutine is what the middleware awaits.
        route = self._routes.get(type(event))
        if route is None:
            raise TypeError(f"not an event the App answers: {event!r}")
        return route(event)

    async def _on_connect(self, event: Connect) -> Reply:
        for hook in self._connect_hooks:
            result = hook(event.session)
            if result is not None and (reply := await resolve(result)) is not None:
                return reply
        return self._lmtp_greeting if event.session.lmtp else self._greeting

    async def _on_helo(self, event: Helo) -> Reply:
        for hook in self._helo_hooks:
            result = hook(event.session, event.name)
            if result is not None and (reply := await resolve(result)) is not None:
                return reply
        return self._greet(event)

    def _greet(self, event: Helo) -> Reply:
        """The reply to HELO or EHLO, the extensions the engine offers listed."""
        if not event.esmtp:
            return self._helo_reply
        keywords = event.keywords
        reply = self._ehlo_replies.get(keywords)
        if reply is None:
            reply = Reply(250, None, (self._hostname, *keywords))
            if len(self._ehlo_replies) < 16:  # a handful of keyword sets: with/without TLS
                self._ehlo_replies[keywords] = reply
        return reply

    async def _on_mail(self, event: Mail) -> Reply:
        for hook in self._mail_hooks:
            result = hook(event.transaction, event.address)
            if result is not None and (reply := await resolve(result)) is not None:
                return reply
        return MAIL_OK

    async def _on_rcpt(self, event: Rcpt) -> Reply:
        for hook in self._rcpt_hooks:
            result = hook(event.transaction, event.address)
            if result is not None and (reply := await resolve(result)) is not None:
                return reply
        return RCPT_OK

    async def _on_data_chunk(self, event: DataChunk) -> Reply:
        transaction = event.transaction
        chunk = event.chunk
        for hook in self._data_chunk_hooks:
            result = hook(transaction, chunk)
            if result is not None and (reply := await resolve(result)) is not None:
                return reply
        return self._spool_chunk(event)

    def _spool_chunk(self, event: DataChunk) -> Reply:
        """Write the chunk into the transaction's message, made at the first chunk."""
        transaction = event.transaction
        message = transaction.message
        try:
            if message is None:
                message = transaction.message = self.build_message(event.session, transaction)
            message.write(event.chunk)
        except OSError as exc:
            # A full disk: the client keeps the message and tries again later; the spool is
            # closed already, and the session goes on.
            logger.error("could not spool a message from %s: %s", event.session.peer_host, exc)
            return INSUFFICIENT_STORAGE
        return CHUNK_OK

    async def _on_data(self, event: Data) -> Reply:
        message = event.message
        try:
            message.spool.finish()  # the last pieces into the file, or joined in memory
        except OSError as exc:
            logger.error("could not spool message %s: %s", message.id, exc)
            return INSUFFICIENT_STORAGE
        transaction = event.transaction
        for hook in self._data_hooks:
            result = hook(transaction, message)
            if result is not None and (outcome := await resolve_data(result)) is not None:
                if isinstance(outcome, Reply):
                    return outcome
                if outcome:
                    record_recipient_replies(transaction, outcome, hook)
        return await hand_over(self, event, message)

    async def _on_disconnect(self, event: Disconnect) -> Reply:
        for hook in self._disconnect_hooks:
            await resolve(hook(event.session))
        return DISCONNECTED

    # -- the terminal handler -----------------------------------------------------------------

    def build_message(self, session: Session, transaction: Transaction) -> Message:
        """A new Message for ``transaction``'s content: a new id, and our ``Received:``
        header (RFC 5321 4.4) first in its spool."""
        message_id = new_id()
        now = time.time()
        trace = received_header(session, transaction, message_id, by=self._hostname, when=now)
        directory, lock = self._spool_where or self._spool_place()
        body = Spool(directory, self.limits.spool_memory, lock)
        body.write(trace)
        # Positional: with keywords, attrs' __init__ of many fields costs twice as much.
        return Message(
            message_id,  # id
            transaction.mail_from,
            tuple(transaction.rcpt_to),
            session.peer,
            session.helo_name,
            session.tls,
            now,  # received_at
            transaction.mail_params,
            tuple(transaction.rcpt_params),
            body,
            len(trace),  # trace_length
        )

    def _spool_place(self) -> tuple[Path | None, bool]:
        """Where spool files go, and whether they are locked while in use (outside a store's
        own directory, where other processes' start-up cleans by lock); kept while serving."""
        store = self.store
        directory = store.spool_dir if store is not None else None
        if directory is not None:
            return directory, False
        return self.spool_dir, True

    # -- serving ------------------------------------------------------------------------------

    def _channel_depth(self) -> int:
        return self._receive.statistics().current_buffer_used

    def _open_channel(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Message](math.inf)
        self._channel_closed = False

    @asynccontextmanager
    async def serving(self, *, raise_exceptions: bool = False) -> AsyncIterator[App]:
        """The App's serving period: the server (or test client) handles events inside it.

        On entry: the store is opened (a Maildir's folders created), the spool directory is
        created or cleaned of files left by processes no longer running, startup hooks run and
        the ``on_message`` consumer starts. On exit: the channel is closed, the consumer
        drains every message accepted so far, then shutdown hooks run and the store closes.
        With ``raise_exceptions`` an exception from an ``on_message`` hook is raised on exit
        instead of being logged. The drain happens on a normal exit (a graceful shutdown); if
        the serving period is cancelled, the consumer is cancelled with it and what it had not
        taken yet stays on :attr:`messages`.
        """
        if self._serving:
            raise RuntimeError("this App is serving already")
        self._serving = True
        try:
            if self._channel_closed:
                self._open_channel()
            await self._open_storage()
            self._spool_where = self._spool_place()
            await call_each(self._startup_hooks)
            consumer_errors: list[Exception] = []
            body_error: Exception | None = None
            try:
                async with anyio.create_task_group() as tasks:
                    if self._message_hooks:
                        tasks.start_soon(
                            consume,
                            self._receive,
                            self._message_hooks,
                            raise_exceptions,
                            consumer_errors,
                        )
                    try:
                        yield self
                    except Exception as exc:
                        # Raised again outside the task group, which would wrap it in a group.
                        body_error = exc
                    finally:
                        self._send.close()
                        self._channel_closed = True
                if body_error is not None:
                    raise body_error
            finally:
                try:
                    await call_each(self._shutdown_hooks)
                finally:
                    if self.store is not None:
                        await self.store.close()
            if consumer_errors:
                raise consumer_errors[0]
        finally:
            self._serving = False
            self._spool_where = None

    async def _open_storage(self) -> None:
        """Open the store; create the spool directory, or clean it of the files that processes
        no longer running left there (a crash, a kill). OSError: the server cannot start."""
        store = self.store
        if store is not None:
            await store.open()
        if store is None or store.spool_dir is None:
            directory = self.spool_dir or spool.default_directory()
            await anyio.to_thread.run_sync(spool.open_directory, directory)


def default_app(maildir: str | os.PathLike[str] = "./maildir", hostname: str | None = None) -> App:
    """What ``minismtp run`` serves without an app: every message stored in ``maildir``.

    The server logs one line per transaction (logger ``minismtp.server``).
    """
    return App(hostname=hostname or socket.gethostname(), maildir=maildir)


# The hook types and LOCAL_ERROR moved out (minismtp.hooks, minismtp.replies) are importable
# from here as they were.
__all__ = [
    "CHUNK_OK",
    "DISCONNECTED",
    "INSUFFICIENT_STORAGE",
    "LOCAL_ERROR",
    "MAIL_OK",
    "RCPT_OK",
    "App",
    "ConnectHook",
    "DataChunkHook",
    "DataHook",
    "HeloHook",
    "HookResult",
    "LifespanHook",
    "MailHook",
    "MessageHook",
    "RcptHook",
    "default_app",
]
