"""Shared fixtures: the anyio backends, trustme certificates, real servers on port 0, and a
raw SMTP client for dialogues that smtplib will not have (pipelining tricks, bad clients)."""

from __future__ import annotations

import importlib.util
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trustme
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from minismtp.app import App
from minismtp.server import Server, ServerConfig, serve
from minismtp.tls import TLSConfig
from minismtp.types import Message


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Run each ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return request.param


def with_uvloop() -> list[Any]:
    """asyncio, trio and (when installed) uvloop: for a module's own ``anyio_backend``.

    uvloop is what ``minismtp run --loop auto`` picks, and the server's asyncio Protocol
    path meets uvloop's own transports there, so the server's tests run on it too.
    """
    backends: list[Any] = ["asyncio", "trio"]
    if importlib.util.find_spec("uvloop") is not None and sys.platform != "win32":
        backends.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))
    return backends


# -- certificates ---------------------------------------------------------------------------


@attrs.frozen
class Certificates:
    """A trustme CA and a server certificate for localhost/127.0.0.1, written out as PEM."""

    ca: trustme.CA
    cert_path: Path  # the chain: leaf first, then the CA
    key_path: Path
    ca_path: Path

    def client_context(self) -> ssl.SSLContext:
        """What a careful client uses: verify the server against the trustme CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue_certificates(directory: Path, common_name: str = "localhost") -> Certificates:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "mx.test", common_name=common_name)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, ca_path = (directory / n for n in ("cert.pem", "key.pem", "ca.pem"))
    leaf.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_path))
    return Certificates(ca, cert_path, key_path, ca_path)


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
async def tls_server(app: App, config: ServerConfig, certs: Certificates) -> AsyncIterator[Server]:
    """``app`` served with STARTTLS on ``port`` and implicit TLS on ``tls_port``."""
    tls = TLSConfig(certs.cert_path, certs.key_path, handshake_timeout=1.0)
    async with serve(app, "127.0.0.1", 0, tls=tls, tls_port=0, config=config) as running:
        yield running


# -- a raw client ---------------------------------------------------------------------------


@attrs.define
class WireClient:
    """An SMTP client that sends exactly the bytes it is given and reads whole replies."""

    stream: ByteStream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reply(self) -> str:
        """The next reply, its lines joined by newlines; AssertionError at EOF."""
        lines: list[str] = []
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                try:
                    self.buffer += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                    raise AssertionError(
                        f"connection closed; got {lines!r} {self.buffer!r}"
                    ) from exc
                end = self.buffer.find(b"\r\n")
            line = self.buffer[:end].decode()
            del self.buffer[: end + 2]
            lines.append(line)
            if line[3:4] != "-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def at_eof(self) -> bool:
        """True when the server has closed the connection (with nothing more to read)."""
        if self.buffer:
            return False
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
        self.buffer += data
        return False

    async def starttls(self, context: ssl.SSLContext, hostname: str = "localhost") -> None:
        self.stream = await TLSStream.wrap(
            self.stream, hostname=hostname, ssl_context=context, standard_compatible=False
        )


Connect = Callable[..., AbstractAsyncContextManager[WireClient]]


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


def drain(server: Server) -> list[Message]:
    """Every message the server has put on the channel so far."""
    messages = []
    while True:
        try:
            messages.append(server.mail_rx.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return messages


class FirstWritePrefixed(ByteStream):
    """A client stream whose first write carries the PROXY header in front of its data, as a
    balancer may send the header and the ClientHello in one segment."""

    def __init__(self, stream: ByteStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def send(self, item: bytes) -> None:
        item, self._prefix = self._prefix + item, b""
        await self._stream.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive(max_bytes)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
