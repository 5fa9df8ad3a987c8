"""contrib.access: ClientAccess allow and deny lists, decided at connect."""

from __future__ import annotations

import smtplib

import anyio
import pytest

from minismtp.app import App
from minismtp.contrib.access import ClientAccess
from minismtp.server import serve
from minismtp.testing import TestClient
from minismtp.types import Reply, Session
from tests.helpers.clients import Connect

pytestmark = pytest.mark.anyio

DENIED = Reply(554, "5.7.1", "Access denied")
GREETING = Reply(220, None, "mx.test ESMTP")


def access_app(allow: list[str] = [], deny: list[str] = []) -> App:  # noqa: B006
    app = App(hostname="mx.test")
    app.add_middleware(ClientAccess, allow=allow, deny=deny)
    return app


async def greetings(app: App, hosts: list[str]) -> list[Reply]:
    """The greeting each host gets; a refused one must also find the session closed."""
    replies = []
    async with TestClient(app) as client:
        for host in hosts:
            client.peer = (host, 40000)
            reply = await client.connect()
            replies.append(reply)
            if reply.is_success:
                await client.quit()
            else:
                assert not client.connected  # a non-2xx greeting ends the session
    return replies


async def test_denied_network_gets_554_5_7_1_and_is_closed_rfc5321_3_1() -> None:
    app = access_app(deny=["192.0.2.0/24", "2001:db8::/32"])
    replies = await greetings(
        app, ["192.0.2.77", "198.51.100.1", "2001:db8:1::1", "2001:db9::1", "::ffff:192.0.2.1"]
    )
    assert replies == [DENIED, GREETING, DENIED, GREETING, DENIED]


async def test_allow_list_serves_only_its_networks() -> None:
    app = access_app(allow=["10.0.0.0/8", "2001:db8::1"])
    replies = await greetings(app, ["10.20.30.40", "192.0.2.1", "2001:db8::1", "2001:db8::2"])
    assert replies == [GREETING, DENIED, GREETING, DENIED]


async def test_most_specific_range_decides() -> None:
    app = access_app(allow=["10.1.2.0/24", "192.0.2.0/24"], deny=["10.0.0.0/8", "192.0.2.9"])
    replies = await greetings(app, ["10.1.2.3", "10.9.9.9", "192.0.2.8", "192.0.2.9"])
    assert replies == [GREETING, DENIED, GREETING, DENIED]


async def test_same_range_in_both_lists_denies() -> None:
    assert await greetings(
        access_app(allow=["192.0.2.0/24"], deny=["192.0.2.0/24"]), ["192.0.2.1"]
    ) == [DENIED]


async def test_a_peer_that_is_not_an_ip_matches_no_range() -> None:
    assert await greetings(access_app(deny=["0.0.0.0/0"]), ["/run/smtp.sock"]) == [GREETING]
    assert await greetings(access_app(allow=["0.0.0.0/0"]), ["/run/smtp.sock"]) == [DENIED]


async def test_refused_client_never_reaches_connect_hooks() -> None:
    app = access_app(deny=["192.0.2.0/24"])
    seen: list[str] = []

    @app.on_connect
    def record(session: Session) -> None:
        seen.append(session.peer_host)

    await greetings(app, ["192.0.2.1", "198.51.100.1"])
    assert seen == ["198.51.100.1"]


def test_a_range_with_host_bits_set_is_an_error() -> None:
    with pytest.raises(ValueError):
        ClientAccess(App(), deny=["192.0.2.1/24"])


async def test_denied_over_a_real_socket_554_then_eof_rfc5321_3_1(connect: Connect) -> None:
    app = access_app(deny=["127.0.0.0/8"])
    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        with anyio.fail_after(5):
            assert await client.reply() == "554 5.7.1 Access denied"
            assert await client.at_eof()


async def test_allowed_over_a_real_socket_smtplib_delivers() -> None:
    app = access_app(allow=["127.0.0.1"])
    async with serve(app, "127.0.0.1", 0) as server:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")

        await anyio.to_thread.run_sync(send)
        assert server.mail_rx.receive_nowait().original == b"Subject: x\r\n\r\nhi\r\n"
