"""The switch of the asyncio fast path (minismtp.inline): on, App calls that need no waiting
run from the socket's callback as the connection's task; off, all of them in the task."""

from __future__ import annotations

import contextvars
import sys

import pytest

from minismtp.app import App
from minismtp.server import ServerConfig, serve
from minismtp.types import Address, Session, Transaction
from tests.helpers.clients import Connect

pytestmark = pytest.mark.anyio

VARIABLE: contextvars.ContextVar[str] = contextvars.ContextVar("VARIABLE", default="unset")


def called_from_the_callback() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "data_received":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


async def test_the_switch_decides_where_app_calls_run(
    app: App, connect: Connect, app_calls: str, anyio_backend_name: str
) -> None:
    inline: list[bool] = []
    values: list[str] = []

    @app.on_connect
    def set_variable(session: Session) -> None:
        VARIABLE.set(session.id)  # in the task: the session's context

    @app.on_mail
    def where(tx: Transaction, sender: Address) -> None:
        inline.append(called_from_the_callback())
        values.append(VARIABLE.get())

    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        assert server.config.inline is (app_calls == "inline")
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO client.example")).startswith("250")
        for _ in range(3):
            assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")
            assert (await client.command("RSET")).startswith("250")
        (connection,) = server._connections
        session_id = connection.session.id
    expected = app_calls == "inline" and anyio_backend_name == "asyncio"
    assert inline == [expected] * 3
    # Inline or not, the hook sees the context variables of the connection's task.
    assert values == [session_id] * 3


def test_inline_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINISMTP_INLINE", "0")
    assert ServerConfig().inline is False
    assert ServerConfig(inline=True).inline is True
    monkeypatch.setenv("MINISMTP_INLINE", "1")
    assert ServerConfig().inline is True
