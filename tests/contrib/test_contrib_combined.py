"""All contrib middleware in one stack, in every order: each still acts and replies as it says."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from minismtp.app import App
from minismtp.contrib.access import ClientAccess
from minismtp.contrib.domains import RecipientDomainFilter, SenderDomainFilter
from minismtp.contrib.early_talker import EarlyTalker
from minismtp.contrib.greylist import Greylist
from minismtp.contrib.ratelimit import ConnectionLimit
from minismtp.contrib.size import MessageSizeLimit
from minismtp.events import Connect, Data, Event, Helo, Mail, Rcpt
from minismtp.ids import new_id
from minismtp.message import Message
from minismtp.testing import TestClient
from minismtp.types import Address, Reply, Session, Transaction
from tests.helpers.clock import FakeClock

pytestmark = pytest.mark.anyio

LIMIT = 10_000


def stack(clock: FakeClock) -> list[tuple[Any, dict[str, Any]]]:
    return [
        (ClientAccess, {"deny": ["203.0.113.0/24"]}),
        (ConnectionLimit, {"per_ip": 5, "per_ip_per_minute": 1000, "clock": clock}),
        (RecipientDomainFilter, {"domains": ["example.com"]}),
        (SenderDomainFilter, {"deny": ["spam.example"]}),
        (MessageSizeLimit, {"max_bytes": LIMIT}),
        (Greylist, {"delay": 300, "clock": clock}),
        (EarlyTalker, {"delay": 0.1}),
    ]


def message(size: int) -> bytes:
    line = b"x" * 98 + b"\r\n"
    assert size % len(line) == 0
    return line * (size // len(line))


async def dialogue(app: App, clock: FakeClock, greylist_inside_domains: bool) -> None:
    async with TestClient(app) as client:
        client.peer = ("203.0.113.9", 40000)
        assert await client.connect() == Reply(554, "5.7.1", "Access denied")
        client.peer = ("192.0.2.1", 40000)
        assert (await client.connect()).code == 220
        assert client.session.greeting_delay == 0.1
        ehlo = await client.ehlo("client.example.org")
        assert [line for line in ehlo.lines if line.startswith("SIZE")] == [f"SIZE {LIMIT}"]
        assert await client.mail("a@spam.example") == Reply(
            550, "5.7.1", "Sender address rejected: domain not accepted"
        )
        assert (await client.mail("a@example.org", f"SIZE={LIMIT + 100}")).code == 552
        assert (await client.mail("a@example.org")).code == 250
        foreign = await client.rcpt("b@elsewhere.org")
        # Greylist acts on what reaches it: inside the domain filter, relaying is refused at
        # once; outside it, the relay attempt is greylisted first and refused on the retry.
        assert foreign.code == (550 if greylist_inside_domains else 451)
        assert await client.rcpt("b@example.com") == Reply(
            451, "4.7.1", "Greylisted, try again later"
        )
        await client.rset()
        clock.now += 300
        await client.mail("a@example.org")
        assert (await client.rcpt("b@elsewhere.org")).code == 550
        assert (await client.rcpt("b@example.com")).code == 250
        assert (await client.data(message(LIMIT + 100))).code == 552
        replies = await client.send_message("a@example.org", "b@example.com", message(LIMIT))
        assert replies[-1].code == 250
    assert [len(m.original) for m in client.messages] == [LIMIT]


async def test_every_order_of_all_seven_middleware() -> None:
    """Every order of the six that decide (6! = 720 stacks), with EarlyTalker moved through
    every position in turn; one full dialogue each, in memory."""
    for number, order in enumerate(itertools.permutations(range(6))):
        stacked = list(order)
        stacked.insert(number % 7, 6)
        clock = FakeClock()
        app = App(hostname="mx.example.com")
        middleware = stack(clock)
        for index in stacked:
            cls, options = middleware[index]
            app.add_middleware(cls, **options)
        # The last added runs first: Greylist (5) is inside the domain filter (2) when it was
        # added before it.
        inside = stacked.index(5) < stacked.index(2)
        await dialogue(app, clock, inside)


def events_from(peer: str) -> list[Event]:
    """One event of each stage, each one that a middleware acting at it would refuse."""
    session = Session(id=new_id(), hostname="mx", peer=(peer, 40000), local=("192.0.2.25", 25))
    session.helo_name = "client.example.org"
    sender = Address("a", "spam.example")
    transaction = Transaction(session, sender, {"SIZE": str(LIMIT + 1)})
    return [
        Connect(session),
        Helo(session, "client.example.org", True, ("SIZE 1000000",)),
        Mail(session, transaction, sender, transaction.mail_params),
        Rcpt(session, transaction, Address("b", "elsewhere.org"), {}),
        Data(session, transaction, Message.from_bytes(message(LIMIT + 100))),
    ]


@pytest.mark.parametrize("index", range(7))
async def test_each_middleware_passes_on_unchanged_the_events_it_does_not_act_on(
    index: int,
) -> None:
    """``acts_on`` lets the App send the other events past a middleware: so each must pass
    them on untouched, even those that would be refused at its own stages."""
    cls, options = stack(FakeClock())[index]
    inner = Reply(250, "2.0.0", "inner")
    seen: list[Event] = []

    async def app(event: Event) -> Reply:
        seen.append(event)
        return inner

    middleware = cls(app, **options)
    others = [e for e in events_from("203.0.113.9") if not isinstance(e, cls.acts_on)]
    assert len(others) >= 2
    for event in others:
        extras = dict(event.session.extras)
        assert await middleware(event) is inner
        assert event.session.extras == extras
    assert seen == others
