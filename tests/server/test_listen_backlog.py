"""The listen queue: a burst of clients waits in the kernel's queue while the server is busy.

asyncio's ``create_server()`` listens again on the socket it is given, with a queue of 100 by
default. A burst past that drops handshakes, and a client whose last ACK was dropped believes it
is connected and waits for a greeting that never comes (RFC 5321 3.1: the client waits for the
220). Checked on every loop, the asyncio Protocol path included.
"""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from minismtp.app import App
from minismtp.server import ServerConfig, serve

pytestmark = pytest.mark.anyio

BURST = 300  # three times asyncio's default queue


async def test_a_burst_of_connections_is_queued_not_dropped() -> None:
    config = ServerConfig(max_connections=BURST)
    async with serve(App(hostname="mx.example.com"), "127.0.0.1", 0, config=config) as server:
        # Nothing below awaits: the event loop, and so the server, accepts nothing meanwhile,
        # and every handshake must be completed by the kernel from the listen queue.
        clients = [socket.socket() for _ in range(BURST)]
        try:
            with selectors.DefaultSelector() as selector:
                for sock in clients:
                    sock.setblocking(False)
                    sock.connect_ex(("127.0.0.1", server.port))
                    selector.register(sock, selectors.EVENT_WRITE)
                connected = 0
                # A dropped SYN is sent again after a second, and dropped again.
                deadline = time.monotonic() + 2.0
                while connected < BURST and (left := deadline - time.monotonic()) > 0:
                    for key, _ in selector.select(left):
                        selector.unregister(key.fileobj)
                        connected += 1
            assert connected == BURST
        finally:
            for sock in clients:
                sock.close()
