"""contrib.size: MessageSizeLimit (RFC 1870) in EHLO, MAIL, DATA and BDAT, and its memory bound."""

from __future__ import annotations

import smtplib
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest

from minismtp.app import App
from minismtp.contrib.size import MessageSizeLimit
from minismtp.server import ServerConfig, serve
from minismtp.testing import TestClient
from minismtp.types import Reply
from tests.helpers.clients import Connect, WireClient

pytestmark = pytest.mark.anyio

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LIMIT = 10_000
MiB = 1024 * 1024


def limited_app(max_bytes: int = LIMIT, max_size: int | None = None) -> App:
    app = App(hostname="mx.example.com", max_size=max_size)
    app.add_middleware(MessageSizeLimit, max_bytes=max_bytes)
    return app


def sized(n: int) -> bytes:
    """A message of exactly ``n`` octets (n >= 2): 80-octet CRLF lines and a shorter last one."""
    whole, rest = divmod(n, 80)
    if rest == 1:  # no 1-octet line: make the last full line one longer instead
        whole, rest = whole - 1, 81
    return (b"x" * 78 + b"\r\n") * whole + (b"y" * (rest - 2) + b"\r\n" if rest else b"")


def size_lines(reply: Reply) -> list[str]:
    return [line for line in reply.lines if line.upper().startswith("SIZE")]


# -- EHLO ---------------------------------------------------------------------------------------


async def test_ehlo_advertises_the_limit_instead_of_the_servers_rfc1870_4() -> None:
    async with TestClient(limited_app()) as client:
        reply = await client.ehlo("client.example.org")
    assert size_lines(reply) == [f"SIZE {LIMIT}"]
    assert "PIPELINING" in reply.lines  # the other keywords stay


async def test_ehlo_before_and_after_starttls_both_advertise_the_limit_rfc3207_4_2() -> None:
    app = limited_app()
    async with TestClient(app, tls=True) as client:
        before = await client.ehlo()
        assert "STARTTLS" in before.lines and size_lines(before) == [f"SIZE {LIMIT}"]
        assert (await client.starttls()).code == 220
        after = await client.ehlo()
        assert "STARTTLS" not in after.lines and size_lines(after) == [f"SIZE {LIMIT}"]
        assert await client.ehlo() == after


async def test_helo_reply_is_left_alone_rfc5321_4_1_1_1() -> None:
    async with TestClient(limited_app()) as client:
        assert await client.helo("client.example.org") == Reply(250, None, "mx.example.com")


async def test_a_limit_above_the_servers_advertises_the_servers() -> None:
    async with TestClient(limited_app(max_bytes=50_000, max_size=20_000)) as client:
        assert size_lines(await client.ehlo()) == ["SIZE 20000"]
        # And the server's limit is what holds.
        assert await client.mail("a@example.org", "SIZE=20001") == TOO_BIG


@pytest.mark.parametrize("limits", [(3000, 5000), (5000, 3000)])
async def test_two_limits_in_either_order_the_smaller_wins(limits: tuple[int, int]) -> None:
    app = App(hostname="mx.example.com")
    for max_bytes in limits:
        app.add_middleware(MessageSizeLimit, max_bytes=max_bytes)
    async with TestClient(app) as client:
        assert size_lines(await client.ehlo()) == ["SIZE 3000"]
        replies = await client.send_message("a@example.org", "b@example.com", sized(3001))
        assert replies[-1] == TOO_BIG
        replies = await client.send_message("a@example.org", "b@example.com", sized(3000))
        assert replies[-1].code == 250


# -- MAIL SIZE= ---------------------------------------------------------------------------------


async def test_declared_size_above_the_limit_refused_at_mail_rfc1870_6_1() -> None:
    async with TestClient(limited_app()) as client:
        await client.ehlo()
        assert await client.mail("a@example.org", f"SIZE={LIMIT + 1}") == TOO_BIG
        # Refused: no transaction was opened.
        assert (await client.rcpt("b@example.com")).code == 503
        assert (await client.mail("a@example.org", f"SIZE={LIMIT}")).code == 250


async def test_smtplib_declares_the_size_and_is_refused_at_mail_rfc1870_6_1() -> None:
    app = limited_app()
    async with serve(app, "127.0.0.1", 0) as server:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], sized(LIMIT + 1))

        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await anyio.to_thread.run_sync(send)
    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.startswith(b"5.3.4 ")


# -- DATA and BDAT ------------------------------------------------------------------------------


def test_sized_builds_exact_sizes() -> None:
    for n in (2, 3, 79, 80, 81, 82, 161, 9999, 10_000, 10_001):
        assert len(sized(n)) == n


async def test_data_exactly_at_the_limit_accepted_one_more_octet_refused_rfc1870_6_3() -> None:
    async with TestClient(limited_app()) as client:
        replies = await client.send_message("a@example.org", "b@example.com", sized(LIMIT))
        assert replies[-1].code == 250
        replies = await client.send_message("a@example.org", "b@example.com", sized(LIMIT + 1))
        assert replies[-1] == TOO_BIG
        # The session goes on: the next message fits.
        replies = await client.send_message("a@example.org", "b@example.com", sized(100))
        assert replies[-1].code == 250
    assert [len(m.original) for m in client.messages] == [LIMIT, 100]


async def test_bdat_chunks_past_the_limit_refused_exact_size_accepted_rfc3030_rfc1870() -> None:
    async with TestClient(limited_app()) as client:
        await client.ehlo()
        await client.mail("a@example.org")
        await client.rcpt("b@example.com")
        assert (await client.bdat(sized(LIMIT - 80))).code == 250
        assert (await client.bdat(sized(80), last=True)).code == 250
        await client.mail("a@example.org")
        await client.rcpt("b@example.com")
        await client.bdat(sized(LIMIT - 80))
        assert await client.bdat(sized(81), last=True) == TOO_BIG
    assert [len(m.original) for m in client.messages] == [LIMIT]


async def test_refused_message_never_reaches_data_hooks() -> None:
    app = limited_app()
    seen: list[int] = []
    app.on_data(lambda tx, message: seen.append(message.size))
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", sized(LIMIT + 500))
        await client.send_message("a@example.org", "b@example.com", sized(LIMIT))
    assert seen == [LIMIT]


async def test_data_past_the_limit_over_a_real_socket_552_5_3_4(connect: Connect) -> None:
    app = limited_app()
    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await open_data(client)
        await client.send(sized(LIMIT + 1) + b".\r\n")
        assert await client.reply() == f"552 5.3.4 {TOO_BIG.text}"
        assert (await client.command("NOOP")).startswith("250")


# -- memory --------------------------------------------------------------------------------------


async def open_data(client: WireClient, bdat_size: int | None = None) -> None:
    assert (await client.reply()).startswith("220")
    assert (await client.command("EHLO client.example.org")).startswith("250")
    assert (await client.command("MAIL FROM:<a@example.org>")).startswith("250")
    assert (await client.command("RCPT TO:<b@example.com>")).startswith("250")
    if bdat_size is None:
        assert (await client.command("DATA")).startswith("354")
    else:
        await client.send(b"BDAT %d LAST\r\n" % bdat_size)


def chunks(total: int, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    """``total`` octets of 1000-octet text lines, made on the fly from one reused chunk."""
    line = b"x" * 998 + b"\r\n"
    chunk = line * (chunk_size // len(line))
    sent = 0
    while total - sent >= len(chunk):
        yield chunk
        sent += len(chunk)
    rest = total - sent
    if rest:
        yield (line * (rest // len(line) + 1))[:rest]


async def stream_message(port: int, size: int, bdat: bool) -> tuple[str, int]:
    """Send one ``size``-octet message; the final reply and the peak traced memory growth."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        client = WireClient(stream)
        await open_data(client, size if bdat else None)
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for chunk in chunks(size):
                await client.send(chunk)
            if not bdat:
                await client.send(b".\r\n")
            with anyio.fail_after(30):
                reply = await client.reply()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return reply, peak - baseline


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
async def test_200_mb_message_to_a_1_mb_limit_keeps_memory_under_16_mb_rfc1870(
    command: str,
) -> None:
    """The issue's memory test: the server cuts the content off while it streams in.

    Server and client share this process, so the traced peak covers both; the client
    holds one reused 256 KiB chunk.
    """
    app = limited_app(max_bytes=1 * MiB)
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0)) as server:
        reply, growth = await stream_message(server.port, 200_000_000, bdat=command == "BDAT")
    assert reply == f"552 5.3.4 {TOO_BIG.text}"
    assert growth < 16 * MiB, f"peak memory grew by {growth / MiB:.1f} MiB"


async def test_the_memory_measure_sees_a_message_the_server_keeps() -> None:
    """Control for the test above: without the limit, and with a spool that may keep 64 MiB
    in memory, a 24 MB message shows up in the peak."""
    app = App(hostname="mx.example.com", spool_memory=64 * MiB)
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0)) as server:
        reply, growth = await stream_message(server.port, 24_000_000, bdat=False)
    assert reply.startswith("250 2.0.0 OK queued as")
    assert growth > 24_000_000
