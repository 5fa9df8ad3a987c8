"""contrib.early_talker: clients that talk before the greeting, over real sockets."""

from __future__ import annotations

import smtplib
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from minismtp.app import App
from minismtp.contrib.access import ClientAccess
from minismtp.contrib.early_talker import EarlyTalker
from minismtp.server import Server, ServerConfig, serve
from minismtp.types import Session
from tests.helpers.clients import Connect

pytestmark = pytest.mark.anyio

TALKED_FIRST = "554 5.5.1 Protocol error: talked before greeting"
DELAY = 0.2


def talker_app(delay: float = DELAY) -> App:
    app = App(hostname="mx.test")
    app.add_middleware(EarlyTalker, delay=delay)
    return app


def served(app: App) -> AbstractAsyncContextManager[Server]:
    return serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0))


async def test_client_talking_first_gets_554_5_5_1_and_is_dropped_rfc5321_4_3_1(
    connect: Connect,
) -> None:
    # A long delay: the client talks at once, so the test does not wait for it.
    async with served(talker_app(delay=30.0)) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            await client.send(b"EHLO spambot.example\r\n")
            assert await client.reply() == TALKED_FIRST
            assert await client.at_eof()


async def test_pipelined_transaction_before_the_greeting_is_never_executed(
    connect: Connect,
) -> None:
    app = talker_app(delay=30.0)
    async with served(app) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            await client.send(
                b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                b"DATA\r\nSubject: spam\r\n\r\nspam\r\n.\r\nQUIT\r\n"
            )
            assert await client.reply() == TALKED_FIRST
            assert await client.at_eof()
        with pytest.raises(anyio.WouldBlock):
            server.mail_rx.receive_nowait()


async def test_patient_client_is_greeted_after_the_delay_and_served(connect: Connect) -> None:
    async with served(talker_app()) as server, connect(server.port) as client:
        started = anyio.current_time()
        with anyio.fail_after(5):
            assert await client.reply() == "220 mx.test ESMTP"
        # The server's delay starts at its accept(), which may come a little before connect()
        # returns here, and uvloop's loop clock lags by up to a millisecond.
        assert anyio.current_time() - started >= DELAY - 0.02
        assert (await client.command("EHLO patient.example")).startswith("250-mx.test")
        assert (await client.command("QUIT")).startswith("221")


async def test_smtplib_waits_for_the_greeting_and_delivers() -> None:
    async with served(talker_app()) as server:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")

        await anyio.to_thread.run_sync(send)
        assert server.mail_rx.receive_nowait().original == b"Subject: x\r\n\r\nhi\r\n"


async def test_a_refused_greeting_is_sent_at_once(connect: Connect) -> None:
    app = App(hostname="mx.test")
    app.add_middleware(ClientAccess, deny=["127.0.0.0/8"])
    app.add_middleware(EarlyTalker, delay=30.0)
    async with served(app) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            assert await client.reply() == "554 5.7.1 Access denied"
            assert await client.at_eof()


async def test_a_connect_hook_may_exempt_trusted_clients(connect: Connect) -> None:
    app = talker_app(delay=30.0)

    @app.on_connect
    def trust_localhost(session: Session) -> None:
        if session.peer_host == "127.0.0.1":
            session.greeting_delay = 0.0

    async with served(app) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            assert await client.reply() == "220 mx.test ESMTP"


def test_delay_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EarlyTalker(App(), delay=0)
