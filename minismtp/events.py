"""The events the engine asks the App (and its middleware) to decide on.

Each event is answered with one :class:`~minismtp.types.Reply`. A 2xx answer accepts: the
engine then records the sender, the recipient or the message; anything else refuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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


@attrs.frozen
class Data(Event):
    """The complete message of ``transaction`` (DATA or BDAT ... LAST), before it is accepted.

    ``data`` is the content exactly as the client meant it: dot-unstuffed, without the
    terminating ``.``; no trace header has been added yet.
    """

    transaction: Transaction
    data: bytes


AppEvent = Connect | Helo | Mail | Rcpt | Data
Handler = Callable[[Event], Awaitable[Reply]]
