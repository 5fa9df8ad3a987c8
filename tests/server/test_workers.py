"""``minismtp run --workers N``: one listening socket, N processes, each message stored once."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.certs import RenewedCertificate
from tests.helpers.processes import run

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="--workers is POSIX only")

WORKER = r"worker {} started \(pid (\d+)\)"
CLIENTS = 50
PER_CLIENT = 20  # 1,000 messages
PER_CONNECTION = 5  # a new connection every 5 messages: the kernel shares them out


def body(client: int, n: int) -> bytes:
    return b"X-Seq: %d-%d\r\nSubject: worker test\r\n\r\n" % (client, n) + b"line\r\n" * (n + 1)


def send_all(port: int, client: int, errors: list[BaseException]) -> None:
    try:
        for start in range(0, PER_CLIENT, PER_CONNECTION):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                for n in range(start, start + PER_CONNECTION):
                    smtp.sendmail("a@example.com", ["b@example.com"], body(client, n))
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_two_workers_1000_messages_from_50_clients_each_stored_once(tmp_path: Path) -> None:
    with run("--workers", "2", "--maildir", "box", cwd=tmp_path) as server:
        assert server.loop.endswith(", 2 workers")
        pids = {int(server.wait_for("stderr", WORKER.format(i)).group(1)) for i in (0, 1)}
        for i in (0, 1):
            server.wait_for("stderr", rf"worker {i} \(pid \d+\) serving")
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=send_all, args=(server.port, c, errors)) for c in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors[:3]
        assert server.stop() == 0
    stored = list((tmp_path / "box" / "new").iterdir())
    assert len(stored) == CLIENTS * PER_CLIENT
    seen: set[tuple[int, int]] = set()
    served_by: dict[int, int] = {}
    for path in stored:
        content = path.read_bytes()
        client, n = map(int, re.search(rb"X-Seq: (\d+)-(\d+)", content).groups())  # type: ignore[union-attr]
        assert content.startswith(b"Received: ") and content.endswith(body(client, n))
        seen.add((client, n))
        # Maildir's unique name carries the pid of the process that delivered it.
        pid = int(re.search(r"P(\d+)Q", path.name).group(1))  # type: ignore[union-attr]
        served_by[pid] = served_by.get(pid, 0) + 1
    assert len(seen) == CLIENTS * PER_CLIENT  # each exactly once
    assert set(served_by) == pids, served_by  # both workers served some


def test_a_worker_that_dies_is_restarted(tmp_path: Path) -> None:
    with run("--workers", "2", "--maildir", "box", cwd=tmp_path) as server:
        first = int(server.wait_for("stderr", WORKER.format(0)).group(1))
        server.wait_for("stderr", r"worker 0 \(pid \d+\) serving")
        os.kill(first, signal.SIGKILL)
        server.wait_for("stderr", rf"worker 0 \(pid {first}\) exited with status -9; restarting")
        server.wait_for("stderr", rf"worker 0 started \(pid (?!{first}\))\d+\)")
        for n in range(10):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], body(0, n))
        assert server.stop() == 0, "\n".join(server.stderr)
    assert len(list((tmp_path / "box" / "new").iterdir())) == 10


def test_sighup_reaches_every_worker_and_each_reloads_the_certificate(tmp_path: Path) -> None:
    certificate = RenewedCertificate.issue(tmp_path)
    with run("--workers", "2", "--maildir", "box", *certificate.args, cwd=tmp_path) as server:
        for i in (0, 1):
            server.wait_for("stderr", rf"worker {i} \(pid \d+\) serving")
        certificate.renew()
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("stderr", "TLS certificate reloaded", count=2)  # one line per worker
        context = ssl.create_default_context(cafile=str(certificate.second.ca_path))
        for n in range(10):  # new connections, whichever worker takes each
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                smtp.starttls(context=context)
                smtp.sendmail("a@example.com", ["b@example.com"], body(0, n))
        assert server.stop() == 0, "\n".join(server.stderr)
    assert len(list((tmp_path / "box" / "new").iterdir())) == 10


def get_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


def test_each_worker_serves_its_metrics_on_port_plus_its_index(tmp_path: Path) -> None:
    """``--metrics-port P``: worker i on P + i, each URL printed once, with its worker."""
    port = free_port_pair()
    with run(
        "--workers", "2", "--maildir", "box", "--metrics-port", str(port), cwd=tmp_path
    ) as server:
        for i in (0, 1):
            server.wait_for("stderr", rf"worker {i} \(pid \d+\) serving")
        urls = [line for line in server.stdout if "metrics" in line]
        assert urls == [
            f"minismtp metrics of worker 0 on http://127.0.0.1:{port}/metrics",
            f"minismtp metrics of worker 1 on http://127.0.0.1:{port + 1}/metrics",
        ]
        for n in range(6):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], body(0, n))
        accepted = [
            int(re.search(r'^minismtp_transactions_total\{code="250",result="accepted"\} (\d+)$', text, re.M)[1])  # type: ignore[index]
            if "code=\"250\"" in text else 0
            for text in (get_metrics(f"http://127.0.0.1:{port + i}/metrics") for i in (0, 1))
        ]  # fmt: skip
        assert sum(accepted) == 6  # each worker counts its own
        assert server.stop() == 0, server.output
    assert not any("metrics on" in line for line in server.stderr)  # not said twice


def free_port_pair() -> int:
    """A port P such that P and P + 1 were both free a moment ago."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two free ports in a row")


def test_metrics_port_0_gives_each_worker_a_free_port(tmp_path: Path) -> None:
    with run("--workers", "2", "--maildir", "box", "--metrics-port", "0", cwd=tmp_path) as server:
        ports = [
            int(server.wait_for("stdout", rf"^minismtp metrics of worker {i} on http://127\.0\.0\.1:(\d+)/metrics$")[1])
            for i in (0, 1)
        ]  # fmt: skip
        assert len(set(ports)) == 2
        for i in (0, 1):
            server.wait_for("stderr", rf"worker {i} \(pid \d+\) serving")
            assert "minismtp_connections_total" in get_metrics(
                f"http://127.0.0.1:{ports[i]}/metrics"
            )
        assert server.stop() == 0, server.output


def test_a_worker_that_cannot_start_is_retried_with_backoff_then_exit_2(tmp_path: Path) -> None:
    """Issue 20: it was restarted forever, every ~1.5 s, with a traceback each time."""
    (tmp_path / "nodb.py").write_text(
        "from minismtp import App\n"
        "app = App(hostname='mx.test')\n"
        "@app.on_startup\n"
        "async def connect():\n"
        "    raise ConnectionRefusedError('no database')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "minismtp", "run", "nodb:app", "--port", "0", "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    lines = err.splitlines()
    why = "could not start: the App did not start: ConnectionRefusedError: no database (nodb.py:5)"
    assert re.fullmatch(
        rf"minismtp: error: worker [01] {re.escape(why)} \(5 times in a row\)", lines[-1]
    )
    assert not any("Traceback" in line for line in lines), err
    # Each failure is one line, and the pause doubles: 0.5 s, 1 s, 2 s, 4 s.
    waits = [
        float(m[1])
        for line in lines
        if (m := re.search(rf"WARNING minismtp.workers: worker 0 {re.escape(why)}; restarting it in ([\d.]+) s$", line))
    ]  # fmt: skip
    assert waits[:4] == [0.5, 1, 2, 4][: len(waits[:4])] and len(waits) >= 3, err
    assert "minismtp listening on" in out  # the sockets were fine
