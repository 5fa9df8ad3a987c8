"""minismtp.dns.DnsResolver against a DNS server on loopback: answers, the three errors, the
TTL cache, the per-query timeout, on both anyio backends in one process."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import anyio
import pytest

from minismtp import dns as mdns
from minismtp.dns import DnsResolver, NoData, NXDomain, TempError
from tests.helpers.dnsserver import dns_server

pytestmark = pytest.mark.anyio

ZONES = {
    "example.com": {
        "TXT": ["v=spf1 -all", "k" * 600],
        "A": ["192.0.2.1"],
        "AAAA": ["2001:db8::1"],
        "MX": ["10 mx.example.com.", "20 mx2.example.com."],
    },
    "1.2.0.192.in-addr.arpa": {"PTR": ["mx.example.com."]},
}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    with dns_server(ZONES) as address:
        yield address


async def test_answers(server: tuple[str, int]) -> None:
    resolver = DnsResolver([server[0]], port=server[1], timeout=5)
    assert sorted(await resolver.txt("example.com")) == [
        b"k" * 600,
        b"v=spf1 -all",
    ]  # strings joined
    assert await resolver.a("example.com") == (ipaddress.IPv4Address("192.0.2.1"),)
    assert await resolver.aaaa("example.com.") == (ipaddress.IPv6Address("2001:db8::1"),)
    assert sorted(await resolver.mx("example.com")) == [
        (10, "mx.example.com"),
        (20, "mx2.example.com"),
    ]
    assert await resolver.ptr(ipaddress.IPv4Address("192.0.2.1")) == ("mx.example.com",)


async def test_nxdomain_and_nodata_are_told_apart(server: tuple[str, int]) -> None:
    resolver = DnsResolver([server[0]], port=server[1], timeout=5)
    with pytest.raises(NXDomain):
        await resolver.txt("nowhere.example.com")
    with pytest.raises(NoData):
        await resolver.txt("1.2.0.192.in-addr.arpa")
    with pytest.raises(NXDomain):
        await resolver.a("a" * 64 + ".example.com")  # a name no query can carry
    with pytest.raises(NXDomain):
        await resolver.a("bad\u2028name.example.com")  # nor IDNA


async def test_answers_are_cached_for_their_ttl(server: tuple[str, int]) -> None:
    resolver = DnsResolver([server[0]], port=server[1], timeout=5)
    assert await resolver.a("example.com")
    with dns_server({}) as other:  # the same resolver pointed elsewhere still answers: cached
        resolver._resolver.nameservers = [other[0]]
        resolver._resolver.port = other[1]
        assert await resolver.a("example.com")
        with pytest.raises(NXDomain):
            await resolver.a("mx.example.com")


async def test_timeout_is_temperror() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = DnsResolver(["127.0.0.1"], port=silent.getsockname()[1], timeout=0.3)
        with anyio.fail_after(5):
            with pytest.raises(TempError):
                await resolver.txt("example.com")
    finally:
        silent.close()


async def test_configure_points_the_default_resolver(server: tuple[str, int]) -> None:
    mdns.configure([server[0]], server[1])
    try:
        assert await mdns.default_resolver().a("example.com")
    finally:
        mdns.configure(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_cli_resolver_option(text: str, expected: tuple[str, int]) -> None:
    from minismtp.cli import build_parser

    args = build_parser().parse_args(["run", "--resolver", text])
    assert args.resolver == expected


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:70000", "[::1", "[::1]x"])
def test_cli_resolver_option_refuses(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from minismtp.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--resolver", text])
    assert exited.value.code == 2 and "--resolver" in capsys.readouterr().err
