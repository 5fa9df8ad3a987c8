"""Whatever a client sends, in whatever writes, a real server answers it over its socket just
as the engine alone answers the same bytes: the wire and the session loop add nothing, lose
nothing and reorder nothing (asyncio, uvloop and trio, each with its own wire, and anyio's
streams on each)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import anyio.lowlevel
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minismtp.app import App
from minismtp.server import ServerConfig, serve
from minismtp.types import Address, Message, Transaction
from tests.helpers.backends import with_uvloop
from tests.helpers.clients import drain
from tests.helpers.engine_driver import drive
from tests.helpers.smtp_input import LIMITS, check_replies, cut, smtpish

_QUEUED_AS = re.compile(rb"OK queued as [0-9A-F]+")


@attrs.frozen
class Served:
    port: int
    messages: Callable[[], list[Message]]  # those accepted since the last call


@pytest.fixture(scope="module", params=with_uvloop())
def backend(request: pytest.FixtureRequest) -> Any:
    return request.param


# The usual read size, and one that makes every read a few bytes (trio) or pauses reading after
# a few bytes until the session takes them (asyncio, uvloop); and anyio's streams everywhere.
@pytest.fixture(
    scope="module",
    params=[ServerConfig(), ServerConfig(read_size=7), ServerConfig(transport="stream")],
    ids=["auto", "read_size=7", "streams"],
)
def served(backend: Any, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A server on a thread of its own, on ``backend``, with the config of ``request.param``."""
    name, options = backend if isinstance(backend, tuple) else (backend, {})
    with anyio.from_thread.start_blocking_portal(name, options) as portal:
        app = App(hostname="mx.test", limits=LIMITS)

        @app.on_mail
        async def let_others_run(transaction: Transaction, sender: Address) -> None:
            # A hook that waits: the session's task goes on after it, not the inline path of
            # the usual App calls, and the client's bytes may queue on the wire meanwhile.
            await anyio.lowlevel.checkpoint()

        with portal.wrap_async_context_manager(
            serve(app, "127.0.0.1", 0, config=request.param)
        ) as server:
            # On the server's own thread: a message is on the channel before its 250 is sent.
            yield Served(server.addresses[0][1], lambda: portal.call(drain, server))


def exchange(port: int, writes: list[bytes]) -> bytes:
    """Send ``writes`` one by one, close our side, and take every reply up to the server's
    close."""
    replies = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        try:
            for data in writes:
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if isinstance(exc, TimeoutError):  # a server that stopped answering: a failure
                raise
            # The server closed first (after QUIT, or at an HTTP request) and our bytes it
            # did not read made its close a reset: its replies are still read below.
        while True:
            try:
                received = client.recv(65536)
            except ConnectionResetError:
                break  # unread bytes of ours made the close a reset: all it sent came first
            if not received:
                break
            replies += received
    return bytes(replies)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=smtpish, points=st.lists(st.integers(min_value=0), max_size=12))
def test_over_a_socket_every_reply_and_message_is_the_engines(
    served: Served, data: bytes, points: list[int]
) -> None:
    alone = drive(data, limits=LIMITS)
    replies = _QUEUED_AS.sub(b"OK queued", exchange(served.port, cut(data, points)))
    check_replies(replies)
    assert replies == alone.out
    assert [message.original for message in served.messages()] == alone.messages
