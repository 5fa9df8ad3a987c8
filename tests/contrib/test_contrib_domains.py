"""contrib.domains: recipient and sender domain filters, through SMTP dialogues."""

from __future__ import annotations

import smtplib

import anyio
import pytest

from minismtp.app import App
from minismtp.contrib.domains import DomainList, RecipientDomainFilter, SenderDomainFilter
from minismtp.server import serve
from minismtp.testing import TestClient
from minismtp.types import Address, Reply, Transaction

pytestmark = pytest.mark.anyio

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(550, "5.7.1", "Sender address rejected: domain not accepted")
RCPT_OK = Reply(250, "2.1.5", "OK")
MAIL_OK = Reply(250, "2.1.0", "OK")
BODY = b"Subject: hi\r\n\r\nHello.\r\n"


def recipient_app(*domains: str) -> App:
    app = App(hostname="mx.example.com")
    app.add_middleware(RecipientDomainFilter, domains=list(domains))
    return app


async def rcpt_replies(app: App, recipients: list[str], *mail_params: str) -> list[Reply]:
    async with TestClient(app) as client:
        await client.ehlo("client.example.org")
        assert await client.mail("a@example.org", *mail_params) == MAIL_OK
        return [await client.rcpt(recipient) for recipient in recipients]


# -- RecipientDomainFilter ---------------------------------------------------------------------


async def test_listed_domain_accepted_others_relay_denied_rfc5321_3_6_2() -> None:
    replies = await rcpt_replies(
        recipient_app("example.com"), ["b@example.com", "b@elsewhere.org", "c@example.com"]
    )
    assert replies == [RCPT_OK, RELAY_DENIED, RCPT_OK]


async def test_domain_match_ignores_case_rfc5321_2_4() -> None:
    replies = await rcpt_replies(recipient_app("Example.COM"), ["b@EXAMPLE.com", "B@example.Com"])
    assert replies == [RCPT_OK, RCPT_OK]


async def test_wildcard_matches_subdomains_only_not_the_parent() -> None:
    replies = await rcpt_replies(
        recipient_app("*.example.com"),
        [
            "b@mx.example.com",
            "b@a.b.example.com",
            "b@example.com",  # the parent itself: not matched by *.example.com
            "b@notexample.com",  # a suffix, but not at a label boundary
            "b@example.com.evil.org",
        ],
    )
    assert replies == [RCPT_OK, RCPT_OK, RELAY_DENIED, RELAY_DENIED, RELAY_DENIED]


async def test_parent_and_wildcard_together_take_both() -> None:
    replies = await rcpt_replies(
        recipient_app("example.com", "*.example.com"), ["b@example.com", "b@sub.example.com"]
    )
    assert replies == [RCPT_OK, RCPT_OK]


async def test_trailing_dot_in_a_pattern_is_ignored() -> None:
    assert await rcpt_replies(recipient_app("example.com."), ["b@example.com"]) == [RCPT_OK]


async def test_address_literals_refused_unless_listed_rfc5321_4_1_3() -> None:
    replies = await rcpt_replies(
        recipient_app("example.com"), ["b@[192.0.2.1]", "b@[IPv6:2001:db8::1]"]
    )
    assert replies == [RELAY_DENIED, RELAY_DENIED]


async def test_listed_address_literals_match_in_any_spelling_rfc5321_4_1_3() -> None:
    app = recipient_app("[192.0.2.1]", "[ipv6:2001:DB8:0::1]")
    replies = await rcpt_replies(
        app, ["b@[192.0.2.1]", "b@[IPv6:2001:db8::1]", "b@[192.0.2.2]", "b@[IPv6:2001:db8::2]"]
    )
    assert replies == [RCPT_OK, RCPT_OK, RELAY_DENIED, RELAY_DENIED]


async def test_postmaster_without_domain_always_accepted_rfc5321_4_5_1() -> None:
    replies = await rcpt_replies(
        recipient_app("example.com"), ["postmaster", "postmaster@elsewhere.org"]
    )
    # <postmaster> must be accepted; postmaster@ a foreign domain is relaying like any other.
    assert replies == [RCPT_OK, RELAY_DENIED]


async def test_internationalised_domain_matches_its_a_label_rfc6531() -> None:
    app = recipient_app("bücher.example")
    replies = await rcpt_replies(
        app, ["a@xn--bcher-kva.example", "b@bücher.example", "c@BÜCHER.example"], "SMTPUTF8"
    )
    assert replies == [RCPT_OK, RCPT_OK, RCPT_OK]


async def test_refused_recipient_never_reaches_the_hooks() -> None:
    app = recipient_app("example.com")
    seen: list[str] = []

    @app.on_rcpt
    def record(tx: Transaction, rcpt: Address) -> None:
        seen.append(str(rcpt))

    await rcpt_replies(app, ["b@elsewhere.org", "b@example.com"])
    assert seen == ["b@example.com"]


async def test_relay_denied_reaches_smtplib_and_only_local_mail_is_delivered() -> None:
    app = recipient_app("example.com")
    async with serve(app, "127.0.0.1", 0) as server:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                return client.sendmail("a@example.org", ["b@example.com", "c@elsewhere.org"], BODY)

        refused = await anyio.to_thread.run_sync(send)
        message = server.mail_rx.receive_nowait()
    assert refused == {"c@elsewhere.org": (550, b"5.7.1 Relay access denied")}
    assert message.rcpt_to == (Address("b", "example.com"),)


@pytest.mark.parametrize("pattern", ["*", "exa*mple.com", "*.*.example.com", "", "*.[192.0.2.1]"])
def test_bad_patterns_are_refused_at_construction(pattern: str) -> None:
    with pytest.raises(ValueError):
        DomainList.of([pattern])


def test_one_string_instead_of_a_list_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        RecipientDomainFilter(App(), domains="example.com")


# -- SenderDomainFilter ------------------------------------------------------------------------


async def mail_replies(app: App, senders: list[str]) -> list[Reply]:
    replies = []
    async with TestClient(app) as client:
        await client.ehlo("client.example.org")
        for sender in senders:
            replies.append(await client.mail(sender))
            await client.rset()
    return replies


def sender_app(
    allow: list[str] | None = None, deny: list[str] | None = None
) -> App:  # fmt: skip
    app = App(hostname="mx.example.com")
    app.add_middleware(SenderDomainFilter, allow=allow, deny=deny)
    return app


async def test_denied_sender_domain_550_5_7_1_rfc5321_3_3() -> None:
    replies = await mail_replies(
        sender_app(deny=["spam.example", "*.spam.example"]),
        ["a@spam.example", "a@mx.SPAM.example", "a@example.org"],
    )
    assert replies == [SENDER_DENIED, SENDER_DENIED, MAIL_OK]


async def test_allow_list_refuses_everything_else() -> None:
    replies = await mail_replies(
        sender_app(allow=["partner.example"]), ["a@partner.example", "a@other.example"]
    )
    assert replies == [MAIL_OK, SENDER_DENIED]


async def test_deny_wins_over_allow() -> None:
    app = sender_app(allow=["*.partner.example"], deny=["bad.partner.example"])
    replies = await mail_replies(app, ["a@good.partner.example", "a@bad.partner.example"])
    assert replies == [MAIL_OK, SENDER_DENIED]


async def test_null_sender_stays_acceptable_under_an_allow_list_rfc5321_4_5_5() -> None:
    replies = await mail_replies(sender_app(allow=["partner.example"], deny=["x.example"]), [""])
    assert replies == [MAIL_OK]


async def test_null_sender_refused_only_when_denied_explicitly() -> None:
    assert await mail_replies(sender_app(deny=["<>"]), ["", "a@example.org"]) == [
        SENDER_DENIED,
        MAIL_OK,
    ]


async def test_sender_address_literal_refused_under_an_allow_list() -> None:
    replies = await mail_replies(
        sender_app(allow=["partner.example", "[192.0.2.9]"]), ["a@[192.0.2.1]", "a@[192.0.2.9]"]
    )
    assert replies == [SENDER_DENIED, MAIL_OK]


async def test_denied_sender_reaches_smtplib_as_sender_refused() -> None:
    app = sender_app(deny=["spam.example"])
    async with serve(app, "127.0.0.1", 0) as server:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@spam.example", ["b@example.com"], BODY)

        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await anyio.to_thread.run_sync(send)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 Sender address rejected: domain not accepted"
