"""DNS lookups for the middleware that need them (SPF, DKIM, ARC, DMARC, DNSBL).

One small :class:`Resolver` protocol serves them all: TXT, A, AAAA, MX and PTR queries, each
answering a tuple of records or raising one of three errors that the RFCs tell apart:

- :class:`NXDomain`: the name does not exist (RCODE 3);
- :class:`NoData`: the name exists but has no record of that type;
- :class:`TempError`: no answer could be had (timeout, SERVFAIL, no reachable server): the
  same question may get an answer later. SPF calls this ``temperror``, DKIM ``TEMPFAIL``.

:class:`DnsResolver` is the default, on dnspython's asynchronous resolver (which runs on
asyncio and on trio): a per-query timeout and a bounded cache that keeps each answer for its
TTL. :class:`FakeResolver` answers from a dict, for tests. dnspython is an optional
dependency (``pip install 'minismtp[auth]'``), imported only when a DnsResolver is made.

The middleware take ``resolver=`` and fall back to :func:`default_resolver`, which
``minismtp run --resolver IP[:PORT]`` points at a given server (:func:`configure`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

if TYPE_CHECKING:
    import dns.asyncresolver

__all__ = [
    "TIMEOUT",
    "DNSError",
    "DnsResolver",
    "FakeResolver",
    "NXDomain",
    "NoData",
    "Resolver",
    "TempError",
    "configure",
    "default_resolver",
    "missing_extra",
    "reverse_name",
]

log = logging.getLogger("minismtp.dns")

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
T = TypeVar("T")


class DNSError(Exception):
    """A query got no records. ``name`` and ``rdtype`` say which query."""

    def __init__(self, name: str, rdtype: str, detail: str = "") -> None:
        self.name = name
        self.rdtype = rdtype
        self.detail = detail
        super().__init__(f"{name} {rdtype}: {detail or type(self).__name__}")


class NXDomain(DNSError):
    """The name does not exist."""


class NoData(DNSError):
    """The name exists, without records of the type asked for."""


class TempError(DNSError):
    """No answer: a timeout, SERVFAIL, or no server reachable. Asking later may work."""


class Resolver(Protocol):
    """What the DNS-using middleware need. Names are given without the trailing dot.

    Every method answers a non-empty tuple or raises :class:`NXDomain`, :class:`NoData` or
    :class:`TempError` (never anything else for a failed lookup). CNAMEs are followed.
    """

    async def txt(self, name: str) -> tuple[bytes, ...]:
        """TXT records, the character-strings of each joined without a separator
        (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        ...

    async def a(self, name: str) -> tuple[IPv4, ...]: ...

    async def aaaa(self, name: str) -> tuple[IPv6, ...]: ...

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        """``(preference, exchange)`` pairs, exchanges without the trailing dot."""
        ...

    async def ptr(self, address: IPv4 | IPv6) -> tuple[str, ...]:
        """The names of ``address`` (its ``in-addr.arpa``/``ip6.arpa`` PTR records)."""
        ...


def missing_extra(package: str, what: str) -> ImportError:
    """The error raised when an optional dependency of the ``auth`` extra is missing."""
    return ImportError(f"{what} needs the {package!r} package: pip install 'minismtp[auth]'")


def reverse_name(address: IPv4 | IPv6) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa`` (no trailing dot)."""
    return address.reverse_pointer


def _strip(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


class DnsResolver:
    """The default Resolver, on ``dns.asyncresolver`` (dnspython).

    ``nameservers``: addresses to ask (``port`` for all of them); default: the system's
    (``/etc/resolv.conf``). ``timeout``: seconds allowed for one query, retries included;
    past it the query raises :class:`TempError`. ``cache_size``: answers kept, each for its
    TTL (least recently used dropped first; negative answers are kept too).
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        try:
            import dns.asyncresolver
            import dns.resolver
        except ImportError:
            raise missing_extra("dnspython", "minismtp.dns.DnsResolver") from None
        resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.cache = dns.resolver.LRUCache(cache_size)
        self._resolver: dns.asyncresolver.Resolver = resolver
        self.timeout = timeout

    async def _resolve(self, name: str, rdtype: str) -> Any:
        import dns.asyncbackend
        import dns.exception
        import dns.name
        import dns.resolver

        # dnspython remembers the first event loop library it sees as the process's default:
        # name the one running now, so asyncio and trio can take turns in one process.
        backend = dns.asyncbackend.get_backend(dns.asyncbackend.sniff())
        try:
            return await self._resolver.resolve(
                _strip(name) + ".", rdtype, lifetime=self.timeout, search=False, backend=backend
            )
        except dns.resolver.NXDOMAIN:
            raise NXDomain(name, rdtype) from None
        except dns.resolver.NoAnswer:
            raise NoData(name, rdtype) from None
        except dns.exception.Timeout:
            raise TempError(name, rdtype, "timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise TempError(name, rdtype, "server failure") from exc
        except (
            dns.name.EmptyLabel,
            dns.name.LabelTooLong,
            dns.name.NameTooLong,
            dns.name.IDNAException,
            UnicodeError,
        ) as exc:
            # A name that cannot be asked for cannot exist.
            raise NXDomain(name, rdtype, str(exc)) from None
        except dns.exception.DNSException as exc:
            raise TempError(name, rdtype, str(exc) or type(exc).__name__) from exc

    async def txt(self, name: str) -> tuple[bytes, ...]:
        answer = await self._resolve(name, "TXT")
        return tuple(b"".join(rdata.strings) for rdata in answer)

    async def a(self, name: str) -> tuple[IPv4, ...]:
        answer = await self._resolve(name, "A")
        return tuple(IPv4(rdata.address) for rdata in answer)

    async def aaaa(self, name: str) -> tuple[IPv6, ...]:
        answer = await self._resolve(name, "AAAA")
        return tuple(IPv6(rdata.address) for rdata in answer)

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        answer = await self._resolve(name, "MX")
        return tuple((int(rdata.preference), _strip(rdata.exchange.to_text())) for rdata in answer)

    async def ptr(self, address: IPv4 | IPv6) -> tuple[str, ...]:
        answer = await self._resolve(reverse_name(address), "PTR")
        return tuple(_strip(rdata.target.to_text()) for rdata in answer)


class _Timeout:
    def __repr__(self) -> str:
        return "TIMEOUT"


#: In a :class:`FakeResolver` zone: this query (or every query of this name) times out.
TIMEOUT: Any = _Timeout()

Records = Mapping[str, Any]


class FakeResolver:
    """A Resolver answering from ``zones``, for tests: no network, no clock.

    ``zones`` maps a name to its records by type::

        FakeResolver({
            "example.com": {"TXT": ["v=spf1 mx -all"], "MX": [(10, "mx.example.com")]},
            "mx.example.com": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
            "1.2.0.192.in-addr.arpa": {"PTR": ["mx.example.com"]},
            "www.example.com": {"CNAME": "example.com"},
            "slow.example": TIMEOUT,             # every query of this name times out
            "half.example": {"TXT": TIMEOUT},    # only its TXT query does
        })

    A name absent from ``zones`` is NXDOMAIN; a present name without the type asked is
    NoData. TXT values may be ``str``, ``bytes`` or a sequence of character-strings (joined).
    Every query made is appended to :attr:`queries` as ``(name, type)``.
    """

    def __init__(self, zones: Mapping[str, Records | Any] | None = None) -> None:
        self.zones: dict[str, Any] = {
            _strip(name).lower(): records for name, records in (zones or {}).items()
        }
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, *values: Any) -> None:
        """Add records (or a :data:`TIMEOUT`) to a zone, creating the name if needed."""
        records = self.zones.setdefault(_strip(name).lower(), {})
        if records is TIMEOUT:
            raise ValueError(f"{name}: every query of this name times out")
        if values == (TIMEOUT,):
            records[rdtype] = TIMEOUT
        else:
            records.setdefault(rdtype, []).extend(values)

    async def _lookup(self, name: str, rdtype: str, convert: Callable[[Any], T]) -> tuple[T, ...]:
        await anyio.lowlevel.checkpoint()
        name = _strip(name).lower()
        self.queries.append((name, rdtype))
        for _ in range(8):  # CNAME chains, bounded
            if any(not label or len(label) > 63 for label in name.split(".")):
                raise NXDomain(name, rdtype, "invalid name")
            records = self.zones.get(name)
            if records is None:
                raise NXDomain(name, rdtype)
            if records is TIMEOUT:
                raise TempError(name, rdtype, "timeout")
            values = records.get(rdtype)
            if values is TIMEOUT:
                raise TempError(name, rdtype, "timeout")
            if values:
                return tuple(convert(value) for value in values)
            target = records.get("CNAME")
            if target is None:
                raise NoData(name, rdtype)
            name = _strip(target).lower()
        raise TempError(name, rdtype, "CNAME chain too long")

    async def txt(self, name: str) -> tuple[bytes, ...]:
        return await self._lookup(name, "TXT", _txt)

    async def a(self, name: str) -> tuple[IPv4, ...]:
        return await self._lookup(name, "A", IPv4)

    async def aaaa(self, name: str) -> tuple[IPv6, ...]:
        return await self._lookup(name, "AAAA", IPv6)

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        return await self._lookup(name, "MX", lambda mx: (int(mx[0]), _strip(str(mx[1]))))

    async def ptr(self, address: IPv4 | IPv6) -> tuple[str, ...]:
        return await self._lookup(reverse_name(address), "PTR", lambda name: _strip(str(name)))


def _txt(value: str | bytes | Iterable[str | bytes]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    return b"".join(part.encode() if isinstance(part, str) else part for part in value)


_nameservers: tuple[list[str], int] | None = None
_default: Resolver | None = None


def configure(nameservers: Sequence[str] | None = None, port: int = 53) -> None:
    """Point :func:`default_resolver` at these servers (None: the system's)."""
    global _nameservers, _default
    _nameservers = (list(nameservers), port) if nameservers is not None else None
    _default = None


def default_resolver() -> Resolver:
    """The process's shared :class:`DnsResolver`, made at the first call."""
    global _default
    if _default is None:
        if _nameservers is None:
            _default = DnsResolver()
        else:
            _default = DnsResolver(_nameservers[0], port=_nameservers[1])
    return _default
