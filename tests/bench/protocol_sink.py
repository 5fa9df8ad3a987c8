"""The Python floor: a bare SMTP sink, a plain ``asyncio.Protocol`` on uvloop (issue 21).

What any Python SMTP server on asyncio must do at the least, and nothing more: the greeting,
EHLO (PIPELINING, 8BITMIME, SIZE) or HELO, MAIL, RCPT, DATA with the end of data found and the
content dot-unstuffed into one ``bytes``, RSET, NOOP, QUIT. Every command gets its reply in the
right order (503 out of sequence, 500 unknown), the replies to one read go out in one write.
No parsing of addresses, no App, no logging, no limits: a message is counted and dropped.
The distance from minismtp to this is what our layers cost; this to Postfix's smtp-sink (C)
is what Python costs.

    python -m tests.bench.protocol_sink --port 0

prints ``sink-asyncio listening on HOST:PORT (uvloop)`` once it accepts connections, and on
SIGINT/SIGTERM ``sink-asyncio received N messages, B bytes`` on stderr (the content's octets,
unstuffed), which the benchmark checks against what its clients sent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

from tests.bench.serving import serve_until_stopped

HOSTNAME = b"sink.example.com"
GREETING = b"220 " + HOSTNAME + b" ESMTP\r\n"
EHLO = b"250-" + HOSTNAME + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 33554432\r\n"
OK = b"250 2.0.0 OK\r\n"
MAIL_OK = b"250 2.1.0 OK\r\n"
RCPT_OK = b"250 2.1.5 OK\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 OK queued\r\n"
BYE = b"221 2.0.0 Bye\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
UNKNOWN = b"500 5.5.2 Command unrecognized\r\n"
TOO_LONG = b"500 5.5.6 Line too long\r\n"
MAX_LINE = 64 * 1024
END = b"\r\n.\r\n"

totals = [0, 0]  # messages, content octets


class Sink(asyncio.Protocol):
    """One session. In DATA the content is gathered with a CRLF in front of it, so that the end
    of data right after the 354 (``.\\r\\n``) and a stuffed first line look like every other
    line's: one search for ``\\r\\n.\\r\\n`` and one replace of ``\\r\\n..`` do all of it."""

    __slots__ = ("buffer", "content", "mail", "rcpt", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""  # an unfinished command line
        self.content: bytearray | None = None  # in DATA: CRLF + what came so far
        self.mail = False
        self.rcpt = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        replies: list[bytes] = []
        pos = 0
        if self.content is not None:
            pos = self.in_data(data, 0, replies)
            if pos < 0:
                return
        elif self.buffer:
            data = self.buffer + data
            self.buffer = b""
        size = len(data)
        while pos < size:
            end = data.find(b"\r\n", pos)
            if end < 0:
                if size - pos > MAX_LINE:
                    replies.append(TOO_LONG)
                    self.close(replies)
                    return
                self.buffer = data[pos:]
                break
            verb = data[pos : pos + 4].upper()
            pos = end + 2
            if verb == b"MAIL":
                self.mail, self.rcpt = True, False
                replies.append(MAIL_OK)
            elif verb == b"RCPT":
                if self.mail:
                    self.rcpt = True
                    replies.append(RCPT_OK)
                else:
                    replies.append(BAD_SEQUENCE)
            elif verb == b"DATA":
                if not self.rcpt:
                    replies.append(BAD_SEQUENCE)
                    continue
                replies.append(START_DATA)
                self.content = bytearray(b"\r\n")
                pos = self.in_data(data, pos, replies)
                if pos < 0:
                    return
            elif verb == b"EHLO":
                self.mail = self.rcpt = False
                replies.append(EHLO)
            elif verb in (b"HELO", b"RSET"):
                self.mail = self.rcpt = False
                replies.append(OK)
            elif verb == b"NOOP":
                replies.append(OK)
            elif verb == b"QUIT":
                replies.append(BYE)
                self.close(replies)
                return
            else:
                replies.append(UNKNOWN)
        if replies:
            assert self.transport is not None
            self.transport.write(b"".join(replies))

    def in_data(self, data: bytes, pos: int, replies: list[bytes]) -> int:
        """Take content from ``data[pos:]``; where the commands go on, or -1 (all taken, and
        the replies so far written)."""
        content = self.content
        assert content is not None
        start = max(0, len(content) - 4)  # the end may straddle two reads
        content += memoryview(data)[pos:]
        end = content.find(END, start)
        if end < 0:
            if replies:
                assert self.transport is not None
                self.transport.write(b"".join(replies))
            return -1
        rest = len(content) - end - 5  # after the end-of-data line: further commands
        # The first line's stuffing has no CRLF before it in the message: skip it here.
        first = 3 if content.startswith(b"\r\n..") else 2
        with memoryview(content) as view:
            message = bytes(view[first : end + 2]).replace(b"\r\n..", b"\r\n.")
        self.content = None
        self.mail = self.rcpt = False
        totals[0] += 1
        totals[1] += len(message)
        replies.append(QUEUED)
        return len(data) - rest

    def close(self, replies: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(replies))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.content = None
        self.transport = None


async def serve(host: str, port: int) -> None:
    await serve_until_stopped(Sink, host, port, "sink-asyncio", "uvloop")
    print(
        f"sink-asyncio received {totals[0]} messages, {totals[1]} bytes",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
