"""``minismtp run --workers N``: one listening socket, N processes, each message stored once."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import sys
import threading
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
