"""contrib.dnsbl: RFC 5782 query names, what counts as a listing, refusal at connect."""

from __future__ import annotations

import ipaddress

import pytest

from minismtp.app import App
from minismtp.contrib.dnsbl import DNSBL, dnsbl_query_name, dnsbl_result, lookup
from minismtp.dns import TIMEOUT, FakeResolver
from minismtp.testing import TestClient
from minismtp.types import Reply

pytestmark = pytest.mark.anyio

ZONES = {
    "2.0.0.127.bl.example": {"A": ["127.0.0.2"]},  # RFC 5782 5: the test entry
    "2.2.0.192.bl.example": {"A": ["127.0.0.2", "127.0.0.4"]},
    "3.2.0.192.bl.example": {"A": ["127.255.255.254"]},  # query through a public resolver
    "4.2.0.192.bl.example": {"A": ["127.255.255.252"]},
    "5.2.0.192.bl.example": {"A": ["192.0.2.99"]},  # a zone answering outside 127/8
    "6.2.0.192.bl.example": TIMEOUT,
    "2.2.0.192.other.example": {"TXT": ["listed"]},  # a name without an A record
}


def test_query_names_rfc5782_2_1_and_2_4() -> None:
    assert (
        dnsbl_query_name(ipaddress.ip_address("192.0.2.99"), "bl.example")
        == "99.2.0.192.bl.example"
    )
    v6 = dnsbl_query_name(ipaddress.ip_address("2001:db8:1:2:3:4:567:89ab"), "bl.example.")
    assert v6 == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example"


@pytest.mark.parametrize(
    ("address", "status", "codes"),
    [
        ("127.0.0.2", "listed", ("127.0.0.2",)),
        ("192.0.2.2", "listed", ("127.0.0.2", "127.0.0.4")),
        ("192.0.2.3", "error", ("127.255.255.254",)),
        ("192.0.2.4", "error", ("127.255.255.252",)),
        ("192.0.2.5", "error", ("192.0.2.99",)),
        ("192.0.2.6", "error", ()),
        ("192.0.2.7", "clear", ()),
        ("::ffff:192.0.2.2", "listed", ("127.0.0.2", "127.0.0.4")),
    ],
)
async def test_only_127_0_0_0_8_answers_list_rfc5782_2_3(
    address: str, status: str, codes: tuple[str, ...]
) -> None:
    answer = await lookup(address, "bl.example", resolver=FakeResolver(ZONES))
    assert (answer.status, answer.codes) == (status, codes)


async def test_no_a_record_is_clear() -> None:
    answer = await lookup("192.0.2.2", "other.example", resolver=FakeResolver(ZONES))
    assert answer.status == "clear"


def dnsbl_app(**options: object) -> App:
    app = App(hostname="mx.example.com")
    app.add_middleware(
        DNSBL, zones=["bl.example", "other.example"], resolver=FakeResolver(ZONES), **options
    )
    return app


async def test_reject_refuses_a_listed_client_at_connect() -> None:
    async with TestClient(dnsbl_app(reject=True), peer=("192.0.2.2", 4000)) as client:
        greeting = await client.connect()
    assert greeting == Reply(
        554, "5.7.1", "Service unavailable; client [192.0.2.2] blocked using bl.example"
    )


@pytest.mark.parametrize("address", ["192.0.2.3", "192.0.2.5", "192.0.2.6", "192.0.2.7"])
async def test_errors_and_clear_answers_never_refuse(address: str) -> None:
    async with TestClient(dnsbl_app(reject=True), peer=(address, 4000)) as client:
        greeting = await client.connect()
        assert greeting.code == 220
        result = dnsbl_result(client.session)
    assert result is not None and result.listed == ()
    assert [a.zone for a in result.answers] == ["bl.example", "other.example"]


async def test_annotates_by_default() -> None:
    async with TestClient(dnsbl_app(), peer=("192.0.2.2", 4000)) as client:
        assert (await client.connect()).code == 220
        result = dnsbl_result(client.session)
    assert result is not None and [a.zone for a in result.listed] == ["bl.example"]


def test_zones_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        DNSBL(App(), zones="bl.example")  # type: ignore[arg-type]


async def test_message_from_a_listed_client_is_annotated() -> None:
    async with TestClient(dnsbl_app(), peer=("192.0.2.2", 4000)) as client:
        replies = await client.send_message(
            "a@example.org", ["b@example.com"], b"Subject: hi\r\n\r\nHi.\r\n"
        )
        assert [r.code for r in replies] == [250, 250, 250]
    (message,) = client.messages
    assert message.data.startswith(
        b"X-DNSBL: listed in bl.example (127.0.0.2, 127.0.0.4)\r\nReceived: "
    )


async def test_message_from_a_clear_client_is_not_annotated() -> None:
    async with TestClient(dnsbl_app(), peer=("192.0.2.7", 4000)) as client:
        await client.send_message("a@example.org", ["b@example.com"], b"Subject: hi\r\n\r\nHi.\r\n")
    (message,) = client.messages
    assert message.data.startswith(b"Received: ")
