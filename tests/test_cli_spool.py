"""``--spool-memory`` and ``--spool-dir`` reach the App; bad values are one line and exit 2."""

from __future__ import annotations

import smtplib
import textwrap
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, minismtp, run

LARGE = b"Subject: large\r\n\r\n" + (b"0123456789" * 7 + b"\r\n") * 2000

APP = """
from pathlib import Path

from minismtp import App

app = App(hostname="mx.spool.test")


@app.on_message
def record(message):
    with message:
        Path("seen").write_text(f"{message.path.parent.name} {message.size}")
"""


def test_spool_options_put_large_messages_in_the_spool_dir(tmp_path: Path) -> None:
    (tmp_path / "spoolapp.py").write_text(textwrap.dedent(APP))
    (tmp_path / "spool").mkdir()
    args = ("spoolapp:app", "--spool-memory", "4096", "--spool-dir", "spool")
    with run(*args, cwd=tmp_path) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], LARGE)
        assert server.stop() == 0
    assert (tmp_path / "seen").read_text() == f"spool {len(LARGE)}"
    assert list((tmp_path / "spool").iterdir()) == []  # closed by the consumer


def test_the_default_maildir_spools_in_its_tmp(tmp_path: Path) -> None:
    with run("--spool-memory", "0", cwd=tmp_path) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], LARGE)
        (stored,) = (tmp_path / "maildir" / "new").iterdir()
        assert stored.read_bytes().endswith(LARGE)
        assert list((tmp_path / "maildir" / "tmp").iterdir()) == []
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--spool-memory", "-1"),
            r"argument --spool-memory: must not be negative: -1 \(see 'minismtp run --help'\)",
        ),
        (
            ("--spool-memory", "lots"),
            r"argument --spool-memory: not a whole number: 'lots' \(see 'minismtp run --help'\)",
        ),
        (
            ("--spool-dir", "/nonexistent/spool"),
            "--spool-dir: not a directory: '/nonexistent/spool'",
        ),
    ],
)
def test_bad_spool_options_exit_2_with_one_line(args: tuple[str, ...], expected: str) -> None:
    assert_one_line_error(minismtp("run", *args), expected)
