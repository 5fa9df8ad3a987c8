"""Shared fixtures: the anyio backends, certificates, real servers on port 0, a raw client.

What tests import (clients, certificates, backends) lives in :mod:`tests.helpers`."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from minismtp.app import App
from minismtp.server import Server, ServerConfig, serve
from minismtp.tls import TLSConfig
from tests.helpers.certs import Certificates, issue_certificates
from tests.helpers.clients import Connect, WireClient


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Run each ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return request.param


# -- certificates ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return issue_certificates(tmp_path_factory.mktemp("certs"))


# -- servers ----------------------------------------------------------------------------------


@pytest.fixture
def app() -> App:
    return App(hostname="mx.test")


@pytest.fixture
def config() -> ServerConfig:
    """Server settings for a test; override in a module or a test to change them."""
    return ServerConfig(shutdown_grace=2.0)


@pytest.fixture
async def server(app: App, config: ServerConfig) -> AsyncIterator[Server]:
    """``app`` served on 127.0.0.1, plain, on a free port."""
    async with serve(app, "127.0.0.1", 0, config=config) as running:
        yield running


@pytest.fixture
def handshake_timeout() -> float:
    """The TLS handshake timeout of ``tls_server``: long, for handshakes that must succeed on a
    loaded machine; a test of the timeout itself parametrizes a short one."""
    return 30.0


@pytest.fixture
async def tls_server(
    app: App, config: ServerConfig, certs: Certificates, handshake_timeout: float
) -> AsyncIterator[Server]:
    """``app`` served with STARTTLS on ``port`` and implicit TLS on ``tls_port``."""
    tls = TLSConfig(certs.cert_path, certs.key_path, handshake_timeout=handshake_timeout)
    async with serve(app, "127.0.0.1", 0, tls=tls, tls_port=0, config=config) as running:
        yield running


# -- a raw client ---------------------------------------------------------------------------


@pytest.fixture
def connect() -> Connect:
    """``async with connect(port) as client:`` (``tls=context`` for implicit TLS)."""

    @asynccontextmanager
    async def connect(
        port: int, *, tls: ssl.SSLContext | None = None, hostname: str = "localhost"
    ) -> AsyncIterator[WireClient]:
        client = WireClient(await anyio.connect_tcp("127.0.0.1", port))
        try:
            if tls is not None:
                await client.starttls(tls, hostname)
            yield client
        finally:
            await anyio.aclose_forcefully(client.stream)

    return connect
