"""trio: one edge-triggered epoll for the sessions' reads, instead of trio's per-wait one.

trio's ``wait_readable`` arms the socket in its epoll on every wait (``EPOLLONESHOT``: an
``epoll_ctl`` system call each time) and parks the task under four coroutines of its own and
a table entry (what that costs per idle connection: tests/bench/README.md). Here each
connection's socket is registered once, edge-triggered, in an epoll of our own, which trio
waits on like any other file; a read that finds its socket empty parks its task in a table,
and one system task wakes the parked tasks whose sockets have news.

Edge-triggered is safe because a reader always tries ``recv`` before it parks, with no
checkpoint in between: bytes that arrive after that failed try raise a new edge. An edge
for bytes a reader has taken already only wakes it for nothing: it tries, finds nothing, and
parks again. Linux only (``select.epoll``); elsewhere the wire uses trio's own waits.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Awaitable
from typing import Any

import attrs
from trio import lowlevel

_EDGE = select.EPOLLIN | select.EPOLLET


@attrs.define(eq=False)
class EdgeReadiness:
    """The read readiness of every session's socket in one trio run (see the module)."""

    _epoll: select.epoll
    _parked: dict[int, lowlevel.Task] = attrs.field(factory=dict)  # fd -> task in wait_readable

    @classmethod
    def current(cls) -> EdgeReadiness:
        """This trio run's, started on first use (a system task: it ends with the run)."""
        try:
            return _CURRENT.get()
        except LookupError:
            readiness = cls(select.epoll())
            _CURRENT.set(readiness)
            lowlevel.spawn_system_task(readiness._wake_parked, name="minismtp readiness")
            return readiness

    def register(self, sock: socket.socket) -> None:
        """Watch ``sock`` (once per connection: closing the socket removes it)."""
        self._epoll.register(sock.fileno(), _EDGE)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock``, still open (its bytes go through a TLS stream now)."""
        fd = sock.fileno()
        if fd >= 0:
            self._parked.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except OSError:  # not registered (another run's wire) or closed already
                pass

    def wait_readable(self, sock: socket.socket) -> Awaitable[None]:
        """Until ``sock`` has news; await only after a read found it empty (see the module).

        A plain function giving trio's wait: one coroutine less under every idle session.
        """
        fd = sock.fileno()
        parked = self._parked

        def abort(_: Any) -> lowlevel.Abort:
            parked.pop(fd, None)
            return lowlevel.Abort.SUCCEEDED

        parked[fd] = lowlevel.current_task()
        return lowlevel.wait_task_rescheduled(abort)  # noqa: ASYNC105 (the caller awaits it)

    async def _wake_parked(self) -> None:
        epoll, parked = self._epoll, self._parked
        try:
            while True:
                await lowlevel.wait_readable(epoll)
                for fd, _ in epoll.poll(0):
                    task = parked.pop(fd, None)
                    if task is not None:
                        lowlevel.reschedule(task)
        finally:
            epoll.close()


_CURRENT: lowlevel.RunVar[EdgeReadiness] = lowlevel.RunVar("minismtp.readiness")

__all__ = ["EdgeReadiness"]
