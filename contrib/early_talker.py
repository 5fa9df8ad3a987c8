"""Early-talker detection (Postfix postscreen's "pregreet" test)."""

from __future__ import annotations

from minismtp.events import Connect, Event, Handler
from minismtp.types import Reply

__all__ = ["EarlyTalker"]


class EarlyTalker:
    """Hold the greeting back for ``delay`` seconds; refuse a client that talks before it.

    RFC 5321 4.3.1 has the client wait for the greeting; spambots often do not. Acts at
    **connect**: it sets ``session.greeting_delay``, and the server waits that long before
    sending the 220. A client that sends anything meanwhile gets ``554 5.5.1 Protocol error:
    talked before greeting`` from the server and is dropped; a patient one gets the greeting
    and is served. A refused greeting (from middleware further in) is sent at once.

    The delay is set before the rest of the stack runs, so an ``on_connect`` hook may lower
    it, or set it to 0 for clients it trusts. Only the network server holds the greeting:
    the in-memory :class:`~minismtp.testing.TestClient` ignores it. Keep the delay short (a
    few seconds): every legitimate client waits that long too.
    """

    acts_on = (Connect,)

    def __init__(self, app: Handler, *, delay: float = 3.0) -> None:
        if delay <= 0:
            raise ValueError("delay must be positive")
        self.app = app
        self.delay = delay

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Connect):
            session = event.session
            session.greeting_delay = max(session.greeting_delay, self.delay)
        return await self.app(event)
