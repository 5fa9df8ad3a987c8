"""Per-client connection limits: how many at once, and how many new ones a minute."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs

from minismtp.events import Connect, Disconnect, Event, Handler
from minismtp.types import Reply

from ._net import BoundedMap, client_key

__all__ = ["ConnectionLimit"]

log = logging.getLogger("minismtp.contrib.ratelimit")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try later")
TOO_MANY_NEW_CONNECTIONS = Reply(421, "4.7.0", "Connection rate limit exceeded, try later")


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class ConnectionLimit:
    """Limit each client to ``per_ip`` connections at once and ``per_ip_per_minute`` new ones.

    Acts at **connect**: past either limit the greeting is ``421 4.7.0`` and the connection
    closes (the client retries later: a 4xx greeting is temporary, RFC 5321 3.8). A client is
    an IPv4 address, or an IPv6 /64. Either limit may be None (no limit).

    The rate is a token bucket: a client may open ``per_ip_per_minute`` connections in a
    burst, then one every ``60 / per_ip_per_minute`` seconds. Every attempt counts, refused
    ones included (down to a minute's worth of debt), so a client hammering the port faster
    than that stays refused; after two quiet minutes at most it is served again.

    Memory: concurrent counts exist only for clients with an open connection; rate buckets
    are kept for at most ``max_clients`` clients, the least recently seen forgotten first
    (a forgotten client starts again with a full bucket).

    A connection counts from its ``Connect`` to its ``Disconnect`` event, which the server
    sends for every connection on every path (before it closes the socket, so the slot is
    free by the time the client sees the close). ``clock`` (monotonic seconds) is injectable
    for tests.
    """

    acts_on = (Connect, Disconnect)

    def __init__(
        self,
        app: Handler,
        *,
        per_ip: int | None = None,
        per_ip_per_minute: int | None = None,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("per_ip", per_ip), ("per_ip_per_minute", per_ip_per_minute)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit)")
        self.app = app
        self.per_ip = per_ip
        self.per_ip_per_minute = per_ip_per_minute
        self.clock = clock
        self._open: dict[str, int] = {}
        self._counted: dict[str, str] = {}  # session id -> its client's key, while it counts
        self._buckets: BoundedMap[str, _Bucket] = BoundedMap(max_clients)

    def open_connections(self, host: str) -> int:
        """Connections counted for the client at ``host`` (its /64 for IPv6) right now."""
        return self._open.get(client_key(host), 0)

    @property
    def tracked_clients(self) -> int:
        """Clients with a rate bucket (at most ``max_clients``)."""
        return len(self._buckets)

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Connect):
            key = client_key(event.session.peer_host)
            refusal = self._admit(key)
            if refusal is not None:
                log.info("session %s from %s: %s", event.session.id, key, refusal)
                return refusal
            self._open[key] = self._open.get(key, 0) + 1
            self._counted[event.session.id] = key
        elif isinstance(event, Disconnect):
            counted = self._counted.get(event.session.id)
            if counted is not None:
                del self._counted[event.session.id]
                self._release(counted)
        return await self.app(event)

    def _admit(self, key: str) -> Reply | None:
        if self.per_ip_per_minute is not None and not self._take_token(key):
            return TOO_MANY_NEW_CONNECTIONS
        if self.per_ip is not None and self._open.get(key, 0) >= self.per_ip:
            return TOO_MANY_CONNECTIONS
        return None

    def _take_token(self, key: str) -> bool:
        assert self.per_ip_per_minute is not None
        capacity = float(self.per_ip_per_minute)
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(capacity - 1, now)
            return True
        refill = (now - bucket.updated) * capacity / 60.0
        bucket.updated = now
        tokens = min(capacity, bucket.tokens + refill)
        # A refused attempt costs a token too, down to a minute's worth of debt.
        bucket.tokens = max(tokens - 1, -capacity)
        return tokens >= 1

    def _release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
