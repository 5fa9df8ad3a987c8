"""aiosmtpd 1.4.6 whose handler adds each message to a Redis stream before its 250.

The same entry as minismtp's ``RedisStreamStore`` (id, mail_from, rcpt_to as JSON, peer, helo,
tls, received_at, size, body with a ``Received:`` line first), one ``XADD`` per message with
redis' asyncio client, awaited before the handler answers: what a user of aiosmtpd writes to
get the same promise from a 250.

    python -m tests.bench.aiosmtpd_redis --port 0 --redis redis://127.0.0.1:6379/0 --stream s

prints ``aiosmtpd listening on HOST:PORT (asyncio)`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import redis.asyncio
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.bench.serving import serve_until_stopped


class RedisHandler:
    def __init__(self, client: redis.asyncio.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        message_id = os.urandom(10).hex().upper()
        now = time.time()
        peer = session.peer
        trace = (
            f"Received: from {session.host_name} ([{peer[0]}])\r\n"
            f"\tby mx.example.com with ESMTP id {message_id}; {time.ctime(now)}\r\n"
        ).encode()
        fields: dict[Any, Any] = {
            "id": message_id,
            "mail_from": envelope.mail_from or "",
            "rcpt_to": json.dumps(envelope.rcpt_tos),
            "peer": f"{peer[0]}:{peer[1]}",
            "helo": session.host_name or "",
            "tls": "0",
            "received_at": f"{now:.6f}",
            "size": len(content),
            "body": trace + content,
        }
        try:
            await self.client.xadd(self.stream, fields)
        except redis.RedisError:
            return "451 4.3.0 Requested action aborted: local error in processing"
        self.count += 1
        return f"250 2.0.0 OK queued as {message_id}"


async def serve(host: str, port: int, url: str, stream: str, loop_name: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    await client.ping()
    handler = RedisHandler(client, stream)
    await serve_until_stopped(
        lambda: SMTP(handler, hostname="mx.example.com"), host, port, "aiosmtpd", loop_name
    )
    await client.aclose()
    print(f"aiosmtpd received {handler.count} messages", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    parser.add_argument("--stream", default="minismtp")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    run: Any = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    run(serve(args.host, args.port, args.redis, args.stream, args.loop))


if __name__ == "__main__":
    main()
