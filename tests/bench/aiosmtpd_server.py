"""The aiosmtpd side of the benchmark: aiosmtpd 1.4.6 as people use it today.

A handler puts every message on an unbounded ``asyncio.Queue``; a consumer task drains it and
counts (the same shape as the minismtp App's channel and ``@app.on_message`` consumer). No
validation in the handler: this is aiosmtpd at its fastest.

    python -m tests.bench.aiosmtpd_server --port 0 [--loop asyncio|uvloop] [--maildir DIR]

prints ``aiosmtpd listening on HOST:PORT (asyncio)`` once it accepts connections, and on exit
(SIGTERM/SIGINT) ``aiosmtpd received N messages, B bytes`` on stderr.

With ``--maildir DIR`` the handler is aiosmtpd's own ``aiosmtpd.handlers.Mailbox(DIR)``
instead: each message parsed into an ``email`` message and added to a ``mailbox.Maildir``,
whose ``add()`` writes it in ``tmp/``, fsyncs it and links it into ``new/`` (``new/`` itself is
not fsynced), all on the event loop's thread. The benchmark counts the files in ``new/``.

The server runs on the main thread's event loop (``loop.create_server`` with aiosmtpd's ``SMTP``
protocol, exactly what ``aiosmtpd.controller.Controller`` does on its own thread), so the
process's CPU time is the server's alone and no thread hand-off distorts the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.bench.serving import serve_until_stopped


class QueueHandler:
    """aiosmtpd handler: hand each message over on an unbounded queue, answer 250."""

    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.queue.put_nowait(content)
        return "250 2.0.0 OK queued"


async def consume(queue: asyncio.Queue[bytes], totals: list[int]) -> None:
    """Drain the queue, taking everything queued on each wake-up."""
    while True:
        content = await queue.get()
        totals[0] += 1
        totals[1] += len(content)
        while not queue.empty():
            content = queue.get_nowait()
            totals[0] += 1
            totals[1] += len(content)


async def serve(host: str, port: int, loop_name: str, maildir: str | None = None) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue()  # maxsize 0: unbounded
    totals = [0, 0]
    consumer = asyncio.create_task(consume(queue, totals))
    handler: Any = QueueHandler(queue) if maildir is None else Mailbox(Path(maildir))
    await serve_until_stopped(
        lambda: SMTP(handler, hostname="mx.example.com"), host, port, "aiosmtpd", loop_name
    )
    consumer.cancel()
    if maildir is None:  # with the Mailbox, the files in new/ are the count
        print(
            f"aiosmtpd received {totals[0]} messages, {totals[1]} bytes",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--maildir", help="store into this Maildir with aiosmtpd's Mailbox")
    args = parser.parse_args(argv)
    run: Any = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    run(serve(args.host, args.port, args.loop, args.maildir))


if __name__ == "__main__":
    main()
