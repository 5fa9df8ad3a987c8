"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314) with trustme certificates, on both backends."""

from __future__ import annotations

import logging
import smtplib
import ssl
from pathlib import Path

import anyio
import pytest
import trustme

from minismtp.app import App
from minismtp.server import Server, ServerConfig, serve
from minismtp.tls import TLSConfig
from minismtp.types import Address, Reply, Session, TLSInfo, Transaction
from tests.helpers.certs import Certificates, issue_certificates
from tests.helpers.clients import Connect, WireClient, drain

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["auto", "stream"])
def config(request: pytest.FixtureRequest) -> ServerConfig:
    """Both transports: "auto" (an asyncio Protocol on asyncio) and anyio's streams."""
    return ServerConfig(shutdown_grace=2.0, transport=request.param)


BODY = b"Subject: secret\r\n\r\nOver TLS.\r\n"


async def starttls(client: WireClient, certs: Certificates) -> None:
    assert (await client.reply()).startswith("220 mx.test ESMTP")
    assert "STARTTLS" in await client.command("EHLO client.example")
    assert (await client.command("STARTTLS")).startswith("220 2.0.0")
    await client.starttls(certs.client_context())


# -- real clients ------------------------------------------------------------------------------


async def test_starttls_with_smtplib_rfc3207(tls_server: Server, certs: Certificates) -> None:
    def send() -> tuple[bool, bool]:
        with smtplib.SMTP("127.0.0.1", tls_server.port, timeout=10) as client:
            client.ehlo()
            offered_before = client.has_extn("starttls")
            client.starttls(context=certs.client_context())
            client.ehlo()
            offered_after = client.has_extn("starttls")
            client.sendmail("a@example.com", ["b@example.com"], BODY)
            return offered_before, offered_after

    offered_before, offered_after = await anyio.to_thread.run_sync(send)
    assert offered_before and not offered_after  # RFC 3207 4.2: not advertised once active
    (message,) = drain(tls_server)
    assert message.original == BODY
    assert message.tls is not None and message.tls.version in ("TLSv1.2", "TLSv1.3")
    assert message.tls.cipher
    assert b"with ESMTPS id" in message.data.split(b"\r\n\r\n")[0]


async def test_implicit_tls_with_smtp_ssl_rfc8314_3_3(
    tls_server: Server, certs: Certificates
) -> None:
    assert tls_server.tls_port and tls_server.tls_port != tls_server.port

    def send() -> bool:
        with smtplib.SMTP_SSL(
            "127.0.0.1", tls_server.tls_port, context=certs.client_context(), timeout=10
        ) as client:
            client.ehlo()
            client.sendmail("a@example.com", ["b@example.com"], BODY)
            return client.has_extn("starttls")

    assert await anyio.to_thread.run_sync(send) is False
    (message,) = drain(tls_server)
    assert message.original == BODY and message.tls is not None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aiosmtplib_start_tls(tls_server: Server, certs: Certificates) -> None:
    import aiosmtplib

    errors, _ = await aiosmtplib.send(
        BODY, sender="a@example.com", recipients=["b@example.com"], hostname="127.0.0.1",
        port=tls_server.port, start_tls=True, tls_context=certs.client_context(),
    )  # fmt: skip
    assert errors == {}
    (message,) = drain(tls_server)
    assert message.tls is not None and message.original == BODY


async def test_client_verifies_the_server_certificate(tls_server: Server) -> None:
    """A client that trusts another CA refuses the handshake: the trust is real."""
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", tls_server.port, timeout=10) as client:
            client.ehlo()
            client.starttls(context=stranger)

    with pytest.raises(ssl.SSLCertVerificationError):
        await anyio.to_thread.run_sync(send)


# -- the STARTTLS state machine ------------------------------------------------------------------


async def test_commands_pipelined_after_starttls_are_discarded_rfc3207_4_2(
    tls_server: Server, certs: Certificates, connect: Connect
) -> None:
    """CVE-2011-0411 and aiosmtpd's CVE-2024-34083: plaintext after STARTTLS is never run."""
    async with connect(tls_server.port) as client:
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO client.example")).startswith("250-")
        await client.send(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\n")
        assert (await client.reply()).startswith("220 2.0.0")
        await client.starttls(certs.client_context())
        # The first reply over TLS answers our EHLO: nothing answered the injected MAIL...
        assert (await client.command("EHLO client.example")).startswith("250-mx.test")
        # ...and it opened no transaction (a second MAIL would be 503 nested MAIL).
        assert (await client.command("MAIL FROM:<b@example.com>")).startswith("250 2.1.0")


async def test_mail_right_after_the_handshake_needs_a_new_ehlo_rfc3207_4_2(
    tls_server: Server, certs: Certificates, connect: Connect
) -> None:
    async with connect(tls_server.port) as client:
        await starttls(client, certs)
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("503 5.5.1")


async def test_starttls_twice_is_503_rfc3207_4_2(
    tls_server: Server, certs: Certificates, connect: Connect
) -> None:
    async with connect(tls_server.port) as client:
        await starttls(client, certs)
        ehlo = await client.command("EHLO client.example")
        assert "STARTTLS" not in ehlo
        assert (await client.command("STARTTLS")).startswith("503 5.5.1")
    assert tls_server.tls_port is not None
    async with connect(tls_server.tls_port, tls=certs.client_context()) as client:
        assert (await client.reply()).startswith("220 mx.test")
        assert (await client.command("STARTTLS")).startswith("503 5.5.1")


async def test_starttls_without_a_certificate_is_502(server: Server, connect: Connect) -> None:
    async with connect(server.port) as client:
        assert (await client.reply()).startswith("220")
        assert "STARTTLS" not in await client.command("EHLO client.example")
        assert (await client.command("STARTTLS")).startswith("502 5.5.1")


async def test_require_tls_530_before_starttls_rfc3207_4(
    app: App, certs: Certificates, connect: Connect
) -> None:
    tls = TLSConfig(certs.cert_path, certs.key_path)
    async with (
        serve(app, "127.0.0.1", 0, tls=tls, require_tls=True) as server,
        connect(server.port) as client,
    ):
        assert (await client.reply()).startswith("220")
        await client.command("EHLO client.example")
        reply = await client.command("MAIL FROM:<a@example.com>")
        assert reply == "530 5.7.0 Must issue a STARTTLS command first"
        assert (await client.command("STARTTLS")).startswith("220")
        await client.starttls(certs.client_context())
        await client.command("EHLO client.example")
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")


async def test_session_records_the_client_certificate_subject(
    app: App, certs: Certificates, connect: Connect
) -> None:
    client_cert = certs.ca.issue_cert("client.example", common_name="client.example")
    context = certs.client_context()
    client_cert.configure_cert(context)
    seen: list[TLSInfo | None] = []

    @app.on_mail
    def record(tx: Transaction, sender: Address) -> None:
        seen.append(tx.session.tls)

    tls = TLSConfig(certs.cert_path, certs.key_path, client_ca_path=certs.ca_path)
    async with serve(app, "127.0.0.1", 0, tls=tls) as server, connect(server.port) as client:
        assert (await client.reply()).startswith("220")
        await client.command("EHLO client.example")
        assert (await client.command("STARTTLS")).startswith("220")
        await client.starttls(context)
        await client.command("EHLO client.example")
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")
    (info,) = seen
    assert info is not None and info.peer_certificate_subject is not None
    assert info.peer_certificate_subject.startswith("CN=client.example,")


# -- bad clients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("handshake_timeout", [1.0])  # the stalled one is to time out
async def test_bad_handshakes_cost_only_their_connection(
    tls_server: Server,
    certs: Certificates,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stalled handshake, plaintext on the implicit TLS port and a garbage ClientHello are
    each dropped (one log line each) while a good client is served at the same time."""
    assert tls_server.tls_port is not None
    tls_port = tls_server.tls_port
    caplog.set_level(logging.INFO, logger="minismtp")
    dropped: list[str] = []

    async def stall_mid_starttls() -> None:
        async with connect(tls_server.port) as client:
            assert (await client.reply()).startswith("220")
            await client.command("EHLO client.example")
            assert (await client.command("STARTTLS")).startswith("220")
            await client.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
            assert await client.at_eof()  # after the server's handshake timeout
            dropped.append("stalled")

    async def plaintext_on_tls_port() -> None:
        async with connect(tls_port) as client:
            await client.send(b"EHLO client.example\r\n")
            assert await client.at_eof()
            dropped.append("plaintext")

    async def garbage_client_hello() -> None:
        async with connect(tls_port) as client:
            await client.send(b"\x16\x03\x01\x00\x30" + b"\xff" * 48)
            assert await client.at_eof()
            dropped.append("garbage")

    def good_client() -> None:
        with smtplib.SMTP_SSL(
            "127.0.0.1", tls_port, context=certs.client_context(), timeout=10
        ) as client:
            client.sendmail("a@example.com", ["b@example.com"], BODY)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stall_mid_starttls)
            tasks.start_soon(plaintext_on_tls_port)
            tasks.start_soon(garbage_client_hello)
            await anyio.to_thread.run_sync(good_client)
    assert sorted(dropped) == ["garbage", "plaintext", "stalled"]
    assert [m.original for m in drain(tls_server)] == [BODY]
    failures = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(failures) == 3, [r.getMessage() for r in failures]
    assert any("timed out" in r.getMessage() for r in failures)


# -- certificate reload ----------------------------------------------------------------------------


def server_ca_issuer(port: int) -> str:
    """The organization of the CA that issued the certificate the server presents now."""
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=10)
    from cryptography import x509  # trustme's own dependency

    issuer = x509.load_pem_x509_certificate(pem.encode()).issuer
    return issuer.rfc4514_string()


async def test_certificate_reload_for_new_connections(
    app: App, tmp_path: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    directory = anyio.Path(tmp_path)
    first = issue_certificates(tmp_path / "first")
    second = issue_certificates(tmp_path / "second")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    await cert_path.write_bytes(first.cert_path.read_bytes())
    await key_path.write_bytes(first.key_path.read_bytes())
    tls = TLSConfig(str(cert_path), str(key_path))
    async with serve(app, "127.0.0.1", 0, tls=tls, tls_port=0) as server:
        assert server.tls_port is not None
        before = await anyio.to_thread.run_sync(server_ca_issuer, server.tls_port)

        # A broken file is refused and the old certificate stays.
        await cert_path.write_bytes(b"not a certificate")
        with caplog.at_level(logging.ERROR, logger="minismtp"):
            assert server.reload_tls() is False
        assert "keeping the old one" in caplog.text
        assert await anyio.to_thread.run_sync(server_ca_issuer, server.tls_port) == before

        await cert_path.write_bytes(second.cert_path.read_bytes())
        await key_path.write_bytes(second.key_path.read_bytes())
        assert server.reload_tls() is True
        after = await anyio.to_thread.run_sync(server_ca_issuer, server.tls_port)
        assert after != before


async def test_connect_hook_sees_implicit_tls_before_the_greeting(
    app: App, tls_server: Server, certs: Certificates, connect: Connect
) -> None:
    seen: list[TLSInfo | None] = []

    @app.on_connect
    def record(session: Session) -> Reply | None:
        seen.append(session.tls)
        return None

    assert tls_server.tls_port is not None
    async with connect(tls_server.tls_port, tls=certs.client_context()) as client:
        assert (await client.reply()).startswith("220")
    async with connect(tls_server.port) as client:
        assert (await client.reply()).startswith("220")
    assert seen[0] is not None and seen[1] is None
