"""The Received: trace header of RFC 5321 4.4 (and the with-words of RFC 3848 and RFC 6531)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime

import pytest

from minismtp import received
from minismtp.received import address_literal, received_header, rfc5322_date
from minismtp.types import Address, Session, TLSInfo, Transaction

WHEN = 1_700_000_000.0


def make(
    helo: str | None = "client.example.org",
    peer: str = "192.0.2.7",
    esmtp: bool = True,
    tls: bool = False,
    rcpts: tuple[str, ...] = ("bob@example.com",),
    params: dict[str, str | None] | None = None,
) -> tuple[Session, Transaction]:
    session = Session(
        peer=(peer, 40000),
        helo_name=helo,
        esmtp=esmtp,
        tls=TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256") if tls else None,
    )
    tx = Transaction(session, Address("alice", "example.org"), params or {})
    for rcpt in rcpts:
        local, _, domain = rcpt.partition("@")
        tx.rcpt_to.append(Address(local, domain))
    return session, tx


def header(**kwargs: object) -> str:
    session, tx = make(**kwargs)  # type: ignore[arg-type]
    return received_header(session, tx, "ABC123", by="mx.example.com", when=WHEN).decode()


def test_rfc5321_4_4_full_header_bytes() -> None:
    session, tx = make()
    raw = received_header(session, tx, "ABC123", by="mx.example.com", when=WHEN)
    assert raw == (
        b"Received: from client.example.org ([192.0.2.7])\r\n"
        b"\tby mx.example.com with ESMTP id ABC123\r\n"
        b"\tfor <bob@example.com>; " + formatdate(WHEN, localtime=True).encode() + b"\r\n"
    )


def test_rfc5322_date_is_the_acceptance_time() -> None:
    date = header().rsplit("; ", 1)[1].strip()
    assert parsedate_to_datetime(date).timestamp() == WHEN
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", date)


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.undo()  # the TZ the test set, before tzset() reads it back
    time.tzset()


@pytest.mark.parametrize(
    ("zone", "offset"),
    [("UTC", "+0000"), ("Asia/Kolkata", "+0530"), ("America/St_Johns", "-0330")],
)
def test_rfc5322_3_3_date_in_local_time_with_its_offset(
    local_zone: None, monkeypatch: pytest.MonkeyPatch, zone: str, offset: str
) -> None:
    """Whole and half hours on either side of UTC, as email.utils.formatdate writes them."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    monkeypatch.setattr(received, "_date_cache", (-1, ""))  # dates of the last zone's second
    for when in (WHEN, WHEN + 183 * 86400, 1_000_000_000):  # winter, summer, and 2001
        date = rfc5322_date(when)
        assert date == formatdate(when, localtime=True)
        assert parsedate_to_datetime(date).timestamp() == when
    assert rfc5322_date(WHEN).endswith(offset)


def test_rfc5321_7_2_for_clause_only_with_exactly_one_recipient() -> None:
    assert "for <" not in header(rcpts=("a@example.com", "b@example.com"))
    assert "\tfor <a@example.com>;" in header(rcpts=("a@example.com",))


@pytest.mark.parametrize(
    ("esmtp", "tls", "params", "word"),
    [
        (False, False, None, "SMTP"),
        (True, False, None, "ESMTP"),
        (True, True, None, "ESMTPS"),
        (True, False, {"SMTPUTF8": None}, "UTF8SMTP"),
        (True, True, {"SMTPUTF8": None}, "UTF8SMTPS"),
    ],
)
def test_rfc3848_and_rfc6531_with_protocol(
    esmtp: bool, tls: bool, params: dict[str, str | None] | None, word: str
) -> None:
    assert f" with {word} id ABC123" in header(esmtp=esmtp, tls=tls, params=params)


def test_rfc5321_4_1_3_ipv6_peer_is_an_ipv6_address_literal() -> None:
    assert header(peer="2001:db8:0:0::1").startswith(
        "Received: from client.example.org ([IPv6:2001:db8::1])\r\n"
    )
    assert address_literal("::ffff:192.0.2.1") == "[IPv6:::ffff:c000:201]"


def test_peer_that_is_not_an_ip_address_gets_no_tcp_info() -> None:
    assert header(peer="").startswith("Received: from client.example.org\r\n")
    assert address_literal("/run/smtp.sock") is None


@pytest.mark.parametrize("helo", [None, "evil (x); by forged", "a b", "x\\y"])
def test_helo_name_that_would_break_the_header_is_written_unknown(helo: str | None) -> None:
    assert header(helo=helo).startswith("Received: from unknown ([192.0.2.7])\r\n")


@pytest.mark.parametrize("helo", ["[192.0.2.7]", "[IPv6:2001:db8::1]", "mail-1.example_x.org"])
def test_helo_domain_or_address_literal_is_kept(helo: str) -> None:
    assert header(helo=helo).startswith(f"Received: from {helo} (")


def test_utf8_names_are_encoded_as_utf8() -> None:
    raw = received_header(
        *make(helo="почта.example", rcpts=("иван@example.com",), params={"SMTPUTF8": None}),
        "ABC123",
        by="mx.example.com",
        when=WHEN,
    )
    assert "from почта.example (".encode() in raw
    assert "for <иван@example.com>".encode() in raw
