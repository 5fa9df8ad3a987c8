"""contrib.spf: the SPF middleware at MAIL, its opt-in refusals (RFC 7372), a few evaluator
cases the RFC 7208 suite does not spell out, and the Resolver fakes it runs on."""

from __future__ import annotations

import string

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minismtp.app import App
from minismtp.contrib.auth import Authenticate, auth_results
from minismtp.contrib.spf import SPF, check_host, spf_result
from minismtp.dns import TIMEOUT, FakeResolver, NoData, NXDomain, TempError
from minismtp.testing import TestClient
from minismtp.types import Reply

pytestmark = pytest.mark.anyio

ZONES = {
    "example.com": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all exp=why.example.com"]},
    "why.example.com": {"TXT": ["%{i} is not one of %{d}'s designated mail servers."]},
    "soft.example": {"TXT": ["v=spf1 ~all"]},
    "flaky.example": TIMEOUT,
    "client.example.org": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.7"]},
}


def spf_app(**options: object) -> App:
    app = App(hostname="mx.example.net")
    app.add_middleware(SPF, resolver=FakeResolver(ZONES), **options)
    return app


async def mail(
    app: App, sender: str, peer: str = "198.51.100.1", helo: str = "client.example.org"
) -> tuple[Reply, object]:
    async with TestClient(app, peer=(peer, 4000)) as client:
        await client.ehlo(helo)
        reply = await client.mail(sender)
    return reply


async def test_annotates_by_default_rfc7208_8() -> None:
    app = spf_app()
    seen = []

    @app.on_mail
    def remember(transaction, address):  # type: ignore[no-untyped-def]
        seen.append(spf_result(transaction))

    reply = await mail(app, "alice@example.com")
    assert reply.code == 250
    (result,) = seen
    assert result is not None and result.result == "fail" and result.domain == "example.com"
    assert result.explanation == "198.51.100.1 is not one of example.com's designated mail servers."


async def test_pass_rfc7208_8_3() -> None:
    app = spf_app(reject_fail=True)
    reply = await mail(app, "alice@example.com", peer="192.0.2.10")
    assert reply.code == 250


async def test_reject_fail_550_5_7_23_with_the_explanation_rfc7372_3_2() -> None:
    reply = await mail(spf_app(reject_fail=True), "alice@example.com")
    assert reply == Reply(
        550, "5.7.23", "198.51.100.1 is not one of example.com's designated mail servers."
    )


async def test_softfail_is_never_refused_rfc7208_8_5() -> None:
    reply = await mail(spf_app(reject_fail=True), "bob@soft.example")
    assert reply.code == 250


async def test_reject_temperror_451_4_7_24_rfc7372_3_2() -> None:
    reply = await mail(spf_app(reject_temperror=True), "carol@flaky.example")
    assert reply == Reply(451, "4.7.24", "Temporary SPF error for flaky.example")
    reply = await mail(spf_app(), "carol@flaky.example")
    assert reply.code == 250


async def test_null_sender_checks_helo_rfc7208_2_3() -> None:
    app = spf_app()
    seen = []

    @app.on_mail
    def remember(transaction, address):  # type: ignore[no-untyped-def]
        seen.append(spf_result(transaction))

    await mail(app, "", peer="192.0.2.7")
    (result,) = seen
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "client.example.org")


async def test_authenticate_checks_spf_at_mail_too() -> None:
    app = App(hostname="mx.example.net")
    app.add_middleware(Authenticate, resolver=FakeResolver(ZONES), reject_spf_fail=True)
    seen = []

    @app.on_mail
    def remember(transaction, address):  # type: ignore[no-untyped-def]
        seen.append(auth_results(transaction))

    assert (await mail(app, "alice@example.com")).code == 550
    assert (await mail(app, "alice@example.com", peer="192.0.2.1")).code == 250
    (results,) = seen
    assert results is not None and results.spf is not None and results.spf.result == "pass"


async def test_ten_lookup_limit_rfc7208_4_6_4() -> None:
    zones = {f"l{i}.example": {"TXT": [f"v=spf1 include:l{i + 1}.example"]} for i in range(11)}
    zones["l11.example"] = {"TXT": ["v=spf1 +all"]}
    result = await check_host(
        "192.0.2.1", "l0.example", "a@l0.example", resolver=FakeResolver(zones)
    )
    assert result.result == "permerror" and "4.6.4" in result.reason
    zones["l0.example"] = {"TXT": ["v=spf1 include:l2.example"]}
    result = await check_host(
        "192.0.2.1", "l0.example", "a@l0.example", resolver=FakeResolver(zones)
    )
    assert result.result == "pass"


async def test_whole_evaluation_is_time_limited() -> None:
    class Slow(FakeResolver):
        async def txt(self, name: str) -> tuple[bytes, ...]:
            await anyio.sleep(10)
            raise AssertionError

    result = await check_host(
        "192.0.2.1", "example.com", "a@example.com", resolver=Slow(), time_limit=0.05
    )
    assert result.result == "temperror"


async def test_fake_resolver_errors_and_cname() -> None:
    resolver = FakeResolver(
        {
            "a.example": {"A": ["192.0.2.1"], "MX": [(10, "mx.a.example.")]},
            "alias.example": {"CNAME": "a.example."},
            "slow.example": {"A": TIMEOUT},
        }
    )
    assert [str(a) for a in await resolver.a("alias.example")] == ["192.0.2.1"]
    assert await resolver.mx("a.example") == ((10, "mx.a.example"),)
    with pytest.raises(NXDomain):
        await resolver.a("nowhere.example")
    with pytest.raises(NoData):
        await resolver.aaaa("a.example")
    with pytest.raises(TempError):
        await resolver.a("slow.example")
    assert resolver.queries[0] == ("alias.example", "A")


RESULTS = {"pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"}
TERMS = [
    "a",
    "mx",
    "ptr",
    "all",
    "-all",
    "~all",
    "?all",
    "a:%{d}",
    "exists:%{ir}.%{v}.x.example",
    "include:inc.example",
    "redirect=inc.example",
    "exp=exp.example",
    "ip4:192.0.2.0/24",
    "ip6:2001:db8::/32",
    "a/24//64",
    "mx:%{o}/0",
    "%{",
    "a:",
    "ip4:1.2.3",
    "x=%{l1r+-}",
    "include:%{s}",
    "exists:%{p}.example",
    "a:%{h}.example",
    "v=spf1",
]


@given(
    st.lists(st.sampled_from(TERMS) | st.text(alphabet=string.printable, max_size=12), max_size=8)
)
@settings(max_examples=150, deadline=None)
def test_any_record_gives_a_result_never_an_exception(terms: list[str]) -> None:
    """RFC 7208 2.6: whatever a domain publishes, check_host() ends in one of its results."""
    record = " ".join(["v=spf1", *terms])
    resolver = FakeResolver(
        {
            "example.com": {"TXT": [record], "A": ["192.0.2.1"], "MX": [(10, "example.com")]},
            "inc.example": {"TXT": [record]},
            "exp.example": {"TXT": ["%{c} %{r} %{t} %{i}"]},
            "1.2.0.192.in-addr.arpa": {"PTR": ["example.com"]},
        }
    )

    async def check() -> str:
        result = await check_host(
            "192.0.2.1", "example.com", "a@example.com", helo="h.example", resolver=resolver
        )
        return result.result

    assert anyio.run(check) in RESULTS
