"""A fast SMTP load client for the benchmark: raw ``asyncio.Protocol`` sessions on uvloop,
spread over several processes.

It covers what Postfix's ``smtp-source`` cannot: PIPELINING (RFC 2920), messages whose every
line is dot-stuffed (RFC 5321 4.5.2), per-message latency, and holding idle connections open.
It also serves as the whole client when ``smtp-source`` cannot be had.

    python -m tests.bench.client load HOST PORT --sessions 50 --messages 20000 --size 1024 \
        [--pipelining] [--dot-stuffed] [--procs 2]
    python -m tests.bench.client latency HOST PORT --messages 2000 --size 1024
    python -m tests.bench.client idle HOST PORT --connections 1000

``load`` and ``latency`` print one JSON object on stdout. ``idle`` prints ``ready N`` once N
sessions have been greeted and answered EHLO, then holds them until stdin closes.

Messages look like ``smtp-source``'s: four header lines, then lines of 80 octets (a digit,
X's, CRLF) up to ``--size`` octets of body. With ``--dot-stuffed`` every body line starts with
a dot, so every line goes over the wire stuffed (``..``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs

HELO_NAME = "bench.example.com"
MAIL_FROM = "sender@example.com"
RCPT_TO = "rcpt@example.com"

Step = tuple[bytes, tuple[bytes, ...]]  # what to send, the reply codes expected back in order


def message_content(size: int, *, dot_stuffed: bool = False, seq: int = 0) -> bytes:
    """A message (headers + ``size`` octets of body) as the user sees it: unstuffed."""
    headers = (
        f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-Id: <{os.getpid()}.{seq}@{HELO_NAME}>\r\n\r\n"
    ).encode()
    lines = []
    remaining = size
    n = 0
    while remaining > 0:
        length = min(80, remaining)
        if length < 3:  # too short for a line of its own: pad the body out instead
            lines.append(b"X" * length)
            break
        first = b"." if dot_stuffed else b"%d" % (n % 10)
        lines.append(first + b"X" * (length - 3) + b"\r\n")
        remaining -= length
        n += 1
    body = b"".join(lines)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return headers + body


def wire_data(content: bytes) -> bytes:
    """The DATA text as sent: dot-stuffed (RFC 5321 4.5.2), then the end-of-data line."""
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def message_steps(data: bytes, *, pipelining: bool) -> list[Step]:
    mail = f"MAIL FROM:<{MAIL_FROM}>\r\n".encode()
    rcpt = f"RCPT TO:<{RCPT_TO}>\r\n".encode()
    if pipelining:  # RFC 2920: MAIL, RCPT, DATA in one group; the text once 354 is back
        return [(mail + rcpt + b"DATA\r\n", (b"250", b"250", b"354")), (data, (b"250",))]
    return [(mail, (b"250",)), (rcpt, (b"250",)), (b"DATA\r\n", (b"354",)), (data, (b"250",))]


PROLOGUE: list[Step] = [(b"", (b"220",)), (f"EHLO {HELO_NAME}\r\n".encode(), (b"250",))]
EPILOGUE: list[Step] = [(b"QUIT\r\n", (b"221",))]


class SmtpError(Exception):
    pass


class Session(asyncio.Protocol):
    """One SMTP session: the prologue, ``messages`` transactions, then QUIT (or hold, if idle).

    Works on whole reads: every complete reply in a chunk is consumed at once, so the client
    costs little per message.
    """

    def __init__(
        self,
        steps: list[Step],
        messages: int,
        done: asyncio.Future[None],
        *,
        on_greeted: Callable[[], None] | None = None,
        latencies: list[float] | None = None,
    ) -> None:
        self.steps = steps
        self.messages_left = messages
        self.done = done
        self.on_greeted = on_greeted
        self.latencies = latencies
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.phase = "prologue"
        self.plan: list[Step] = PROLOGUE
        self.index = 0
        self.expected: tuple[bytes, ...] = PROLOGUE[0][1]
        self.replies: list[bytes] = []
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        end = buffer.rfind(b"\r\n")
        if end < 0:
            self.buffer = buffer
            return
        self.buffer = buffer[end + 2 :]
        for line in buffer[:end].split(b"\r\n"):
            if line[3:4] == b"-":  # a continuation line of a multi-line reply
                continue
            self.replies.append(line[:3])
            if len(self.replies) == len(self.expected):
                if tuple(self.replies) != self.expected:
                    self.fail(f"expected {self.expected}, got {line!r}")
                    return
                self.replies = []
                self.advance()

    def advance(self) -> None:
        self.index += 1
        if self.index == len(self.plan):
            self.index = 0
            if self.phase == "messages":
                self.messages_left -= 1
                if self.latencies is not None:
                    self.latencies.append(time.perf_counter() - self.started)
            elif self.phase == "prologue" and self.on_greeted is not None:
                self.on_greeted()
                self.phase = "idle"
                return
            if self.phase in ("prologue", "messages") and self.messages_left > 0:
                self.phase, self.plan = "messages", self.steps
                self.started = time.perf_counter()
            elif self.phase != "epilogue":
                self.phase, self.plan = "epilogue", EPILOGUE
            else:
                assert self.transport is not None
                self.transport.close()
                return
        payload, self.expected = self.plan[self.index]
        assert self.transport is not None
        self.transport.write(payload)

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(SmtpError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.phase == "epilogue" or (self.phase == "idle" and exc is None):
            self.done.set_result(None)
        else:
            self.done.set_exception(SmtpError(f"connection lost in {self.phase}: {exc}"))


async def open_session(
    host: str,
    port: int,
    steps: list[Step],
    messages: int,
    **options: Any,
) -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: Session(steps, messages, done, **options), host, port)
    return done


@attrs.frozen
class LoadJob:
    host: str
    port: int
    sessions: int
    messages: int
    size: int
    pipelining: bool
    dot_stuffed: bool


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_sessions(job: LoadJob, data: bytes, message_counts: Sequence[int]) -> None:
    steps = message_steps(data, pipelining=job.pipelining)
    sessions = [open_session(job.host, job.port, steps, n) for n in message_counts if n > 0]
    done = await asyncio.gather(*sessions)
    await asyncio.gather(*done)


def load_worker(job: LoadJob, counts: list[int], barrier: Any, results: Any) -> None:
    import uvloop

    # Made up before the clock starts: the figure is for sending, not for building the text
    # (0.1 s for 10 MB, a seventh of a 16 x 10 MB run at 250 MB/s).
    data = wire_data(message_content(job.size, dot_stuffed=job.dot_stuffed))
    barrier.wait()
    start = time.monotonic()
    try:
        uvloop.run(run_sessions(job, data, counts))
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    results.put({"start": start, "end": time.monotonic()})


def run_load(job: LoadJob, procs: int) -> dict[str, Any]:
    """Spread the sessions over ``procs`` processes; time from the first start to the last end."""
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, job.sessions))
    per_session = split(job.messages, job.sessions)
    shares = [per_session[i::procs] for i in range(procs)]
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [ctx.Process(target=load_worker, args=(job, s, barrier, results)) for s in shares]
    for w in workers:
        w.start()
    outcomes = [results.get() for _ in workers]
    for w in workers:
        w.join()
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        return {"error": errors[0]}
    seconds = max(o["end"] for o in outcomes) - min(o["start"] for o in outcomes)
    wire_bytes = len(wire_data(message_content(job.size, dot_stuffed=job.dot_stuffed)))
    return {
        "messages": job.messages,
        "seconds": seconds,
        "msgs_per_s": job.messages / seconds,
        "data_bytes": wire_bytes * job.messages,
        "mb_per_s": wire_bytes * job.messages / seconds / 1e6,
    }


async def run_latency(host: str, port: int, messages: int, size: int) -> dict[str, Any]:
    latencies: list[float] = []
    steps = message_steps(wire_data(message_content(size)), pipelining=False)
    done = await open_session(host, port, steps, messages, latencies=latencies)
    await done
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "messages": messages,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": quantiles[98] * 1e6,
    }


async def hold_idle(host: str, port: int, connections: int) -> None:
    loop = asyncio.get_running_loop()
    greeted = 0
    all_greeted = asyncio.Event()

    def on_greeted() -> None:
        nonlocal greeted
        greeted += 1
        if greeted == connections:
            all_greeted.set()

    gate = asyncio.Semaphore(100)  # do not overrun the listen backlog

    async def one() -> asyncio.Future[None]:
        async with gate:
            return await open_session(host, port, [], 0, on_greeted=on_greeted)

    sessions = await asyncio.gather(*(one() for _ in range(connections)))
    waiter = asyncio.ensure_future(asyncio.wait(sessions, return_when=asyncio.FIRST_EXCEPTION))
    greeted_wait = asyncio.ensure_future(all_greeted.wait())
    await asyncio.wait([waiter, greeted_wait], return_when=asyncio.FIRST_COMPLETED)
    for s in sessions:
        if s.done() and s.exception() is not None:
            raise s.exception()  # type: ignore[misc]
    print(f"ready {greeted}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # hold until the benchmark closes stdin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("load", "latency", "idle"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        if name == "idle":
            p.add_argument("--connections", type=int, default=1000)
            continue
        p.add_argument("--messages", type=int, default=1000)
        p.add_argument("--size", type=int, default=1024)
        if name == "load":
            p.add_argument("--sessions", type=int, default=50)
            p.add_argument("--pipelining", action="store_true")
            p.add_argument("--dot-stuffed", action="store_true")
            p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import uvloop

    if args.mode == "load":
        job = LoadJob(
            args.host,
            args.port,
            args.sessions,
            args.messages,
            args.size,
            args.pipelining,
            args.dot_stuffed,
        )
        result = run_load(job, args.procs)
    elif args.mode == "latency":
        result = uvloop.run(run_latency(args.host, args.port, args.messages, args.size))
    else:
        uvloop.run(hold_idle(args.host, args.port, args.connections))
        return
    print(json.dumps(result), flush=True)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
