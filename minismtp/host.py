"""What a connection's driver needs of the world around it, declared (:mod:`minismtp.connection`).

The driver imports neither the server nor the test client: each hands it a :class:`Host`
(itself), and the asyncio accept path may hand it a :class:`FastPath`.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream

from minismtp.config import ServerConfig
from minismtp.events import Event
from minismtp.metrics import Metrics
from minismtp.protocol import Limits
from minismtp.tls import TLSConfig
from minismtp.types import Message, Reply

if TYPE_CHECKING:
    from minismtp.connection import Connection


class SessionApp(Protocol):
    """What a connection needs of the App: its name, its limits, and answers to events."""

    @property
    def hostname(self) -> str: ...

    @property
    def limits(self) -> Limits: ...

    async def __call__(self, event: Event, /) -> Reply: ...

    def answer_now(self, event: Event, /) -> Reply | None:
        """The reply to ``event`` if it needs no waiting, else None (then the connection
        awaits the App's call): asked first for every event."""


class ServableApp(SessionApp, Protocol):
    """What the server needs of an App (:class:`minismtp.app.App` is one).

    ``serving()`` is the App's serving period; ``messages`` its channel (``Server.mail_rx``).
    The CLI sets the name and the limits from its options.
    """

    hostname: str
    limits: Limits

    def serving(self) -> AbstractAsyncContextManager[Any]: ...

    @property
    def messages(self) -> MemoryObjectReceiveStream[Message]: ...


class Host(Protocol):
    """What a connection needs of whoever accepted it (:class:`minismtp.server.Server`, or the
    test client). Read-only to the driver, except the counters in ``metrics``."""

    @property
    def app(self) -> SessionApp: ...

    @property
    def config(self) -> ServerConfig: ...

    @property
    def tls(self) -> TLSConfig | None:
        """The certificate for STARTTLS and implicit TLS; None: TLS is not offered."""

    @property
    def require_tls(self) -> bool: ...

    @property
    def idle_timeout(self) -> float:
        """The idle timeout in force for a read that starts now: ``config.idle_timeout``, or
        less while the server is under stress (``ServerConfig.stress_idle_timeout``)."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def stopping(self) -> bool:
        """A shutdown is under way: a session ends (``421 4.3.2``) outside a transaction."""

    def track(self, connection: Connection) -> None:
        """The connection is open: time it out, interrupt it at shutdown."""

    def untrack(self, connection: Connection) -> None: ...


class FastPath(Protocol):
    """A way to run the connection's steps from the wire's own callbacks, instead of waking
    its task for every read (:mod:`minismtp.inline`, on asyncio). :meth:`attach` is called
    from the connection's task before its first read, :meth:`detach` when it ends."""

    def attach(self, connection: Connection) -> None: ...

    def detach(self) -> None: ...


__all__ = ["FastPath", "Host", "ServableApp", "SessionApp"]
