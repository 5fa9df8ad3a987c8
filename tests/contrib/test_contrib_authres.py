"""The Authentication-Results header (RFC 8601): its syntax, and forged ones recognised."""

from __future__ import annotations

import authres
import pytest

from minismtp.contrib.auth import authserv_id_of, claims, format_authentication_results
from minismtp.contrib.dkim import ARCResult, DKIMResult, DKIMSignature
from minismtp.contrib.dmarc import DMARCResult
from minismtp.contrib.spf import SPFResult

SPF_PASS = SPFResult("pass", "example.com", "alice@example.com")
DKIM_PASS = DKIMResult(
    (DKIMSignature("pass", "example.com", "sel", "rsa-sha256", "@example.com", "Vx3mUJ2p"),)
)
DMARC_PASS = DMARCResult("pass", "example.com", "reject", "none", True, True)


def test_the_header_a_user_sees_rfc8601_2_2() -> None:
    value = format_authentication_results(
        "mx.example.net", spf=SPF_PASS, dkim=DKIM_PASS, arc=ARCResult("none"), dmarc=DMARC_PASS
    )
    assert value == (
        "mx.example.net;\r\n"
        "\tspf=pass smtp.mailfrom=alice@example.com;\r\n"
        "\tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b=Vx3mUJ2p;\r\n"
        "\tarc=none;\r\n"
        "\tdmarc=pass (p=reject) header.from=example.com"
    )


def parsed(value: str) -> authres.AuthenticationResultsHeader:
    """An independent RFC 8601 parser (the authres package) reads what we wrote."""
    return authres.AuthenticationResultsHeader.parse(
        f"Authentication-Results: {value}".replace("\r\n\t", " ")
    )


def test_an_independent_parser_reads_every_result() -> None:
    dkim = DKIMResult(
        (
            DKIMSignature(
                "fail",
                "example.com",
                "sel",
                "rsa-sha256",
                None,
                "abc",
                'body hash "did" not verify',
            ),
            DKIMSignature(
                "temperror",
                "other.example",
                "s2",
                "ed25519-sha256",
                None,
                "xyz",
                "key lookup failed",
            ),
        )
    )
    spf = SPFResult(
        "permerror",
        "example.org",
        "b@example.org",
        reason="more than 10 DNS-querying terms (RFC 7208 4.6.4)",
    )
    dmarc = DMARCResult("fail", "example.com", "reject", "quarantine")
    header = parsed(
        format_authentication_results(
            "mx.example.net", spf=spf, dkim=dkim, arc=ARCResult("fail"), dmarc=dmarc
        )
    )
    assert header.authserv_id == "mx.example.net"
    assert [(r.method, r.result) for r in header.results] == [
        ("spf", "permerror"),
        ("dkim", "fail"),
        ("dkim", "temperror"),
        ("arc", "fail"),
        ("dmarc", "fail"),
    ]
    assert header.results[1].reason == "body hash 'did' not verify"
    assert {p.type + "." + p.name: p.value for p in header.results[4].properties} == {
        "header.from": "example.com"
    }


def test_helo_identity_and_odd_local_parts() -> None:
    helo = SPFResult("pass", "client.example.org", "postmaster@client.example.org", identity="helo")
    assert (
        format_authentication_results("mx", spf=helo, fold=" ")
        == "mx; spf=pass smtp.helo=client.example.org"
    )
    odd = SPFResult("softfail", "example.org", '"a b"@example.org')
    assert (
        format_authentication_results("mx", spf=odd, fold=" ")
        == "mx; spf=softfail smtp.mailfrom=example.org"
    )


def test_nothing_checked_is_none_rfc8601_2_2() -> None:
    assert format_authentication_results("mx.example.net") == "mx.example.net; none"


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        ("mx.example.net; spf=pass smtp.mailfrom=a@b.example", "mx.example.net"),
        ("  MX.Example.NET ; none", "MX.Example.NET"),
        ("(forged) mx.example.net 1; dkim=pass", "mx.example.net"),
        ('"mx.example.net"; dkim=pass', "mx.example.net"),
        ("mx.example.net;dkim=pass", "mx.example.net"),
        ("", None),
    ],
)
def test_authserv_id_rfc8601_2_5(value: str, authserv_id: str | None) -> None:
    assert authserv_id_of(value) == authserv_id


def test_forged_header_predicate_rfc8601_5() -> None:
    forged = claims("mx.example.net")
    assert forged("Authentication-Results", "mx.example.net; dkim=pass header.d=bank.example")
    assert forged("authentication-results", "MX.EXAMPLE.NET;\r\n\tspf=pass")
    assert not forged("Authentication-Results", "relay.example.org; spf=pass")
    assert not forged("ARC-Authentication-Results", "i=1; mx.example.net; spf=pass")
    assert not forged("Subject", "mx.example.net; hello")
