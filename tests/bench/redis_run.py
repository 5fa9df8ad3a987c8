"""Durable hand-off side by side: 1 KB messages into Redis Streams (``appendfsync always``)
with minismtp's ``RedisStreamStore``, beside minismtp's Maildir store and beside aiosmtpd whose
handler does the same ``XADD`` with redis' asyncio client (issue 17).

    python -m tests.bench.redis_run                  # 3 rounds of 20,000 messages per server
    python -m tests.bench.redis_run --quick          # 1 round of 2,000: a sanity run
    python -m tests.bench.redis_run --targets minismtp-redis,aiosmtpd-redis --rounds 5

One redis-server (``--appendonly yes --appendfsync always --save ''``, its files in the work
directory) serves every run; each server process is fresh per run, warmed up with 1,000
messages, then measured. The servers alternate within a round (A B C A B C ...). Each run's
messages are counted where they landed (``XLEN`` of its stream, files in ``new/``) and checked
against what the clients had accepted: the exit status is 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import attrs

from tests.bench.run import (
    CLK_TCK,
    LOCK,
    Clients,
    Server,
    Target,
    exclusive,
    find_smtp_source,
    free_port,
    load_metrics,
    minismtp_command,
    on_cpus,
    progress,
    split_cpus,
)

BASELINE = "aiosmtpd-redis"
TARGETS = ("minismtp-redis", "minismtp-maildir", "aiosmtpd-redis")


@attrs.define
class Redis:
    """The redis-server every run writes to."""

    directory: Path
    cpus: frozenset[int] | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes"]
        argv += ["--appendfsync", "always", "--save", "", "--dir", str(self.directory)]
        argv += ["--logfile", str(self.directory / "redis.log")]
        self.proc = subprocess.Popen(argv, preexec_fn=on_cpus(self.cpus))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command("PING") == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit(f"redis-server did not start (see {self.directory / 'redis.log'})")

    def command(self, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True
        )
        return done.stdout.strip()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def url(self, stream: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?stream={stream}"


def targets(redis: Redis, workdir: Path, run_id: str) -> dict[str, tuple[Target, str]]:
    """Each target with where its messages land (a stream name, or a Maildir path)."""
    stream_m, stream_a = f"bench-minismtp-{run_id}", f"bench-aiosmtpd-{run_id}"
    maildir = workdir / f"maildir-{run_id}"
    common = (
        "--port", "0", "--loop", "auto", "--max-connections", "4096",
        "--max-connections-per-address", "0",
    )  # fmt: skip
    return {
        "minismtp-redis": (
            Target(
                "minismtp-redis",
                "minismtp --store redis://",
                (*minismtp_command(), "run", *common, "--store", redis.url(stream_m)),
            ),
            stream_m,
        ),
        "minismtp-maildir": (
            Target(
                "minismtp-maildir",
                "minismtp --maildir (fsync)",
                (*minismtp_command(), "run", *common, "--maildir", str(maildir)),
            ),
            str(maildir),
        ),
        "aiosmtpd-redis": (
            Target(
                "aiosmtpd-redis",
                "aiosmtpd 1.4.6 + redis.asyncio XADD",
                (
                    sys.executable,
                    "-m",
                    "tests.bench.aiosmtpd_redis",
                    "--port",
                    "0",
                    "--loop",
                    "uvloop",
                    "--redis",
                    redis.url("x").split("?")[0],
                    "--stream",
                    stream_a,
                ),
            ),
            stream_a,
        ),
    }


def landed(redis: Redis, where: str) -> int:
    if where.startswith("/"):
        new = Path(where) / "new"
        return sum(1 for _ in new.iterdir()) if new.exists() else 0
    return int(redis.command("XLEN", where) or 0)


def clean(redis: Redis, where: str) -> None:
    if where.startswith("/"):
        shutil.rmtree(where, ignore_errors=True)
    else:
        redis.command("DEL", where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--messages", type=int, help="measured 1 KB messages per run")
    parser.add_argument("--quick", action="store_true", help="1 round of 2,000 messages")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--client", choices=["auto", "python"], default="auto")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    messages = args.messages or (2_000 if args.quick else 20_000)
    warmup = 200 if args.quick else 1_000
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="minismtp-redis-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pinning = None if args.no_pin else split_cpus()
    server_cpus, client_cpus = pinning or (None, None)
    smtp_source = find_smtp_source() if args.client == "auto" else None
    clients = Clients(smtp_source, procs=2, cpus=client_cpus)
    # Redis shares the server's CPU: on one box, the SMTP server and its store compete alike.
    redis = Redis(workdir / "redis", cpus=server_cpus)
    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ok = True
    progress(f"work directory {workdir}")
    with exclusive(LOCK):
        redis.start()
        try:
            for round_no in range(1, rounds + 1):
                for name in names:
                    target, where = targets(redis, workdir, f"{name}-{round_no}")[name]
                    server = Server(target, workdir / f"{name}-{round_no}.log", cpus=server_cpus)
                    server.start()
                    try:
                        clients.load(server, sessions=args.sessions, messages=warmup, size=1024)
                        redis_before = redis.cpu_seconds()
                        values = load_metrics(
                            server,
                            lambda s=server: clients.load(
                                s, sessions=args.sessions, messages=messages, size=1024
                            ),
                            messages,
                            1024,
                        )
                        values["redis_cpu_us"] = (
                            (redis.cpu_seconds() - redis_before) / messages * 1e6
                        )
                    finally:
                        server.stop()
                    count = landed(redis, where)
                    if count != warmup + messages:
                        ok = False
                        progress(f"{name}: {count} stored, {warmup + messages} accepted: MISMATCH")
                    clean(redis, where)
                    for metric, value in values.items():
                        results[name][metric].append(value)
                    progress(
                        f"[round {round_no}] {name:17} {values['msgs_per_s']:8,.0f} msgs/s, "
                        f"server CPU {values['cpu_us']:5.0f} µs/msg, "
                        f"redis CPU {values['redis_cpu_us']:5.0f} µs/msg, "
                        f"other processes {values['foreign_pct']:.0f}%"
                    )
        finally:
            redis.stop()
    print(table(results, names, rounds, messages, clients.which()))
    return 0 if ok else 1


def table(
    results: dict[str, dict[str, list[float]]], names: list[str], rounds: int, n: int, client: str
) -> str:
    def median(name: str, metric: str) -> float:
        return statistics.median(results[name][metric])

    lines = [
        "| server (1 KB, 50 sessions, durable before 250) | msgs/s ↑ | server CPU/msg (µs) ↓ "
        "| redis-server CPU/msg (µs) ↓ |",
        "|---|---|---|---|",
    ]
    for name in names:
        ratio = ""
        if BASELINE in results and name != BASELINE:
            ratio = f" (x{median(name, 'msgs_per_s') / median(BASELINE, 'msgs_per_s'):.2f})"
        redis_cpu = "-" if name == "minismtp-maildir" else f"{median(name, 'redis_cpu_us'):,.0f}"
        lines.append(
            f"| {name} | {median(name, 'msgs_per_s'):,.0f}{ratio} | "
            f"{median(name, 'cpu_us'):,.0f} | {redis_cpu} |"
        )
    lines.append("")
    lines.append(
        f"{rounds} round(s) of {n:,} messages per server (medians), client {client}, "
        f"{os.cpu_count()} CPUs; ratios against {BASELINE} in the same run."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
