"""DMARC (RFC 7489): organizational domains, alignment, policy discovery and results."""

from __future__ import annotations

import pytest

from minismtp.contrib.dkim import DKIMResult, DKIMSignature
from minismtp.contrib.dmarc import (
    DMARCRecord,
    aligned,
    evaluate_dmarc,
    from_domain,
    organizational_domain,
    parse_record,
)
from minismtp.contrib.spf import SPFResult
from minismtp.dns import TIMEOUT, FakeResolver


@pytest.mark.parametrize(
    ("domain", "organizational"),
    [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("Example.COM.", "example.com"),
        ("co.uk", "co.uk"),  # a public suffix is its own
    ],
)
def test_organizational_domain_rfc7489_3_2(domain: str, organizational: str) -> None:
    assert organizational_domain(domain) == organizational


#: RFC 7489 3.1: (authenticated domain, From domain, mode) -> aligned?
ALIGNMENT = [
    ("example.com", "example.com", "r", True),
    ("example.com", "example.com", "s", True),
    ("EXAMPLE.com", "example.COM", "s", True),
    ("mail.example.com", "example.com", "r", True),
    ("mail.example.com", "example.com", "s", False),
    ("example.com", "news.example.com", "r", True),
    ("example.com", "news.example.com", "s", False),
    ("a.example.com", "b.example.com", "r", True),
    ("a.example.com", "b.example.com", "s", False),
    ("example.net", "example.com", "r", False),
    ("example.co.uk", "other.co.uk", "r", False),  # co.uk is a public suffix
    ("mail.example.co.uk", "example.co.uk", "r", True),
    ("evil-example.com", "example.com", "r", False),
]


@pytest.mark.parametrize(("authenticated", "author", "mode", "expected"), ALIGNMENT)
def test_alignment_table_rfc7489_3_1(
    authenticated: str, author: str, mode: str, expected: bool
) -> None:
    assert aligned(authenticated, author, mode) is expected  # type: ignore[arg-type]


def test_parse_record_rfc7489_6_3() -> None:
    assert parse_record("v=DMARC1; p=reject") == DMARCRecord("reject")
    assert parse_record("v=DMARC1; p=quarantine; sp=none; adkim=s; aspf=s; pct=20") == DMARCRecord(
        "quarantine", "none", "s", "s", 20
    )
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:d@example.com") == DMARCRecord("none")
    assert parse_record("v=DMARC1; p=bogus") is None
    assert parse_record("v=spf1 -all") is None


def test_from_domain_rfc7489_6_6_1() -> None:
    assert from_domain(["Alice <alice@Example.COM>"]) == ("example.com", "")
    assert from_domain([]) == (None, "no From header")
    assert from_domain(["a@example.com, b@example.net"])[0] is None
    assert from_domain(["a@example.com, b@example.com"]) == ("example.com", "")


def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result, domain, f"bounce@{domain}")  # type: ignore[arg-type]


def dkim(*signatures: tuple[str, str]) -> DKIMResult:
    return DKIMResult(tuple(DKIMSignature(result, domain, "sel") for domain, result in signatures))  # type: ignore[arg-type]


ZONES = {
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; sp=quarantine"]},
    "_dmarc.strict.example": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.sampled.example": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.flaky.example": {"TXT": TIMEOUT},
    "_dmarc.two.example": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
}

#: (From domain, SPF, DKIM) -> (result, policy, disposition)
EVALUATIONS = [
    ("example.com", spf("pass", "example.com"), dkim(), ("pass", "reject", "none")),
    ("example.com", spf("pass", "bounces.example.com"), dkim(), ("pass", "reject", "none")),
    ("example.com", spf("pass", "example.net"), dkim(), ("fail", "reject", "reject")),
    (
        "example.com",
        spf("fail", "example.com"),
        dkim(("example.com", "pass")),
        ("pass", "reject", "none"),
    ),
    (
        "example.com",
        spf("pass", "example.net"),
        dkim(("example.com", "fail")),
        ("fail", "reject", "reject"),
    ),
    (
        "example.com",
        spf("softfail", "example.com"),
        dkim(("example.net", "pass")),
        ("fail", "reject", "reject"),
    ),
    ("news.example.com", None, dkim(("example.com", "pass")), ("pass", "quarantine", "none")),
    ("news.example.com", None, dkim(), ("fail", "quarantine", "quarantine")),  # sp= for a subdomain
    (
        "strict.example",
        spf("pass", "mail.strict.example"),
        dkim(("mail.strict.example", "pass")),
        ("fail", "reject", "reject"),
    ),
    ("strict.example", spf("pass", "strict.example"), dkim(), ("pass", "reject", "none")),
    ("nodmarc.example", spf("fail", "nodmarc.example"), dkim(), ("none", None, None)),
    ("two.example", None, None, ("none", None, None)),
    ("flaky.example", None, None, ("temperror", None, None)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("domain", "spf_result", "dkim_result", "expected"), EVALUATIONS)
async def test_evaluate_rfc7489_6_6(
    domain: str,
    spf_result: SPFResult | None,
    dkim_result: DKIMResult | None,
    expected: tuple[str, str | None, str | None],
) -> None:
    result = await evaluate_dmarc(domain, spf_result, dkim_result, resolver=FakeResolver(ZONES))
    assert (result.result, result.policy, result.disposition) == expected


@pytest.mark.anyio
async def test_pct_sampling_rfc7489_6_6_4() -> None:
    resolver = FakeResolver(ZONES)
    inside = await evaluate_dmarc(
        "sampled.example", None, None, resolver=resolver, sample=lambda: 0.2
    )
    outside = await evaluate_dmarc(
        "sampled.example", None, None, resolver=resolver, sample=lambda: 0.7
    )
    assert (inside.disposition, outside.disposition) == ("reject", "quarantine")


@pytest.mark.anyio
async def test_no_from_domain_is_permerror() -> None:
    result = await evaluate_dmarc(
        None, None, None, resolver=FakeResolver(), no_domain_reason="no From header"
    )
    assert (result.result, result.reason) == ("permerror", "no From header")
