"""The PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), bytes in, header out.

Section numbers below are those of the HAProxy specification: 2.1 is the human-readable
header (v1), 2.2 the binary header (v2), 2.2.x its TLVs, 3 the implementation rules.
"""

from __future__ import annotations

import ipaddress
import ssl
import struct
from collections.abc import Awaitable, Callable

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteStream
from anyio.streams.tls import TLSStream
from hypothesis import given, settings
from hypothesis import strategies as st

from minismtp.proxy import (
    DEFAULT_MAX_V2_PAYLOAD,
    LOOPBACK,
    NEED_MORE,
    PP2_TYPE_CRC32C,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    crc32c,
    is_trusted,
    parse_networks,
    read_proxy_header,
)
from tests.helpers.clients import FirstWritePrefixed

SMTP = b"EHLO client.example\r\n"


def v2(command: int, family: int, payload: bytes = b"", version: int = 2) -> bytes:
    """A v2 header (section 2.2): signature, version/command, family/protocol, length."""
    return (
        V2_SIGNATURE
        + bytes(((version << 4) | command, family))
        + struct.pack("!H", len(payload))
        + payload
    )


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The address block of TCP over IPv4 or IPv6 (section 2.2)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return s.packed + d.packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def with_crc(header_without_crc: bytes) -> bytes:
    """Append a CRC32C TLV (section 2.2.4) and fill it in over the finished header."""
    body = header_without_crc[16:] + tlv(PP2_TYPE_CRC32C, b"\x00" * 4)
    zeroed = header_without_crc[:14] + struct.pack("!H", len(body)) + body
    return zeroed[:-4] + struct.pack("!I", crc32c(zeroed))


def parse_all(
    data: bytes, max_v2_payload: int = DEFAULT_MAX_V2_PAYLOAD
) -> tuple[ProxyHeader, bytes]:
    result = ProxyParser(max_v2_payload=max_v2_payload).feed(data)
    assert isinstance(result, tuple), "header incomplete"
    return result


TCP4 = Family.INET
TCP6 = Family.INET6
MAX6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

VALID = [
    pytest.param(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        ProxyHeader(1, Command.PROXY, TCP4, ("192.0.2.1", 56324), ("198.51.100.2", 25)),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(1, Command.PROXY, TCP4, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        id="v1-tcp4-longest",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n",
        ProxyHeader(1, Command.PROXY, TCP4, ("0.0.0.0", 0), ("10.0.0.1", 0)),
        id="v1-tcp4-port-0",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 587\r\n",
        ProxyHeader(1, Command.PROXY, TCP6, ("2001:db8::1", 40000), ("2001:db8::25", 587)),
        id="v1-tcp6",
    ),
    pytest.param(
        f"PROXY TCP6 {MAX6} {MAX6} 65535 65535\r\n".encode(),
        ProxyHeader(1, Command.PROXY, TCP6, (MAX6, 65535), (MAX6, 65535)),
        id="v1-tcp6-longest-104",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.7 1 2\r\n",
        ProxyHeader(1, Command.PROXY, TCP6, ("2001:db8::1", 1), ("::ffff:c000:207", 2)),
        id="v1-tcp6-normalised",
    ),
    pytest.param(
        b"PROXY UNKNOWN\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNSPEC),
        id="v1-unknown-short",
    ),
    pytest.param(
        f"PROXY UNKNOWN {MAX6} {MAX6} 65535 65535\r\n".encode(),
        ProxyHeader(1, Command.PROXY, Family.UNSPEC),
        id="v1-unknown-worst-case-107",
    ),
    pytest.param(
        b"PROXY UNKNOWN whatever \xff follows\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNSPEC),
        id="v1-unknown-ignores-rest",
    ),
    pytest.param(
        v2(1, 0x11, inet("192.0.2.1", "198.51.100.2", 56324, 25)),
        ProxyHeader(2, Command.PROXY, TCP4, ("192.0.2.1", 56324), ("198.51.100.2", 25)),
        id="v2-tcp4",
    ),
    pytest.param(
        v2(1, 0x21, inet("2001:db8::1", "2001:db8::25", 40000, 465)),
        ProxyHeader(2, Command.PROXY, TCP6, ("2001:db8::1", 40000), ("2001:db8::25", 465)),
        id="v2-tcp6",
    ),
    pytest.param(
        v2(0, 0x00),
        ProxyHeader(2, Command.LOCAL, Family.UNSPEC),
        id="v2-local-health-check",
    ),
    pytest.param(
        v2(0, 0x11, inet("192.0.2.1", "198.51.100.2", 1, 2)),
        ProxyHeader(2, Command.LOCAL, Family.UNSPEC),
        id="v2-local-discards-addresses",
    ),
    pytest.param(
        v2(0, 0x77, b"\xff" * 5),
        ProxyHeader(2, Command.LOCAL, Family.UNSPEC),
        id="v2-local-ignores-family",
    ),
    pytest.param(
        v2(1, 0x00),
        ProxyHeader(2, Command.PROXY, Family.UNSPEC),
        id="v2-proxy-unspec",
    ),
    pytest.param(
        v2(1, 0x31, b"/run/client.sock".ljust(108, b"\0") + b"/run/mx.sock".ljust(108, b"\0")),
        ProxyHeader(2, Command.PROXY, Family.UNIX),
        id="v2-unix-stream",
    ),
    pytest.param(
        v2(
            1,
            0x11,
            inet("192.0.2.1", "198.51.100.2", 1, 25)
            + tlv(0x01, b"smtp")
            + tlv(0x02, b"mx.example")
            + tlv(0x04, b"")
            + tlv(0xEA, b"\x01vpce-0123"),
        ),
        ProxyHeader(
            2,
            Command.PROXY,
            TCP4,
            ("192.0.2.1", 1),
            ("198.51.100.2", 25),
            ((0x01, b"smtp"), (0x02, b"mx.example"), (0x04, b""), (0xEA, b"\x01vpce-0123")),
        ),
        id="v2-tlvs",
    ),
    pytest.param(
        v2(1, 0x00, tlv(0x05, b"id-1")),
        ProxyHeader(2, Command.PROXY, Family.UNSPEC, tlvs=((0x05, b"id-1"),)),
        id="v2-unspec-with-tlv",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_and_what_follows_it(data: bytes, expected: ProxyHeader) -> None:
    """Sections 2.1 and 2.2: the header is parsed; the bytes after it are the client's."""
    assert parse_all(data + SMTP) == (expected, SMTP)
    assert parse_all(data) == (expected, b"")


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_fed_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    """Section 3: a header split over many reads is waited for, never misread."""
    parser = ProxyParser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is NEED_MORE
        assert parser.buffered == i + 1
    assert parser.feed(data[-1:] + SMTP) == (expected, SMTP)
    assert parser.buffered == 0


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_every_truncation_waits_then_eof_is_an_error(data: bytes, expected: ProxyHeader) -> None:
    """A connection closed inside the header is refused, whatever prefix arrived."""
    for cut in range(len(data)):
        parser = ProxyParser()
        if cut:
            assert parser.feed(data[:cut]) is NEED_MORE
        with pytest.raises(ProxyError, match="closed"):
            parser.feed(b"")


def test_v2_crc32c_tlv_checked() -> None:
    """Section 2.2.4: PP2_TYPE_CRC32C covers the header with its own value zeroed."""
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    header = with_crc(v2(1, 0x11, inet("192.0.2.1", "198.51.100.2", 1, 25) + tlv(0x01, b"h2")))
    parsed, rest = parse_all(header + SMTP)
    assert parsed.source == ("192.0.2.1", 1)
    assert [kind for kind, _ in parsed.tlvs] == [0x01, PP2_TYPE_CRC32C]
    assert rest == SMTP
    corrupt = header[:20] + bytes((header[20] ^ 1,)) + header[21:]
    with pytest.raises(ProxyError, match="CRC32C"):
        ProxyParser().feed(corrupt)
    assert ProxyParser(verify_crc=False).feed(corrupt) is not NEED_MORE


def test_header_names_peer_or_keeps_the_real_one() -> None:
    """Section 2.2: LOCAL and UNKNOWN keep the connection's real endpoints."""
    real = ("10.0.0.5", 40000)
    here = ("10.0.0.9", 25)
    proxied = parse_all(b"PROXY TCP4 192.0.2.1 198.51.100.2 5 25\r\n")[0]
    assert proxied.peer(real) == ("192.0.2.1", 5)
    assert proxied.local(here) == ("198.51.100.2", 25)
    local = parse_all(v2(0, 0x00))[0]
    assert local.peer(real) == real
    assert local.local(here) == here
    unknown = parse_all(b"PROXY UNKNOWN\r\n")[0]
    assert unknown.peer(real) == real


LONG_UNKNOWN = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH + 1 - 16) + b"\r\n"
assert len(LONG_UNKNOWN) == V1_MAX_LENGTH + 1
GOOD4 = inet("192.0.2.1", "198.51.100.2", 1, 2)
GOOD6 = inet("2001:db8::1", "2001:db8::2", 1, 2)

MALFORMED = [
    # Not a PROXY header at all: refused from the first byte that cannot start one.
    pytest.param(b"EHLO client.example\r\n", "no PROXY header", id="smtp-command"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", "no PROXY header", id="http"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", "no PROXY header", id="tls-client-hello"),
    pytest.param(b"proxy TCP4 1.2.3.4 1.2.3.5 1 2\r\n", "no PROXY header", id="v1-lowercase"),
    pytest.param(b"PROXY\r\n", "no PROXY header", id="v1-no-space"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", "signature", id="v2-bad-signature-end"),
    pytest.param(b"\r\n\r\n\x01", "signature", id="v2-bad-signature-early"),
    pytest.param(b"\r\nQUIT\r\n", "signature", id="v2-signature-shuffled"),
    # v1 line endings (section 2.1: the line ends with CRLF).
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n", "CRLF", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4\r1.2.3.5 1 2\r\n", "CR", id="v1-bare-cr"),
    pytest.param(b"PROXY UNKNOWN \r \r\n", "CR", id="v1-unknown-bare-cr"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\r\r\n", "CR", id="v1-cr-cr-lf"),
    # v1 length (section 2.1: 107 octets at most).
    pytest.param(LONG_UNKNOWN, "longer than 107", id="v1-unknown-108"),
    pytest.param(b"PROXY TCP4 " + b"1" * 200, "longer than 107", id="v1-no-crlf"),
    # v1 fields.
    pytest.param(b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "protocol", id="v1-tcp5"),
    pytest.param(b"PROXY tcp4 1.2.3.4 1.2.3.5 1 2\r\n", "protocol", id="v1-protocol-case"),
    pytest.param(b"PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n", "protocol", id="v1-udp4"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 1.2.3.5 1 2\r\n", "protocol", id="v1-double-space"),
    pytest.param(b"PROXY \r\n", "protocol", id="v1-empty"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "exactly", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n", "exactly", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 \r\n", "exactly", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4  1.2.3.5 1 2\r\n", "exactly", id="v1-inner-double-space"),
    pytest.param(b"PROXY TCP4 01.2.3.4 1.2.3.5 1 2\r\n", "IPv4", id="v1-ipv4-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.256 1.2.3.5 1 2\r\n", "IPv4", id="v1-ipv4-octet-256"),
    pytest.param(b"PROXY TCP4 1.2.3 1.2.3.5 1 2\r\n", "IPv4", id="v1-ipv4-three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4 localhost 1 2\r\n", "IPv4", id="v1-ipv4-hostname"),
    pytest.param(b"PROXY TCP4 ::1 1.2.3.5 1 2\r\n", "IPv4", id="v1-ipv6-in-tcp4"),
    pytest.param(b"PROXY TCP4 \xd9\xa1.2.3.4 1.2.3.5 1 2\r\n", "IPv4", id="v1-ipv4-non-ascii"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6", id="v1-ipv4-in-tcp6"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6", id="v1-ipv6-zone"),
    pytest.param(b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", "IPv6", id="v1-ipv6-triple-colon"),
    pytest.param(b"PROXY TCP6 [::1] ::1 1 2\r\n", "IPv6", id="v1-ipv6-brackets"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "port", id="v1-port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1 99999\r\n", "port", id="v1-port-99999"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 025 2\r\n", "port", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 -1 2\r\n", "port", id="v1-port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n", "port", id="v1-port-plus"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 1_0 2\r\n", "port", id="v1-port-underscore"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 smtp 2\r\n", "port", id="v1-port-name"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 \xd9\xa1 2\r\n", "port", id="v1-port-arabic-digit"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.5 123456 2\r\n", "port", id="v1-port-six-digits"),
    # v2 version and command (section 2.2: version 2; commands LOCAL and PROXY only).
    pytest.param(v2(1, 0x11, GOOD4, version=1), "version 1", id="v2-version-1"),
    pytest.param(v2(1, 0x11, GOOD4, version=3), "version 3", id="v2-version-3"),
    pytest.param(v2(2, 0x11, GOOD4), "command", id="v2-command-2"),
    pytest.param(v2(0xF, 0x11, GOOD4), "command", id="v2-command-15"),
    # v2 family and transport.
    pytest.param(v2(1, 0x12, GOOD4), "datagram", id="v2-udp4"),
    pytest.param(v2(1, 0x22, GOOD6), "datagram", id="v2-udp6"),
    pytest.param(v2(1, 0x10, GOOD4), "family", id="v2-inet-unspec-transport"),
    pytest.param(v2(1, 0x41, GOOD4), "family", id="v2-family-4"),
    pytest.param(v2(1, 0x13, GOOD4), "family", id="v2-transport-3"),
    # v2 address block shorter than its family needs.
    pytest.param(v2(1, 0x11, GOOD4[:11]), "needs 12", id="v2-inet-short"),
    pytest.param(v2(1, 0x21, GOOD6[:35]), "needs 36", id="v2-inet6-short"),
    pytest.param(v2(1, 0x21, GOOD4), "needs 36", id="v2-inet6-with-ipv4-block"),
    pytest.param(v2(1, 0x31, b"\0" * 215), "needs 216", id="v2-unix-short"),
    # v2 TLVs (section 2.2.x).
    pytest.param(v2(1, 0x11, GOOD4 + b"\x01\x00"), "TLV truncated", id="v2-tlv-header-cut"),
    pytest.param(v2(1, 0x11, GOOD4 + b"\x01\x00\x05abc"), "past the end", id="v2-tlv-overrun"),
    pytest.param(v2(1, 0x00, b"\x02\xff\xff"), "past the end", id="v2-unspec-tlv-overrun"),
    pytest.param(v2(1, 0x11, GOOD4 + tlv(0x03, b"abc")), "4 octets", id="v2-crc-wrong-size"),
    pytest.param(v2(1, 0x11, GOOD4 + tlv(0x03, b"abcd")), "CRC32C", id="v2-crc-mismatch"),
    # v2 size (our cap, see DEFAULT_MAX_V2_PAYLOAD).
    pytest.param(
        v2(1, 0x11, GOOD4 + tlv(0xE0, b"x" * (DEFAULT_MAX_V2_PAYLOAD - 12 - 2))),
        "over 2048",
        id="v2-oversized",
    ),
    pytest.param(V2_SIGNATURE + b"\x21\x11\xff\xff", "65535 octets, over", id="v2-claims-65535"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_header_refused(data: bytes, message: str) -> None:
    """Section 3: a receiver must not try to guess; a bad header closes the connection."""
    with pytest.raises(ProxyError, match=message):
        ProxyParser().feed(data + SMTP)


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_header_refused_byte_by_byte(data: bytes, message: str) -> None:
    """The same verdict when the bytes trickle in, and no later than the whole header."""
    parser = ProxyParser()
    with pytest.raises(ProxyError, match=message):  # raised by one of the feeds
        for i in range(len(data)):
            assert parser.feed(data[i : i + 1]) is NEED_MORE
        parser.feed(SMTP)
    assert parser.buffered <= parser.max_header_length


def test_garbage_refused_at_first_byte() -> None:
    """A client that speaks first without a header is refused at once, not at the deadline."""
    for first in (b"E", b"\x16", b"\r\n\r\n\x00\r\nQ\x00", b"P\x00", b"PROXY\t"):
        with pytest.raises(ProxyError):
            ProxyParser().feed(first)


def test_v1_stray_cr_refused_before_the_line_ends() -> None:
    """Section 2.1: CR only ever comes before LF; a stray one is refused at the next byte."""
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4\r") is NEED_MORE
    with pytest.raises(ProxyError, match="CR"):
        parser.feed(b"1")


def test_oversized_v2_refused_before_its_payload_arrives() -> None:
    """The length field alone condemns an oversized header: nothing more is buffered."""
    parser = ProxyParser(max_v2_payload=64)
    head = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65)
    for byte in head[:-1]:
        assert parser.feed(bytes((byte,))) is NEED_MORE
    with pytest.raises(ProxyError, match="65 octets, over 64"):
        parser.feed(head[-1:])
    exact = v2(1, 0x11, GOOD4 + tlv(0xE0, b"y" * (64 - 12 - 3)))
    header, rest = parse_all(exact + SMTP, max_v2_payload=64)
    assert header.tlvs == ((0xE0, b"y" * 49),) and rest == SMTP


def test_v2_version_refused_at_thirteenth_byte() -> None:
    """A wrong version nibble is refused without waiting for the length field."""
    with pytest.raises(ProxyError, match="version 1"):
        ProxyParser().feed(V2_SIGNATURE + b"\x11")


def test_parser_is_single_use() -> None:
    parser = ProxyParser()
    parser.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError):
        parser.feed(SMTP)


# --- properties -----------------------------------------------------------------------------

chunks = st.lists(st.binary(min_size=1, max_size=40), max_size=12)
starts = st.sampled_from(
    [
        b"",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN",
        V2_SIGNATURE,
        V2_SIGNATURE + b"\x21",
        V2_SIGNATURE + b"\x21\x11",
    ]
)


def _outcome(parser: ProxyParser, pieces: list[bytes]) -> object:
    """What feeding ``pieces`` gives: the header and rest, NEED_MORE, or 'error'."""
    try:
        result: object = NEED_MORE
        for piece in pieces:
            result = parser.feed(piece)
            if result is NEED_MORE:
                assert parser.buffered <= parser.max_header_length
            else:
                break
        return result
    except ProxyError:
        return "error"


@settings(max_examples=400, deadline=None)
@given(start=starts, pieces=chunks)
def test_arbitrary_bytes_only_raise_proxy_error_and_stay_bounded(
    start: bytes, pieces: list[bytes]
) -> None:
    """Whatever a client sends: a header, NEED_MORE with a bounded buffer, or ProxyError."""
    if start:
        pieces = [start, *pieces]
    _outcome(ProxyParser(max_v2_payload=64), pieces)


@settings(max_examples=300, deadline=None)
@given(start=starts, pieces=chunks)
def test_chunking_never_changes_the_verdict(start: bytes, pieces: list[bytes]) -> None:
    """Byte by byte or all at once, the same header, rest and errors (section 3)."""
    data = start + b"".join(pieces)
    if not data:
        return
    whole = _outcome(ProxyParser(), [data])
    trickled = _outcome(ProxyParser(), [data[i : i + 1] for i in range(len(data))])
    if isinstance(whole, tuple) and isinstance(trickled, tuple):
        # Fed byte by byte the parser stops at the header's last byte: the rest comes later.
        assert trickled[0] == whole[0]
        assert data.endswith(whole[1])
    else:
        assert whole == trickled


addresses4 = st.ip_addresses(v=4)
addresses6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(
    src=st.one_of(addresses4, addresses6),
    dst_seed=st.binary(min_size=16, max_size=16),
    sport=ports,
    dport=ports,
    tail=st.binary(max_size=30),
)
def test_addresses_round_trip_v1_and_v2(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst_seed: bytes,
    sport: int,
    dport: int,
    tail: bytes,
) -> None:
    """Any address and port survives both encodings, and what follows is left untouched."""
    dst = ipaddress.ip_address(dst_seed[: len(src.packed)])
    six = src.version == 6
    expected = ProxyHeader(
        1, Command.PROXY, TCP6 if six else TCP4, (str(src), sport), (str(dst), dport)
    )
    text = f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    assert parse_all(text + tail) == (expected, tail)
    binary = v2(1, 0x21 if six else 0x11, inet(str(src), str(dst), sport, dport))
    assert parse_all(binary + tail) == (
        ProxyHeader(2, Command.PROXY, expected.family, expected.source, expected.destination),
        tail,
    )


# --- trust ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack socket's view of IPv4 loopback
        ("10.0.0.1", False),
        ("::2", False),
        ("::ffff:10.0.0.1", False),
        ("", False),  # a Unix socket peer has no IP address
        ("localhost", False),
        ("fe80::1%eth0", False),
    ],
)
def test_loopback_trusted_by_default(peer: str, trusted: bool) -> None:
    assert is_trusted(peer) is trusted
    assert is_trusted(peer, LOOPBACK) is trusted


def test_trusted_networks_replace_the_default() -> None:
    networks = parse_networks(["10.0.0.0/8", " 2001:db8::/32 ", "192.0.2.7"])
    assert is_trusted("10.200.0.1", networks)
    assert is_trusted("::ffff:10.1.1.1", networks)
    assert is_trusted("2001:db8:1::5", networks)
    assert is_trusted("192.0.2.7", networks)
    assert not is_trusted("192.0.2.8", networks)
    assert not is_trusted("127.0.0.1", networks)
    assert not is_trusted("10.0.0.1", ())


@pytest.mark.parametrize("bad", ["10.1.2.3/8", "10.0.0.0/33", "example.com", ""])
def test_parse_networks_refuses_typos(bad: str) -> None:
    with pytest.raises(ValueError, match="CIDR"):
        parse_networks([bad])


# --- the async reader, on asyncio and trio --------------------------------------------------


def feeder(*chunks: bytes) -> Callable[[], Awaitable[bytes]]:
    """A ``receive`` that returns ``chunks`` in turn, then blocks forever."""
    queue = list(chunks)

    async def receive() -> bytes:
        if queue:
            await anyio.lowlevel.checkpoint()
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


@pytest.mark.anyio
async def test_read_proxy_header_over_several_reads() -> None:
    data = v2(1, 0x21, GOOD6)
    receive = feeder(data[:5], data[5:20], data[20:] + b"EH")
    header, rest = await read_proxy_header(receive, timeout=5)
    assert header.source == ("2001:db8::1", 1)
    assert rest == b"EH"


@pytest.mark.anyio
async def test_read_proxy_header_deadline() -> None:
    """A proxy sends the header at once; a silent connection is refused at the deadline."""
    with anyio.fail_after(5):
        with pytest.raises(ProxyError, match=r"within 0\.05 s"):
            await read_proxy_header(feeder(b"PROXY TCP4 "), timeout=0.05)


@pytest.mark.anyio
async def test_read_proxy_header_malformed() -> None:
    with pytest.raises(ProxyError, match="no PROXY header"):
        await read_proxy_header(feeder(b"EHLO x\r\n"), timeout=5)


@pytest.mark.anyio
@pytest.mark.parametrize("gone", [anyio.EndOfStream, anyio.BrokenResourceError])
async def test_read_proxy_header_peer_gone(gone: type[Exception]) -> None:
    async def receive() -> bytes:
        raise gone

    with pytest.raises(ProxyError, match="closed"):
        await read_proxy_header(receive, timeout=5)
    with pytest.raises(ProxyError, match="closed"):
        await read_proxy_header(feeder(b"PROXY", b""), timeout=5)


@pytest.mark.anyio
async def test_read_proxy_header_over_tcp() -> None:
    """A real socket: the header and the first command in one segment are split correctly."""
    received: list[tuple[ProxyHeader, bytes]] = []

    async def serve(stream: ByteStream) -> None:
        async with stream:
            header, rest = await read_proxy_header(stream.receive, timeout=5)
            while not rest.endswith(b"\r\n"):
                rest += await stream.receive()
            received.append((header, rest))
            await stream.send(b"250 ok\r\n")

    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                await client.send(b"PROXY TCP6 2001:db8::7 2001:db8::25 4242 25\r\n" + SMTP)
                assert await client.receive() == b"250 ok\r\n"
            tg.cancel_scope.cancel()
    assert received == [
        (
            ProxyHeader(1, Command.PROXY, TCP6, ("2001:db8::7", 4242), ("2001:db8::25", 25)),
            SMTP,
        )
    ]


@pytest.mark.anyio
async def test_implicit_tls_behind_proxy_header() -> None:
    """RFC 8314 implicit TLS behind PROXY v2: the ClientHello may arrive in the header's
    segment, so the bytes after the header go to the TLS layer (anyio BufferedByteStream),
    which is how the server must wire it."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    header = v2(1, 0x11, inet("203.0.113.9", "198.51.100.2", 50505, 465))
    seen: list[tuple[ProxyHeader, bytes]] = []
    done = anyio.Event()

    async def serve(stream: ByteStream) -> None:
        async with stream:
            proxy_header, rest = await read_proxy_header(stream.receive, timeout=5)
            buffered = BufferedByteStream(stream)
            buffered.feed_data(rest)
            tls = await TLSStream.wrap(
                buffered, server_side=True, ssl_context=server_context, standard_compatible=False
            )
            await tls.send(b"220 mx.example ESMTP\r\n")
            seen.append((proxy_header, await tls.receive()))
            done.set()

    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            raw = await anyio.connect_tcp("127.0.0.1", port)
            # Send the header with the ClientHello, in one write, as a balancer may.
            client = await TLSStream.wrap(
                FirstWritePrefixed(raw, header),
                hostname="mx.example",
                ssl_context=client_context,
                standard_compatible=False,
            )
            async with client:
                assert await client.receive() == b"220 mx.example ESMTP\r\n"
                await client.send(SMTP)
                await done.wait()
            tg.cancel_scope.cancel()
    assert seen[0][0].source == ("203.0.113.9", 50505)
    assert seen[0][1] == SMTP
