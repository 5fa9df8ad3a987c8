"""The events the engine asks the App (and its middleware) to decide on.

Each event is answered with one :class:`~minismtp.types.Reply`. A 2xx answer accepts: the
engine then records the sender, the recipient or the message; anything else refuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import attrs

from minismtp.types import Address, Reply, Session, Transaction


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


def _as_pieces(data: bytes | Iterable[Piece]) -> list[Piece]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [bytes(data)]
    return list(data)


def _same_content(a: list[Piece], b: list[Piece]) -> bool:
    return b"".join(a) == b"".join(b)


def _describe_content(pieces: list[Piece]) -> str:
    return f"<{sum(map(len, pieces))} octets>"


@attrs.frozen
class Data(Event):
    """The complete message of ``transaction`` (DATA or BDAT ... LAST), before it is accepted.

    ``data`` is the content exactly as the client meant it: dot-unstuffed, without the
    terminating ``.``; no trace header has been added yet.

    The engine hands the content over in the pieces it arrived in (``Data(session,
    transaction, pieces)``; a single ``bytes`` will do too), and ``data`` joins them when
    first read. The App builds its Message with :meth:`prefixed`, which puts the trace header
    in front in that same join: a message nobody looked at on the way is copied once, not
    twice (with 10 MB messages, each copy is about a tenth of the server's CPU).
    """

    transaction: Transaction
    _pieces: list[Piece] = attrs.field(
        alias="data",
        converter=_as_pieces,
        eq=attrs.cmp_using(eq=_same_content),
        hash=False,
        repr=_describe_content,
    )

    @property
    def data(self) -> bytes:
        pieces = self._pieces
        if len(pieces) != 1 or not isinstance(pieces[0], bytes):
            pieces[:] = [b"".join(pieces)]  # joined once: the pieces go, the bytes stay
        return cast(bytes, pieces[0])

    @property
    def size(self) -> int:
        """Octets of content: ``len(data)``, without joining it."""
        return sum(map(len, self._pieces))

    def prefixed(self, prefix: bytes) -> bytes:
        """``prefix + data`` in one copy of the content (the App's trace header goes first)."""
        return b"".join((prefix, *self._pieces))


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


AppEvent = Connect | Helo | Mail | Rcpt | Data | Disconnect
Handler = Callable[[Event], Awaitable[Reply]]
