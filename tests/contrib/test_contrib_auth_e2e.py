"""End to end: ``minismtp run --resolver <a DNS server on loopback>`` with Authenticate.

A DNS server started here (dnspython's message APIs, 127.0.0.1, a free port) holds the SPF,
DKIM and DMARC records of example.com; a message signed here is sent with smtplib from
127.0.0.1 to a ``minismtp run`` subprocess, which stores it in a Maildir. What lands there
carries the ``Authentication-Results:`` header (RFC 8601) the server wrote.
"""

from __future__ import annotations

import email.parser
import email.policy
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.dkimkeys import DKIMKey, rsa_key
from tests.helpers.dnsserver import dns_server
from tests.helpers.processes import run as minismtp_run

APP = """\
from minismtp import App
from minismtp.contrib.auth import Authenticate

app = App(hostname="mx.test", maildir="inbound")
app.add_middleware(Authenticate)
"""

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@mx.test\r\n"
    b"Subject: signed\r\n"
    b"Message-ID: <e2e@example.com>\r\n"
    b"\r\n"
    b"Hello from example.com.\r\n"
)


@pytest.fixture(scope="module")
def key() -> DKIMKey:
    return rsa_key(2048)


@pytest.fixture
def resolver(key: DKIMKey) -> Iterator[str]:
    zones = {
        "example.com": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
        "other.example": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "sel._domainkey.example.com": {"TXT": [key.record]},
        "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]},
    }
    with dns_server(zones) as (host, port):
        yield f"{host}:{port}"


def results(maildir: Path) -> list[str]:
    """The Authentication-Results value of each stored message, unfolded, in order."""
    found = []
    for path in sorted((maildir / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns):
        message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            path.read_bytes()
        )
        found.append(" ".join(message["Authentication-Results"].split()))
    return found


@pytest.mark.slow
def test_signed_then_altered_through_minismtp_run(
    tmp_path: Path, key: DKIMKey, resolver: str
) -> None:
    (tmp_path / "authapp.py").write_text(APP)
    signed = key.sign(MESSAGE, "example.com")
    altered = signed.replace(b"Hello from", b"Hello, altered, from")
    with minismtp_run("authapp:app", "--resolver", resolver, cwd=tmp_path) as running:
        with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
            client.sendmail("alice@example.com", ["bob@mx.test"], signed)
            client.sendmail("bounce@other.example", ["bob@mx.test"], altered)
            client.sendmail("alice@example.com", ["bob@mx.test"], altered)
    assert running.returncode == 0, running.output
    first, second, third = results(tmp_path / "inbound")
    assert first.startswith(
        "mx.test; spf=pass smtp.mailfrom=alice@example.com; dkim=pass header.d=example.com"
    )
    assert first.endswith("arc=none; dmarc=pass (p=reject) header.from=example.com")
    # altered in transit, sent with an envelope sender whose SPF pass does not align
    assert "spf=pass smtp.mailfrom=bounce@other.example" in second
    assert 'dkim=fail reason="body hash did not verify"' in second
    assert second.endswith("dmarc=fail (p=reject) header.from=example.com")
    # the same alteration with an aligned SPF pass: DMARC passes (RFC 7489 4.2)
    assert "dkim=fail" in third and third.endswith("dmarc=pass (p=reject) header.from=example.com")
