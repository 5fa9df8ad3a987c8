"""DKIM (RFC 6376) and ARC (RFC 8617) verification through our Resolver, keys made here."""

from __future__ import annotations

import io

import anyio
import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minismtp.contrib.dkim import verify_arc, verify_dkim, verify_message
from minismtp.dns import TIMEOUT, FakeResolver
from tests.helpers.dkimkeys import DKIMKey, ed25519_key, rsa_key

pytestmark = pytest.mark.anyio

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b"This is the body.\r\n"
)


@pytest.fixture(scope="module")
def rsa() -> DKIMKey:
    return rsa_key()


@pytest.fixture(scope="module")
def ed() -> DKIMKey:
    return ed25519_key()


def zones(**keys: DKIMKey | object) -> FakeResolver:
    """``sel_example_com=key`` -> the TXT record of ``sel._domainkey.example.com``."""
    resolver = FakeResolver()
    for name, key in keys.items():
        selector, _, domain = name.partition("_")
        record = key.record if isinstance(key, DKIMKey) else key
        resolver.add(f"{selector}._domainkey.{domain.replace('_', '.')}", "TXT", record)
    return resolver


async def test_unsigned_message_is_none() -> None:
    result = await verify_dkim(MESSAGE, resolver=FakeResolver())
    assert result.signatures == () and result.result == "none"


@pytest.mark.parametrize(
    "canonicalize", [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple")]
)
async def test_rsa_signature_passes_rfc6376_3_4(
    rsa: DKIMKey, canonicalize: tuple[bytes, bytes]
) -> None:
    signed = rsa.sign(MESSAGE, "example.com", canonicalize=canonicalize)
    result = await verify_dkim(signed, resolver=zones(sel_example_com=rsa))
    (signature,) = result.signatures
    assert signature.result == "pass", signature
    assert (signature.domain, signature.selector, signature.algorithm) == (
        "example.com",
        "sel",
        "rsa-sha256",
    )
    assert signature.b and signature.identity == "@example.com"


async def test_ed25519_signature_passes_rfc8463(ed: DKIMKey) -> None:
    signed = ed.sign(MESSAGE, "example.com")
    result = await verify_dkim(signed, resolver=zones(sel_example_com=ed))
    assert [s.result for s in result.signatures] == ["pass"]
    assert result.signatures[0].algorithm == "ed25519-sha256"


async def test_relaxed_survives_rewrapping_simple_does_not(rsa: DKIMKey) -> None:
    """RFC 6376 3.4.2/3.4.4: relaxed tolerates header case and whitespace changes."""
    resolver = zones(sel_example_com=rsa)
    relaxed = rsa.sign(MESSAGE, "example.com", canonicalize=(b"relaxed", b"relaxed"))
    simple = rsa.sign(MESSAGE, "example.com", canonicalize=(b"simple", b"simple"))
    for signed, expected in ((relaxed, "pass"), (simple, "fail")):
        altered = signed.replace(b"Subject: hello", b"subject:   hello").replace(
            b"the body.", b"the  body.  "
        )
        result = await verify_dkim(altered, resolver=resolver)
        assert result.signatures[0].result == expected


async def test_body_length_limit_l_tag(rsa: DKIMKey) -> None:
    """RFC 6376 3.5 l=: content appended after the signed length keeps the signature valid;
    a change inside it does not."""
    resolver = zones(sel_example_com=rsa)
    signed = rsa.sign(MESSAGE, "example.com", length=True)
    assert b"l=" in signed.split(b"\r\n\r\n")[0]
    appended = signed + b"-- \r\nmailing list footer\r\n"
    assert (await verify_dkim(appended, resolver=resolver)).result == "pass"
    changed = signed.replace(b"Hello Bob", b"Hello Eve")
    result = await verify_dkim(changed, resolver=resolver)
    assert result.signatures[0].result == "fail"
    assert result.signatures[0].reason == "body hash did not verify"


async def test_two_signatures_each_reported(rsa: DKIMKey, ed: DKIMKey) -> None:
    """RFC 6376 4: several signatures, each evaluated; here one passes and one has no key."""
    once = rsa.sign(MESSAGE, "example.com")
    twice = ed.sign(once, "mailer.example", selector="ed")
    resolver = zones(sel_example_com=rsa)  # no key for ed._domainkey.mailer.example
    result = await verify_dkim(twice, resolver=resolver)
    assert [(s.domain, s.result) for s in result.signatures] == [
        ("mailer.example", "permerror"),
        ("example.com", "pass"),
    ]
    assert result.signatures[0].reason == "no key for signature"
    assert result.result == "pass" and result.passing_domains() == ("example.com",)
    resolver.add("ed._domainkey.mailer.example", "TXT", ed.record)
    both = await verify_dkim(twice, resolver=resolver)
    assert [s.result for s in both.signatures] == ["pass", "pass"]


async def test_broken_body_hash_fails(rsa: DKIMKey) -> None:
    signed = rsa.sign(MESSAGE, "example.com")
    result = await verify_dkim(
        signed.replace(b"This is the body", b"This is a body"), resolver=zones(sel_example_com=rsa)
    )
    assert result.signatures[0].result == "fail"
    assert result.signatures[0].reason == "body hash did not verify"


async def test_missing_key_is_permerror(rsa: DKIMKey) -> None:
    """RFC 6376 6.1.2: no key record for the signature is a PERMFAIL."""
    signed = rsa.sign(MESSAGE, "example.com")
    result = await verify_dkim(signed, resolver=FakeResolver())
    assert result.signatures[0].result == "permerror"


async def test_revoked_key_fails(rsa: DKIMKey) -> None:
    """RFC 6376 3.6.1: an empty p= is a revoked key."""
    signed = rsa.sign(MESSAGE, "example.com")
    result = await verify_dkim(signed, resolver=zones(sel_example_com="v=DKIM1; k=rsa; p="))
    assert result.signatures[0].result in ("fail", "permerror")
    assert result.result != "pass"


async def test_dns_timeout_is_temperror(rsa: DKIMKey) -> None:
    """RFC 6376 6.1.2: a key query that fails for a transient reason is TEMPFAIL."""
    signed = rsa.sign(MESSAGE, "example.com")
    resolver = FakeResolver({"sel._domainkey.example.com": TIMEOUT})
    result = await verify_dkim(signed, resolver=resolver)
    assert result.signatures[0].result == "temperror"


async def test_wrong_key_fails(rsa: DKIMKey) -> None:
    signed = rsa.sign(MESSAGE, "example.com")
    other = rsa_key()
    result = await verify_dkim(signed, resolver=zones(sel_example_com=other))
    assert result.signatures[0].result == "fail"


async def test_reads_from_a_file_and_caps_the_size(rsa: DKIMKey) -> None:
    signed = rsa.sign(MESSAGE, "example.com")
    resolver = zones(sel_example_com=rsa)
    result = await verify_dkim(lambda: io.BytesIO(signed), resolver=resolver)
    assert result.result == "pass"
    capped = await verify_dkim(lambda: io.BytesIO(signed), resolver=resolver, max_size=100)
    assert capped.signatures[0].result == "policy"
    assert "larger than 100 octets" in capped.signatures[0].reason


async def test_keys_fetched_once_per_name(rsa: DKIMKey) -> None:
    signed = rsa.sign(rsa.sign(MESSAGE, "example.com"), "example.com")
    resolver = zones(sel_example_com=rsa)
    result = await verify_dkim(signed, resolver=resolver)
    assert [s.result for s in result.signatures] == ["pass", "pass"]
    assert resolver.queries == [("sel._domainkey.example.com", "TXT")]


# -- ARC (RFC 8617) ---------------------------------------------------------------------------


def arc_seal(message: bytes, key: DKIMKey, domain: str, srv_id: str, results: str) -> bytes:
    """What a forwarder does: its Authentication-Results, then an ARC set over them."""
    message = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + message
    headers = dkim.arc_sign(message, b"arc", domain.encode(), key.private, srv_id.encode())
    return b"".join(headers) + message


async def test_arc_chain_of_two_passes(rsa: DKIMKey) -> None:
    pytest.importorskip("authres")
    resolver = zones(arc_list_example=rsa, arc_relay_example=rsa)
    signed = rsa.sign(MESSAGE, "example.com")
    hop1 = arc_seal(signed, rsa, "list.example", "list.example", "dkim=pass header.d=example.com")
    hop2 = arc_seal(hop1, rsa, "relay.example", "relay.example", "arc=pass")
    result = await verify_arc(hop2, resolver=resolver)
    assert result.result == "pass", result
    assert result.instances == 2 and result.sealers == ("relay.example", "list.example")


async def test_arc_chain_broken_after_sealing_fails(rsa: DKIMKey) -> None:
    pytest.importorskip("authres")
    resolver = zones(arc_list_example=rsa, sel_example_com=rsa)
    hop1 = arc_seal(
        rsa.sign(MESSAGE, "example.com"), rsa, "list.example", "list.example", "dkim=pass"
    )
    altered = hop1.replace(b"Hello Bob", b"Hello Eve")
    result = await verify_arc(altered, resolver=resolver)
    assert result.result == "fail"
    dkim_result, arc_result = await verify_message(altered, resolver=resolver)
    assert dkim_result.result == "fail" and arc_result is not None and arc_result.result == "fail"


async def test_arc_none_when_unsealed(rsa: DKIMKey) -> None:
    result = await verify_arc(rsa.sign(MESSAGE, "example.com"), resolver=zones(sel_example_com=rsa))
    assert result.result == "none"


async def test_arc_chain_a_sealer_reported_failed_stays_failed_rfc8617_5_2(rsa: DKIMKey) -> None:
    resolver = zones(arc_list_example=rsa, arc_relay_example=rsa)
    hop1 = arc_seal(MESSAGE, rsa, "list.example", "list.example", "dkim=none")
    broken = hop1.replace(b"Hello Bob", b"Hello Eve")  # then the relay finds arc=fail
    hop2 = arc_seal(broken, rsa, "relay.example", "relay.example", "arc=fail")
    assert b"cv=fail" in hop2
    result = await verify_arc(hop2, resolver=resolver)
    assert result.result == "fail"


async def test_signatures_past_the_limit_are_not_verified_rfc6376_6_1(rsa: DKIMKey) -> None:
    signed = MESSAGE
    for _ in range(4):
        signed = rsa.sign(signed, "example.com")
    resolver = zones(sel_example_com=rsa)
    result = await verify_dkim(signed, resolver=resolver, max_signatures=2)
    assert [s.result for s in result.signatures] == ["pass", "pass", "policy", "policy"]
    assert result.signatures[2].reason == "not verified: more than 2 signatures"


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_any_mangled_signature_gives_a_result_never_an_exception(
    rsa: DKIMKey, data: st.DataObject
) -> None:
    """A signature header a sender mangled (RFC 6376 6.1.1) is a result, never an error."""
    signed = rsa.sign(MESSAGE, "example.com")
    head, _, body = signed.partition(b"\r\nFrom:")
    tags = head.split(b";")
    index = data.draw(st.integers(0, len(tags) - 1))
    tags[index] = data.draw(
        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    )
    mangled = b";".join(tags) + b"\r\nFrom:" + body
    arc = data.draw(
        st.sampled_from([b"", b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x; s=y; b=\r\n"])
    )

    async def verify() -> object:
        return await verify_message(arc + mangled, resolver=zones(sel_example_com=rsa))

    dkim_result, arc_result = anyio.run(verify)
    assert dkim_result.result in {
        "pass",
        "fail",
        "neutral",
        "policy",
        "permerror",
        "temperror",
        "none",
    }
    assert arc_result is not None
