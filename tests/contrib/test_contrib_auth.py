"""contrib.auth.Authenticate through whole dialogues: the header a message lands with, the
forged header removed, the results for hooks, and the opt-in DMARC refusal."""

from __future__ import annotations

import email.parser
import email.policy
from typing import Any

import pytest

from minismtp.app import App
from minismtp.contrib.auth import Authenticate, AuthenticationResults, auth_results
from minismtp.contrib.dkim import DKIM, dkim_result
from minismtp.contrib.dmarc import DMARC, dmarc_result
from minismtp.contrib.spf import SPF
from minismtp.dns import FakeResolver
from minismtp.testing import TestClient
from minismtp.types import Reply
from tests.helpers.dkimkeys import DKIMKey, rsa_key

pytestmark = pytest.mark.anyio

PEER = "192.0.2.10"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture(scope="module")
def key() -> DKIMKey:
    return rsa_key()


def zones(key: DKIMKey) -> FakeResolver:
    return FakeResolver(
        {
            "example.com": {"TXT": [f"v=spf1 ip4:{PEER} -all"]},
            "other.example": {"TXT": [f"v=spf1 ip4:{PEER} -all"]},
            "sel._domainkey.example.com": {"TXT": [key.record]},
            "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]},
        }
    )


def headers(data: bytes) -> Any:
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)


async def deliver(app: App, sender: str, content: bytes) -> tuple[Reply, bytes | None]:
    async with TestClient(app, peer=(PEER, 4000)) as client:
        await client.ehlo("client.example.org")
        await client.mail(sender)
        await client.rcpt("bob@example.net")
        reply = await client.data(content)
        data = client.messages[0].data if client.messages else None
    return reply, data


def auth_app(key: DKIMKey, **options: Any) -> App:
    app = App(hostname="mx.example.net")
    app.add_middleware(Authenticate, resolver=zones(key), **options)
    return app


async def test_signed_message_lands_with_the_header_rfc8601(key: DKIMKey) -> None:
    reply, data = await deliver(
        auth_app(key), "alice@example.com", key.sign(MESSAGE, "example.com")
    )
    assert reply.code == 250 and data is not None
    assert data.startswith(
        b"Authentication-Results: mx.example.net;\r\n\tspf=pass smtp.mailfrom=alice@example.com;\r\n\tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b="
    )
    ours, _, rest = data.partition(b"\r\nReceived: ")  # ours first, the trace header after
    assert ours.endswith(b"arc=none;\r\n\tdmarc=pass (p=reject) header.from=example.com")
    assert b"Authentication-Results" not in rest


async def test_forged_header_claiming_our_id_is_removed_rfc8601_5(key: DKIMKey) -> None:
    forged = (
        b"Authentication-Results: mx.example.net; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: relay.example.org; spf=pass smtp.mailfrom=x@example.org\r\n"
    )
    reply, data = await deliver(auth_app(key), "alice@example.com", forged + MESSAGE)
    assert reply.code == 250 and data is not None
    values = headers(data).get_all("Authentication-Results")
    assert len(values) == 2
    assert values[0].startswith("mx.example.net;") and "bank.example" not in values[0]
    assert values[1].startswith("relay.example.org;")  # another authserv-id's stays


async def test_results_for_hooks(key: DKIMKey) -> None:
    app = auth_app(key)
    seen: list[AuthenticationResults | None] = []

    @app.on_data
    def remember(transaction, message):  # type: ignore[no-untyped-def]
        seen.append(auth_results(transaction))

    await deliver(app, "alice@example.com", key.sign(MESSAGE, "example.com"))
    (results,) = seen
    assert results is not None and results.header is not None
    assert (results.spf.result, results.dkim.result, results.dmarc.result) == (
        "pass",
        "pass",
        "pass",
    )  # type: ignore[union-attr]


async def test_altered_unaligned_fails_and_reject_dmarc_550_5_7_1(key: DKIMKey) -> None:
    altered = key.sign(MESSAGE, "example.com").replace(b"Hello Bob", b"Hello Eve")
    reply, data = await deliver(auth_app(key), "bounce@other.example", altered)
    assert reply.code == 250 and data is not None
    value = headers(data)["Authentication-Results"]
    assert "spf=pass smtp.mailfrom=bounce@other.example" in value
    assert 'dkim=fail reason="body hash did not verify"' in value
    assert "dmarc=fail (p=reject) header.from=example.com" in value
    reply, data = await deliver(auth_app(key, reject_dmarc=True), "bounce@other.example", altered)
    assert reply == Reply(550, "5.7.1", "Email rejected per DMARC policy") and data is None


async def test_aligned_spf_pass_carries_dmarc_rfc7489_4_2(key: DKIMKey) -> None:
    altered = key.sign(MESSAGE, "example.com").replace(b"Hello Bob", b"Hello Eve")
    reply, data = await deliver(auth_app(key, reject_dmarc=True), "alice@example.com", altered)
    assert reply.code == 250 and data is not None
    value = headers(data)["Authentication-Results"]
    assert "dkim=fail" in value and "dmarc=pass" in value


async def test_separate_middleware_record_the_same_results(key: DKIMKey) -> None:
    resolver = zones(key)
    app = App(hostname="mx.example.net")
    app.add_middleware(DMARC, resolver=resolver)
    app.add_middleware(DKIM, resolver=resolver)
    app.add_middleware(SPF, resolver=resolver)
    seen = []

    @app.on_data
    def remember(transaction, message):  # type: ignore[no-untyped-def]
        seen.append((dkim_result(transaction), dmarc_result(transaction)))

    reply, data = await deliver(app, "alice@example.com", key.sign(MESSAGE, "example.com"))
    assert reply.code == 250 and data is not None and b"Authentication-Results" not in data
    ((dkim, dmarc),) = seen
    assert (
        dkim is not None and dkim.result == "pass" and dmarc is not None and dmarc.result == "pass"
    )
