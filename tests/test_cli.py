"""``minismtp run`` through a real subprocess: serving, the embedded default, signals, errors."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from minismtp.cli_listeners import bind_problem
from minismtp.cli_parser import _hostname
from tests.helpers.certs import Certificates, RenewedCertificate, issue_certificates
from tests.helpers.processes import minismtp, run, unprivileged

BODY = b"From: a@example.com\r\nSubject: cli\r\n\r\nThrough the command line.\r\n"


def sendmail(port: int, recipients: list[str], body: bytes = BODY) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.com", recipients, body)


# -- serving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_run_module_app_receives_mail(loop: str) -> None:
    """``minismtp run examples.hello:app --port 0``, as the README serves it."""
    with run("examples.hello:app", "--loop", loop) as server:
        assert server.loop == {"uvloop": "asyncio+uvloop"}.get(loop, loop)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            sendmail(server.port, ["b@elsewhere.example"])
        sendmail(server.port, ["b@example.com"])
        # The example's on_message hook prints each message: id, sender, recipients, size.
        server.wait_for("stdout", r"^[0-9A-Z]+ a@example\.com b@example\.com \d+$")
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


def test_the_embedded_default_limits_connections_per_address(tmp_path: Path) -> None:
    """Postfix's default (50) unless told; here 2, and a client from elsewhere still served."""
    with run("--max-connections-per-address", "2", cwd=tmp_path) as server:
        address = ("127.0.0.1", server.port)
        with socket.create_connection(address) as one, socket.create_connection(address) as two:
            for client in (one, two):
                client.settimeout(10)
                assert client.recv(1024).startswith(b"220 ")
            with socket.create_connection(address, timeout=10) as third:
                assert third.recv(1024) == b"421 4.7.0 Too many connections from your address\r\n"
                assert third.recv(1024) == b""
            with smtplib.SMTP(*address, timeout=10, source_address=("127.0.0.2", 0)) as other:
                other.sendmail("a@example.com", ["b@example.com"], BODY)
        server.wait_for("stderr", r"the last from 127\.0\.0\.1: 2 open from that address")
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


def test_metrics_port_serves_the_counters_and_is_announced_once(tmp_path: Path) -> None:
    with run("--metrics-port", "0", cwd=tmp_path) as server:
        announced = server.wait_for(
            "stdout", r"^minismtp metrics on http://127\.0\.0\.1:(\d+)/metrics$"
        )
        assert server.stdout.index(announced.string) == 1  # after the SMTP address
        sendmail(server.port, ["b@example.com"])
        url = f"http://127.0.0.1:{announced[1]}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        assert 'minismtp_transactions_total{code="250",result="accepted"} 1\n' in text
        assert server.stop() == 0
    assert sum("metrics" in line for line in server.stdout + server.stderr) == 1


BARE_LF_BODY = b"Subject: plain LF\nfrom a file\n.\nnot the end\r\n"


def send_raw_data(port: int, body: bytes) -> bytes:
    """MAIL, RCPT, DATA, ``body``, ``CRLF.CRLF``: the reply to the content (smtplib would
    turn the bare LFs into CRLFs)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        for command in (
            b"HELO client.test",
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<b@example.com>",
            b"DATA",
        ):
            sock.sendall(command + b"\r\n")
            assert replies.readline()[:1] in (b"2", b"3")
        sock.sendall(body + b".\r\n")
        return replies.readline()


@pytest.mark.parametrize("mode", ["reject", "normalize", None])
def test_bare_lf_is_refused_or_normalized_and_only_crlf_dot_crlf_ends_data(
    tmp_path: Path, mode: str | None
) -> None:
    """RFC 5321 2.3.8 and 4.1.1.4; ``--bare-lf normalize`` is Postfix's
    ``smtpd_forbid_bare_newline = normalize``: a bare LF is a line end within the content, and
    ``<LF>.<LF>`` is not the end of data in either mode (SMTP smuggling)."""
    with run(*(("--bare-lf", mode) if mode else ()), cwd=tmp_path) as server:
        reply = send_raw_data(server.port, BARE_LF_BODY)
        assert server.stop() == 0
    stored = list((tmp_path / "maildir" / "new").iterdir())
    if mode == "normalize":
        assert reply.startswith(b"250 2.0.0 OK queued as ")
        (message,) = stored
        assert message.read_bytes().endswith(
            b"\r\nSubject: plain LF\r\nfrom a file\r\n.\r\nnot the end\r\n"
        )
    else:  # the default
        assert reply == b"550 5.5.2 Message contains bare CR or LF\r\n"
        assert stored == []


# -- errors: one line, exit status 2 ----------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit status 2, nothing on stdout (nothing was announced) and exactly one line on
    stderr, ``minismtp: error: `` then ``expected`` (a regular expression)."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch("minismtp: error: " + expected, lines[0]), lines[0]


def test_bad_module_exits_2_with_one_line() -> None:
    assert_one_line_error(
        minismtp("run", "no_such_module:app"),
        re.escape(
            "cannot import 'no_such_module': ModuleNotFoundError: No module named 'no_such_module'"
        ),
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "import os\n\ndef half():\n    raise RuntimeError('half written')\n\nhalf()\n",
            "RuntimeError: half written (broken.py:4)",
        ),
        ("app = (\n", "SyntaxError: '(' was never closed (broken.py:1)"),
        # Raised inside the standard library: the user's line that called it.
        ("import json\n\napp = json.loads('{')\n", "JSONDecodeError: .* (broken.py:3)"),
    ],
)
def test_module_that_raises_exits_2_naming_the_file_and_line(
    tmp_path: Path, source: str, expected: str
) -> None:
    (tmp_path / "broken.py").write_text(source)
    result = minismtp("run", "broken:app", cwd=tmp_path)
    assert_one_line_error(
        result,
        re.escape("cannot import 'broken': ") + expected.replace("(", r"\(").replace(")", r"\)"),
    )


def test_app_whose_startup_fails_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "nodb.py").write_text(
        "from minismtp import App\n"
        "app = App(hostname='mx.test')\n"
        "@app.on_startup\n"
        "async def connect():\n"
        "    raise ConnectionRefusedError('no database')\n"
    )
    assert_one_line_error(
        minismtp("run", "nodb:app", "--port", "0", cwd=tmp_path),
        re.escape("the App did not start: ConnectionRefusedError: no database (nodb.py:5)"),
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("examples.hello", "APP must be module:attribute, not 'examples.hello'"),
        ("examples.hello:nothing", "module 'examples.hello' has no attribute 'nothing'"),
        ("examples.hello:App", "examples.hello:App is not an App (a factory? add --factory)"),
        ("os:sep", "os:sep is not an App"),
    ],
)
def test_bad_app_spec_exits_2_with_one_line(spec: str, expected: str) -> None:
    assert_one_line_error(minismtp("run", spec), re.escape(expected))


def test_factory(tmp_path: Path) -> None:
    (tmp_path / "made.py").write_text(
        "from minismtp import App\ndef create():\n    return App(hostname='made.test')\n"
    )
    assert_one_line_error(
        minismtp("run", "made:create", cwd=tmp_path),
        re.escape("made:create is not an App (a factory? add --factory)"),
    )
    with run("made:create", "--factory", cwd=tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            assert client.recv(100).startswith(b"220 made.test ESMTP")
        assert server.stop() == 0


HELP = " (see 'minismtp run --help')"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--port", "seventy"), "argument --port: not a port number: 'seventy'" + HELP),
        (("--port", "65536"), "argument --port: not a port number: 65536" + HELP),
        (("--max-size", "-1"), "argument --max-size: must be at least 1: -1" + HELP),
        (
            ("--loop", "tokio"),
            "argument --loop: invalid choice: 'tokio' "
            "(choose from 'auto', 'asyncio', 'uvloop', 'trio')" + HELP,
        ),
        (("--no-such-option",), "unrecognized arguments: --no-such-option" + HELP),
        (("--tls-port", "465"), "--tls-port needs --tls-cert"),
        (("--require-tls",), "--require-tls needs --tls-cert"),
        (
            ("examples.hello:app", "--maildir", "box"),
            "--maildir is for the embedded default; give your App a maildir",
        ),
        (("--proxy-trusted", "10.0.0.0/8"), "--proxy-trusted needs --proxy-protocol"),
        (
            ("--proxy-protocol", "--proxy-trusted", "10.1.2.3/8"),
            "--proxy-trusted: not a network in CIDR notation: '10.1.2.3/8' "
            "(10.1.2.3/8 has host bits set)",
        ),
        (("--workers", "0"), "argument --workers: must be at least 1: 0" + HELP),
        (
            ("--max-connections-per-address", "-1"),
            "argument --max-connections-per-address: must not be negative: -1" + HELP,
        ),
        (
            ("--max-connections-per-address", "many"),
            "argument --max-connections-per-address: not a whole number: 'many'" + HELP,
        ),
        (
            ("--hostname", "bad host name"),
            "argument --hostname: not a domain name or an address literal like [192.0.2.1]: "
            "'bad host name'" + HELP,
        ),
        (
            ("--bare-lf", "keep"),
            "argument --bare-lf: invalid choice: 'keep' (choose from 'reject', 'normalize')" + HELP,
        ),
        (
            ("--log-level", "loud"),
            "argument --log-level: invalid choice: 'loud' "
            "(choose from 'critical', 'error', 'warning', 'info', 'debug')" + HELP,
        ),
    ],
)
def test_bad_option_exits_2_with_one_line(args: tuple[str, ...], expected: str) -> None:
    assert_one_line_error(minismtp("run", *args), re.escape(expected))


@pytest.mark.parametrize(
    "hostname",
    ["mx.example.com", "mx", "a-b.example", "123.example", "[192.0.2.1]", "[IPv6:2001:db8::1]"],
)
def test_hostname_accepts_a_domain_or_an_address_literal_rfc5321_4_1_3(hostname: str) -> None:
    assert _hostname(hostname) == hostname


@pytest.mark.parametrize(
    "hostname",
    [
        "bad host", "mx.example.com.", "a..b", "-mx.example", "mx-.example", "mx_1.example",
        "[2001:db8::1]", "[IPv6:192.0.2.1]", "[192.0.2.300]", "a" * 64 + ".example",
        "mx.example\r\n", "",
    ],
)  # fmt: skip
def test_hostname_refuses_anything_else(hostname: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _hostname(hostname)


def test_hostname_option_is_checked_before_serving(tmp_path: Path) -> None:
    assert_one_line_error(
        minismtp("run", "--hostname", "[IPv6:192.0.2.1]", "--port", "0", cwd=tmp_path),
        re.escape(
            "argument --hostname: not a domain name or an address literal like [192.0.2.1]: "
            "'[IPv6:192.0.2.1]'" + HELP
        ),
    )


# -- ports ----------------------------------------------------------------------------------------


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def in_use(port: int, option: str) -> str:
    return re.escape(
        f"127.0.0.1:{port} ({option}) is in use by another process: stop it, or choose another port"
    )


def test_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    with taken_port() as port:
        result = minismtp("run", "--port", str(port), cwd=tmp_path)
    assert_one_line_error(result, in_use(port, "--port"))


def test_tls_port_in_use_exits_2_with_one_line(tmp_path: Path, certs: Certificates) -> None:
    tls = ("--tls-cert", str(certs.cert_path), "--tls-key", str(certs.key_path))
    with taken_port() as port:
        result = minismtp("run", "--port", "0", *tls, "--tls-port", str(port), cwd=tmp_path)
    assert_one_line_error(result, in_use(port, "--tls-port"))


def test_metrics_port_in_use_exits_2_and_nothing_listens(tmp_path: Path) -> None:
    """Issue 20: the SMTP port was listening, then a traceback and status 1."""
    with taken_port() as metrics, taken_port() as smtp:
        pass  # two ports that were free a moment ago
    with taken_port() as metrics:
        process = subprocess.Popen(
            [sys.executable, "-m", "minismtp", "run", "--port", str(smtp), "--metrics-port", str(metrics)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = process.communicate(timeout=60)
    assert_one_line_error(
        subprocess.CompletedProcess(process.args, process.returncode, out, err),
        in_use(metrics, "--metrics-port"),
    )
    with socket.socket() as probe:  # the SMTP port was let go, if it was ever bound
        probe.bind(("127.0.0.1", smtp))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--port", "2681", "--metrics-port", "2681"), "--metrics-port is 2681, as --port is"),
        (
            ("--port", "2680", "--workers", "2", "--metrics-port", "2679"),
            r"the metrics port of worker 1 \(--metrics-port \+ 1\) is 2680, as --port is",
        ),
    ],
)
def test_two_listeners_on_one_port_are_refused_before_binding(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    assert_one_line_error(
        minismtp("run", *args, cwd=tmp_path), expected + ": give each its own port"
    )


def test_tls_port_equal_to_port_is_refused(tmp_path: Path, certs: Certificates) -> None:
    tls = ("--tls-cert", str(certs.cert_path), "--tls-key", str(certs.key_path))
    result = minismtp("run", "--port", "2682", *tls, "--tls-port", "2682", cwd=tmp_path)
    assert_one_line_error(
        result, re.escape("--tls-port is 2682, as --port is: give each its own port")
    )


def test_metrics_host_that_does_not_resolve_exits_2(tmp_path: Path) -> None:
    result = minismtp(
        "run",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--metrics-host",
        "nosuch.invalid",
        cwd=tmp_path,
    )
    assert_one_line_error(
        result, re.escape("--metrics-host 'nosuch.invalid': no such host or address (") + ".+\\)"
    )


def test_an_address_not_of_this_machine_exits_2(tmp_path: Path) -> None:
    result = minismtp("run", "--host", "192.0.2.1", "--port", "2525", cwd=tmp_path)
    assert_one_line_error(
        result,
        re.escape("192.0.2.1:2525 (--port): 192.0.2.1 is not an address of this machine (--host)"),
    )


PRIVILEGED = (
    "a port below 1024 needs root or the CAP_NET_BIND_SERVICE capability "
    "(systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE); or listen above 1023 behind a "
    "firewall redirect"
)


def test_a_privileged_port_names_the_ways_out() -> None:
    denied = PermissionError(errno.EACCES, "Permission denied")
    assert bind_problem("--metrics-port", "--metrics-host", "127.0.0.1", 80, denied) == (
        f"127.0.0.1:80 (--metrics-port): {PRIVILEGED}"
    )


def test_a_privileged_port_as_a_user_exits_2(tmp_path: Path) -> None:
    """Issue 20: ``--metrics-port 80`` as a user gave a traceback and status 1."""
    tmp_path.chmod(0o777)  # the user nobody runs in it
    result = minismtp(
        "run", "--port", "0", "--metrics-port", "80", cwd=tmp_path, wrapper=unprivileged()
    )
    assert_one_line_error(result, re.escape(f"127.0.0.1:80 (--metrics-port): {PRIVILEGED}"))


# -- the Maildir ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_maildir_that_cannot_be_created_exits_2(tmp_path: Path, workers: str) -> None:
    (tmp_path / "afile").write_text("not a directory\n")
    result = minismtp(
        "run", "--port", "0", "--maildir", "afile", "--workers", workers, cwd=tmp_path
    )
    assert_one_line_error(
        result, re.escape("cannot write the Maildir 'afile': afile/tmp: not a directory")
    )


def test_a_maildir_that_cannot_be_written_exits_2(tmp_path: Path) -> None:
    """Issue 20: it started, then every message got 451."""
    wrapper = unprivileged()
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "box" / sub).mkdir(parents=True)
    for path in (tmp_path, tmp_path / "box", *(tmp_path / "box").iterdir()):
        path.chmod(0o755)  # others (nobody, when we are root) may read, not write
    tmp_path.chmod(0o777)
    result = minismtp("run", "--port", "0", "--maildir", "box", cwd=tmp_path, wrapper=wrapper)
    assert_one_line_error(
        result, re.escape("cannot write the Maildir 'box': box/tmp/") + r"\S+: permission denied"
    )


# -- TLS files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (("cert.pem", "nosuch.pem"), "cannot read the TLS key 'nosuch.pem': no such file or directory"),
        (("nosuch.pem", "key.pem"), "cannot read the TLS certificate 'nosuch.pem': no such file or directory"),
        (("cert.pem", None), "the TLS certificate file 'cert.pem' holds no private key: name the key's file too (--tls-key)"),
        (("cert.pem", "other-key.pem"), "the TLS key in 'other-key.pem' does not belong to the certificate in 'cert.pem'"),
        (("key.pem", "key.pem"), "the TLS certificate file 'key.pem' holds no PEM certificate"),
        (("cert.pem", "cert.pem"), "the TLS key file 'cert.pem' holds no PEM private key"),
        (("junk.pem", "key.pem"), "the TLS certificate file 'junk.pem' holds no PEM certificate"),
    ],
)  # fmt: skip
def test_tls_errors_blame_the_right_file(
    tmp_path: Path, files: tuple[str, str | None], expected: str
) -> None:
    issued = issue_certificates(tmp_path / "issued")
    shutil.copy(issued.cert_path, tmp_path / "cert.pem")
    shutil.copy(issued.key_path, tmp_path / "key.pem")
    shutil.copy(issue_certificates(tmp_path / "other").key_path, tmp_path / "other-key.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cert, key = files
    args = ("--tls-cert", cert, *(("--tls-key", key) if key else ()))
    assert_one_line_error(minismtp("run", "--port", "0", *args, cwd=tmp_path), re.escape(expected))


def test_an_unreadable_tls_key_is_blamed_not_the_certificate(tmp_path: Path) -> None:
    """Issue 20: a key file the server may not read names the key file and the reason."""
    wrapper = unprivileged()
    issued = issue_certificates(tmp_path / "issued")
    shutil.copy(issued.cert_path, tmp_path / "cert.pem")
    shutil.copy(issued.key_path, tmp_path / "key.pem")
    (tmp_path / "cert.pem").chmod(0o644)
    (tmp_path / "key.pem").chmod(0o000)
    tmp_path.chmod(0o777)
    args = ("--tls-cert", "cert.pem", "--tls-key", "key.pem")
    result = minismtp("run", "--port", "0", *args, cwd=tmp_path, wrapper=wrapper)
    assert_one_line_error(result, re.escape("cannot read the TLS key 'key.pem': permission denied"))


def test_a_failed_reload_names_the_file_and_keeps_the_certificate(tmp_path: Path) -> None:
    certificate = RenewedCertificate.issue(tmp_path)
    with run(*certificate.args, cwd=tmp_path) as server:
        certificate.key.unlink()
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(
            "stderr",
            re.escape(
                "ERROR minismtp.tls: TLS certificate not reloaded, keeping the old one: "
                f"cannot read the TLS key {str(certificate.key)!r}: no such file or directory"
            ),
        )
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.starttls(context=certificate.first.client_context())
            assert client.noop()[0] == 250
        assert server.stop() == 0


# -- help and version --------------------------------------------------------------------------------


def test_bare_minismtp_prints_the_help_and_exits_2() -> None:
    result = minismtp()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: minismtp ")
    assert re.search(r"\n +run +serve an App\n", result.stderr), result.stderr
    assert "--version" in result.stderr


@pytest.mark.parametrize("level", ["DEBUG", "Info", "warning"])
def test_log_level_in_any_case(tmp_path: Path, level: str) -> None:
    with run("--log-level", level, cwd=tmp_path) as server:
        sendmail(server.port, ["b@example.com"])
        assert server.stop() == 0
    info_lines = [line for line in server.stderr if " INFO " in line]
    assert bool(info_lines) == (level.lower() in ("debug", "info"))
    assert any(" DEBUG " in line for line in server.stderr) == (level.lower() == "debug")


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
        "--metrics-host", "--bare-lf", "--max-connections-per-address",
    ]  # fmt: skip
    for option in options:
        # The option, perhaps its metavar or choices, then at least four words saying what
        # it does.
        explained = (
            re.escape(option)
            + r"(?: (?:[A-Z_]+|\{[a-z,]+\}))? [A-Za-z(][\w(./-]*(?: [\w(),./:;'-]+){3}"
        )
        assert re.search(explained, text), option
