"""The server over real sockets: real clients, timeouts, limits and shutdown, on both backends."""

from __future__ import annotations

import logging
import smtplib
import socket
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from minismtp.app import App
from minismtp.asyncio_wire import ProtocolWire
from minismtp.events import Event, Mail
from minismtp.server import Server, ServerConfig, SmtpServer, serve
from minismtp.trio_wire import TrioSocketWire
from minismtp.types import Address, Message, Reply, Session, Transaction
from minismtp.wires import StreamWire
from tests.helpers.clients import Connect, WireClient, drain

pytestmark = pytest.mark.anyio


BODY = b"From: a@example.com\r\nSubject: hello\r\n\r\nHello, world.\r\n"


async def sendmail(port: int, sender: str, recipients: list[str], body: bytes = BODY) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(sender, recipients, body)

    await anyio.to_thread.run_sync(send)


async def greeted(client: WireClient) -> None:
    assert (await client.reply()).startswith("220 mx.test ESMTP")
    assert (await client.command("EHLO client.example")).startswith("250-mx.test")


# -- mail goes through -------------------------------------------------------------------------


async def test_plain_message_with_smtplib_rfc5321_3_3(server: Server) -> None:
    await sendmail(server.port, "a@example.com", ["b@example.com"])
    (message,) = drain(server)
    assert message.mail_from == Address("a", "example.com")
    assert message.rcpt_to == (Address("b", "example.com"),)
    assert message.original == BODY
    assert message.data.startswith(b"Received: from ")
    assert message.data.endswith(BODY)
    assert message.peer[0] == "127.0.0.1"


async def test_several_recipients_rfc5321_3_3(server: Server) -> None:
    recipients = [f"user{i}@example.com" for i in range(5)]
    await sendmail(server.port, "a@example.com", recipients)
    (message,) = drain(server)
    assert [str(rcpt) for rcpt in message.rcpt_to] == recipients


async def test_several_transactions_in_one_session_rfc5321_3_3(server: Server, app: App) -> None:
    sessions: list[Session] = []
    app.on_connect(sessions.append)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            for i in range(3):
                client.sendmail("a@example.com", [f"b{i}@example.com"], BODY + b"%d\r\n" % i)

    await anyio.to_thread.run_sync(send)
    messages = drain(server)
    assert [m.original for m in messages] == [BODY + b"%d\r\n" % i for i in range(3)]
    assert len(sessions) == 1 and sessions[0].transactions == 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aiosmtplib_message(server: Server) -> None:
    import aiosmtplib

    errors, response = await aiosmtplib.send(
        BODY, sender="a@example.com", recipients=["b@example.com"], hostname="127.0.0.1",
        port=server.port, start_tls=False,
    )  # fmt: skip
    assert errors == {} and response.startswith("2.0.0 OK queued as")
    (message,) = drain(server)
    assert message.original == BODY


async def test_sessions_get_unique_ids_and_addresses(server: Server, app: App) -> None:
    sessions: list[Session] = []
    app.on_connect(sessions.append)
    await sendmail(server.port, "a@example.com", ["b@example.com"])
    await sendmail(server.port, "a@example.com", ["b@example.com"])
    first, second = sessions
    assert first.id and second.id and first.id != second.id
    assert first.peer[0] == "127.0.0.1" and first.peer[1] > 0
    assert first.local == ("127.0.0.1", server.port)
    assert first.hostname == "mx.test"


# -- refusals ----------------------------------------------------------------------------------


async def test_rcpt_refused_by_hook_reaches_smtplib_rfc5321_4_2_2(server: Server, app: App) -> None:
    @app.on_rcpt
    async def only_example_com(tx: Transaction, rcpt: Address) -> Reply | None:
        if rcpt.domain != "example.com":
            return Reply(550, "5.7.1", "Relay access denied")
        return None

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await sendmail(server.port, "a@example.com", ["b@elsewhere.example"])
    assert refused.value.recipients == {"b@elsewhere.example": (550, b"5.7.1 Relay access denied")}
    assert drain(server) == []


class RefuseSender:
    def __init__(self, app: App, *, sender: str) -> None:
        self.app = app
        self.sender = sender

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Mail) and str(event.address) == self.sender:
            return Reply(553, "5.7.1", "Sender refused")
        return await self.app(event)


async def test_middleware_rejection_rfc5321_4_2_2(server: Server, app: App) -> None:
    app.add_middleware(RefuseSender, sender="spam@example.com")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await sendmail(server.port, "spam@example.com", ["b@example.com"])
    assert refused.value.smtp_code == 553
    await sendmail(server.port, "good@example.com", ["b@example.com"])
    assert [str(m.mail_from) for m in drain(server)] == ["good@example.com"]


async def test_hook_that_raises_gives_451_and_the_next_transaction_works(
    server: Server, app: App
) -> None:
    @app.on_data
    def explode_once(tx: Transaction, message: Message) -> None:
        if b"boom" in message.data:
            raise RuntimeError("secret detail")

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as failed:
                client.sendmail("a@example.com", ["b@example.com"], b"boom\r\n")
            client.sendmail("a@example.com", ["b@example.com"], BODY)
            return failed.value.smtp_code, failed.value.smtp_error

    code, text = await anyio.to_thread.run_sync(send)
    assert code == 451 and text.startswith(b"4.3.0") and b"secret" not in text
    assert [m.original for m in drain(server)] == [BODY]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_keyboard_interrupt_in_a_session_leaves_serve_bare() -> None:
    """Trio raises a KeyboardInterrupt in whichever task runs, often a session's; it leaves
    serve() as itself, not in nested exception groups. (On asyncio it leaves the event loop
    from the task at once, asyncio's own way, which a test cannot catch.)"""
    app = App(hostname="mx.example.com")

    @app.on_rcpt
    def interrupted(tx: Transaction, rcpt: Address) -> None:
        raise KeyboardInterrupt

    def send_quietly(port: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.com", ["b@example.com"], BODY)
        except (smtplib.SMTPException, OSError):
            pass  # the server is gone mid-session

    with anyio.fail_after(10), pytest.raises(KeyboardInterrupt):
        async with serve(app, "127.0.0.1", 0) as server:
            port = server.addresses[0][1]
            await anyio.to_thread.run_sync(send_quietly, port, abandon_on_cancel=True)
            await anyio.sleep_forever()


# -- load ----------------------------------------------------------------------------------------


async def test_200_concurrent_clients_5_messages_each_received_once_byte_exact(
    app: App, connect: Connect
) -> None:
    """RFC 2920 pipelining and RFC 5321 4.5.2 dot-stuffing under 200 concurrent sessions."""

    def content(client: int, n: int) -> bytes:
        # A line starting with a dot (stuffed on the wire) and sizes from 0.1 to 15 KB.
        lines = (b"x" * 70 + b"\r\n") * (client + n)
        return b"Subject: %d-%d\r\n\r\n.dot\r\n%s%s\r\n" % (client, n, lines, b"y" * n)

    async def one_client(number: int) -> None:
        async with connect(server.port) as client:
            await greeted(client)
            for n in range(5):
                await client.send(
                    b"MAIL FROM:<c%d@example.org>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n" % number
                )
                assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
                await client.send(content(number, n).replace(b"\r\n.", b"\r\n..") + b".\r\n")
                assert (await client.reply()).startswith("250 2.0.0")
            assert (await client.command("QUIT")).startswith("221")

    # 200 clients from one address: past the per-address limit (50) unless it is off.
    config = ServerConfig(shutdown_grace=2.0, max_connections_per_address=0)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for number in range(200):
                    clients.start_soon(one_client, number)
    received = Counter(m.original for m in drain(server))
    expected = Counter(content(c, n) for c in range(200) for n in range(5))
    assert received == expected


async def test_client_vanishing_mid_data_leaves_no_message(
    server: Server, connect: Connect
) -> None:
    async with connect(server.port) as client:
        await greeted(client)
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
        await client.send(b"Subject: half\r\n\r\nhalf a message")
    # The server keeps serving, and only the complete message arrives.
    await sendmail(server.port, "a@example.com", ["b@example.com"])
    assert [m.original for m in drain(server)] == [BODY]


# -- clocks ---------------------------------------------------------------------------------------


async def test_idle_timeout_421_4_4_2_rfc5321_4_5_3_2_7(app: App, connect: Connect) -> None:
    config = ServerConfig(idle_timeout=0.2)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            await greeted(client)
            assert (await client.reply()).startswith("421 4.4.2")
            assert await client.at_eof()


async def test_slow_but_flowing_upload_is_not_cut_by_the_idle_timeout(
    app: App, connect: Connect
) -> None:
    """An upload that keeps flowing at the minimum data rate outlasts the idle timeout."""
    # An idle timeout of 1 s leaves a loaded machine room for a late chunk.
    config = ServerConfig(idle_timeout=1.0, min_data_rate=100)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        await greeted(client)
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
        started = anyio.current_time()
        for _ in range(25):  # 100 bytes every 0.1 s: 2.5 s in all, over two idle timeouts
            await client.send(b"y" * 98 + b"\r\n")
            await anyio.sleep(0.1)
        await client.send(b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        assert anyio.current_time() - started > 2 * config.idle_timeout
    (message,) = drain(server)
    assert message.original == (b"y" * 98 + b"\r\n") * 25


async def test_trickling_upload_is_cut_by_the_minimum_data_rate(app: App, connect: Connect) -> None:
    """Postfix's smtpd_min_data_rate: bytes that never stop but come too slowly are cut."""
    config = ServerConfig(idle_timeout=1.0, min_data_rate=10_000)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        await greeted(client)
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]

        async def trickle() -> None:
            # 10 bytes every 20 ms: never idle for 1 s, but 500 bytes/s, not 10,000.
            with pytest.raises((anyio.BrokenResourceError, OSError)):
                while True:
                    await client.send(b"z" * 8 + b"\r\n")
                    await anyio.sleep(0.02)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(trickle)
                assert (await client.reply()).startswith("421 4.4.2 Data rate too low")
                tasks.cancel_scope.cancel()
    assert drain(server) == []


async def test_session_duration_cap(app: App, connect: Connect) -> None:
    config = ServerConfig(idle_timeout=5, max_session_duration=0.5)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        await greeted(client)
        with anyio.fail_after(5):
            # Well within the idle timeout, but the session as a whole has lasted too long.
            assert (await client.reply()).startswith("421 4.4.2 Session time limit exceeded")
            assert await client.at_eof()


async def test_a_client_that_stops_reading_loses_its_slot(
    app: App, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """Replies the client never reads fill the buffers; the stalled write times out."""
    caplog.set_level(logging.INFO, logger="minismtp")
    config = ServerConfig(idle_timeout=1.0)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        await greeted(client)
        await client.send(b"MAIL FROM:<a@example.com>\r\n")
        flood = b"RCPT TO:<b@example.com>\r\n" * 40_000  # a duplicate: answered every time
        with anyio.fail_after(10), pytest.raises((anyio.BrokenResourceError, OSError)):
            while True:
                await client.send(flood)
        assert "stopped reading" in caplog.text


async def test_greeting_delay_refuses_a_client_that_talks_first_rfc5321_4_3_1(
    app: App, server: Server, connect: Connect
) -> None:
    @app.on_connect
    def hold_greeting(session: Session) -> None:
        session.greeting_delay = 10.0

    async with connect(server.port) as client:
        with anyio.fail_after(5):
            await client.send(b"EHLO early.example\r\n")
            reply = await client.reply()
            assert reply == "554 5.5.1 Protocol error: talked before greeting"
            assert await client.at_eof()


async def test_greeting_delay_serves_a_client_that_waits(
    app: App, server: Server, connect: Connect
) -> None:
    @app.on_connect
    def hold_greeting(session: Session) -> None:
        session.greeting_delay = 0.2

    async with connect(server.port) as client:
        started = time.monotonic()
        await greeted(client)
        # The server's 0.2 s may start a little before connect() returns here, and uvloop's
        # loop clock lags by up to a millisecond: a hundredth of a second of slack.
        assert time.monotonic() - started >= 0.19


# -- limits ----------------------------------------------------------------------------------------


async def test_max_connections_421_4_7_0(app: App, connect: Connect) -> None:
    config = ServerConfig(max_connections=2)
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        async with connect(server.port) as first, connect(server.port) as second:
            await greeted(first)
            await greeted(second)
            async with connect(server.port) as third:
                assert (await third.reply()).startswith("421 4.7.0")
                assert await third.at_eof()
            assert (await first.command("QUIT")).startswith("221")
            assert await first.at_eof()
            # The slot is free again once the server has closed the first session.
            with anyio.fail_after(5):
                while True:
                    async with connect(server.port) as fourth:
                        if (await fourth.reply()).startswith("220"):
                            break
            assert (await second.command("NOOP")).startswith("250")


async def test_port_in_use_is_an_oserror(app: App, server: Server) -> None:
    with pytest.raises(OSError):
        async with serve(App(), "127.0.0.1", server.port):
            pass


# -- shutdown ------------------------------------------------------------------------------------


async def test_graceful_shutdown_lets_a_transaction_finish(app: App, connect: Connect) -> None:
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=10)) as server:
        port = server.port
        async with connect(port) as busy, connect(port) as idle, anyio.create_task_group() as tg:
            await greeted(busy)
            await greeted(idle)
            await busy.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [(await busy.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
            await busy.send(b"Subject: first half\r\n")
            tg.start_soon(server.stop)
            with anyio.fail_after(5):
                # The idle session is told at once; the busy one finishes its message.
                assert (await idle.reply()).startswith("421 4.3.2")
                await busy.send(b"\r\nsecond half\r\n.\r\n")
                assert (await busy.reply()).startswith("250 2.0.0")
                assert (await busy.reply()).startswith("421 4.3.2")
                assert await busy.at_eof()
        assert server.connections == 0
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)
    assert [m.original for m in drain(server)] == [b"Subject: first half\r\n\r\nsecond half\r\n"]


async def test_graceful_shutdown_gives_up_after_the_grace_period(
    app: App, connect: Connect
) -> None:
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=0.2)) as server:
        async with connect(server.port) as busy:
            await greeted(busy)
            await busy.send(b"MAIL FROM:<a@example.com>\r\n")
            assert (await busy.reply()).startswith("250")
            with anyio.fail_after(5):
                await server.stop()
            assert (await busy.reply()).startswith("421 4.3.2")
            assert await busy.at_eof()
    assert drain(server) == []


async def test_on_message_consumers_drain_before_serve_returns(connect: Connect) -> None:
    app = App(hostname="mx.test")
    seen: list[bytes] = []

    @app.on_message
    async def consume(message: Message) -> None:
        await anyio.sleep(0.01)
        seen.append(message.original)

    async with serve(app, "127.0.0.1", 0) as server:
        for i in range(3):
            await sendmail(server.port, "a@example.com", ["b@example.com"], BODY + b"%d\r\n" % i)
    assert seen == [BODY + b"%d\r\n" % i for i in range(3)]


async def test_anyio_stream_transport_on_every_loop(app: App, connect: Connect) -> None:
    """The portable path (anyio's streams) where "auto" picks another: the same dialogue, the
    same clocks."""
    config = ServerConfig(transport="stream")
    async with serve(app, "127.0.0.1", 0, config=config) as server:
        await sendmail(server.port, "a@example.com", ["b@example.com"])
        async with connect(server.port) as client:
            await greeted(client)
            await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [(await client.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
            await client.send(b"..dot\r\n.\r\n")
            assert (await client.reply()).startswith("250 2.0.0")
    assert [m.original for m in drain(server)] == [BODY, b".dot\r\n"]
    # The idle timeout, short for this step alone: the one meant to time out.
    config = ServerConfig(transport="stream", idle_timeout=0.3)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            assert (await client.reply()).startswith("220 mx.test ESMTP")
            assert (await client.reply()).startswith("421 4.4.2")


@pytest.mark.parametrize("transport", ["auto", "stream"])
async def test_the_server_picks_the_wire_for_the_loop(
    app: App, connect: Connect, anyio_backend_name: str, transport: Any
) -> None:
    """ "auto": the asyncio Protocol on asyncio and uvloop, the socket itself on trio."""
    expected = {
        ("auto", "asyncio"): ProtocolWire,
        ("auto", "trio"): TrioSocketWire,
        ("stream", "asyncio"): StreamWire,
        ("stream", "trio"): StreamWire,
    }[transport, anyio_backend_name]
    config = ServerConfig(transport=transport)
    async with serve(app, "127.0.0.1", 0, config=config) as server, connect(server.port) as client:
        assert (await client.reply()).startswith("220 mx.test ESMTP")
        (connection,) = server._connections
        assert type(connection.wire) is expected
        assert (await client.command("QUIT")).startswith("221")


# -- the seed's API --------------------------------------------------------------------------------


async def test_seed_api_sketch_4() -> None:
    """The seed's API as the README's "The seed's API: `SmtpServer`" shows it, with smtplib."""
    from minismtp import SmtpServer

    server = SmtpServer("127.0.0.1", 0, "localhost", timeout=10)
    async with server.start() as listening:
        await sendmail(listening.port, "a@example.com", ["b@example.com"])
        with anyio.fail_after(5):
            mail = await listening.mail_rx.receive()
        assert (mail.mail_from, mail.rcpt_to) == (
            Address("a", "example.com"),
            (Address("b", "example.com"),),
        )
        assert mail.data.startswith(b"Received: from ")
        assert b"by localhost with ESMTP" in mail.data
        await listening.stop()


async def test_seed_api_as_context_manager_with_buffer_size() -> None:
    async with SmtpServer("127.0.0.1", 0, "mx.seed", timeout=10, buffer_size=7) as listening:
        assert listening.config.read_size == 7 and listening.config.idle_timeout == 10
        await sendmail(listening.port, "a@example.com", ["b@example.com"])
        mail = listening.mail_rx.receive_nowait()
        assert mail.original == BODY


# -- the pytest plugin -----------------------------------------------------------------------------


@pytest.fixture
def smtp_app() -> App:
    app = App(hostname="plugin.test")

    @app.on_rcpt
    def refuse_elsewhere(tx: Transaction, rcpt: Address) -> Reply | None:
        return None if rcpt.domain == "example.com" else Reply(550, "5.7.1", "No relay")

    return app


def test_pytest_plugin_smtp_server_fixture(smtp_server: tuple[str, int], smtp_app: App) -> None:
    host, port = smtp_server
    with smtplib.SMTP(host, port, timeout=10) as client:
        assert client.ehlo()[1].startswith(b"plugin.test")
        client.mail("a@example.org")
        assert client.rcpt("b@elsewhere.example")[0] == 550
        client.rset()
        client.sendmail("a@example.org", ["b@example.com"], BODY)
    assert smtp_app.messages.receive_nowait().original == BODY
    with socket.create_connection((host, port), timeout=10) as raw:
        assert raw.recv(100).startswith(b"220 plugin.test")
