"""The Disconnect contract: every connection whose Connect reached the App gets exactly one
Disconnect, whatever ended it; connections refused before the App saw them get neither."""

from __future__ import annotations

import socket
import struct
from collections import Counter

import anyio
import attrs
import pytest
from anyio.abc import SocketAttribute

from minismtp.app import App
from minismtp.events import Connect, Disconnect, Event, Handler
from minismtp.server import Server, ServerConfig, serve
from minismtp.testing import TestClient
from minismtp.types import Address, Reply, Session, Transaction
from tests.helpers.clients import Connect as ConnectTo
from tests.helpers.clients import WireClient

pytestmark = pytest.mark.anyio


@attrs.define
class Seen:
    """The sessions the App saw connect and disconnect, and the metrics at each Disconnect."""

    connects: list[str] = attrs.field(factory=list)
    disconnects: list[str] = attrs.field(factory=list)
    abandoned_at_disconnect: list[int] = attrs.field(factory=list)
    event: anyio.Event = attrs.field(factory=anyio.Event)

    def watch(self, app: App) -> None:
        app.on_connect(lambda session: self.connects.append(session.id))

        @app.on_disconnect
        def disconnected(session: Session) -> None:
            self.disconnects.append(session.id)
            self.abandoned_at_disconnect.append(app.metrics.transactions_abandoned)
            self.event.set()

    async def one_disconnect(self) -> str:
        with anyio.fail_after(5):
            await self.event.wait()
        self.event = anyio.Event()
        assert len(self.connects) == len(self.disconnects) == 1, (self.connects, self.disconnects)
        assert self.connects == self.disconnects
        return self.disconnects[0]


@pytest.fixture
def seen(app: App) -> Seen:
    watched = Seen()
    watched.watch(app)
    return watched


async def greeted(client: WireClient) -> None:
    assert (await client.reply()).startswith("220 ")
    assert (await client.command("EHLO client.example")).startswith("250-")


async def test_quit(server: Server, connect: ConnectTo, seen: Seen) -> None:
    async with connect(server.port) as client:
        await greeted(client)
        assert (await client.command("QUIT")).startswith("221")
        # Before the close the client sees: a slot counted at Connect is free by then.
        assert await client.at_eof()
        assert seen.disconnects == seen.connects
    await seen.one_disconnect()


async def test_client_vanishing_mid_data_ends_its_transaction_first(
    server: Server, connect: ConnectTo, seen: Seen
) -> None:
    async with connect(server.port) as client:
        await greeted(client)
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
        await client.send(b"Subject: half\r\n")
    await seen.one_disconnect()
    assert seen.abandoned_at_disconnect == [1]


async def test_connection_reset(server: Server, connect: ConnectTo, seen: Seen) -> None:
    async with connect(server.port) as client:
        await greeted(client)
        raw = client.stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await seen.one_disconnect()


async def test_idle_timeout(app: App, connect: ConnectTo, seen: Seen) -> None:
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(idle_timeout=0.2)) as server:
        async with connect(server.port) as client:
            await greeted(client)
            with anyio.fail_after(5):
                assert (await client.reply()).startswith("421 4.4.2")
            await seen.one_disconnect()


async def test_shutdown_of_an_idle_session(app: App, connect: ConnectTo, seen: Seen) -> None:
    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        with anyio.fail_after(5):
            await server.stop()
        assert (await client.reply()).startswith("421 4.3.2")
        await seen.one_disconnect()


async def test_shutdown_cancels_a_session_stuck_in_a_hook(
    app: App, connect: ConnectTo, seen: Seen
) -> None:
    entered = anyio.Event()

    @app.on_rcpt
    async def hang(tx: Transaction, rcpt: Address) -> None:
        entered.set()
        await anyio.sleep_forever()

    config = ServerConfig(shutdown_grace=0.1, shutdown_cancel_after=0.5)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        async with connect(server.port) as client:
            await greeted(client)
            await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
            with anyio.fail_after(5):
                await entered.wait()
                await server.stop()
                assert server.connections == 0
                assert await client.at_eof()
            await seen.one_disconnect()
    assert seen.abandoned_at_disconnect == [1]


async def test_refused_greeting(app: App, server: Server, connect: ConnectTo, seen: Seen) -> None:
    app.on_connect(lambda session: Reply(554, "5.7.1", "Go away"))
    async with connect(server.port) as client:
        assert (await client.reply()).startswith("554 5.7.1")
        assert await client.at_eof()
    await seen.one_disconnect()


async def test_closed_by_the_engine_after_too_many_errors(
    server: Server, connect: ConnectTo, seen: Seen
) -> None:
    async with connect(server.port) as client:
        await greeted(client)
        replies = []
        for _ in range(30):
            replies.append(await client.command("BOGUS"))
            if replies[-1].startswith("421"):
                break
        assert replies[-1].startswith("421 4.7.0")
    await seen.one_disconnect()


async def test_talked_before_the_greeting(
    app: App, server: Server, connect: ConnectTo, seen: Seen
) -> None:
    def hold(session: Session) -> None:
        session.greeting_delay = 30.0

    app.on_connect(hold)
    async with connect(server.port) as client:
        await client.send(b"EHLO early.example\r\n")
        with anyio.fail_after(5):
            assert (await client.reply()).startswith("554 5.5.1")
    await seen.one_disconnect()


async def test_the_server_full_gives_neither_event(
    app: App, connect: ConnectTo, seen: Seen
) -> None:
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(max_connections=1)) as server:
        async with connect(server.port) as first:
            await greeted(first)
            async with connect(server.port) as second:
                assert (await second.reply()).startswith("421 4.7.0")
            assert len(seen.connects) == 1 and seen.disconnects == []
            assert (await first.command("QUIT")).startswith("221")
        await seen.one_disconnect()


@attrs.define
class CountEvents:
    """Middleware counting the events of each class, as a middleware author sees them."""

    app: Handler
    counts: Counter[str]

    async def __call__(self, event: Event) -> Reply:
        self.counts[type(event).__name__] += 1
        return await self.app(event)


async def test_many_sessions_each_once(app: App, connect: ConnectTo) -> None:
    counts: Counter[str] = Counter()
    app.add_middleware(CountEvents, counts=counts)
    async with serve(app, "127.0.0.1", 0) as server:

        async def session(n: int) -> None:
            async with connect(server.port) as client:
                await greeted(client)
                if n % 2:
                    assert (await client.command("QUIT")).startswith("221")

        async with anyio.create_task_group() as tasks:
            for n in range(20):
                tasks.start_soon(session, n)
    assert counts[Connect.__name__] == counts[Disconnect.__name__] == 20


# -- the in-memory test client runs the same driver ---------------------------------------------


async def test_test_client_sends_disconnect_on_quit_eof_and_exit() -> None:
    app = App()
    seen = Seen()
    seen.watch(app)
    async with TestClient(app) as client:
        await client.ehlo()
        await client.quit()
        assert seen.disconnects == seen.connects != []
        await client.connect()  # a new session
        await client.disconnect()
        assert seen.disconnects == seen.connects and len(seen.connects) == 2
        await client.connect()
    assert seen.disconnects == seen.connects and len(seen.connects) == 3
