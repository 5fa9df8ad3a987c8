"""Fairness under load: how long a new client waits while others upload big messages.

Starts each server the way ``run.py`` does (its targets, its ``Server``), has ``--uploads``
clients send ``--size-mb`` MB messages to it as fast as the server takes them, over and over,
and meanwhile runs ``--probes`` short sessions one after another, timing each step apart:
connect to greeting, EHLO, MAIL, RCPT, DATA (354), and a 1 KB message's end of data to its
250. Prints the maximum and median of each step per server, as a Markdown table, with the
ratio to aiosmtpd's figure in the same run, and how fast the uploads went meanwhile.

    python -m tests.bench.fairness                                    # the defaults below
    python -m tests.bench.fairness --targets minismtp-auto,aiosmtpd --uploads 40 --size-mb 30 \
        --probes 20
    python -m tests.bench.fairness --compare REV     # each minismtp target also as of REV

The uploaders run in a process of their own (threads, blocking sockets), the probes in this
one; both on the client CPUs, the server on its own CPU, as in ``run.py`` (``--no-pin``).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import attrs

from tests.bench.client import HELO_NAME, MAIL_FROM, RCPT_TO, message_content, wire_data
from tests.bench.run import (
    BASELINE,
    LOCK,
    Server,
    ServerFailed,
    Target,
    all_targets,
    cpus_kept_awake,
    csv,
    exclusive,
    progress,
    source_tree,
    split_cpus,
)

MB = 1_000_000  # as tests/bench/memory.py's 40x30mb scenario
CHUNK = 1024 * 1024  # the uploaders' sendall() size, and how often they count their bytes
STEPS = ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data")
DEFAULT_TARGETS = ("aiosmtpd", "minismtp-auto", "minismtp-trio")


# --- replies -------------------------------------------------------------------------------


class Replies:
    """Whole SMTP replies off a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def code(self) -> int:
        """The next reply's code (its last line's); ConnectionError at EOF."""
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed by the server; got {self.buffer!r}")
                self.buffer += data
                end = self.buffer.find(b"\r\n")
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line[3:4] != b"-":
                return int(line[:3])


def expect(replies: Replies, code: int) -> None:
    got = replies.code()
    if got != code:
        raise ConnectionError(f"expected {code}, got {got}")


# --- the uploaders -------------------------------------------------------------------------


@attrs.frozen
class Counters:
    """What the uploaders did, shared with the measuring process."""

    streaming: Synchronized[int]  # uploaders that have had their first 354
    sent: Synchronized[int]  # octets of message data sent, counted every CHUNK
    codes: Any  # a managed dict would cost a server process: a fixed array of counts instead
    errors: Synchronized[int]

    @classmethod
    def new(cls, ctx: Any) -> Counters:
        return cls(
            ctx.Value(ctypes.c_long, 0),
            ctx.Value(ctypes.c_longlong, 0),
            ctx.Array(ctypes.c_long, 600),  # by reply code
            ctx.Value(ctypes.c_long, 0),
        )

    def add(self, value: Synchronized[int], n: int = 1) -> None:
        with value.get_lock():
            value.value += n


def upload_forever(host: str, port: int, data: bytes, counters: Counters) -> None:
    """One uploader: a session, then message after message until the process ends; a new
    session if the server closes this one."""
    first = True
    while True:
        try:
            with socket.create_connection((host, port)) as sock:
                replies = Replies(sock)
                expect(replies, 220)
                sock.sendall(f"EHLO {HELO_NAME}\r\n".encode())
                expect(replies, 250)
                while True:
                    sock.sendall(f"MAIL FROM:<{MAIL_FROM}>\r\n".encode())
                    expect(replies, 250)
                    sock.sendall(f"RCPT TO:<{RCPT_TO}>\r\n".encode())
                    expect(replies, 250)
                    sock.sendall(b"DATA\r\n")
                    expect(replies, 354)
                    if first:
                        counters.add(counters.streaming)
                        first = False
                    view = memoryview(data)
                    for start in range(0, len(data), CHUNK):
                        sock.sendall(view[start : start + CHUNK])
                        counters.add(counters.sent, len(view[start : start + CHUNK]))
                    code = replies.code()  # 250, or 552 from a server whose limit is lower
                    with counters.codes.get_lock():
                        counters.codes[code] += 1
        except OSError:
            counters.add(counters.errors)
            time.sleep(0.1)


def uploaders(
    host: str, port: int, uploads: int, size: int, counters: Counters, cpus: frozenset[int] | None
) -> None:
    """The uploaders' process: ``uploads`` threads, until it is killed."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    os.nice(5)  # the probes, on the same CPUs, get the CPU first when they wake
    data = wire_data(message_content(size))
    threads = [
        threading.Thread(target=upload_forever, args=(host, port, data, counters), daemon=True)
        for _ in range(uploads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- the probes ----------------------------------------------------------------------------

PROBE_MESSAGE = wire_data(message_content(1024))


def probe(host: str, port: int, timeout: float) -> dict[str, float]:
    """One short session; the seconds each step took, from sending it to its reply."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        replies = Replies(sock)
        expect(replies, 220)
        times["greeting"] = time.perf_counter() - started  # the connect included
        for step, line, code in (
            ("EHLO", f"EHLO {HELO_NAME}\r\n", 250),
            ("MAIL", f"MAIL FROM:<{MAIL_FROM}>\r\n", 250),
            ("RCPT", f"RCPT TO:<{RCPT_TO}>\r\n", 250),
            ("DATA", "DATA\r\n", 354),
        ):
            started = time.perf_counter()
            sock.sendall(line.encode())
            expect(replies, code)
            times[step] = time.perf_counter() - started
        started = time.perf_counter()
        sock.sendall(PROBE_MESSAGE)
        expect(replies, 250)
        times["end of data"] = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
        replies.code()
    return times


# --- one server ----------------------------------------------------------------------------


@attrs.define
class Result:
    target: Target
    source: Path  # the tree the server imports minismtp from
    version: str = ""  # "@REV" when served from another commit than the others (--compare)
    loop: str = ""
    samples: dict[str, list[float]] = attrs.field(factory=lambda: {s: [] for s in STEPS})
    upload_mb_per_s: float = 0.0
    codes: Counter[int] = attrs.field(factory=Counter)
    upload_errors: int = 0


@attrs.frozen
class Settings:
    uploads: int
    size: int
    probes: int
    interval: float
    settle: float
    timeout: float
    server_cpus: frozenset[int] | None
    client_cpus: frozenset[int] | None
    workdir: Path


def measure(target: Target, settings: Settings, result: Result) -> None:
    """One server: its uploaders streaming, then the probes, one after another."""
    tag = f"{result.version}-{len(result.samples['greeting'])}"
    log = settings.workdir / f"{target.name}{tag}.log"
    server = Server(target, log, result.source, cpus=settings.server_cpus)
    server.start()
    result.loop = server.loop
    ctx = multiprocessing.get_context("fork")
    counters = Counters.new(ctx)
    args = (server.host, server.port, settings.uploads, settings.size, counters)
    process = ctx.Process(target=uploaders, args=(*args, settings.client_cpus), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + settings.timeout
        while counters.streaming.value < settings.uploads:
            if time.monotonic() > deadline or not process.is_alive():
                raise ServerFailed(
                    f"{target.name}: {counters.streaming.value} of {settings.uploads} uploads "
                    f"streaming after {settings.timeout:g} s\n{server.log_tail()}"
                )
            server.check_alive()
            time.sleep(0.05)
        time.sleep(settings.settle)  # every uploader past its first megabytes
        sent, started = counters.sent.value, time.monotonic()
        for _ in range(settings.probes):
            for step, seconds in probe(server.host, server.port, settings.timeout).items():
                result.samples[step].append(seconds)
            time.sleep(settings.interval)
        elapsed = time.monotonic() - started
        result.upload_mb_per_s += (counters.sent.value - sent) / MB / elapsed
        server.check_alive()
    finally:
        process.kill()
        process.join()
        server.stop()
    result.codes.update({code: n for code, n in enumerate(counters.codes[:]) if n})
    result.upload_errors += counters.errors.value


# --- the table -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.1f}"


def table(results: Sequence[Result], rounds: int) -> str:
    base = next((r for r in results if r.target.name == BASELINE), None)
    header = ["step (ms)"] + [
        r.target.label
        + (f" ({r.loop})" if "--loop" in r.target.label else "")
        + (f" {r.version}" if r.version else "")
        for r in results
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in STEPS:
        for name, stat in (("max", max), ("p50", statistics.median)):
            cells = [f"{step}: {name} ↓"]
            for result in results:
                value = stat(result.samples[step])
                cell = ms(value)
                if base is not None and result is not base:
                    cell += f" (x{value / stat(base.samples[step]):.2f})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
    cells = ["uploads meanwhile: MB/s ↑"]
    for result in results:
        cell = f"{result.upload_mb_per_s / rounds:,.0f}"
        if base is not None and result is not base and base.upload_mb_per_s:
            cell += f" (x{result.upload_mb_per_s / base.upload_mb_per_s:.2f})"
        cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outcomes(results: Sequence[Result]) -> str:
    parts = []
    for result in results:
        codes = ", ".join(f"{n} x {code}" for code, n in sorted(result.codes.items()))
        errors = f"; {result.upload_errors} lost session(s)" if result.upload_errors else ""
        parts.append(f"{result.target.name}{result.version}: {codes or 'none finished'}{errors}")
    return "Uploads answered: " + "; ".join(parts) + "."


# --- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        type=csv,
        default=list(DEFAULT_TARGETS),
        help="comma-separated servers of run.py: minismtp-auto (uvloop), minismtp-trio, "
        "minismtp-asyncio, aiosmtpd, ... (default: %(default)s)",
    )
    parser.add_argument("--uploads", type=int, default=40, help="uploading clients (default: 40)")
    parser.add_argument(
        "--size-mb", type=float, default=30, help="each upload's size in MB (default: 30)"
    )
    parser.add_argument(
        "--probes", type=int, default=20, help="probe sessions per server and round (default: 20)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="A B A B ... (default: 1)")
    parser.add_argument(
        "--interval", type=float, default=0.1, help="seconds between probes (default: 0.1)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds of uploading before the first probe (default: 1)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds any one wait may take"
    )
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place processes")
    parser.add_argument("--minismtp-args", default="", metavar="ARGS", help="see run.py")
    parser.add_argument("--commit", metavar="REV", help="serve a snapshot of REV (see run.py)")
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="also run each minismtp target from a snapshot of REV, beside the tree's",
    )
    parser.add_argument("--workdir", type=Path, help="server logs (default: temp)")
    args = parser.parse_args(argv)

    available = all_targets(None, shlex.split(args.minismtp_args))
    unknown = [t for t in args.targets if t not in available]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="minismtp-fairness-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pinning = None if args.no_pin else split_cpus()
    server_cpus, client_cpus = pinning or (None, None)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # the probes, with the uploaders
    source = source_tree(args.commit, workdir)
    settings = Settings(
        uploads=args.uploads,
        size=int(args.size_mb * MB),
        probes=args.probes,
        interval=args.interval,
        settle=args.settle,
        timeout=args.timeout,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        workdir=workdir,
    )
    results = []
    for name in args.targets:
        if args.compare and name.startswith("minismtp"):
            old = source_tree(args.compare, workdir)
            results.append(Result(available[name], old.path, "@" + old.describe.split()[0]))
        results.append(Result(available[name], source.path))
    progress(f"logs in {workdir}")
    with exclusive(LOCK), cpus_kept_awake() if pinning else nullcontext():
        load = os.getloadavg()[0]
        started = time.monotonic()
        try:
            for round_no in range(1, args.rounds + 1):
                for result in results:
                    measure(result.target, settings, result)
                    greeting = result.samples["greeting"]
                    progress(
                        f"[round {round_no}] {result.target.name}{result.version}: greeting max "
                        f"{ms(max(greeting))} ms, p50 {ms(statistics.median(greeting))} ms"
                    )
        except (ServerFailed, OSError) as exc:
            progress(f"benchmark failed: {exc}")
            return 2
        elapsed = time.monotonic() - started
    print(table(results, args.rounds))
    print()
    print(
        f"minismtp {source.describe}"
        + (f" (and {args.compare} where marked)" if args.compare else "")
        + f"; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs, "
        f"load average {load:.2f} at the start; {args.rounds} round(s), {args.probes} probes "
        f"per server and round, {args.interval:g} s apart, after {args.settle:g} s of "
        f"{args.uploads} uploads of {args.size_mb:g} MB each; run took {elapsed:.0f} s. "
        "Each step is timed from sending its command to its reply (the greeting from the "
        "connect); ratios: the server / aiosmtpd in the same run (↓ lower is better)."
    )
    print(outcomes(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
