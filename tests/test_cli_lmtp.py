"""``minismtp run --lmtp --unix PATH``: LMTP and unix-domain sockets from the command line."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import stat
from pathlib import Path

import pytest

from tests.helpers.processes import UNIX_LISTENING, minismtp
from tests.helpers.processes import run_on_unix_socket as run

BODY = b"Subject: cli\r\n\r\nOver LMTP.\r\n"


def lmtp_send(path: Path, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.LMTP(str(path)) as client:
        return client.sendmail("a@example.org", recipients, BODY)


def lmtp_replies(path: Path, recipients: list[str]) -> list[str]:
    """The replies after the data, one per recipient (smtplib reads only the first)."""
    rcpts = b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients)
    dialogue = b"LHLO x\r\nMAIL FROM:<a@example.org>\r\n" + rcpts + b"DATA\r\n" + BODY
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(dialogue + b".\r\nQUIT\r\n")
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    lines = received.decode().split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("354"))
    return lines[start + 1 : start + 1 + len(recipients)]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_run_lmtp_on_a_unix_socket(tmp_path: Path, loop: str) -> None:
    sock = tmp_path / "lmtp.sock"
    with run("examples.lmtp_lists:app", "--lmtp", "--unix", str(sock), "--loop", loop) as server:
        line = server.wait_for("stdout", UNIX_LISTENING)
        assert line[1] == str(sock) and line[2].startswith("LMTP, ")
        assert lmtp_send(sock, ["dev@lists.example.com"]) == {}
        server.wait_for("stdout", r"^list dev: message \w+ from <a@example\.org>$")
        server.wait_for("stderr", rf"session \w+ from {re.escape(str(sock))} ")
        assert server.stop() == 0
    assert not sock.exists()


def test_per_recipient_replies_from_the_command_line(tmp_path: Path) -> None:
    sock = tmp_path / "lmtp.sock"
    with run("examples.lmtp_lists:app", "--lmtp", "--unix", str(sock)) as server:
        replies = lmtp_replies(sock, ["nope@lists.example.com", "dev@lists.example.com"])
        assert replies[0] == "550 5.1.1 No such list"
        assert replies[1].startswith("250 2.0.0 OK queued as ")
        assert server.stop() == 0


def test_unix_mode_and_beside_a_tcp_port(tmp_path: Path) -> None:
    sock = tmp_path / "smtp.sock"
    args = ("--unix", str(sock), "--unix-mode", "0660", "--port", "0", "--maildir", "box")
    with run(*args, cwd=tmp_path) as server:
        tcp = server.wait_for("stdout", r"^minismtp listening on 127\.0\.0\.1:(\d+) ")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        with smtplib.SMTP("127.0.0.1", int(tcp[1]), timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.com"], BODY)
        assert server.stop() == 0
    assert len(list((tmp_path / "box" / "new").iterdir())) == 1


def test_a_live_server_on_the_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    sock = tmp_path / "lmtp.sock"
    with run("--lmtp", "--unix", str(sock), cwd=tmp_path) as first:
        second = minismtp("run", "--lmtp", "--unix", str(sock), cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"minismtp: error: a server is listening on {sock} already"
        ]
        assert lmtp_send(sock, ["b@example.com"]) == {}  # the first one still serves
        assert first.stop() == 0


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "lmtp.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()
    with run("--lmtp", "--unix", str(sock), cwd=tmp_path) as server:
        assert lmtp_send(sock, ["b@example.com"]) == {}
        assert server.stop() == 0


def test_workers_share_the_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "lmtp.sock"
    with run("--lmtp", "--unix", str(sock), "--workers", "2", cwd=tmp_path) as server:
        server.wait_for("stderr", r"worker 1 \(pid \d+\) serving")
        for _ in range(4):
            assert lmtp_send(sock, ["b@example.com"]) == {}
        assert server.stop() == 0
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 4
    assert not sock.exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--unix-mode", "0660"), "--unix-mode needs --unix"),
        (("--unix", "x.sock", "--unix-mode", "rw"), "not an octal file mode: 'rw'"),
        (("--unix", "x.sock", "--unix-mode", "01777"), "not an octal file mode: '01777'"),
    ],
)
def test_bad_unix_options_are_one_line(tmp_path: Path, args: tuple[str, ...], error: str) -> None:
    result = minismtp("run", *args, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert error in line
