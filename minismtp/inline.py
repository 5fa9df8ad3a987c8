"""The asyncio fast path: a connection's App calls run straight from ``data_received``.

On asyncio and uvloop, waking the connection's task for every command costs a future, a
callback and a task step, about a fifth of the server's CPU per small message (figures in
``tests/bench/README.md``). When the task waits for the client's bytes and they arrive, the
:class:`~minismtp.asyncio_wire.ProtocolWire` offers them to :class:`InlinePath` first, which
runs the engine, the App calls that finish at once and the write of the replies right there.

This is the only module that uses asyncio's private ``_enter_task``/``_leave_task``; the
rest of the server knows the fast path only as a :class:`~minismtp.connection.FastPath`.

Invariants:

1. It runs only while the connection's task is suspended in ``wire.receive()`` with nothing
   queued (``ProtocolWire.data_received`` checks; ``Connection.feed_nowait`` too), so
   the task's own code and the fast path never run at the same time, and bytes are fed to the
   engine in the order they came.
2. The code it runs sees what it would see in the task: ``asyncio.current_task()`` is the
   connection's task (``_enter_task``; anyio's cancel scopes and ``get_current_task()`` rely
   on it), and the context variables are the task's (its context, entered with ``run``).
   If a task is running already (``_enter_task`` refuses), nothing is taken: the task reads
   the bytes itself.
3. Nothing here waits. Whatever must (an App call that did not finish at once, a full
   transport, TLS, the greeting, the end) is left to the task as its next step, and the
   task is woken with ``wire.wake()``: its ``receive()`` then returns ``b""``, which the
   connection knows is not the client's EOF because a step is waiting.
4. An exception is never raised into the event loop: it becomes the task's step and is
   raised there, where the session's error handling is.

The fallback is the ordinary path: without an ``InlinePath`` (``ServerConfig.inline`` false,
or ``MINISMTP_INLINE=0``, or a Python without these functions or the task's context) every
read wakes the task, which runs the same steps. The server's test suite runs both ways.

Eager tasks (3.12+) are no substitute: they run a new task's first step at once, where the
cost here is resuming a waiting task on every read.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import attrs

from minismtp.asyncio_wire import ProtocolWire
from minismtp.connection import Connection

_enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None
_leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None
_enter_task = getattr(asyncio.tasks, "_enter_task", None)
_leave_task = getattr(asyncio.tasks, "_leave_task", None)

#: Whether this Python can run the fast path: asyncio's task switch functions, and
#: ``create_task(context=...)`` (3.11) so that the task's context can be entered from outside.
AVAILABLE = _enter_task is not None and _leave_task is not None and sys.version_info >= (3, 11)


def start_task(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, None], path: InlinePath | None
) -> asyncio.Task[None]:
    """The connection's task, in a context of its own that ``path`` (if any) can enter."""
    if path is None:
        return loop.create_task(coroutine)
    return loop.create_task(coroutine, context=path.context)  # type: ignore[call-arg, unused-ignore]


@attrs.define(eq=False)
class InlinePath:
    """The fast path of one connection over ``wire`` (see the module's invariants)."""

    wire: ProtocolWire
    context: contextvars.Context = attrs.field(factory=contextvars.copy_context)
    _connection: Connection | None = None
    _task: asyncio.Task[Any] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def new(cls, wire: ProtocolWire, enabled: bool) -> InlinePath | None:
        return cls(wire) if enabled and AVAILABLE else None

    def attach(self, connection: Connection) -> None:
        """From the connection's task, before its first read."""
        self._connection = connection
        self._task = asyncio.current_task()
        self._loop = self.wire.loop
        self.wire.inline_reader = self._read

    def detach(self) -> None:
        self.wire.inline_reader = None
        self._connection = None

    def _read(self, data: bytes) -> bool:
        """Offered each chunk by the wire; False: not taken, the task will read it."""
        connection, task, loop = self._connection, self._task, self._loop
        if connection is None or task is None or loop is None:
            return False
        try:
            _enter_task(loop, task)  # type: ignore[misc]  # AVAILABLE, or no InlinePath
        except RuntimeError:  # called from within some task after all: the usual way then
            return False
        try:
            taken = self.context.run(connection.feed_nowait, data)
        except RuntimeError:  # the context is entered already: invariant 1 was broken
            return False
        finally:
            _leave_task(loop, task)  # type: ignore[misc]
        if taken:
            self.wire.wake()
        return taken is not None


__all__ = ["AVAILABLE", "InlinePath", "start_task"]
