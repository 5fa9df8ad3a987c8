"""One address must not lock everybody out: the per-address limit and stress-adaptive timeouts.

As Postfix does by default: ``smtpd_client_connection_count_limit`` (50 from one client) and,
once the server is near its connection cap, idle and data-rate deadlines cut to 10 s
(``${stress?{10}:{300}}``). Each accept path is covered: "auto" is the asyncio Protocol on
asyncio and uvloop and the socket itself on trio, "stream" is anyio's streams.
"""

from __future__ import annotations

import logging
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any, Literal

import anyio
import pytest

from minismtp.admission import address_key
from minismtp.app import App
from minismtp.server import Server, ServerConfig, serve
from tests.helpers.clients import Connect, WireClient, drain

pytestmark = pytest.mark.anyio

BODY = b"From: a@example.com\r\nSubject: legitimate\r\n\r\nStill delivered.\r\n"
FROM_YOUR_ADDRESS = "421 4.7.0 Too many connections from your address"


@pytest.fixture(params=["auto", "stream"])
def transport(request: pytest.FixtureRequest) -> Literal["auto", "stream"]:
    return request.param  # type: ignore[no-any-return]


def server_records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "minismtp.server" and text in r.getMessage()
    ]


async def greeted(client: WireClient) -> None:
    assert (await client.reply()).startswith("220 mx.test ESMTP")


async def open_greeted(stack: AsyncExitStack, connect: Connect, port: int, n: int) -> list[Any]:
    clients = [await stack.enter_async_context(connect(port)) for _ in range(n)]
    for client in clients:
        await greeted(client)
    return clients


async def sendmail_from(source: str, port: int) -> None:
    """A whole message with smtplib, from ``source`` (another loopback address)."""

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
            client.sendmail("a@example.com", ["b@example.com"], BODY)

    await anyio.to_thread.run_sync(send)


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll the server's state, with a deadline: its changes have no event to wait on."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def wait_until_all_closed(server: Server) -> None:
    await eventually(lambda: not server.connections)


# -- the per-address limit ---------------------------------------------------------------------


async def test_one_address_gets_421_past_its_limit_and_another_still_gets_its_250(
    app: App,
    connect: Connect,
    transport: Literal["auto", "stream"],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without the per-address limit the attacker's 12 would take all 10 slots.
    caplog.set_level(logging.INFO, "minismtp.server")
    config = ServerConfig(max_connections=10, max_connections_per_address=5, transport=transport)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        port = server.port
        async with AsyncExitStack() as stack:
            attackers = await open_greeted(stack, connect, port, 5)
            for _ in range(7):
                async with connect(port) as extra:
                    with anyio.fail_after(10):
                        assert await extra.reply() == FROM_YOUR_ADDRESS
                        assert await extra.at_eof()
            # The flood holds its 5 slots; a client from elsewhere is served whole.
            await sendmail_from("127.0.0.2", port)
            (message,) = drain(server)
            assert message.peer[0] == "127.0.0.2"
            assert message.original == BODY
            for attacker in attackers:  # still served: the limit refuses only the extra ones
                assert (await attacker.command("NOOP")).startswith("250")
    # Seven refusals, one line (at most one per ten seconds).
    assert server_records(caplog, "refused") == [
        "refused 1 connection(s), the last from 127.0.0.1: 5 open from that address "
        "(--max-connections-per-address)"
    ]


async def test_a_slot_is_freed_when_a_connection_ends(
    app: App, connect: Connect, transport: Literal["auto", "stream"]
) -> None:
    config = ServerConfig(max_connections_per_address=2, transport=transport)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        port = server.port
        async with connect(port) as first, connect(port) as second:
            await greeted(first)
            await greeted(second)
            async with connect(port) as third:
                assert await third.reply() == FROM_YOUR_ADDRESS
            assert (await first.command("QUIT")).startswith("221")
            assert await first.at_eof()
            # Counted out once the server has closed the first session (not at the client's
            # QUIT): polled with a deadline.
            with anyio.fail_after(10):
                while True:
                    async with connect(port) as fourth:
                        if (await fourth.reply()).startswith("220"):
                            break
        # The others, dropped by their client rather than ended by QUIT, are counted out too.
        await wait_until_all_closed(server)
        assert server._admission.per_address == {}
        async with AsyncExitStack() as stack:
            await open_greeted(stack, connect, port, 2)


async def test_no_limit_per_address_with_0(app: App, connect: Connect) -> None:
    config = ServerConfig(max_connections_per_address=0)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        async with AsyncExitStack() as stack:
            await open_greeted(stack, connect, server.port, 8)
        assert server._admission.per_address == {}


def test_the_limit_counts_an_ipv6_client_by_its_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack listener's IPv4
    assert address_key("fe80::1%2") == "fe80::/64"
    assert address_key("") is None  # a unix-domain socket's client: not counted
    assert address_key("/run/client.sock") is None
    assert address_key("/run/odd:name") is None


# -- stress ------------------------------------------------------------------------------------


@pytest.fixture
async def stressable(app: App, transport: Literal["auto", "stream"]) -> AsyncIterator[Server]:
    """10 slots, stress past 8 open, 0.5 s timeouts under stress, 300 s otherwise."""
    config = ServerConfig(
        max_connections=10,
        max_connections_per_address=0,
        stress_threshold=0.8,
        stress_idle_timeout=0.5,
        idle_timeout=300,
        transport=transport,
    )
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        yield server


def read_deadlines(server: Server) -> list[float]:
    """Seconds left to each read under way."""
    now = time.monotonic()
    return sorted(c.deadline - now for c in server._connections if c._reading)


async def test_under_stress_idle_and_trickling_clients_are_cut_in_the_short_timeout(
    stressable: Server, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "minismtp.server")
    server = stressable
    port = server.port
    async with AsyncExitStack() as stack:
        uploader, *idle = await open_greeted(stack, connect, port, 8)
        await uploader.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        assert [(await uploader.reply())[:3] for _ in range(3)] == ["250"] * 3
        assert (await uploader.command("DATA")).startswith("354")
        await uploader.send(b"Subject: slow\r\n")  # then nothing: a trickle at 0 B/s
        # Eight open is 80%, not more: no stress, the long timeouts.
        await eventually(lambda: len(read_deadlines(server)) == 8)
        assert not server.under_stress
        assert min(read_deadlines(server)) > 100
        started = time.monotonic()
        late = await stack.enter_async_context(connect(port))  # the ninth: stress
        with anyio.fail_after(10):  # 0.5 s, with room for a loaded machine
            await greeted(late)
            assert server.under_stress
            # The reads under way are cut short, counted from when they began...
            for client in idle:
                assert await client.reply() == "421 4.4.2 Timeout exceeded, closing connection"
            assert await uploader.reply() == "421 4.4.2 Data rate too low, closing connection"
            # ...and so is the read that began under stress.
            assert await late.reply() == "421 4.4.2 Timeout exceeded, closing connection"
        assert time.monotonic() - started < 5  # not the 300 s
    await wait_until_all_closed(server)
    # Once no more than the threshold have been open for a stress timeout, it is over.
    await eventually(lambda: not server.under_stress)
    assert server.idle_timeout == 300
    assert server_records(caplog, "stress") == [
        "under stress: 9 of 10 connections open (--max-connections); idle and data-rate "
        "timeouts cut to 0.5 s until the load falls",
        "stress over: 0 connections open; timeouts back to 300 s",
    ]


async def test_stress_is_logged_once_however_many_clients_come(
    app: App,
    connect: Connect,
    transport: Literal["auto", "stream"],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "minismtp.server")
    # A stress timeout that nothing here reaches: the clients stay while more come.
    config = ServerConfig(
        max_connections=10, max_connections_per_address=0, stress_idle_timeout=60,
        transport=transport,
    )  # fmt: skip
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        async with AsyncExitStack() as stack:
            await open_greeted(stack, connect, server.port, 10)
            for _ in range(3):  # past the cap: the global 421, still no second stress line
                async with connect(server.port) as extra:
                    assert (await extra.reply()).startswith("421 4.7.0 Too many connections,")
            assert server.under_stress
            assert 50 < min(read_deadlines(server)) and max(read_deadlines(server)) <= 60
    assert len(server_records(caplog, "under stress")) == 1
