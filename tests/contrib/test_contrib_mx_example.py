"""examples/mx.py: the combined inbound MX, through whole dialogues."""

from __future__ import annotations

import importlib
import smtplib
from pathlib import Path

import anyio
import pytest

from examples.mx import MAX_MESSAGE_SIZE, create_app
from minismtp.dns import FakeResolver
from minismtp.server import ServerConfig, serve
from minismtp.testing import TestClient
from minismtp.types import Reply
from tests.helpers.clock import FakeClock

pytestmark = pytest.mark.anyio

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello, example.com.\r\n"


def stored(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


async def test_mx_refuses_relay_greylists_then_stores_to_the_maildir(tmp_path: Path) -> None:
    clock = FakeClock()
    app = create_app(tmp_path, clock=clock, resolver=FakeResolver())
    async with TestClient(app) as client:
        ehlo = await client.ehlo("client.example.org")
        assert f"SIZE {MAX_MESSAGE_SIZE}" in ehlo.lines
        assert await client.mail("a@example.org", f"SIZE={MAX_MESSAGE_SIZE + 1}") == Reply(
            552, "5.3.4", "Message size exceeds fixed maximum message size"
        )
        assert (await client.mail("a@example.org")).code == 250
        # Relaying is refused outright, not greylisted.
        assert await client.rcpt("b@elsewhere.org") == Reply(550, "5.7.1", "Relay access denied")
        assert await client.rcpt("b@example.com") == Reply(
            451, "4.7.1", "Greylisted, try again later"
        )
        await client.rset()
        clock.now += 300
        replies = await client.send_message("a@example.org", ["b@example.com"], BODY)
        assert [r.code for r in replies] == [250, 250, 250]
        replies = await client.send_message("a@example.org", ["c@sales.example.com"], BODY)
        assert [r.code for r in replies] == [250, 451]  # another recipient: greylisted too
    (message,) = client.messages
    assert stored(tmp_path) == [message.data]
    assert message.data.startswith(b"Authentication-Results: mx.example.com;\r\n\tspf=none")
    assert b"\r\nReceived: from " in message.data and message.data.endswith(BODY)


async def test_module_app_stores_where_mx_maildir_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MX_MAILDIR", str(tmp_path / "inbound"))
    import examples.mx

    module = importlib.reload(examples.mx)
    assert module.app.maildir is not None and module.app.maildir.path == tmp_path / "inbound"
    async with TestClient(module.app) as client:
        replies = await client.send_message("a@example.org", ["b@example.com"], BODY)
        assert [r.code for r in replies] == [250, 451]
    assert (tmp_path / "inbound" / "new").is_dir()


async def test_mx_over_a_real_socket_with_smtplib(tmp_path: Path) -> None:
    clock = FakeClock()
    app = create_app(tmp_path, clock=clock, resolver=FakeResolver())
    async with serve(app, "127.0.0.1", 0, config=ServerConfig(shutdown_grace=1.0)) as server:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                return client.sendmail("a@example.org", ["b@example.com", "c@other.org"], BODY)

        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await anyio.to_thread.run_sync(send)
        assert refused.value.recipients == {
            "b@example.com": (451, b"4.7.1 Greylisted, try again later"),
            "c@other.org": (550, b"5.7.1 Relay access denied"),
        }
        clock.now += 300
        assert await anyio.to_thread.run_sync(send) == {
            "c@other.org": (550, b"5.7.1 Relay access denied")
        }
    (data,) = stored(tmp_path)
    assert data.endswith(BODY)
