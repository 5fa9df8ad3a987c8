"""Where an accepted message goes before its ``250``: the terminal hand-off of the App.

A store gets each finished :class:`~minismtp.message.Message` and returns once the message is
as durable as the store promises; the App answers ``250`` only then. A store never sees the
wire. ``App(store=...)`` takes one; without a store the App puts messages on its in-memory
channel (not durable). Here: :class:`~minismtp.stores.maildir.Maildir` (fsync before the 250).

Write your own as a class with these members (no base class needed)::

    class Store(Protocol):
        spool_dir: Path | None  # a property will do
        async def open(self) -> None: ...
        async def put(self, message: Message) -> Mapping[Address, Reply] | None: ...
        async def close(self) -> None: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from minismtp.types import Address, Reply

if TYPE_CHECKING:
    from minismtp.message import Message

__all__ = ["Store", "StoreUnavailable"]


@runtime_checkable
class Store(Protocol):
    """The contract between the App and a store."""

    @property
    def spool_dir(self) -> Path | None:
        """Where the App creates the spool files of large messages, so that :meth:`put` can
        rename them instead of copying them (a Maildir's ``tmp/``); None: anywhere. A plain
        attribute will do."""

    async def open(self) -> None:
        """Create or check what the store needs, when the App starts serving; raise OSError
        with a clear text if it cannot be used (the server then does not start)."""

    async def put(self, message: Message) -> Mapping[Address, Reply] | None:
        """Store ``message``; return once it is as durable as promised.

        Raising answers the client ``451 4.3.0`` (it keeps the message and retries). A mapping
        gives replies per recipient (LMTP sends them one by one; SMTP folds them); None: every
        recipient accepted. The message's content stays the caller's: a store that keeps the
        spool file itself (a Maildir renames it) tells the spool so (``Spool.moved``)."""

    async def close(self) -> None:
        """Let go of what :meth:`open` took, when the App stops serving."""


class StoreUnavailable(OSError):
    """What a store's ``put`` may raise when the store cannot take messages for now (a server
    down) and has said so in its own log, once, when it began: the App answers ``451 4.3.0``
    without logging a traceback for each message (the server's line per transaction remains)."""
