"""Early-talker detection (Postfix postscreen's "pregreet" test)."""

from __future__ import annotations

from minismtp.events import Connect, Event, Handler
from minismtp.types import Reply

__all__ = ["GREETING_DELAY", "EarlyTalker"]

#: The ``session.extras`` key the server reads the greeting delay from (seconds).
GREETING_DELAY = "greeting_delay"


class EarlyTalker:
    """Hold the greeting back for ``delay`` seconds; refuse a client that talks before it.

    RFC 5321 4.3.1 has the client wait for the greeting; spambots often do not. Acts at
    **connect**: it asks the server (through ``session.extras["greeting_delay"]``) to wait
    ``delay`` seconds before sending the 220. A client that sends anything meanwhile gets
    ``554 5.5.1 Protocol error: talked before greeting`` from the server and is dropped; a
    patient one gets the greeting and is served. A refused greeting (from middleware further
    in) is sent at once.

    The key is set before the rest of the stack runs, so an ``on_connect`` hook may lower
    the delay or delete the key for clients it trusts. Only the network server holds the
    greeting: the in-memory :class:`~minismtp.testing.TestClient` ignores it. Keep the delay
    short (a few seconds): every legitimate client waits that long too.
    """

    acts_on = (Connect,)

    def __init__(self, app: Handler, *, delay: float = 3.0) -> None:
        if delay <= 0:
            raise ValueError("delay must be positive")
        self.app = app
        self.delay = delay

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Connect):
            extras = event.session.extras
            extras[GREETING_DELAY] = max(float(extras.get(GREETING_DELAY) or 0.0), self.delay)
        return await self.app(event)
