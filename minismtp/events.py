"""The events the engine asks the App (and its middleware) to decide on.

Each event is answered with one :class:`~minismtp.types.Reply`. A 2xx answer accepts: the
engine then records the sender, the recipient or the message; anything else refuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs

from minismtp.types import Address, Reply, Session, Transaction

if TYPE_CHECKING:
    from minismtp.message import Message


@attrs.frozen
class Event:
    session: Session


@attrs.frozen
class Connect(Event):
    """A client connected; the answer is the greeting (220 to serve, 554 to refuse)."""


@attrs.frozen
class Helo(Event):
    """HELO (``esmtp`` false) or EHLO (``esmtp`` true).

    ``keywords`` are the extensions the engine will honour (``PIPELINING``, ``SIZE 33554432``
    ...); the App's default answer lists them. Middleware may add or change keywords in the
    reply that comes back with :meth:`Reply.with_extension`.
    """

    name: str
    esmtp: bool
    keywords: tuple[str, ...] = ()


@attrs.frozen
class Mail(Event):
    """MAIL FROM. ``transaction`` is the transaction this command would open."""

    transaction: Transaction
    address: Address
    params: dict[str, str | None]


@attrs.frozen
class Rcpt(Event):
    """RCPT TO, within ``transaction``."""

    transaction: Transaction
    address: Address
    params: dict[str, str | None]


Piece = bytes | memoryview


def _describe_chunk(chunk: Piece) -> str:
    return f"<{len(chunk)} octets>"


@attrs.frozen
class DataChunk(Event):
    """A piece of ``transaction``'s content as it streams in (DATA, or a BDAT chunk).

    ``chunk`` is dot-unstuffed with CRLF line ends, at most 256 KiB (an empty message gives
    one empty chunk); it may be a ``memoryview`` (``bytes(chunk)`` copies it). A 2xx answer
    lets the content go on; anything else refuses it: the engine reads the rest of the content
    and drops it, and that reply answers the end of the data (or of that BDAT chunk). The
    App writes each accepted chunk into the message's spool (``transaction.message``).
    """

    transaction: Transaction
    chunk: Piece = attrs.field(eq=False, repr=_describe_chunk)


@attrs.frozen
class Data(Event):
    """The complete message of ``transaction`` (DATA or BDAT ... LAST), before it is accepted.

    :attr:`message` is the message as it will be handed over, our ``Received:`` header first,
    in its spool (read it with ``open()``, ``chunks()``, ``headers``). :attr:`data` is the
    content exactly as the client meant it (dot-unstuffed, without the terminating ``.`` and
    without our trace header): it loads the whole message into memory.
    """

    transaction: Transaction
    _message: Message | None = attrs.field(default=None, alias="message", eq=False, repr=False)

    @property
    def message(self) -> Message:
        message = self._message or self.transaction.message
        if message is None:
            raise RuntimeError("no message: the App makes it at the first DataChunk")
        return message

    @property
    def data(self) -> bytes:
        """The content as the client sent it, without our trace header (loads it whole)."""
        return self.message.original

    @property
    def size(self) -> int:
        """Octets of content, without loading it."""
        if self._message is not None:
            return self._message.size
        return self.transaction.size


@attrs.frozen
class Disconnect(Event):
    """The connection has ended; the App gets it once for every connection it got a
    :class:`Connect` for, whatever the way it ended: QUIT, a timeout, the client gone, a
    shutdown, a refused greeting, a refusal by the engine (too many errors).

    It comes after the last reply was written (and before the socket is closed), with the
    session as it ended; any transaction still open was ended first. The reply is ignored:
    answer it with what the next handler gives. Middleware that keeps per-connection state
    (counts of open connections) releases it here. Connections refused before the App saw
    them (the server's ``max_connections``, a bad PROXY header, a failed implicit TLS
    handshake) get neither event.
    """


AppEvent = Connect | Helo | Mail | Rcpt | DataChunk | Data | Disconnect
Handler = Callable[[Event], Awaitable[Reply]]
