"""Pytest fixtures for testing an App over a real socket (loaded automatically by pytest).

Override ``smtp_app`` with your App; ``smtp_server`` then serves it on 127.0.0.1 on a free
port for the duration of one test and gives ``(host, port)``::

    import smtplib
    import pytest
    from myproject import app

    @pytest.fixture
    def smtp_app():
        return app

    def test_foreign_recipient_is_refused(smtp_server):
        host, port = smtp_server
        with smtplib.SMTP(host, port) as client:
            client.ehlo()
            client.mail("a@example.org")
            assert client.rcpt("b@elsewhere.example")[0] == 550

The server runs on its own event loop in a background thread, so plain (sync) tests can use
``smtplib`` directly and async tests any client. Messages the server accepted are on
``smtp_app.messages`` as soon as the client has its ``250``: read them with
``receive_nowait()``, or collect them with an ``@app.on_message`` hook.

Imports happen inside the fixtures, so loading this plugin costs a test run nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from minismtp.server import ServableApp


@pytest.fixture
def smtp_app() -> ServableApp:
    """The App that ``smtp_server`` serves: override this fixture with yours.

    The default accepts every message and puts it on ``smtp_app.messages``.
    """
    from minismtp.app import App

    return App(hostname="localhost")


@pytest.fixture
def smtp_server(smtp_app: ServableApp) -> Iterator[tuple[str, int]]:
    """A real minismtp server serving ``smtp_app`` on 127.0.0.1, port chosen by the system."""
    from anyio.from_thread import start_blocking_portal

    from minismtp.server import ServerConfig, serve

    host = "127.0.0.1"
    # A test should not wait long for a session it left open.
    config = ServerConfig(shutdown_grace=1.0)
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(serve(smtp_app, host, 0, config=config)) as server,
    ):
        yield (host, server.port)
