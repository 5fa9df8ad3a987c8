"""The server behind a load balancer: the PROXY protocol (HAProxy's spec, v1 and v2) as the
step before the SMTP engine, on every backend and transport, with STARTTLS and implicit TLS."""

from __future__ import annotations

import ipaddress
import logging
import struct
from contextlib import AsyncExitStack

import anyio
import pytest
from anyio.streams.tls import TLSStream

from minismtp.app import App
from minismtp.proxy import V2_SIGNATURE, parse_networks
from minismtp.server import Server, ServerConfig
from minismtp.types import Session
from tests.helpers.certs import Certificates
from tests.helpers.clients import Connect, FirstWritePrefixed, WireClient

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["auto", "stream"])
def config(request: pytest.FixtureRequest) -> ServerConfig:
    """Both transports; a PROXY deadline long enough for any header that is sent (the test of
    the deadline itself has its own)."""
    return ServerConfig(
        shutdown_grace=2.0, proxy_protocol=True, proxy_timeout=30.0, transport=request.param
    )


@pytest.fixture
def sessions(app: App) -> list[Session]:
    seen: list[Session] = []
    app.on_connect(seen.append)
    return seen


def v2(command: int, family: int, payload: bytes = b"") -> bytes:
    """A v2 header (spec 2.2): signature, version 2 and command, family, length, payload."""
    return (
        V2_SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(payload)) + payload
    )


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return s.packed + d.packed + struct.pack("!HH", sport, dport)


REAL = object()  # the session keeps the real peer: 127.0.0.1
HEADERS = {
    "v1-tcp4": (b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 25\r\n", ("203.0.113.7", 40000)),
    "v1-tcp6": (b"PROXY TCP6 2001:db8::7 2001:db8::25 40001 25\r\n", ("2001:db8::7", 40001)),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", REAL),
    "v2-tcp4": (v2(1, 0x11, inet("203.0.113.8", "198.51.100.1", 40002, 25)), ("203.0.113.8", 40002)),
    "v2-tcp6": (v2(1, 0x21, inet("2001:db8::8", "2001:db8::25", 40003, 25)), ("2001:db8::8", 40003)),
    "v2-local": (v2(0, 0x00), REAL),  # a health check from the balancer itself
}  # fmt: skip


@pytest.mark.parametrize("name", list(HEADERS))
async def test_header_sets_the_session_peer_and_the_rest_reaches_the_engine(
    name: str, server: Server, sessions: list[Session], connect: Connect
) -> None:
    """The header and the first command in one segment: the peer is the proxied client and
    the EHLO after the header is answered (the bytes are not dropped)."""
    header, expected = HEADERS[name]
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await client.send(header + b"EHLO client.example\r\n")
            assert (await client.reply()).startswith("220 mx.test ESMTP")
            assert (await client.reply()).startswith("250-mx.test")
            (session,) = sessions
            if expected is REAL:
                assert session.peer[0] == "127.0.0.1" and session.peer[1] > 0
                assert session.local == ("127.0.0.1", server.port)
            else:
                assert session.peer == expected
                assert session.local[1] == 25
    assert server.metrics.proxy_errors == 0


async def test_received_header_names_the_proxied_client_rfc5321_4_4(
    server: Server, connect: Connect
) -> None:
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await client.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n")
            assert (await client.reply()).startswith("220 ")
            for line in (
                "EHLO client.example",
                "MAIL FROM:<a@example.com>",
                "RCPT TO:<b@example.com>",
            ):
                assert (await client.command(line)).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            assert (await client.command("Subject: hi\r\n\r\nproxied\r\n.")).startswith("250 2.0.0")
    message = server.mail_rx.receive_nowait()
    assert message.peer == ("203.0.113.9", 40000)
    assert b"[203.0.113.9]" in message.data[: message.trace_length]


BAD = {
    "garbage": b"EHLO client.example\r\n",
    "v1-bad-address": b"PROXY TCP4 203.0.113 198.51.100.1 40000 25\r\n",
    "v1-too-long": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    "v2-oversized": V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000),
    "v2-bad-version": V2_SIGNATURE + b"\x31\x11\x00\x0c",
}


async def no_greeting(client: WireClient) -> None:
    """The server closes the connection without sending a single byte."""
    with anyio.fail_after(5):
        assert await client.at_eof()
    assert not client.buffer


@pytest.mark.parametrize("name", list(BAD))
async def test_bad_header_closed_without_greeting(
    name: str, server: Server, sessions: list[Session], connect: Connect
) -> None:
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await client.send(BAD[name])
            await no_greeting(client)
    assert not sessions
    assert server.metrics.proxy_errors == 1


async def test_truncated_header_then_eof_closed_without_greeting(
    server: Server, sessions: list[Session], connect: Connect
) -> None:
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await client.send(b"PROXY TCP4 203.0.113.7 ")
            await client.stream.send_eof()  # type: ignore[attr-defined]
            await no_greeting(client)
    assert not sessions and server.metrics.proxy_errors == 1


@pytest.mark.parametrize(
    "config",
    [
        ServerConfig(proxy_protocol=True, proxy_timeout=0.5, transport=transport)
        for transport in ("auto", "stream")
    ],
)
async def test_missing_header_closed_at_the_deadline_without_greeting(
    server: Server, sessions: list[Session], connect: Connect
) -> None:
    """A client that waits for a greeting (no header) is closed after proxy_timeout."""
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await no_greeting(client)
    assert not sessions and server.metrics.proxy_errors == 1


@pytest.mark.parametrize(
    "config",
    [ServerConfig(proxy_protocol=True, proxy_trusted=parse_networks(["10.0.0.0/8"]))],
)
async def test_untrusted_source_closed_without_greeting(
    server: Server, sessions: list[Session], connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.1 is not a trusted proxy here: even a valid header is not believed."""
    with anyio.fail_after(5):
        async with connect(server.port) as client:
            await client.send(HEADERS["v1-tcp4"][0] + b"EHLO client.example\r\n")
            await no_greeting(client)
    assert not sessions and server.metrics.proxy_errors == 1
    assert "not a trusted proxy" in caplog.text


async def test_starttls_behind_a_v2_header_rfc3207(
    tls_server: Server, sessions: list[Session], connect: Connect, certs: Certificates
) -> None:
    header = v2(1, 0x11, inet("203.0.113.10", "198.51.100.1", 40010, 25))
    with anyio.fail_after(5):
        async with connect(tls_server.port) as client:
            await client.send(header)
            assert (await client.reply()).startswith("220 ")
            assert "STARTTLS" in await client.command("EHLO client.example")
            assert (await client.command("STARTTLS")).startswith("220 2.0.0")
            await client.starttls(certs.client_context())
            assert (await client.command("EHLO client.example")).startswith("250-mx.test")
            (session,) = sessions
            assert session.peer == ("203.0.113.10", 40010)
            assert session.tls is not None
    assert tls_server.metrics.tls_sessions == 1


async def test_implicit_tls_behind_a_v2_header_rfc8314(
    tls_server: Server, sessions: list[Session], certs: Certificates
) -> None:
    """The ClientHello in the header's segment goes to the TLS handshake, not lost."""
    assert tls_server.tls_port is not None
    header = v2(1, 0x11, inet("203.0.113.11", "198.51.100.1", 40011, 465))
    raw = await anyio.connect_tcp("127.0.0.1", tls_server.tls_port)
    with anyio.fail_after(10):
        stream = await TLSStream.wrap(
            FirstWritePrefixed(raw, header),
            hostname="localhost",
            ssl_context=certs.client_context(),
            standard_compatible=False,
        )
        client = WireClient(stream)
        try:
            assert (await client.reply()).startswith("220 mx.test ESMTP")
            assert (await client.command("EHLO client.example")).startswith("250-mx.test")
        finally:
            await anyio.aclose_forcefully(stream)
    (session,) = sessions
    assert session.peer == ("203.0.113.11", 40011)
    assert session.tls is not None and session.tls.version.startswith("TLS")


async def test_plain_client_on_the_tls_port_behind_a_header_is_refused(
    tls_server: Server, sessions: list[Session], connect: Connect
) -> None:
    """Plaintext after the header where a ClientHello belongs: the handshake fails, no 220."""
    assert tls_server.tls_port is not None
    with anyio.fail_after(5):
        async with connect(tls_server.tls_port) as client:
            await client.send(HEADERS["v1-tcp4"][0] + b"EHLO client.example\r\n")
            with anyio.fail_after(5):
                while not await client.at_eof():
                    client.buffer.clear()  # a TLS alert, perhaps; never a greeting
    assert not sessions


# -- the per-address limit behind the balancer ---------------------------------------------------

FROM_YOUR_ADDRESS = "421 4.7.0 Too many connections from your address"


def limited(transport: str) -> ServerConfig:
    """Two connections per client; every connection comes from one balancer, 127.0.0.1."""
    return ServerConfig(
        shutdown_grace=2.0,
        proxy_protocol=True,
        proxy_timeout=30.0,
        max_connections_per_address=2,
        transport=transport,  # type: ignore[arg-type]
    )


def proxied(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 198.51.100.1 {port} 25\r\n".encode()


@pytest.mark.parametrize("config", [limited(t) for t in ("auto", "stream")], ids=["auto", "stream"])
async def test_the_limit_counts_the_client_the_header_names_not_the_balancer(
    server: Server, sessions: list[Session], connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10), caplog.at_level(logging.INFO, "minismtp.server"):
        async with AsyncExitStack() as stack:
            first = []
            for n in range(2):
                client = await stack.enter_async_context(connect(server.port))
                await client.send(proxied("203.0.113.7", 40000 + n))
                assert (await client.reply()).startswith("220 mx.test ESMTP")
                first.append(client)
            # A third from the same client: refused, after its header, with the per-address 421.
            async with connect(server.port) as extra:
                await extra.send(proxied("203.0.113.7", 40002) + b"EHLO client.example\r\n")
                assert await extra.reply() == FROM_YOUR_ADDRESS
                assert await extra.at_eof()
            # Another client through the same balancer (the balancer's third and fourth
            # connections): served, in v1 and in v2.
            headers = [
                proxied("203.0.113.8", 40003),
                v2(1, 0x11, inet("203.0.113.8", "198.51.100.1", 40004, 25)),
            ]
            for header in headers:
                other = await stack.enter_async_context(connect(server.port))
                await other.send(header)
                assert (await other.reply()).startswith("220 mx.test ESMTP")
            assert (await first[0].command("QUIT")).startswith("221")
            assert await first[0].at_eof()
            # Its slot is given back once the server has closed the session: polled.
            while True:
                async with connect(server.port) as again:
                    await again.send(proxied("203.0.113.7", 40005))
                    if (await again.reply()).startswith("220"):
                        break
                    await anyio.sleep(0.01)
        while server.connections:  # noqa: ASYNC110  # the server's state has no event
            await anyio.sleep(0.01)
    assert server._admission.per_address == {}
    # The refused connection never reached the App; the others did, each as its client.
    assert sorted({s.peer[0] for s in sessions}) == ["203.0.113.7", "203.0.113.8"]
    assert server.metrics.proxy_errors == 0
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused[0] == (
        "refused 1 connection(s), the last from 203.0.113.7: 2 open from that address "
        "(--max-connections-per-address)"
    )


@pytest.mark.parametrize("config", [limited("auto")])
async def test_past_the_limit_on_the_tls_port_behind_a_header_closed_without_a_reply(
    tls_server: Server, sessions: list[Session], connect: Connect
) -> None:
    """On the implicit TLS port a plaintext 421 would be noise: the refusal just closes."""
    assert tls_server.tls_port is not None
    with anyio.fail_after(10):
        async with AsyncExitStack() as stack:
            for n in range(2):  # held open, their handshakes never started
                client = await stack.enter_async_context(connect(tls_server.tls_port))
                await client.send(proxied("203.0.113.7", 40000 + n))
            while tls_server._admission.per_address.get("203.0.113.7") != 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            async with connect(tls_server.tls_port) as extra:
                await extra.send(proxied("203.0.113.7", 40002))
                await no_greeting(extra)
    assert not sessions
