"""contrib.greylist: the triplet, the delay, the retry window, expiry, stores, a real client."""

from __future__ import annotations

import smtplib
from typing import Any

import anyio
import attrs
import pytest

from minismtp.app import App
from minismtp.contrib.greylist import (
    Greylist,
    GreylistEntry,
    GreylistStore,
    MemoryGreylistStore,
    Triplet,
)
from minismtp.server import serve
from minismtp.testing import TestClient
from minismtp.types import Reply
from tests.helpers.clock import FakeClock

pytestmark = pytest.mark.anyio

GREYLISTED = Reply(451, "4.7.1", "Greylisted, try again later")
RCPT_OK = Reply(250, "2.1.5", "OK")
BODY = b"Subject: hi\r\n\r\nHello.\r\n"
DELAY = 300.0


def greylisted_app(clock: FakeClock, **options: Any) -> App:
    app = App(hostname="mx.example.com")
    app.add_middleware(Greylist, delay=DELAY, clock=clock, **options)
    return app


async def attempt(
    client: TestClient, rcpt: str = "b@example.com", sender: str = "a@example.org",
    host: str = "192.0.2.1",
) -> Reply:  # fmt: skip
    """One delivery attempt in a new session from ``host``: the RCPT reply."""
    client.peer = (host, 40000)
    await client.connect()
    await client.ehlo("client.example.org")
    await client.mail(sender)
    reply = await client.rcpt(rcpt)
    await client.quit()
    return reply


async def test_first_attempt_451_4_7_1_retry_after_the_delay_passes_rfc5321_4_2_5() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock)) as client:
        assert await attempt(client) == GREYLISTED
        clock.now += DELAY - 1
        assert await attempt(client) == GREYLISTED  # too early: still greylisted
        clock.now += 1
        assert await attempt(client) == RCPT_OK
        # Remembered: passes at once from now on, and the message is delivered.
        clock.now += 5
        await client.connect()
        replies = await client.send_message("a@example.org", "b@example.com", BODY)
        assert [r.code for r in replies] == [250, 250, 250]
    assert len(client.messages) == 1


async def test_each_part_of_the_triplet_counts() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock)) as client:
        assert await attempt(client) == GREYLISTED
        clock.now += DELAY
        assert await attempt(client) == RCPT_OK
        assert await attempt(client, rcpt="c@example.com") == GREYLISTED
        assert await attempt(client, sender="z@example.org") == GREYLISTED
        assert await attempt(client, host="198.51.100.1") == GREYLISTED


async def test_client_counted_by_ipv4_24_and_ipv6_64() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock)) as client:
        assert await attempt(client, host="192.0.2.1") == GREYLISTED
        assert await attempt(client, host="2001:db8::1") == GREYLISTED
        clock.now += DELAY
        # A pool retrying from a neighbouring address passes.
        assert await attempt(client, host="192.0.2.200") == RCPT_OK
        assert await attempt(client, host="2001:db8::ffff:1") == RCPT_OK
        assert await attempt(client, host="192.0.3.1") == GREYLISTED
        assert await attempt(client, host="2001:db8:0:1::1") == GREYLISTED


async def test_addresses_compared_without_case() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock)) as client:
        assert await attempt(client) == GREYLISTED
        clock.now += DELAY
        assert await attempt(client, rcpt="B@Example.COM", sender="A@EXAMPLE.org") == RCPT_OK


async def test_null_sender_is_greylisted_like_any_other() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock)) as client:
        assert await attempt(client, sender="") == GREYLISTED
        clock.now += DELAY
        assert await attempt(client, sender="") == RCPT_OK


async def test_passed_triplet_expires_when_not_seen() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock, expire=1000.0)) as client:
        await attempt(client)
        clock.now += DELAY
        assert await attempt(client) == RCPT_OK
        clock.now += 900
        assert await attempt(client) == RCPT_OK  # seen again: the expiry starts over
        clock.now += 900
        assert await attempt(client) == RCPT_OK
        clock.now += 1001
        assert await attempt(client) == GREYLISTED


async def test_retry_after_the_retry_window_starts_over() -> None:
    clock = FakeClock()
    async with TestClient(greylisted_app(clock, retry_window=3600.0)) as client:
        assert await attempt(client) == GREYLISTED
        clock.now += 3601
        assert await attempt(client) == GREYLISTED
        clock.now += DELAY
        assert await attempt(client) == RCPT_OK


async def test_other_middleware_sees_only_passing_recipients() -> None:
    clock = FakeClock()
    app = greylisted_app(clock)
    seen: list[str] = []
    app.on_rcpt(lambda tx, rcpt: seen.append(str(rcpt)))
    async with TestClient(app) as client:
        await attempt(client)
        clock.now += DELAY
        await attempt(client)
    assert seen == ["b@example.com"]


async def test_memory_store_is_bounded() -> None:
    store = MemoryGreylistStore(max_entries=10)
    async with TestClient(greylisted_app(FakeClock(), store=store)) as client:
        for i in range(50):
            assert await attempt(client, rcpt=f"user{i}@example.com") == GREYLISTED
    assert len(store) == 10


@attrs.define
class DictStore:
    """A store written against the GreylistStore protocol, as a persistent one would be."""

    entries: dict[Triplet, GreylistEntry] = attrs.field(factory=dict)
    calls: list[str] = attrs.field(factory=list)

    async def get(self, triplet: Triplet) -> GreylistEntry | None:
        self.calls.append("get")
        return self.entries.get(triplet)

    async def put(self, triplet: Triplet, entry: GreylistEntry) -> None:
        self.calls.append("put")
        self.entries[triplet] = entry


async def test_a_custom_store_implements_the_protocol() -> None:
    store = DictStore()
    checked: GreylistStore = store  # the protocol, statically
    clock = FakeClock()
    async with TestClient(greylisted_app(clock, store=checked)) as client:
        await attempt(client)
        clock.now += DELAY
        await attempt(client)
    triplet = Triplet("192.0.2.0/24", "a@example.org", "b@example.com")
    assert store.entries == {triplet: GreylistEntry(clock.now - DELAY, clock.now, passed=True)}
    assert store.calls == ["get", "put", "get", "put"]


def test_delay_must_fit_in_the_retry_window() -> None:
    with pytest.raises(ValueError):
        Greylist(App(), delay=7200.0, retry_window=3600.0)


async def test_smtplib_is_greylisted_then_delivers_on_retry() -> None:
    clock = FakeClock()
    app = greylisted_app(clock)
    async with serve(app, "127.0.0.1", 0) as server:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], BODY)

        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await anyio.to_thread.run_sync(send)
        assert refused.value.recipients == {
            "b@example.com": (451, b"4.7.1 Greylisted, try again later")
        }
        clock.now += DELAY
        await anyio.to_thread.run_sync(send)
        assert server.mail_rx.receive_nowait().original == BODY
