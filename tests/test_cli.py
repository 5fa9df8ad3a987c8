"""``minismtp run`` through a real subprocess: serving, the embedded default, signals, errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.certs import RenewedCertificate
from tests.helpers.processes import minismtp, run

BODY = b"From: a@example.com\r\nSubject: cli\r\n\r\nThrough the command line.\r\n"


def sendmail(port: int, recipients: list[str], body: bytes = BODY) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.com", recipients, body)


# -- serving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_run_module_app_receives_mail(loop: str) -> None:
    """API sketch 1: ``minismtp run examples.hello:app --port 0``."""
    with run("examples.hello:app", "--loop", loop) as server:
        assert server.loop == {"uvloop": "asyncio+uvloop"}.get(loop, loop)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            sendmail(server.port, ["b@elsewhere.example"])
        sendmail(server.port, ["b@example.com"])
        # The example's on_message hook prints each message.
        server.wait_for("stdout", r"a@example\.com \(Address\(local_part='b'")
        assert server.stop() == 0


def test_loop_auto_picks_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    with run("examples.hello:app") as server:
        assert server.loop == "asyncio+uvloop"
        assert server.stop() == 0


def test_default_app_stores_each_message_in_maildir_new(tmp_path: Path) -> None:
    """Without an app: ./maildir, a Received: header (RFC 5321 4.4), one log line."""
    with run("--hostname", "mx.cli.test", cwd=tmp_path) as server:
        sendmail(server.port, ["b@example.com"])
        # The 250 comes after the fsync: the file is there now.
        (stored,) = (tmp_path / "maildir" / "new").iterdir()
        content = stored.read_bytes()
        assert content.startswith(b"Received: from ")
        assert b"by mx.cli.test with ESMTP" in content
        assert content.endswith(BODY)
        server.wait_for("stderr", r"from=<a@example\.com> to=<b@example\.com> .*reply=250 id=\w+")
        assert server.stop() == 0


def test_limits_and_hostname_options_reach_the_wire(tmp_path: Path) -> None:
    args = ("--hostname", "mx.opt.test", "--max-size", "1000", "--maildir", "box")
    with run(*args, cwd=tmp_path) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            code, text = client.ehlo()
            assert code == 250 and text.startswith(b"mx.opt.test")
            assert client.esmtp_features["size"] == "1000"
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("a@example.com", ["b@example.com"], b"x" * 2000 + b"\r\n")
            assert refused.value.smtp_code == 552
        assert (tmp_path / "box" / "new").is_dir()
        assert server.stop() == 0


def test_sigterm_during_a_transaction_lets_it_finish_then_exits_0(tmp_path: Path) -> None:
    with run(cwd=tmp_path) as server:
        client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: half\r\n")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("stderr", "SIGTERM: shutting down")
        client.send(b"\r\nand the rest.\r\n.\r\n")
        code, text = client.getreply()
        assert code == 250 and text.startswith(b"2.0.0 OK queued as")
        assert client.getreply()[0] == 421  # 4.3.2: now the server closes
        client.close()
        assert server.process.wait(timeout=20) == 0
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    assert stored.read_bytes().endswith(b"Subject: half\r\n\r\nand the rest.\r\n")


@pytest.mark.parametrize("loop", ["trio", "auto"])
def test_a_second_sigterm_ends_the_transactions_at_once(tmp_path: Path, loop: str) -> None:
    with run("--loop", loop, "--shutdown-grace", "60", cwd=tmp_path) as server:
        client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        client.ehlo()
        client.mail("a@example.com")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("stderr", "SIGTERM: shutting down")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("stderr", "SIGTERM again: closing every session now")
        assert client.getreply()[0] == 421
        assert server.process.wait(timeout=20) == 0
        client.close()
    assert not list((tmp_path / "maildir" / "new").iterdir())


def test_sigint_stops_an_idle_server_with_exit_0(tmp_path: Path) -> None:
    with run(cwd=tmp_path) as server, socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert idle.recv(100).startswith(b"220 ")
        assert server.stop(signal.SIGINT) == 0
        assert b"421 4.3.2" in idle.recv(100)


def test_sighup_reloads_the_certificate_for_new_connections(tmp_path: Path) -> None:
    """Issue 4: swap the files, SIGHUP, and a new connection sees the new certificate."""
    certificate = RenewedCertificate.issue(tmp_path)
    first, second = certificate.first, certificate.second
    with run(*certificate.args, "--tls-port", "0", cwd=tmp_path) as server:
        assert server.tls_port is not None

        def handshake_with(ca_path: Path) -> None:
            context = ssl.create_default_context(cafile=str(ca_path))
            with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.recv(100).startswith(b"220 ")

        handshake_with(first.ca_path)
        certificate.renew()
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("stderr", "TLS certificate reloaded")
        handshake_with(second.ca_path)
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake_with(first.ca_path)
        # STARTTLS on the plain port uses the new certificate too.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cafile=str(second.ca_path)))
            client.sendmail("a@example.com", ["b@example.com"], BODY)
        assert server.stop() == 0
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    assert b"with ESMTPS id" in stored.read_bytes()


# -- errors: one line, exit status 2 ----------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minismtp: error: ")
    for text in expected:
        assert text in lines[0]


def test_bad_module_exits_2_with_one_line() -> None:
    assert_one_line_error(minismtp("run", "no_such_module:app"), "no_such_module")


def test_module_that_raises_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    assert_one_line_error(minismtp("run", "broken:app", cwd=tmp_path), "half written")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("examples.hello", "module:attribute"),
        ("examples.hello:nothing", "no attribute 'nothing'"),
        ("examples.hello:App", "not an App"),
        ("os:sep", "not an App"),
    ],
)
def test_bad_app_spec_exits_2_with_one_line(spec: str, expected: str) -> None:
    assert_one_line_error(minismtp("run", spec), expected)


def test_factory(tmp_path: Path) -> None:
    (tmp_path / "made.py").write_text(
        "from minismtp import App\ndef create():\n    return App(hostname='made.test')\n"
    )
    assert_one_line_error(minismtp("run", "made:create", cwd=tmp_path), "--factory")
    with run("made:create", "--factory", cwd=tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            assert client.recv(100).startswith(b"220 made.test ESMTP")
        assert server.stop() == 0


@pytest.mark.parametrize(
    "args",
    [
        ("--port", "seventy"),
        ("--max-size", "-1"),
        ("--loop", "tokio"),
        ("--no-such-option",),
        ("--tls-port", "465"),
        ("--require-tls",),
        ("examples.hello:app", "--maildir", "box"),
        ("--proxy-trusted", "10.0.0.0/8"),
        ("--proxy-protocol", "--proxy-trusted", "10.1.2.3/8"),
        ("--workers", "0"),
    ],
)
def test_bad_option_exits_2_with_one_line(args: tuple[str, ...]) -> None:
    assert_one_line_error(minismtp("run", *args))


def test_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = minismtp("run", "--port", str(port), cwd=tmp_path)
    assert_one_line_error(result, "in use")


def test_bad_certificate_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    assert_one_line_error(
        minismtp("run", "--tls-cert", "cert.pem", cwd=tmp_path), "TLS certificate"
    )


# -- help and version --------------------------------------------------------------------------------


def test_version() -> None:
    result = minismtp("--version")
    assert result.returncode == 0 and re.fullmatch(r"minismtp \d+\.\d+\.\d+\n", result.stdout)


def test_console_script_is_installed() -> None:
    script = shutil.which("minismtp", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the minismtp script is not next to this Python")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("minismtp ")


def test_help_explains_every_option() -> None:
    result = minismtp("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    options = [
        "--host", "--port", "--hostname", "--maildir", "--max-size", "--max-recipients",
        "--timeout", "--max-connections", "--log-level", "--factory", "--tls-cert",
        "--tls-key", "--tls-port", "--require-tls", "--loop", "--shutdown-grace",
        "--proxy-protocol", "--proxy-trusted", "--proxy-timeout", "--workers", "--metrics-port",
        "--metrics-host",
    ]  # fmt: skip
    for option in options:
        # The option, perhaps its metavar or choices, then at least four words saying what
        # it does.
        explained = (
            re.escape(option)
            + r"(?: (?:[A-Z_]+|\{[a-z,]+\}))? [A-Za-z(][\w(./-]*(?: [\w(),./:;'-]+){3}"
        )
        assert re.search(explained, text), option
