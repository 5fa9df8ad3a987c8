"""A raw SMTP client for dialogues that smtplib will not have (pipelining tricks, bad
clients), and small helpers around a running server."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import attrs
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from minismtp.server import Server
from minismtp.types import Message


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
