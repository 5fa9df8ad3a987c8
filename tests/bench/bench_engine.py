"""Micro-benchmark of the sans-I/O engine alone (no sockets, no App): python tests/bench/bench_engine.py

1. 100,000 transactions of 1 KB messages, pipelined, fed in 64 KiB reads.
2. One 100 MB message in which every line starts with a dot (all dot-stuffed), 64 KiB reads.
"""

from __future__ import annotations

import argparse
import time

from minismtp.events import Connect, Data, DataChunk, Helo
from minismtp.protocol import NEED_DATA, Closed, Engine, Limits
from minismtp.types import Reply, Session

GREETING = Reply(220, None, "mx ESMTP")
OK = Reply(250, "2.0.0", "OK")
READ = 64 * 1024


def run(wire: bytes, limits: Limits) -> tuple[float, int, int]:
    """Feed ``wire`` in 64 KiB reads; answer everything with 250.

    Returns (CPU seconds, messages, content octets); CPU time, so that other work on the
    machine does not count.
    """
    engine = Engine(Session(hostname="mx"), limits)
    view = memoryview(wire)
    pos = 0
    messages = size = 0
    start = time.process_time()
    while True:
        event = engine.next_event()
        if event is NEED_DATA:
            engine.data_to_send()
            engine.receive_data(bytes(view[pos : pos + READ]))
            pos += READ
        elif isinstance(event, Closed):
            break
        elif isinstance(event, DataChunk):
            size += len(event.chunk)  # the content streams out in chunks before Data
            engine.respond(OK)
        elif isinstance(event, Data):
            messages += 1
            engine.respond(OK)
        elif isinstance(event, Connect):
            engine.respond(GREETING)
        elif isinstance(event, Helo):
            engine.respond(Reply(250, None, ("mx", *event.keywords)))
        else:
            engine.respond(OK)
    return time.process_time() - start, messages, size


def transactions(count: int) -> None:
    body = (b"Subject: benchmark\r\n\r\n" + (b"x" * 70 + b"\r\n") * 14).ljust(1022, b"y") + b"\r\n"
    tx = (
        b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\n"
        + body
        + b".\r\n"
    )
    wire = b"EHLO client.example\r\n" + tx * count + b"QUIT\r\n"
    seconds, messages, _ = run(wire, Limits())
    assert messages == count
    print(
        f"{count:,} pipelined 1 KB transactions: {seconds:.2f} s, {count / seconds:,.0f} transactions/s"
    )


def dotted(megabytes: int) -> None:
    line = b"." + b"d" * 76 + b"\r\n"  # 79 octets on the wire, every line dot-stuffed
    lines = megabytes * 1_000_000 // len(line)
    head = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
    wire = head + line * lines + b".\r\nQUIT\r\n"
    limits = Limits(max_message_size=len(wire))
    seconds, messages, size = run(wire, limits)
    assert messages == 1 and size == lines * (len(line) - 1)
    mb = len(wire) / 1e6
    print(f"{mb:.0f} MB message, every line dot-stuffed: {seconds:.2f} s, {mb / seconds:,.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        transactions(args.transactions)
        dotted(args.megabytes)


if __name__ == "__main__":
    main()
