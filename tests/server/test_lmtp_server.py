"""LMTP and unix-domain sockets through the real server, on every backend.

smtplib's LMTP client for the basic flow (it reads one reply after the data, so it cannot
see the others); a raw socket for the per-recipient replies (RFC 2033 4.2).
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from minismtp import App, Reply
from minismtp.message import Message
from minismtp.server import ServerConfig, SmtpServer, serve
from minismtp.testing import parse_replies
from minismtp.types import Address, Transaction
from minismtp.unix import SocketInUse

pytestmark = pytest.mark.anyio

BODY = b"Subject: hi\r\n\r\nHello.\r\n"


def config() -> ServerConfig:
    """Made per test: ServerConfig.inline follows MINISMTP_INLINE (tests/server/conftest.py)."""
    return ServerConfig(shutdown_grace=1.0)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "lmtp.sock"


def list_app() -> App:
    app = App(hostname="lists.test")

    @app.on_data
    def per_list(tx: Transaction, message: Message) -> dict[Address, Reply]:
        return {r: Reply(550, "5.1.1", "No such list") for r in tx.rcpt_to if r.local_part != "dev"}

    return app


def exchange(path: Path, data: bytes) -> list[Reply]:
    """Send ``data`` in one write to the unix socket, then read every reply until close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(data)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    return parse_replies(received)


async def test_smtplib_lmtp_over_a_unix_socket(sock_path: Path) -> None:
    app = App(hostname="lmtp.test")
    async with serve(app, port=None, unix=sock_path, lmtp=True, config=config()) as server:
        assert server.addresses == [] and server.unix_paths == [str(sock_path)]

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.LMTP(str(sock_path)) as client:  # a path: smtplib connects over unix
                return client.sendmail("a@example.org", ["b@example.com"], BODY)

        assert await anyio.to_thread.run_sync(send) == {}
        message = await app.messages.receive()
    assert [str(r) for r in message.rcpt_to] == ["b@example.com"]
    head = message.data.split(b"\r\n\r\n")[0].decode()
    assert f"(unix:{sock_path})" in head and "with LMTP" in head
    assert message.peer == (str(sock_path), 0)
    assert not await anyio.Path(sock_path).exists()  # removed when the server stopped


async def test_each_recipient_gets_its_reply_after_the_dot_rfc2033_4_2(sock_path: Path) -> None:
    """Pipelined (RFC 2920), duplicates and a refused RCPT included."""
    app = list_app()

    @app.on_rcpt
    def no_strangers(tx: Transaction, rcpt: Address) -> Reply | None:
        return Reply(550, "5.1.1", "Unknown") if rcpt.domain != "lists.test" else None

    dialogue = (
        b"LHLO mta.test\r\nMAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<dev@lists.test>\r\nRCPT TO:<nobody@lists.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<dev@lists.test>\r\n"
        b"DATA\r\n" + BODY + b".\r\nQUIT\r\n"
    )
    async with serve(app, port=None, unix=sock_path, lmtp=True, config=config()):
        replies = await anyio.to_thread.run_sync(exchange, sock_path, dialogue)
    assert [(r.code, r.status) for r in replies] == [
        (220, None), (250, None), (250, "2.1.0"),
        (250, "2.1.5"), (250, "2.1.5"), (550, "5.1.1"), (250, "2.1.5"),
        (354, None),
        (250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0"),  # dev, nobody, dev again
        (221, "2.0.0"),
    ]  # fmt: skip
    assert replies[0].text == "lists.test LMTP"


async def test_bdat_last_gets_one_reply_per_recipient_over_tcp() -> None:
    """LMTP on a TCP port too; RFC 3030 chunks answered as the final dot is."""
    app = list_app()
    async with serve(app, "127.0.0.1", 0, lmtp=True, config=config()) as server:

        def talk() -> list[Reply]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                client.sendall(
                    b"LHLO mta.test\r\nMAIL FROM:<a@example.org>\r\n"
                    b"RCPT TO:<nobody@lists.test>\r\nRCPT TO:<dev@lists.test>\r\n"
                    b"BDAT %d LAST\r\n%sQUIT\r\n" % (len(BODY), BODY)
                )
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
            return parse_replies(received)

        replies = await anyio.to_thread.run_sync(talk)
    assert [r.code for r in replies] == [220, 250, 250, 250, 250, 550, 250, 221]


async def test_the_log_line_shows_each_recipients_own_outcome(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minismtp")
    dialogue = (
        b"LHLO mta.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dev@lists.test>\r\n"
        b"RCPT TO:<nobody@lists.test>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n"
    )
    async with serve(list_app(), port=None, unix=sock_path, lmtp=True, config=config()):
        await anyio.to_thread.run_sync(exchange, sock_path, dialogue)
    assert (
        "to=<dev@lists.test>,<nobody@lists.test> outcomes=<nobody@lists.test>:550 " in caplog.text
    )


async def test_ehlo_is_refused_in_lmtp_mode(sock_path: Path) -> None:
    async with serve(App(), port=None, unix=sock_path, lmtp=True, config=config()):
        replies = await anyio.to_thread.run_sync(
            exchange, sock_path, b"EHLO x\r\nHELO x\r\nLHLO x\r\nQUIT\r\n"
        )
    assert [(r.code, r.status) for r in replies][1:3] == [(500, "5.5.1"), (500, "5.5.1")]
    assert replies[3].code == 250


async def test_smtp_and_lmtp_peers_in_the_log(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The transaction's log line names the socket as the peer."""
    caplog.set_level(logging.INFO, logger="minismtp")
    async with serve(App(), "127.0.0.1", 0, unix=sock_path, config=config()) as server:
        assert len(server.addresses) == 1 and server.unix_paths == [str(sock_path)]
        replies = await anyio.to_thread.run_sync(
            exchange,
            sock_path,
            b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
            + BODY
            + b".\r\nQUIT\r\n",
        )
        assert replies[-2].code == 250
    assert f"from {sock_path} " in caplog.text


async def test_the_socket_gets_its_mode(sock_path: Path) -> None:
    async with serve(App(), port=None, unix=sock_path, unix_mode=0o660, config=config()):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660


async def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    async with serve(App(), port=None, unix=sock_path, config=config()):
        replies = await anyio.to_thread.run_sync(exchange, sock_path, b"QUIT\r\n")
    assert [r.code for r in replies] == [220, 221]


async def test_a_live_server_at_the_path_is_not_replaced(sock_path: Path) -> None:
    async with serve(App(), port=None, unix=sock_path, config=config()):
        with pytest.raises(SocketInUse):
            async with serve(App(), port=None, unix=sock_path, config=config()):
                pass  # pragma: no cover
        replies = await anyio.to_thread.run_sync(exchange, sock_path, b"QUIT\r\n")
        assert [r.code for r in replies] == [220, 221]


async def test_smtpserver_speaks_lmtp() -> None:
    """The seed's API, in LMTP mode."""
    async with SmtpServer("127.0.0.1", 0, "lmtp.test", timeout=10, lmtp=True) as listening:

        def send() -> Sequence[object]:
            with smtplib.LMTP("127.0.0.1", listening.port) as client:
                return [client.sendmail("a@example.org", ["b@example.com"], BODY)]

        assert await anyio.to_thread.run_sync(send) == [{}]
        with anyio.fail_after(5):
            mail = await listening.mail_rx.receive()
        assert [str(r) for r in mail.rcpt_to] == ["b@example.com"]
        await listening.stop()
