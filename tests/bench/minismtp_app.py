"""The minismtp side of the benchmark: an App as a real user writes it.

Two contrib middleware (recipient-domain filter, message-size limit) and an ``@app.on_message``
consumer that counts what arrives. Served by the benchmark with

    minismtp run tests.bench.minismtp_app:app --port 0 --loop auto|asyncio|uvloop|trio

``bare`` is the same App without the middleware: the difference is what they cost.

On exit the process prints ``minismtp received N messages, B bytes`` on stderr, which the
benchmark checks against what its client sent.
"""

from __future__ import annotations

import atexit
import sys

from minismtp import App, Message

app = App(hostname="mx.example.com")
bare = App(hostname="mx.example.com")

try:
    from minismtp.contrib.domains import RecipientDomainFilter  # type: ignore[import-not-found, unused-ignore]
    from minismtp.contrib.size import MessageSizeLimit  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:  # the contrib middleware land later; measure the bare App meanwhile
    print(
        f"minismtp_app: WARNING: contrib middleware unavailable ({exc}); benchmarking without them",
        file=sys.stderr,
        flush=True,
    )
else:
    app.add_middleware(MessageSizeLimit, max_bytes=25 * 1024 * 1024)
    app.add_middleware(RecipientDomainFilter, domains=["example.com"])

received = [0, 0]  # messages, bytes


@app.on_message
@bare.on_message
async def count(message: Message) -> None:
    received[0] += 1
    received[1] += message.size  # message.original would copy the content


@atexit.register
def report() -> None:
    print(
        f"minismtp received {received[0]} messages, {received[1]} bytes",
        file=sys.stderr,
        flush=True,
    )
