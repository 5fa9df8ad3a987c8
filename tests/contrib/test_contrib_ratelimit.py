"""contrib.ratelimit: ConnectionLimit, concurrent and per-minute, over sockets and in memory."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from minismtp.app import App
from minismtp.contrib.ratelimit import ConnectionLimit
from minismtp.events import Handler
from minismtp.server import ServerConfig, serve
from minismtp.testing import TestClient
from minismtp.types import Reply
from tests.helpers.clients import Connect, WireClient
from tests.helpers.clock import FakeClock

pytestmark = pytest.mark.anyio

TOO_MANY = "421 4.7.0 Too many connections from your address, try later"
TOO_FAST = Reply(421, "4.7.0", "Connection rate limit exceeded, try later")
GREETING = Reply(220, None, "mx.test ESMTP")


def limited_app(**options: Any) -> tuple[App, list[ConnectionLimit]]:
    """An App behind ConnectionLimit(**options), and a list that will hold that instance."""
    app = App(hostname="mx.test")
    made: list[ConnectionLimit] = []

    def factory(inner: Handler, /, **kwargs: Any) -> ConnectionLimit:
        made.append(ConnectionLimit(inner, **kwargs))
        return made[-1]

    app.add_middleware(factory, **options)
    return app, made


async def greeted(client: WireClient) -> None:
    assert await client.reply() == "220 mx.test ESMTP"


async def until_served(connect: Connect, port: int) -> None:
    """Connect again and again until the server greets (a closed slot is freed as soon as
    the server has dropped the session, a moment after the client sees the close)."""
    with anyio.fail_after(5):
        while True:
            async with connect(port) as client:
                if (await client.reply()).startswith("220"):
                    return


# -- concurrent connections, over real sockets --------------------------------------------------


async def test_per_ip_limit_421_4_7_0_and_close_rfc5321_3_8(connect: Connect) -> None:
    app, _ = limited_app(per_ip=2)
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0)) as server:
        async with connect(server.port) as first, connect(server.port) as second:
            await greeted(first)
            await greeted(second)
            async with connect(server.port) as third:
                assert await third.reply() == TOO_MANY
                assert await third.at_eof()
            assert (await first.command("QUIT")).startswith("221")
            assert await first.at_eof()
            await until_served(connect, server.port)
            assert (await second.command("NOOP")).startswith("250")


async def test_a_client_that_vanishes_frees_its_slot(connect: Connect) -> None:
    app, made = limited_app(per_ip=1)
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0)) as server:
        async with connect(server.port) as first:
            await greeted(first)
            assert made[0].open_connections("127.0.0.1") == 1
            async with connect(server.port) as second:
                assert await second.reply() == TOO_MANY
        # first closed without QUIT
        await until_served(connect, server.port)


async def test_a_refused_connection_holds_no_slot() -> None:
    app, made = limited_app(per_ip=1)
    async with TestClient(app) as client:
        assert await client.connect() == GREETING
        other = TestClient(app)  # a second session of the same App, same address
        assert (await other.connect()).code == 421
        assert not other.connected
        assert made[0].open_connections("127.0.0.1") == 1
        await client.quit()
        # The old session is dropped when the client opens its next one: the slot is free.
        assert await client.connect() == GREETING
        assert made[0].open_connections("127.0.0.1") == 1


# -- new connections per minute, with a fake clock -----------------------------------------------


async def connect_and_quit(client: TestClient, host: str) -> Reply:
    client.peer = (host, 40000)
    greeting = await client.connect()
    if client.connected:
        await client.quit()
    return greeting


async def test_rate_limit_421_4_7_0_then_refills_over_the_minute() -> None:
    clock = FakeClock(1000.0)
    app, _ = limited_app(per_ip_per_minute=3, clock=clock)
    async with TestClient(app) as client:
        burst = [await connect_and_quit(client, "192.0.2.1") for _ in range(4)]
        assert burst == [GREETING, GREETING, GREETING, TOO_FAST]
        assert not client.connected
        # Another client is not affected.
        assert await connect_and_quit(client, "192.0.2.2") == GREETING
        # 20 s earn one connection; the refused attempt cost one too.
        clock.now += 40
        assert await connect_and_quit(client, "192.0.2.1") == GREETING
        assert await connect_and_quit(client, "192.0.2.1") == TOO_FAST
        clock.now += 120
        again = [await connect_and_quit(client, "192.0.2.1") for _ in range(4)]
        assert again == [GREETING, GREETING, GREETING, TOO_FAST]


async def test_refused_attempts_count_so_a_hammering_client_stays_refused() -> None:
    clock = FakeClock(1000.0)
    app, _ = limited_app(per_ip_per_minute=1, clock=clock)
    async with TestClient(app) as client:
        assert await connect_and_quit(client, "192.0.2.1") == GREETING
        for _ in range(5):
            clock.now += 30  # half a token each time, spent at once by the next attempt
            assert await connect_and_quit(client, "192.0.2.1") == TOO_FAST
        clock.now += 120  # two quiet minutes pay the debt and refill the bucket
        assert await connect_and_quit(client, "192.0.2.1") == GREETING


async def test_ipv6_clients_counted_by_64_ipv4_by_address() -> None:
    app, _ = limited_app(per_ip_per_minute=2, clock=FakeClock(1000.0))
    async with TestClient(app) as client:
        hosts = ["2001:db8::1", "2001:db8::ffff:2", "2001:db8:0:0:1::3", "2001:db8:0:1::1"]
        replies = [await connect_and_quit(client, host) for host in hosts]
        assert replies == [GREETING, GREETING, TOO_FAST, GREETING]
        hosts = ["192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2", "::ffff:192.0.2.1"]
        replies = [await connect_and_quit(client, host) for host in hosts]
        assert replies == [GREETING, GREETING, TOO_FAST, GREETING, TOO_FAST]


async def test_counters_stay_bounded_under_many_addresses() -> None:
    app, made = limited_app(per_ip=5, per_ip_per_minute=5, max_clients=100, clock=FakeClock(1000.0))
    async with TestClient(app) as client:
        for i in range(2000):
            host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            assert await connect_and_quit(client, host) == GREETING
        limit = made[0]
        assert limit.tracked_clients == 100
        # Only the session still held by the client counts as open.
        assert sum(limit.open_connections(f"10.0.7.{i}") for i in range(256)) <= 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionLimit(App(), per_ip=0)
    with pytest.raises(ValueError):
        ConnectionLimit(App(), per_ip_per_minute=0)


async def test_a_session_kept_alive_by_the_app_frees_its_slot_at_disconnect() -> None:
    """The slot follows the Disconnect event, not the Session object's lifetime."""
    app, made = limited_app(per_ip=1)
    kept: list[object] = []
    app.on_connect(kept.append)
    async with TestClient(app) as client:
        assert await client.connect() == GREETING
        await client.quit()
        assert made[0].open_connections("127.0.0.1") == 0
        assert await client.connect() == GREETING
    assert made[0].open_connections("127.0.0.1") == 0
    assert len(kept) == 2
