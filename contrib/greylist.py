"""Greylisting: refuse an unknown (client, sender, recipient) triplet once, for a while.

A real mail server queues the message and retries after a 4xx; much spamware never retries.
The cost is a delay on the first message of each new triplet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import attrs

from minismtp.events import Event, Handler, Rcpt
from minismtp.types import Reply

from ._net import BoundedMap, client_key

__all__ = ["Greylist", "GreylistEntry", "GreylistStore", "MemoryGreylistStore", "Triplet"]

log = logging.getLogger("minismtp.contrib.greylist")

GREYLISTED = Reply(451, "4.7.1", "Greylisted, try again later")

DAY = 86400.0


@attrs.frozen
class Triplet:
    """What greylisting remembers: the client network, the sender, the recipient.

    ``client`` is the client's /24 (IPv4) or /64 (IPv6): large senders retry from another
    address of the same pool. Addresses are lower-cased; the null sender is ``""``.
    """

    client: str
    sender: str
    recipient: str


@attrs.frozen
class GreylistEntry:
    """When a triplet was first and last seen, and whether it has passed greylisting."""

    first_seen: float
    last_seen: float
    passed: bool = False


class GreylistStore(Protocol):
    """Where triplets are remembered. Implement these two methods for a persistent store
    (SQLite, Redis...); a store may forget any entry, which costs that triplet one more
    delay at worst, and entries whose ``last_seen`` is older than the Greylist's ``expire``
    are no longer of any use."""

    async def get(self, triplet: Triplet) -> GreylistEntry | None: ...

    async def put(self, triplet: Triplet, entry: GreylistEntry) -> None: ...


@attrs.define
class MemoryGreylistStore:
    """The default store: in memory, at most ``max_entries`` triplets, the least recently
    used forgotten first (lost on restart)."""

    max_entries: int = 100_000
    _entries: BoundedMap[Triplet, GreylistEntry] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._entries = BoundedMap(self.max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, triplet: Triplet) -> GreylistEntry | None:
        return self._entries.get(triplet)

    async def put(self, triplet: Triplet, entry: GreylistEntry) -> None:
        self._entries[triplet] = entry


class Greylist:
    """Greylist each new (client network, sender, recipient) triplet for ``delay`` seconds.

    Acts at **rcpt**: the first time a triplet is seen, and whenever it comes back before
    ``delay`` seconds have passed, the recipient gets ``451 4.7.1 Greylisted, try again
    later``. A retry after ``delay`` (and within ``retry_window`` of the first attempt; a
    later one starts over) passes and the triplet is remembered: it passes at once from then
    on, for as long as it is seen again within ``expire`` seconds. Other events, and
    recipients that pass, go on down the stack.

    Put it innermost (add it first), so recipients that other middleware refuses outright
    are refused without being greylisted. ``store`` defaults to a
    :class:`MemoryGreylistStore`; ``clock`` (seconds since the epoch, as stored) is
    injectable for tests.
    """

    acts_on = (Rcpt,)

    def __init__(
        self,
        app: Handler,
        *,
        delay: float = 300.0,
        expire: float = 35 * DAY,
        retry_window: float = 2 * DAY,
        store: GreylistStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= delay < retry_window:
            raise ValueError("need 0 <= delay < retry_window")
        self.app = app
        self.delay = delay
        self.expire = expire
        self.retry_window = retry_window
        self.store: GreylistStore = store if store is not None else MemoryGreylistStore()
        self.clock = clock

    @staticmethod
    def triplet(event: Rcpt) -> Triplet:
        return Triplet(
            client_key(event.session.peer_host, ipv4_prefix=24, ipv6_prefix=64),
            str(event.transaction.mail_from).lower(),
            str(event.address).lower(),
        )

    async def passes(self, triplet: Triplet) -> bool:
        """Whether ``triplet`` passes now; records the attempt either way."""
        now = self.clock()
        entry = await self.store.get(triplet)
        if entry is not None:
            if entry.passed and now - entry.last_seen <= self.expire:
                await self.store.put(triplet, attrs.evolve(entry, last_seen=now))
                return True
            age = now - entry.first_seen
            if not entry.passed and age <= self.retry_window:
                if age >= self.delay:
                    await self.store.put(triplet, GreylistEntry(entry.first_seen, now, True))
                    return True
                await self.store.put(triplet, attrs.evolve(entry, last_seen=now))
                return False
        await self.store.put(triplet, GreylistEntry(now, now))
        return False

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Rcpt):
            triplet = self.triplet(event)
            if not await self.passes(triplet):
                log.info("session %s: greylisted %s", event.session.id, triplet)
                return GREYLISTED
        return await self.app(event)
