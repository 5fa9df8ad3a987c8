"""The PROXY protocol, versions 1 and 2, as HAProxy specifies it: the client's address from a
load balancer.

A proxy that speaks it sends one header at the very start of the TCP connection, before any
byte of the client's (before the TLS handshake too, for implicit TLS), naming the address the
client connected from. :class:`ProxyParser` turns bytes into that header, sans-I/O like the SMTP
engine: it is fed what the socket delivered and answers :data:`NEED_MORE`, or the header and the
bytes that followed it (they belong to the SMTP engine or the TLS layer), or raises
:class:`ProxyError`. :func:`read_proxy_header` drives it over a real connection with a deadline.

A header is believed only from a trusted peer (:func:`is_trusted`): anyone who may send one can
claim any address. Memory stays bounded whatever arrives: a v1 header is at most 107 octets and a
v2 header at most ``16 + max_v2_payload`` octets, and junk is refused as soon as its first bytes
show it cannot begin a header.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import attrs

from minismtp.net import IPNetwork, parse_ip
from minismtp.net import parse_networks as parse_networks  # --proxy-trusted's parser

# The server's logger: a refused proxy is the server's news.
log = logging.getLogger("minismtp.server")

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN" + two full IPv6 addresses and ports + CRLF, as specified
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16  # signature, version and command, family and protocol, payload length
# The spec allows a payload of 65535 octets. What real proxies send is far smaller: the largest
# address block (AF_UNIX, 216) plus the TLVs HAProxy and the cloud balancers add (ALPN and SNI,
# at most 255 each; a unique id of at most 128; the SSL block with version, CN and cipher names;
# a CRC; a VPC endpoint or link id) stays under 1.5 KiB. 2 KiB leaves room without letting every
# trusted connection hold 64 KiB before it has said anything.
DEFAULT_MAX_V2_PAYLOAD = 2048

LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)

# TLV types of the spec (section 2.2.x) that this module looks at.
PP2_TYPE_CRC32C = 0x03

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# An IPv6 text form: hex groups, "::" and an embedded dotted quad, no zone index ("%eth0").
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]+")
_IPV4_CHARS = re.compile(rb"[0-9.]+")


class ProxyError(Exception):
    """The connection did not start with a valid PROXY header; close it without a greeting."""


class Command(enum.Enum):
    LOCAL = "LOCAL"  # the proxy's own connection (a health check): keep the real peer
    PROXY = "PROXY"  # relayed for a client: the header's source is the client


class Family(enum.Enum):
    UNSPEC = "UNSPEC"  # v1 UNKNOWN, v2 AF_UNSPEC: no address given, keep the real peer
    INET = "INET"  # TCP over IPv4 (v1 TCP4)
    INET6 = "INET6"  # TCP over IPv6 (v1 TCP6)
    UNIX = "UNIX"  # v2 AF_UNIX stream: no IP address to use, keep the real peer


@attrs.frozen
class ProxyHeader:
    """What the proxy said about the connection.

    ``source`` is the client's ``(host, port)`` and ``destination`` the address it connected
    to; both are ``None`` when the header gives no IP address (LOCAL, UNKNOWN, UNSPEC, UNIX).
    ``tlvs`` are the v2 type-length-value extensions as ``(type, value)`` pairs, in order.
    """

    version: int
    command: Command
    family: Family
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def peer(self, real_peer: tuple[str, int]) -> tuple[str, int]:
        """The session's peer: the proxied client, or the real peer when there is none."""
        return self.source if self.source is not None else real_peer

    def local(self, real_local: tuple[str, int]) -> tuple[str, int]:
        """The session's local address: where the client connected, or the real one."""
        return self.destination if self.destination is not None else real_local


class NeedMore:
    """Feed the parser more bytes: the header is not complete yet."""

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@attrs.define
class ProxyParser:
    """Sans-I/O reader of one PROXY header (v1 or v2) at the start of a connection.

    Call :meth:`feed` with each chunk received. It answers :data:`NEED_MORE` until the header is
    complete, then ``(header, rest)`` where ``rest`` is whatever followed the header in the
    same chunk. Anything that is not a valid header raises :class:`ProxyError` as early as the
    bytes seen allow; :attr:`buffered` never exceeds :attr:`max_header_length`.
    """

    max_v2_payload: int = DEFAULT_MAX_V2_PAYLOAD
    verify_crc: bool = True
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _done: bool = attrs.field(default=False, init=False)

    @property
    def max_header_length(self) -> int:
        return max(V1_MAX_LENGTH, V2_HEADER_LENGTH + self.max_v2_payload)

    @property
    def buffered(self) -> int:
        """Octets held while waiting for the rest of the header."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | NeedMore:
        """Add ``data`` (``b""`` means the peer closed) and return the header once complete."""
        if self._done:
            raise RuntimeError("the PROXY header was already read")
        if not data:
            raise ProxyError("connection closed before the PROXY header was complete")
        self._buffer += data
        parsed = parse_proxy_header(
            self._buffer, max_v2_payload=self.max_v2_payload, verify_crc=self.verify_crc
        )
        if parsed is None:
            return NEED_MORE
        header, length = parsed
        rest = bytes(self._buffer[length:])
        self._buffer = bytearray()
        self._done = True
        return header, rest


def parse_proxy_header(
    data: bytes | bytearray,
    *,
    max_v2_payload: int = DEFAULT_MAX_V2_PAYLOAD,
    verify_crc: bool = True,
) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length in octets, or ``None`` if incomplete.

    Raises :class:`ProxyError` when ``data`` cannot be the start of a valid header.
    """
    if data[:1] == V2_SIGNATURE[:1]:
        head = bytes(data[: len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(head):
            raise ProxyError("not a PROXY v2 signature")
        return _parse_v2(data, max_v2_payload, verify_crc)
    head = bytes(data[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(head):
        raise ProxyError(f"no PROXY header: connection starts with {head!r}")
    return _parse_v1(data)


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    newline = data.find(b"\n", 0, V1_MAX_LENGTH)
    if newline < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyError(f"PROXY v1 header longer than {V1_MAX_LENGTH} octets")
        if b"\r" in data[:-1]:
            raise ProxyError("PROXY v1 header has a CR that does not end it")
        return None
    if newline == 0 or data[newline - 1] != 0x0D:
        raise ProxyError("PROXY v1 header does not end with CRLF")
    line = bytes(data[: newline - 1])
    if b"\r" in line:
        raise ProxyError("PROXY v1 header has a CR that does not end it")
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # The spec says the receiver must ignore whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC), newline + 1
    if protocol == b"TCP4":
        family = Family.INET
    elif protocol == b"TCP6":
        family = Family.INET6
    else:
        raise ProxyError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, not {protocol!r}")
    if len(fields) != 6:
        raise ProxyError("PROXY v1 header needs exactly: protocol, two addresses, two ports")
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(1, Command.PROXY, family, source, destination), newline + 1


def _v1_address(text: bytes, family: Family) -> str:
    """A v1 address of ``family`` (INET: TCP4, INET6: TCP6), in the form ipaddress writes."""
    v4 = family is Family.INET
    # ipaddress refuses leading zeros (ambiguous: octal to inet_aton) and out-of-range octets.
    if (_IPV4_CHARS if v4 else _IPV6_CHARS).fullmatch(text):
        parse = ipaddress.IPv4Address if v4 else ipaddress.IPv6Address
        try:
            return str(parse(text.decode("ascii")))
        except ValueError:
            pass
    n = 4 if v4 else 6
    raise ProxyError(f"PROXY v1 TCP{n} address is not an IPv{n} address: {text!r}")


def _v1_port(text: bytes) -> int:
    if _PORT.fullmatch(text):
        port = int(text)
        if port <= 65535:
            return port
    raise ProxyError(f"PROXY v1 port is not a number from 0 to 65535: {text!r}")


# v2 family and protocol byte: high nibble the address family, low nibble the transport.
_V2_FAMILIES = {0x00: Family.UNSPEC, 0x11: Family.INET, 0x21: Family.INET6, 0x31: Family.UNIX}
_V2_DATAGRAM = {0x12, 0x22, 0x32}
_V2_ADDRESS_LENGTH = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


def _parse_v2(
    data: bytes | bytearray, max_payload: int, verify_crc: bool
) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_HEADER_LENGTH:
        if len(data) > 12:
            _v2_command(data[12])  # refuse a bad version as soon as it is seen
        return None
    command = _v2_command(data[12])
    family_byte = data[13]
    (payload_length,) = struct.unpack_from("!H", data, 14)
    if payload_length > max_payload:
        raise ProxyError(f"PROXY v2 header of {payload_length} octets, over {max_payload}")
    end = V2_HEADER_LENGTH + payload_length
    if len(data) < end:
        return None
    if command is Command.LOCAL:
        # The spec: a LOCAL header's protocol block is discarded and the real endpoints used.
        return ProxyHeader(2, Command.LOCAL, Family.UNSPEC), end
    family = _V2_FAMILIES.get(family_byte)
    if family is None:
        if family_byte in _V2_DATAGRAM:
            raise ProxyError("PROXY v2 header describes a datagram (UDP) connection")
        raise ProxyError(f"PROXY v2 header has an invalid family/protocol 0x{family_byte:02x}")
    header = bytes(data[:end])
    address_length = _V2_ADDRESS_LENGTH[family]
    if payload_length < address_length:
        raise ProxyError(
            f"PROXY v2 {family.value} address block needs {address_length} octets, "
            f"got {payload_length}"
        )
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family is Family.INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", header, V2_HEADER_LENGTH)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family is Family.INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", header, V2_HEADER_LENGTH)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    tlvs = _v2_tlvs(header, V2_HEADER_LENGTH + address_length, verify_crc)
    return ProxyHeader(2, Command.PROXY, family, source, destination, tlvs), end


def _v2_command(version_command: int) -> Command:
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header has version {version_command >> 4}, not 2")
    if version_command & 0x0F == 0:
        return Command.LOCAL
    if version_command & 0x0F == 1:
        return Command.PROXY
    raise ProxyError(f"PROXY v2 header has an unknown command {version_command & 0x0F}")


def _v2_tlvs(header: bytes, start: int, verify_crc: bool) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from ``header[start:]``, checking the CRC32C TLV if there is one."""
    tlvs = []
    pos = start
    while pos < len(header):
        if pos + 3 > len(header):
            raise ProxyError("PROXY v2 TLV truncated: incomplete type and length")
        kind = header[pos]
        (length,) = struct.unpack_from("!H", header, pos + 1)
        value = header[pos + 3 : pos + 3 + length]
        if len(value) != length:
            raise ProxyError(f"PROXY v2 TLV 0x{kind:02x} runs past the end of the header")
        if kind == PP2_TYPE_CRC32C and verify_crc:
            _v2_check_crc(header, pos + 3, value)
        tlvs.append((kind, value))
        pos += 3 + length
    return tuple(tlvs)


def _v2_check_crc(header: bytes, at: int, value: bytes) -> None:
    """The spec's CRC32C covers the whole header with the checksum's own 4 octets zeroed."""
    if len(value) != 4:
        raise ProxyError("PROXY v2 CRC32C TLV must hold 4 octets")
    zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyError("PROXY v2 header fails its CRC32C check")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of the PP2_TYPE_CRC32C TLV."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def is_trusted(peer_ip: str, networks: Sequence[IPNetwork] = LOOPBACK) -> bool:
    """Whether a PROXY header from ``peer_ip`` may be believed.

    An IPv4-mapped IPv6 peer (``::ffff:10.0.0.1``, as a dual-stack socket reports it) is
    checked as the IPv4 address it is. Anything that is not an IP address is not trusted.
    """
    address = parse_ip(peer_ip)
    return address is not None and any(address in network for network in networks)


async def read_proxy_header(
    receive: Callable[[], Awaitable[bytes]],
    # The deadline is the protocol's own (a proxy sends the header at once), and running out
    # of it is a ProxyError like any bad header, so it is a parameter, not the caller's scope.
    timeout: float,  # noqa: ASYNC109
    *,
    max_v2_payload: int = DEFAULT_MAX_V2_PAYLOAD,
) -> tuple[ProxyHeader, bytes]:
    """Read the PROXY header from a fresh connection within ``timeout`` seconds.

    ``receive`` is the stream's ``receive`` (``b""``, :exc:`anyio.EndOfStream` and
    :exc:`anyio.BrokenResourceError` all mean the peer is gone). Returns the header and the
    bytes received after it, which the caller must hand on (to the SMTP engine, or to the TLS
    layer for implicit TLS). Raises :class:`ProxyError` for a bad header, a closed connection
    or the deadline.
    """
    parser = ProxyParser(max_v2_payload=max_v2_payload)
    with anyio.move_on_after(timeout):
        while True:
            try:
                data = await receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                raise ProxyError("connection closed before the PROXY header was complete") from exc
            result = parser.feed(data)
            if not isinstance(result, NeedMore):
                return result
    raise ProxyError(f"no complete PROXY header within {timeout:g} s")


class _Source(Protocol):
    async def receive(self) -> bytes: ...

    def unread(self, data: bytes) -> None: ...


Addresses = tuple[tuple[str, int], tuple[str, int]]


async def proxy_addresses(
    wire: _Source,
    peer: tuple[str, int],
    local: tuple[str, int],
    trusted: Sequence[IPNetwork],
    timeout: float,  # noqa: ASYNC109  # see read_proxy_header
) -> Addresses | None:
    """The server's PROXY step on a fresh connection, before the engine and any TLS.

    The client's address and the one it connected to, as the proxy says; or None when the
    connection is to be closed without a greeting (logged: an untrusted peer, a bad header,
    the deadline). Whatever followed the header goes back to the wire (``unread``), for the
    engine or the implicit TLS handshake.
    """
    if not is_trusted(peer[0], trusted):
        log.warning("connection from %s closed: not a trusted proxy (--proxy-trusted)", peer[0])
        return None
    try:
        header, rest = await read_proxy_header(wire.receive, timeout)
    except (ProxyError, anyio.ClosedResourceError, OSError) as exc:
        log.info("connection from %s closed: %s", peer[0], exc)
        return None
    if rest:
        wire.unread(rest)
    return header.peer(peer), header.local(local)
