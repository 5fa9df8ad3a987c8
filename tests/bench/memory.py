"""Memory of ``minismtp run`` under large messages (a benchmark of memory only: no timing).

    python -m tests.bench.memory                      # every scenario, minismtp and aiosmtpd
    python -m tests.bench.memory --scenarios 20x30mb --servers minismtp

Each scenario starts a fresh server (``minismtp run`` serving its embedded default, which
stores into a Maildir with fsync before the 250; aiosmtpd 1.4.6 with the queue handler of
``tests/bench/aiosmtpd_server.py``), sends one small message to load what serving needs, reads
the resident set size (``VmRSS``), then sends the scenario's messages from client threads and
reads the peak (``VmHWM``) and, after the burst, the resident set again. The client streams
each message from one reused 1 MiB block, so the figures are the server's.

Scenarios (the issue's targets in brackets):

- ``20x30mb``: 20 concurrent 30 MB messages [peak growth at most 64 MB];
- ``200x10mb``: 200 concurrent 10 MB messages [at most 128 MB];
- ``1x1gb``: one 1 GB message with ``--max-size 2147483648`` [at most 32 MB];
- ``40x30mb``: 40 concurrent 30 MB messages, and the RSS once the burst is over [back within
  64 MB of the idle level]; ``minismtp-untuned`` runs it without ``minismtp.allocator``'s
  settings (glibc's trim threshold set to its own default, which makes ``tune()`` step aside).

Needs aiosmtpd for its column (``pip install -e '.[bench]'``); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs

MB = 1_000_000
BLOCK = (b"%-76s\r\n" % (b"x" * 60)) * (1024 * 1024 // 78)
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


@attrs.frozen
class Scenario:
    name: str
    clients: int
    size: int
    extra_args: tuple[str, ...] = ()
    after_burst: bool = False


SCENARIOS = {
    "20x30mb": Scenario("20x30mb", 20, 30 * MB),
    "200x10mb": Scenario("200x10mb", 200, 10 * MB),
    "1x1gb": Scenario("1x1gb", 1, 1000 * MB, ("--max-size", str(2 * 1024**3))),
    "40x30mb": Scenario("40x30mb", 40, 30 * MB, after_burst=True),
}


@attrs.define
class Server:
    process: subprocess.Popen[str]
    port: int
    workdir: Path

    def status(self, field: str) -> float:
        """``VmRSS`` or ``VmHWM`` of the server process, in MB."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        assert match is not None
        return int(match[1]) * 1024 / MB

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(kind: str, workdir: Path, extra_args: tuple[str, ...]) -> Server:
    env = dict(os.environ)
    if kind == "aiosmtpd":
        argv = [sys.executable, "-m", "tests.bench.aiosmtpd_server", "--port", "0"]
    else:
        argv = [sys.executable, "-m", "minismtp", "run", "--port", "0", "--log-level", "warning"]
        argv += ["--maildir", str(workdir / "maildir"), *extra_args]
        # Every client comes from 127.0.0.1: 200 of them would meet the per-address limit (50).
        argv += ["--max-connections-per-address", "0"]
        if kind == "minismtp-untuned":
            env["GLIBC_TUNABLES"] = "glibc.malloc.trim_threshold=131072"  # glibc's default
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert process.stdout is not None
    for line in process.stdout:
        if match := LISTENING.search(line):
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return Server(process, int(match[2]), workdir)
    raise RuntimeError(f"{kind} did not start")


def reply(sock: socket.socket, buffer: bytearray) -> bytes:
    """The next whole reply (its last line)."""
    while True:
        end = buffer.find(b"\r\n")
        while end < 0:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buffer += data
            end = buffer.find(b"\r\n")
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        if line[3:4] != b"-":
            return line


def send(port: int, size: int) -> bytes:
    """One message of ``size`` octets over DATA; the final reply."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        buffer = bytearray()
        reply(sock, buffer)
        for command in (b"EHLO bench", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>"):
            sock.sendall(command + b"\r\n")
            assert reply(sock, buffer).startswith(b"250"), command
        sock.sendall(b"DATA\r\n")
        assert reply(sock, buffer).startswith(b"354")
        sock.sendall(b"Subject: memory\r\n\r\n")
        left = size
        while left > 0:
            block = BLOCK if left >= len(BLOCK) else BLOCK[: left - left % 78]
            if not block:
                break
            sock.sendall(block)
            left -= len(block)
        sock.sendall(b".\r\n")
        final = reply(sock, buffer)
        sock.sendall(b"QUIT\r\n")
        return final


def burst(port: int, clients: int, size: int) -> list[bytes]:
    replies: list[bytes] = []
    lock = threading.Lock()

    def one() -> None:
        result = send(port, size)
        with lock:
            replies.append(result)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def settle(read: Callable[[], float], seconds: float = 3.0) -> float:
    """The resident set once it stops falling (the server frees as its consumers catch up)."""
    deadline = time.monotonic() + seconds
    value = read()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        value = min(value, read())
    return value


def measure(kind: str, scenario: Scenario) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="minismtp-membench-"))
    try:
        server = start(kind, workdir, scenario.extra_args)
        try:
            assert send(server.port, 1000).startswith(b"250")
            idle = server.status("VmRSS")
            replies = burst(server.port, scenario.clients, scenario.size)
            ok = sum(r.startswith(b"250") for r in replies)
            peak = server.status("VmHWM")
            after = settle(lambda: server.status("VmRSS")) if scenario.after_burst else 0.0
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"idle": idle, "peak": peak, "growth": peak - idle, "after": after, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--servers", default="minismtp,minismtp-untuned,aiosmtpd")
    args = parser.parse_args()
    servers = args.servers.split(",")
    print("| scenario | server | idle RSS | peak RSS | peak growth | RSS after | 250s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.scenarios.split(","):
        scenario = SCENARIOS[name]
        for kind in servers:
            if kind == "minismtp-untuned" and not scenario.after_burst:
                continue
            if kind == "aiosmtpd" and scenario.name not in ("20x30mb", "40x30mb"):
                continue  # it holds every message whole: 200x10mb and 1 GB would only swap
            figures = measure(kind, scenario)
            after = f"{figures['after']:.0f} MB" if scenario.after_burst else "-"
            print(
                f"| {name} | {kind} | {figures['idle']:.0f} MB | {figures['peak']:.0f} MB | "
                f"{figures['growth']:.0f} MB | {after} | {figures['ok']:.0f}/{scenario.clients} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
