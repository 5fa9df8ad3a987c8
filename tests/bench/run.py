"""Side-by-side benchmark of minismtp and aiosmtpd (issue 7).

Starts every selected server, drives them with the same client, alternates them (A B A B ...)
over several rounds and prints the medians, with the ratio minismtp/aiosmtpd, as a Markdown
table. See tests/bench/README.md for what each figure means.

    python -m tests.bench.run                      # full run, 3 rounds, ~3-4 minutes on 2 cores
    python -m tests.bench.run --quick              # one round, small counts, ~1 minute
    python -m tests.bench.run --targets aiosmtpd,minismtp-trio --scenarios 1k,latency
    python -m tests.bench.run --profile            # also py-spy the 1 KB run of every server
    python -m tests.bench.run --targets aiosmtpd,minismtp-auto --scenarios 1k-maildir,10mb-dots-maildir
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import attrs

from tests.bench.client import HELO_NAME, MAIL_FROM, RCPT_TO

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
BASELINE = "aiosmtpd"
READY = re.compile(rb"listening on (\S+) \(([^)]*)\)")
RECEIVED = re.compile(rb"received (\d+) messages")


# --- servers -------------------------------------------------------------------------------


@attrs.frozen
class Target:
    name: str
    label: str
    argv: tuple[str, ...]  # "{port}" is replaced by a free port for servers that print no port
    env: tuple[tuple[str, str], ...] = ()
    # The command that stores every message in the Maildir "{maildir}" (the durable scenarios);
    # None: the server has no such store, and those scenarios skip it.
    maildir_argv: tuple[str, ...] | None = None

    def storing_in(self, maildir: Path) -> Target:
        assert self.maildir_argv is not None
        argv = tuple(a.replace("{maildir}", str(maildir)) for a in self.maildir_argv)
        return attrs.evolve(self, argv=argv)


def minismtp_command() -> list[str]:
    script = Path(sys.executable).with_name("minismtp")
    return [str(script)] if script.exists() else [sys.executable, "-m", "minismtp"]


def all_targets(smtp_sink: str | None, minismtp_args: Sequence[str] = ()) -> dict[str, Target]:
    aiosmtpd = (sys.executable, "-m", "tests.bench.aiosmtpd_server", "--port", "0")
    mailbox = ("--maildir", "{maildir}")  # aiosmtpd's own Maildir handler
    targets = [
        Target("aiosmtpd", "aiosmtpd 1.4.6 (asyncio)", aiosmtpd, (), (*aiosmtpd, *mailbox)),
        Target(
            "aiosmtpd-uvloop",
            "aiosmtpd 1.4.6 (uvloop)",
            (*aiosmtpd, "--loop", "uvloop"),
            (),
            (*aiosmtpd, "--loop", "uvloop", *mailbox),
        ),
        Target(
            "sink-asyncio",
            "bare asyncio Protocol sink (uvloop)",
            (sys.executable, "-m", "tests.bench.protocol_sink", "--port", "0"),
        ),
    ]

    def minismtp(name: str, label: str, app: str, loop: str, durable: bool) -> Target:
        options = (
            "--port", "0", "--loop", loop, "--max-connections", "4096",
            "--max-connections-per-address", "0", *minismtp_args,
        )  # fmt: skip
        command = (*minismtp_command(), "run")
        # Durable: the embedded default (no APP), whose store is the Maildir: `minismtp run
        # --maildir DIR` as an operator runs it.
        maildir = (*command, "--maildir", "{maildir}", *options) if durable else None
        return Target(name, label, (*command, app, *options), (), maildir)

    for loop in ("auto", "asyncio", "uvloop", "trio"):
        label = f"minismtp --loop {loop}"
        app = "tests.bench.minismtp_app:app"
        targets.append(minismtp(f"minismtp-{loop}", label, app, loop, durable=True))
    for loop in ("auto", "asyncio", "trio"):  # the same App without its two middleware
        label = f"minismtp, no middleware, --loop {loop}"
        app = "tests.bench.minismtp_app:bare"
        targets.append(minismtp(f"minismtp-bare-{loop}", label, app, loop, durable=False))
    if smtp_sink is not None:  # Postfix's C sink: a reference point, not a contender
        targets.append(
            Target(
                "smtp-sink",
                "Postfix smtp-sink (C)",
                (smtp_sink, "-u", "nobody", "-m", "4096", "127.0.0.1:{port}", "4096"),
                (("LD_LIBRARY_PATH", postfix_libs(smtp_sink)),),
            )
        )
    return {t.name: t for t in targets}


DEFAULT_TARGETS = ("aiosmtpd", "minismtp-auto", "minismtp-asyncio", "minismtp-trio")


def postfix_libs(binary: str) -> str:
    return str(Path(binary).parents[1] / "lib" / "postfix")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def on_cpus(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that keeps the child (and the processes it starts) on ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def split_cpus() -> tuple[frozenset[int], frozenset[int]] | None:
    """One CPU for the server under test, the others for the clients; None if not possible."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return frozenset(cpus[:1]), frozenset(cpus[1:])


class ServerFailed(Exception):
    pass


@attrs.define
class Server:
    """One server process: started, measured from /proc, stopped."""

    target: Target
    log_path: Path
    source: Path = ROOT  # the tree whose minismtp (and tests.bench) the server imports
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    loop: str = ""
    sent: int = 0  # messages our clients had accepted, checked against the server's own count
    cpus: frozenset[int] | None = None  # where it may run (see --no-pin)

    def start(self, timeout: float = 30.0) -> None:
        argv = list(self.target.argv)
        fixed_port = any("{port}" in a for a in argv)
        if fixed_port:
            self.port = free_port()
            argv = [a.replace("{port}", str(self.port)) for a in argv]
        env = {**os.environ, **dict(self.target.env), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.source,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=on_cpus(self.cpus),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.target.name} exited:\n{self.log_tail()}")
            if fixed_port:
                if self._accepts():
                    self.loop = "C"
                    return
            elif match := READY.search(self.log_path.read_bytes()):
                address, self.loop = match.group(1).decode(), match.group(2).decode()
                host, _, port = address.rpartition(":")
                self.host, self.port = host.strip("[]"), int(port)
                return
            time.sleep(0.05)
        self.stop()
        raise ServerFailed(f"{self.target.name} not ready after {timeout} s:\n{self.log_tail()}")

    def _accepts(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (/proc/<pid>/stat utime, stime)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_mb(self, field: str = "VmHWM") -> float:
        """Peak (VmHWM) or current (VmRSS) resident set size, in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
        raise ServerFailed(f"no {field} in /proc/{self.pid}/status")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerFailed(f"{self.target.name} died:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop (SIGINT, then harder) and return the count of messages the server reported."""
        if self.proc is None:
            return None
        for signum, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(signum)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        match = RECEIVED.search(self.log_path.read_bytes())
        return int(match.group(1)) if match else None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


# --- clients -------------------------------------------------------------------------------


class ClientFailed(Exception):
    pass


@attrs.frozen
class Clients:
    """Postfix's smtp-source where it can be had, our uvloop client for everything else."""

    smtp_source: str | None
    procs: int
    timeout: float = 300.0
    cpus: frozenset[int] | None = None  # where the clients may run (see --no-pin)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.bench.client", *args]

    def load(
        self,
        server: Server,
        *,
        sessions: int,
        messages: int,
        size: int,
        pipelining: bool = False,
        dot_stuffed: bool = False,
    ) -> float:
        """Send ``messages`` messages over ``sessions`` parallel sessions; return the seconds."""
        if self.smtp_source is not None and not pipelining and not dot_stuffed:
            seconds = self._smtp_source(server, sessions, messages, size)
        else:
            argv = self.python(
                "load",
                server.host,
                str(server.port),
                "--sessions",
                str(sessions),
                "--messages",
                str(messages),
                "--size",
                str(size),
                "--procs",
                str(self.procs),
            )
            argv += ["--pipelining"] * pipelining + ["--dot-stuffed"] * dot_stuffed
            seconds = float(self._json(argv)["seconds"])
        server.sent += messages
        return seconds

    def which(self, *, pipelining: bool = False, dot_stuffed: bool = False) -> str:
        if self.smtp_source is not None and not pipelining and not dot_stuffed:
            return "smtp-source"
        return "client.py"

    def _smtp_source(self, server: Server, sessions: int, messages: int, size: int) -> float:
        argv = [self.smtp_source or "smtp-source", "-d", "-s", str(sessions), "-m", str(messages)]
        argv += ["-l", str(size), "-M", HELO_NAME, "-f", MAIL_FROM, "-t", RCPT_TO]
        argv.append(f"{server.host}:{server.port}")
        env = {**os.environ, "LD_LIBRARY_PATH": postfix_libs(argv[0])}
        started = time.perf_counter()
        done = subprocess.run(
            argv, env=env, capture_output=True, timeout=self.timeout, preexec_fn=on_cpus(self.cpus)
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0 or done.stderr:
            raise ClientFailed(f"smtp-source: {done.stderr.decode(errors='replace').strip()}")
        return seconds

    def latency(self, server: Server, *, messages: int, size: int) -> dict[str, Any]:
        argv = self.python("latency", server.host, str(server.port))
        result = self._json([*argv, "--messages", str(messages), "--size", str(size)])
        server.sent += messages
        return result

    def _json(self, argv: list[str]) -> dict[str, Any]:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, timeout=self.timeout, preexec_fn=on_cpus(self.cpus)
        )
        lines = done.stdout.decode().strip().splitlines()
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        if done.returncode != 0 or "error" in result:
            why = result.get("error") or done.stderr.decode(errors="replace").strip()[-2000:]
            raise ClientFailed(f"client.py: {why}")
        return result

    @contextmanager
    def idle(self, server: Server, connections: int) -> Iterator[None]:
        """Hold ``connections`` greeted sessions open (EHLO answered) for the with-block."""
        argv = self.python("idle", server.host, str(server.port), "--connections", str(connections))
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=on_cpus(self.cpus),
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else b""
            if not line.startswith(b"ready"):
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace").strip()[-2000:]
                raise ClientFailed(f"idle client: {line!r} {err}")
            yield
        finally:
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- scenarios -----------------------------------------------------------------------------


@attrs.frozen
class Row:
    scenario: str
    metric: str
    label: str
    fmt: str
    higher_is_better: bool
    compare: bool = True  # show the ratio to the baseline (not for the disk's own rate)


ROWS = (
    Row("1k", "msgs_per_s", "1 KB, 50 sessions: msgs/s", "{:,.0f}", True),
    Row("1k", "cpu_us", "1 KB, 50 sessions: server CPU/msg (µs)", "{:,.0f}", False),
    Row("1k-pipe", "msgs_per_s", "1 KB, 50 sessions, PIPELINING: msgs/s", "{:,.0f}", True),
    Row("1k-pipe", "cpu_us", "1 KB, 50 sessions, PIPELINING: CPU/msg (µs)", "{:,.0f}", False),
    Row("10mb", "mb_per_s", "10 MB, 4 sessions: MB/s", "{:,.0f}", True),
    Row("10mb", "cpu_ms_per_mb", "10 MB, 4 sessions: CPU/MB (ms)", "{:,.2f}", False),
    Row("10mb-dots", "mb_per_s", "10 MB dot-stuffed, 4 sessions: MB/s", "{:,.0f}", True),
    Row("10mb-dots", "cpu_ms_per_mb", "10 MB dot-stuffed: CPU/MB (ms)", "{:,.2f}", False),
    Row("latency", "p50_us", "1 session, sequential: latency p50 (µs)", "{:,.0f}", False),
    Row("latency", "p99_us", "1 session, sequential: latency p99 (µs)", "{:,.0f}", False),
    Row("rss-idle", "rss_mb", "peak RSS, 1,000 idle connections (MB)", "{:,.1f}", False),
    Row("rss-idle", "kb_per_conn", "RSS growth per idle connection (KB)", "{:,.1f}", False),
    Row("rss-10mb", "rss_mb", "peak RSS, 4 concurrent 10 MB messages (MB)", "{:,.1f}", False),
    # The durable path: every message fsynced into a Maildir before its 250.
    Row("1k-maildir", "msgs_per_s", "1 KB into a Maildir, 50 sessions: msgs/s", "{:,.0f}", True),
    Row("1k-maildir", "cpu_us", "1 KB into a Maildir: server CPU/msg (µs)", "{:,.0f}", False),
    Row(
        "1k-maildir",
        "disk_group",
        "raw disk, 40 threads: 1 KB fsync + rename + group fsync of new/ (files/s)",
        "{:,.0f}",
        True,
        compare=False,
    ),
    Row(
        "1k-maildir",
        "disk_cpu_us",
        "raw disk (group): its CPU per file (µs)",
        "{:,.0f}",
        False,
        compare=False,
    ),
    Row(
        "1k-maildir",
        "disk_file",
        "raw disk, 40 threads: 1 KB fsync + rename, new/ not fsynced (files/s)",
        "{:,.0f}",
        True,
        compare=False,
    ),
    Row(
        "1k-maildir",
        "of_disk",
        "1 KB into a Maildir: msgs/s / raw disk (group) files/s",
        "{:.0%}",
        True,
        compare=False,
    ),
    Row(
        "10mb-dots-maildir",
        "mb_per_s",
        "10 MB dot-stuffed into a Maildir, 4 sessions: MB/s",
        "{:,.0f}",
        True,
    ),
    Row(
        "10mb-dots-maildir",
        "cpu_ms_per_mb",
        "10 MB dot-stuffed into a Maildir: CPU/MB (ms)",
        "{:,.2f}",
        False,
    ),
)
SCENARIOS = tuple(dict.fromkeys(r.scenario for r in ROWS))
FRESH = ("rss-idle", "rss-10mb")  # peak RSS needs a server that has done nothing else
# Into a Maildir, each server in a fresh one; only servers with a Maildir store run these.
DURABLE = ("1k-maildir", "10mb-dots-maildir")
# Run by default: the durable scenarios are asked for by name (about half a minute per server
# and round, much of it waiting for the disk, and a few hundred MB written per server).
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in DURABLE)
BIG = ("10mb", "10mb-dots", "10mb-dots-maildir")  # 10 MB messages over 4 sessions


@attrs.frozen
class Sizes:
    """How much each scenario sends, per server and round."""

    small: int = 20_000  # 1 KB messages per run
    big: int = 16  # 10 MB messages per run (a multiple of 4 sessions)
    latency: int = 2_000  # sequential messages
    idle: int = 1_000  # idle connections
    warmup: int = 2_000  # 1 KB messages before measuring, not measured (see warm_up)
    durable: int = 10_000  # 1 KB messages into a Maildir per run
    disk_seconds: float = 3.0  # per way of the raw disk's rate (tests/bench/disk.py)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(small=5_000, big=4, latency=500, warmup=1_000, durable=2_000, disk_seconds=2)


def load_metrics(
    server: Server, run: Callable[[], float], messages: int, size: int
) -> dict[str, float]:
    cpu_before, ours_before, busy_before = server.cpu_seconds(), our_cpu(), machine_busy()
    started = time.monotonic()
    seconds = run()
    wall = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu_before
    foreign = machine_busy() - busy_before - cpu - (our_cpu() - ours_before)
    server.check_alive()
    megabytes = messages * size / 1e6
    return {
        "msgs_per_s": messages / seconds,
        "mb_per_s": megabytes / seconds,
        "cpu_us": cpu / messages * 1e6,
        "cpu_ms_per_mb": cpu / megabytes * 1e3,
        "foreign_pct": max(0.0, foreign / (wall * (os.cpu_count() or 1)) * 100),
    }


def machine_busy() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat, all but idle)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def our_cpu() -> float:
    """CPU seconds of this process and its finished clients (smtp-source, client.py)."""
    me, clients = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + clients.ru_utime + clients.ru_stime


def warm_up(scenario: str, server: Server, clients: Clients, sizes: Sizes) -> None:
    """A first taste of the scenario's own load, not measured: the first messages of a fresh
    process pay for its heap's growth (10 MB messages: a fifth more CPU per MB)."""
    if scenario in BIG:
        clients.load(server, sessions=4, messages=4, size=10 * MIB, dot_stuffed="dots" in scenario)
    elif scenario not in FRESH:
        clients.load(server, sessions=50, messages=sizes.warmup, size=1024)


def measure(scenario: str, server: Server, clients: Clients, sizes: Sizes) -> dict[str, float]:
    if scenario in ("1k", "1k-pipe"):
        n, pipelining = sizes.small, scenario == "1k-pipe"
        return load_metrics(
            server,
            lambda: clients.load(server, sessions=50, messages=n, size=1024, pipelining=pipelining),
            n,
            1024,
        )
    if scenario == "1k-maildir":
        n = sizes.durable
        return load_metrics(
            server, lambda: clients.load(server, sessions=50, messages=n, size=1024), n, 1024
        )
    if scenario in BIG:
        n, dots = sizes.big, "dots" in scenario
        return load_metrics(
            server,
            lambda: clients.load(server, sessions=4, messages=n, size=10 * MIB, dot_stuffed=dots),
            n,
            10 * MIB,
        )
    if scenario == "latency":
        return clients.latency(server, messages=sizes.latency, size=1024)
    if scenario == "rss-idle":
        before = server.memory_mb("VmRSS")
        with clients.idle(server, sizes.idle):
            server.check_alive()
            per_connection = (server.memory_mb("VmRSS") - before) * 1e3 / sizes.idle
            return {"rss_mb": server.memory_mb(), "kb_per_conn": per_connection}
    if scenario == "rss-10mb":
        clients.load(server, sessions=4, messages=4, size=10 * MIB)
        return {"rss_mb": server.memory_mb()}
    raise ValueError(scenario)


def disk_rates(directory: Path, seconds: float, cpus: frozenset[int] | None) -> dict[str, float]:
    """The raw rate of the disk under ``directory`` (tests/bench/disk.py), in files/s, both
    ways; run where the servers run, since a server's writes are made from its own CPU."""
    argv = [sys.executable, "-m", "tests.bench.disk", "--dir", str(directory), "--keep"]
    argv += ["--seconds", str(seconds), "--threads", "40"]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, timeout=60 + 4 * seconds, preexec_fn=on_cpus(cpus)
    )
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ClientFailed(f"disk.py: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    rates: dict[str, float] = json.loads(lines[-1])
    return {
        "disk_group": rates["group"],
        "disk_file": rates["file"],
        "disk_cpu_us": rates.get("group_cpu_us", 0.0),
    }


def count_files(maildir: Path) -> int:
    """Messages delivered into ``maildir`` (in new/, or cur/ had a reader moved them)."""
    return sum(
        1 for sub in ("new", "cur") if (maildir / sub).is_dir() for _ in (maildir / sub).iterdir()
    )


@contextmanager
def blame(server: Server) -> Iterator[None]:
    """A failing client usually means a failing server: say what the server said."""
    try:
        yield
    except ClientFailed as exc:
        raise ClientFailed(
            f"{exc}\n--- {server.target.name} ({server.log_path}):\n{server.log_tail()}"
        ) from None


# --- the run -------------------------------------------------------------------------------

Results = dict[str, dict[str, dict[str, list[float]]]]  # scenario -> metric -> target -> values


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@attrs.define
class Bench:
    targets: list[Target]
    scenarios: list[str]
    clients: Clients
    sizes: Sizes
    rounds: int
    workdir: Path
    source: Source
    results: Results = attrs.field(factory=lambda: defaultdict(lambda: defaultdict(dict)))
    loops: dict[str, str] = attrs.field(factory=dict)
    delivered: dict[str, list[int]] = attrs.field(factory=dict)  # target -> [sent, counted]
    server_cpus: frozenset[int] | None = None
    maildir_root: Path = Path(tempfile.gettempdir())  # the durable scenarios' file system
    cpus_awake: bool = False  # idle CPUs polled instead of halting (see cpus_kept_awake)

    def server(self, target: Target, tag: str, maildir: Path | None = None) -> Server:
        log = self.workdir / f"{target.name}-{tag}.log"
        if maildir is not None:
            target = target.storing_in(maildir)
        server = Server(target, log, self.source.path, cpus=self.server_cpus)
        server.start()
        self.loops[target.name] = server.loop
        return server

    def stop(self, server: Server, maildir: Path | None = None) -> None:
        counted = server.stop()
        if maildir is not None:  # what landed on the disk, not what the server says
            counted = count_files(maildir)
        if counted is not None:
            totals = self.delivered.setdefault(server.target.name, [0, 0])
            totals[0] += server.sent
            totals[1] += counted

    def delivery_check(self) -> tuple[bool, str]:
        """Messages our clients had accepted vs. each server's own count, over all processes."""
        lines = []
        for name, (sent, counted) in self.delivered.items():
            verdict = "ok" if sent == counted else "MISMATCH"
            lines.append(f"{name} {counted:,}/{sent:,} {verdict}")
        return all(s == c for s, c in self.delivered.values()), "; ".join(lines)

    @property
    def trash(self) -> Path:
        """Where the durable scenarios' files stay until the end of the run."""
        return self.maildir_root / f"{self.workdir.name}-maildirs"

    def run(self) -> None:
        if any(s in DURABLE for s in self.scenarios):
            self.trash.mkdir(parents=True, exist_ok=True)
        try:
            for round_no in range(1, self.rounds + 1):
                for scenario in self.scenarios:
                    for target in self.targets:  # A B A B ...: every server in every round
                        self.one(scenario, target, round_no)
        finally:
            shutil.rmtree(self.trash, ignore_errors=True)

    def one(self, scenario: str, target: Target, round_no: int) -> None:
        """One measurement, on a server of its own: what a process did before (a heap grown
        by 10 MB messages, say) must not change the next figure. aiosmtpd's CPU per 1 KB
        message fell by a quarter once the 10 MB scenarios had run in the same process."""
        maildir = None
        if scenario in DURABLE:
            if target.maildir_argv is None:
                if round_no == 1:
                    progress(f"{scenario}: {target.name} has no Maildir store, skipped")
                return
            # Left in the trash: removing 12,000 files would slow every file creation on the
            # file system for the next 10-15 s (see disk.py), i.e. the next server's run.
            maildir = self.trash / f"maildir-{target.name}-{scenario}-{round_no}"
        server = self.server(target, f"{scenario}-{round_no}", maildir)
        try:
            with blame(server):
                warm_up(scenario, server, self.clients, self.sizes)
                values = measure(scenario, server, self.clients, self.sizes)
        finally:
            self.stop(server, maildir)
            if maildir is not None and scenario in BIG:
                shutil.rmtree(maildir, ignore_errors=True)  # a few large files
        if scenario == "1k-maildir":
            # The disk's own rate, on the same file system, right after the server's run.
            values.update(disk_rates(self.trash, self.sizes.disk_seconds, self.server_cpus))
            values["of_disk"] = values["msgs_per_s"] / values["disk_group"]
        for metric, value in values.items():
            self.results[scenario][metric].setdefault(target.name, []).append(value)
        shown = ", ".join(
            f"{r.metric}={r.fmt.format(values[r.metric])}"
            for r in ROWS
            if r.scenario == scenario and r.metric in values
        )
        if "foreign_pct" in values:
            shown += f" (other processes: {values['foreign_pct']:.0f}% of the machine)"
        progress(f"[round {round_no}] {scenario:9} {target.name:17} {shown}")

    def values(self, row: Row, target: str) -> list[float]:
        """One value per round, in round order."""
        return self.results.get(row.scenario, {}).get(row.metric, {}).get(target, [])

    def median(self, row: Row, target: str) -> float | None:
        values = self.values(row, target)
        return statistics.median(values) if values else None


def markdown_table(bench: Bench) -> str:
    names = [t.name for t in bench.targets]
    header = ["metric (median)"] + [
        t.label
        + (f" ({bench.loops[t.name]})" if "--loop" in t.label and t.name in bench.loops else "")
        for t in bench.targets
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ROWS:
        if row.scenario not in bench.scenarios:
            continue
        base = bench.median(row, BASELINE) if BASELINE in names else None
        cells = [row.label + (" ↑" if row.higher_is_better else " ↓")]
        for name in names:
            value = bench.median(row, name)
            if value is None:
                cells.append("-")
                continue
            cell = row.fmt.format(value)
            if base and name != BASELINE and row.compare:
                cell += f" (x{value / base:.2f}{round_ratios(bench, row, name)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_ratios(bench: Bench, row: Row, name: str) -> str:
    """``"; rounds x3.04-x5.21"``: the lowest and highest ratio of one round's two figures, which
    were measured a few seconds apart (the machine's speed moves more slowly than that)."""
    pairs = zip(bench.values(row, name), bench.values(row, BASELINE), strict=False)
    ratios = [value / base for value, base in pairs if base]
    if len(ratios) < 2:
        return ""
    return f"; rounds x{min(ratios):.2f}-x{max(ratios):.2f}"


def describe(bench: Bench, elapsed: float, load: float) -> str:
    versions = [f"Python {platform.python_version()}"]
    for package in ("anyio", "uvloop", "trio", "aiosmtpd"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    c = bench.clients
    sizes = bench.sizes
    foreign = [
        v
        for scenario in bench.results.values()
        for target in scenario.get("foreign_pct", {}).values()
        for v in target
    ]
    quiet = (
        f"Other processes used {statistics.median(foreign):.0f}% of the machine during the "
        f"median load run, {max(foreign):.0f}% at most"
        + (": figures are disturbed, run again on a quiet machine." if max(foreign) > 10 else ".")
        if foreign
        else ""
    )
    pinning = (
        f" Servers pinned to CPU {','.join(map(str, sorted(bench.server_cpus)))}, clients to "
        f"CPU {','.join(map(str, sorted(c.cpus or ())))}."
        if bench.server_cpus is not None
        else " Servers and clients were placed by the scheduler (--no-pin)."
    )
    awake = (
        " Idle CPUs kept polling (/dev/cpu_dma_latency held at 0)."
        if bench.cpus_awake
        else " Idle CPUs could halt (the servers paid the clients' wake-ups)."
    )
    durable = (
        f"; {sizes.durable:,} x 1 KB into a Maildir (minismtp: `minismtp run --maildir`, "
        f"aiosmtpd: its Mailbox handler), the raw disk rate (tests/bench/disk.py) measured "
        f"for {sizes.disk_seconds:g} s each way after each such run, on the same file system"
        if "1k-maildir" in bench.scenarios
        else ""
    )
    return "\n".join(
        [
            f"minismtp {bench.source.describe}; {', '.join(versions)}; {os.cpu_count()} CPUs "
            f"({cpu_model()}), load average {load:.2f} at the start; {bench.rounds} round(s), "
            f"medians; run took {elapsed:.0f} s.",
            f"Clients: {c.which()} for plain 1 KB and 10 MB, client.py ({c.procs} processes, "
            f"uvloop) for PIPELINING, dot-stuffed, latency and idle connections. Per run: "
            f"{sizes.small:,} x 1 KB, {sizes.big} x 10 MB, {sizes.latency:,} sequential, "
            f"{sizes.idle:,} idle connections{durable}.{pinning}{awake} Ratios: minismtp / aiosmtpd in "
            f"the same run (↑ higher is better, ↓ lower is better). {quiet}",
        ]
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- profiling -----------------------------------------------------------------------------


def _modules(names: str) -> tuple[str, ...]:
    return tuple(f"minismtp/{name}.py" for name in names.split())


LAYERS = (  # (name, path fragments); a sample goes to the innermost frame that matches one
    # The module names of both layouts, before and after the split of 3 December 2026, so that
    # --commit can profile either.
    (
        "engine (protocol.py, commands.py, content.py, streaming.py, paths.py)",
        _modules("protocol paths commands content streaming states limits outcomes replies"),
    ),
    (
        "transport and connection (connection.py, inline.py, the wires, server.py)",
        _modules(
            "server proxy connection inline asyncio_wire trio_wire trio_readiness wires admission"
            " host suspended"
        ),
    ),
    (
        "App: router, hooks, hand-off (app.py, hooks.py, handoff.py, middleware.py)",
        _modules("app hooks handoff middleware"),
    ),
    (
        "values (types.py, events.py, message.py, spool.py, attrs)",
        (*_modules("types events message spool"), "attrs"),
    ),
    ("Received:, ids (received.py, ids.py)", ("minismtp/received.py", "minismtp/ids.py")),
    ("log line (logs.py, logging)", ("minismtp/logs.py", "logging/")),
    ("contrib middleware", ("contrib/",)),
    ("bench consumer", ("tests/bench/", "minismtp_app.py", "aiosmtpd_server.py")),
    ("aiosmtpd", ("aiosmtpd/",)),
    ("email package", ("email/",)),
    ("anyio", ("anyio/",)),
    ("trio", ("trio/", "outcome/", "sniffio/")),
    ("asyncio / uvloop", ("asyncio/", "uvloop/", "selectors.py")),
)


def frame_file(frame: str) -> str:
    # py-spy's raw format: "function (path/to/file.py:line)"
    inside = frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else frame
    return inside.rpartition(":")[0] or inside


def layer_of(stack: Sequence[str]) -> str:
    for frame in reversed(stack):
        path = frame_file(frame)
        for name, fragments in LAYERS:
            if any(f in path for f in fragments):
                return name
    return "other"


def summarize_profile(raw: Path, cpu_us_per_msg: float | None, top: int = 12) -> str:
    by_layer: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        if stack[0].startswith("Thread._bootstrap"):  # an idle helper thread, not the loop
            continue
        total += count
        by_layer[layer_of(stack)] += count
        by_function[stack[-1]] += count
    if not total:
        return "no samples"
    per_msg = cpu_us_per_msg or 0.0
    out = [f"{total} samples; self time by layer (innermost matching frame):", ""]
    out += ["| layer | share | ≈ µs/msg |", "|---|---|---|"]
    for name, count in by_layer.most_common():
        us = f"{count / total * per_msg:.1f}" if per_msg else "-"
        out.append(f"| {name} | {count / total:.1%} | {us} |")
    out += ["", f"top {top} functions by self time:", ""]
    out += [f"- {count / total:5.1%}  {frame}" for frame, count in by_function.most_common(top)]
    return "\n".join(out)


def profile(bench: Bench, rate: int) -> str:
    """py-spy record each server through one 1 KB run (outside the measured rounds)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return "py-spy not found: `pip install py-spy`"
    sections = []
    for target in bench.targets:
        if target.name == "smtp-sink":
            continue
        server = bench.server(target, "profile")
        raw = bench.workdir / f"{target.name}-1k.raw"
        try:
            bench.clients.load(server, sessions=50, messages=bench.sizes.warmup, size=1024)
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    # Without --nonblocking, py-spy stops the process to sample it, and on this
                    # kind of VM the stop lands at the next system call: the samples pile up on
                    # syscall sites (getpid() inside asyncio.get_running_loop got 40% of them).
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-r",
                    str(rate),
                    "-o",
                    str(raw),
                    "-p",
                    str(server.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # py-spy attaches
            bench.clients.load(server, sessions=50, messages=bench.sizes.small, size=1024)
            spy.send_signal(signal.SIGINT)
            err = spy.communicate(timeout=60)[1].decode(errors="replace")
        finally:
            bench.stop(server)
        cpu = bench.median(ROWS[1], target.name)
        if not raw.exists():
            sections.append(f"### {target.label}\n\npy-spy failed: {err.strip()[-500:]}")
            continue
        summary = summarize_profile(raw, cpu)
        sections.append(f"### {target.label} — 1 KB, 50 sessions (py-spy, {raw})\n\n{summary}")
        progress(f"profiled {target.name}: {raw}")
    return "\n\n".join(sections)


# --- command line --------------------------------------------------------------------------


@attrs.frozen
class Source:
    path: Path
    describe: str


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def source_tree(commit: str | None, workdir: Path) -> Source:
    """The working tree, or a snapshot of ``commit`` (others may be editing the tree meanwhile)."""
    if commit is None:
        dirty = git("status", "--porcelain", "--", "minismtp", "contrib")
        return Source(
            ROOT, git("rev-parse", "--short", "HEAD") + (" + uncommitted" if dirty else "")
        )
    rev = git("rev-parse", "--short", commit)
    path = workdir / f"src-{rev}"
    if not path.exists():
        path.mkdir()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)
        # contrib/ is served as minismtp.contrib by the build configuration; mimic it
        (path / "minismtp" / "contrib").symlink_to(path / "contrib")
    return Source(path, f"{rev} (snapshot)")


LOCK = Path(tempfile.gettempdir()) / "minismtp-bench.lock"
CPU_LATENCY = Path("/dev/cpu_dma_latency")


@contextmanager
def cpus_kept_awake() -> Iterator[str | None]:
    """Keep idle CPUs polling rather than halting, for the with-block; yields why not, if not.

    On loopback, the process that writes runs the reader's TCP receive and wake-up in its own
    system call. When the reader sleeps on a halted vCPU, that wake-up costs the writer a
    round trip through the hypervisor: measured with ``perf`` on this machine's VM, 13% of
    minismtp's CPU per pipelined message went to waking the client's halted CPU, and 3.5%
    with the CPUs kept awake. It is the client's cost, charged to the server: on a network
    the client's own machine pays it. A PM QoS request of 0 µs latency, held open as
    ``tuned``'s latency-performance profile does, keeps idle CPUs in their polling state
    (needs root); closing the file ends the request.
    """
    try:
        fd = os.open(CPU_LATENCY, os.O_WRONLY)
    except OSError as exc:
        yield f"{CPU_LATENCY}: {exc.strerror}"
        return
    try:
        os.write(fd, struct.pack("i", 0))
        yield None
    finally:
        os.close(fd)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One benchmark at a time on this machine: two would share the cores and both be wrong."""
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another benchmark run to finish ({path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def find_smtp_source() -> str | None:
    try:
        done = subprocess.run(
            ["sh", str(HERE / "get_smtp_source.sh")], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return path if done.returncode == 0 and Path(path).exists() else None


def csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        type=csv,
        default=list(DEFAULT_TARGETS),
        help="comma-separated servers: aiosmtpd, minismtp-{auto,asyncio,uvloop,trio}, "
        "minismtp-bare-{auto,asyncio,trio} (the App without middleware), aiosmtpd-uvloop, "
        "sink-asyncio (our bare asyncio.Protocol sink), smtp-sink (default: %(default)s)",
    )
    parser.add_argument(
        "--scenarios",
        type=csv,
        default=list(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all but "
        f"{', '.join(DURABLE)})",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--rounds", type=int, help="rounds (default: 3, or 1 with --quick)")
    parser.add_argument(
        "--client",
        choices=["auto", "python"],
        default="auto",
        help="auto: smtp-source where it can do the job; python: client.py for everything",
    )
    parser.add_argument("--procs", type=int, default=2, help="client.py processes (default: 2)")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place servers and clients (default: the server on the first "
        "CPU, the clients on the others)",
    )
    parser.add_argument(
        "--let-cpus-halt",
        action="store_true",
        help="do not keep idle CPUs polling during the run (default: hold "
        "/dev/cpu_dma_latency at 0 where it can be opened; see the README)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy each server's 1 KB run")
    parser.add_argument("--profile-rate", type=int, default=500, help="py-spy samples/s")
    parser.add_argument(
        "--minismtp-args",
        default="",
        metavar="ARGS",
        help="extra options for `minismtp run`, e.g. '--log-level warning'",
    )
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="serve minismtp from a snapshot of this commit (git archive) instead of the tree",
    )
    parser.add_argument(
        "--maildir-root",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the durable scenarios' Maildirs and the raw disk rate's files go, on the "
        "file system to measure (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write every measured value here")
    parser.add_argument("--workdir", type=Path, help="server logs and profiles (default: temp)")
    args = parser.parse_args(argv)

    smtp_source = find_smtp_source()
    if smtp_source is None:
        progress("smtp-source unavailable: client.py drives every scenario")
    smtp_sink = str(Path(smtp_source).with_name("smtp-sink")) if smtp_source else None
    available = all_targets(smtp_sink, shlex.split(args.minismtp_args))
    unknown = [t for t in args.targets if t not in available] + [
        s for s in args.scenarios if s not in SCENARIOS
    ]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="minismtp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pinning = None if args.no_pin else split_cpus()
    server_cpus, client_cpus = pinning or (None, None)
    bench = Bench(
        targets=[available[t] for t in args.targets],
        scenarios=[s for s in SCENARIOS if s in args.scenarios],
        clients=Clients(
            smtp_source if args.client == "auto" else None, args.procs, cpus=client_cpus
        ),
        sizes=Sizes.quick() if args.quick else Sizes(),
        rounds=args.rounds or (1 if args.quick else 3),
        workdir=workdir,
        source=source_tree(args.commit, workdir),
        server_cpus=server_cpus,
        maildir_root=args.maildir_root,
    )
    progress(f"logs in {workdir}")
    with (
        exclusive(LOCK),
        nullcontext("--let-cpus-halt") if args.let_cpus_halt else cpus_kept_awake() as halting,
    ):
        load = os.getloadavg()[0]
        if load > 0.5:
            progress(f"warning: load average {load:.2f} before the start; figures will be low")
        if halting is not None:
            progress(f"idle CPUs may halt ({halting}): the servers pay the clients' wake-ups")
        bench.cpus_awake = halting is None
        return run_and_report(bench, args, load)


def run_and_report(bench: Bench, args: argparse.Namespace, load: float) -> int:
    started = time.monotonic()
    try:
        bench.run()
    except (ServerFailed, ClientFailed) as exc:
        progress(f"benchmark failed: {exc}")
        return 2
    profiles = profile(bench, args.profile_rate) if args.profile else ""
    elapsed = time.monotonic() - started

    print(markdown_table(bench))
    print()
    print(describe(bench, elapsed, load))
    delivered_ok, delivery = bench.delivery_check()
    if delivery:
        print(f"Messages counted by each server's consumer / accepted by the clients: {delivery}.")
    if profiles:
        print("\n## Profiles\n")
        print(profiles)
    if args.json:
        args.json.write_text(json.dumps({"results": bench.results, "loops": bench.loops}, indent=1))
    return 0 if delivered_ok else 1


if __name__ == "__main__":
    sys.exit(main())
