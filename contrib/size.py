"""A message size limit (RFC 1870), enforced while the message streams in."""

from __future__ import annotations

from minismtp.events import Data, Event, Handler, Helo, Mail
from minismtp.types import Reply

__all__ = ["MessageSizeLimit"]

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


def _advertised_size(keywords: tuple[str, ...]) -> int | None:
    """The ``SIZE n`` the engine offers in EHLO, if it does."""
    for keyword in keywords:
        name, _, value = keyword.partition(" ")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class MessageSizeLimit:
    """Refuse messages larger than ``max_bytes`` octets; a message of exactly that size passes.

    Acts at:

    - **helo** (EHLO): the reply advertises ``SIZE n`` (RFC 1870 4), replacing the engine's;
    - **mail**: a ``SIZE=`` declaration above the limit gets ``552 5.3.4`` at once
      (RFC 1870 6.1); otherwise the transaction's ``max_size`` is lowered to ``max_bytes``, so
      that the engine cuts off DATA or BDAT content past it while it streams in, keeping
      nothing of it, and answers ``552 5.3.4`` at its end;
    - **data**: a message over the limit that reached the App anyway gets ``552 5.3.4``.

    The size counted is that of the content as the App receives it (dot-unstuffed, CRLF line
    ends, without the terminating ``.``). The server's own limit (``Limits.max_message_size``,
    32 MiB by default) still applies: a ``max_bytes`` above it lowers nothing, and the
    advertised ``SIZE`` is the smaller of the two. Several limits in one stack: the smallest
    wins, in any order.
    """

    acts_on = (Helo, Mail, Data)

    def __init__(self, app: Handler, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.app = app
        self.max_bytes = max_bytes
        # EHLO replies are a handful of constants (with and without STARTTLS): adjust each once.
        self._ehlo_replies: dict[tuple[Reply, tuple[str, ...]], Reply] = {}

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Mail):
            transaction = event.transaction
            declared = transaction.declared_size
            if declared is not None and declared > self.max_bytes:
                return TOO_BIG
            transaction.max_size = min(transaction.max_size, self.max_bytes)
            return await self.app(event)
        if isinstance(event, Helo) and event.esmtp:
            reply = await self.app(event)
            if not reply.is_success:
                return reply
            key = (reply, event.keywords)
            adjusted = self._ehlo_replies.get(key)
            if adjusted is None:
                adjusted = self._advertise(reply, event.keywords)
                if len(self._ehlo_replies) < 16:
                    self._ehlo_replies[key] = adjusted
            return adjusted
        if isinstance(event, Data) and event.size > self.max_bytes:
            return TOO_BIG
        return await self.app(event)

    def _advertise(self, reply: Reply, keywords: tuple[str, ...]) -> Reply:
        server_limit = _advertised_size(keywords)
        limit = self.max_bytes if server_limit is None else min(server_limit, self.max_bytes)
        advertised = _advertised_size(reply.lines[1:])
        if advertised is not None and advertised <= limit:
            return reply  # a smaller limit further in the stack said so already
        return reply.with_extension("SIZE", str(limit))
