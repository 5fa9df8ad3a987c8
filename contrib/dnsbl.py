"""DNS blocklists (RFC 5782): is the client's address listed in a DNSBL zone?

A client ``192.0.2.1`` is looked up as the A record ``1.2.0.192.<zone>`` (IPv6: its 32
nibbles reversed, RFC 5782 2.4). Only an answer in ``127.0.0.0/8`` is a listing (2.3); the
codes ``127.255.255.0/24`` are what some lists answer for refused queries (through a public
resolver, over quota...): they are errors, not listings, and any other answer is ignored as
an error too, so that a misconfigured or expired zone answering everything cannot block the
world.

:class:`DNSBL` is the middleware: at connect it asks every zone at once and records the
answers for the session (:func:`dnsbl_result`); by default it refuses nothing and, at the end
of data, prepends an ``X-DNSBL:`` header to a message from a listed client.
``reject=True``: a listed client gets ``554 5.7.1 Service unavailable; client [ip] blocked
using <zone>`` instead of the greeting (RFC 5321 3.1).
"""

from __future__ import annotations

import ipaddress
import logging
import weakref
from collections.abc import Sequence
from typing import Literal

import anyio
import attrs

from minismtp.dns import NoData, NXDomain, Resolver, TempError, default_resolver
from minismtp.events import Connect, Data, Event, Handler
from minismtp.net import parse_ip
from minismtp.types import Reply, Session

__all__ = ["DNSBL", "DNSBLAnswer", "DNSBLResult", "dnsbl_query_name", "dnsbl_result", "lookup"]

log = logging.getLogger("minismtp.contrib.dnsbl")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")


@attrs.frozen
class DNSBLAnswer:
    """One zone's answer: ``listed``, ``clear`` (NXDOMAIN or no A record) or ``error``
    (``127.255.255.x``, an answer outside ``127.0.0.0/8``, or no answer at all)."""

    zone: str
    status: Literal["listed", "clear", "error"]
    codes: tuple[str, ...] = ()
    reason: str = ""


@attrs.frozen
class DNSBLResult:
    """Every zone's answer for one client address."""

    address: str
    answers: tuple[DNSBLAnswer, ...] = ()

    @property
    def listed(self) -> tuple[DNSBLAnswer, ...]:
        return tuple(a for a in self.answers if a.status == "listed")


def dnsbl_query_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """RFC 5782 2.1 and 2.4: the reversed octets (or nibbles) of ``address`` under ``zone``."""
    reverse = (
        address.reverse_pointer.rpartition(".in-addr.arpa")[0]
        or (address.reverse_pointer.rpartition(".ip6.arpa")[0])
    )
    return f"{reverse}.{zone.strip('.')}"


async def lookup(
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    zone: str,
    *,
    resolver: Resolver | None = None,
) -> DNSBLAnswer:
    """Ask ``zone`` about ``address``; DNS errors are answers (``error``), never raised."""
    ip = parse_ip(address) if isinstance(address, str) else address
    if ip is None:
        return DNSBLAnswer(zone, "error", reason=f"not an IP address: {address!r}")
    resolver = resolver or default_resolver()
    try:
        answers = await resolver.a(dnsbl_query_name(ip, zone))
    except (NXDomain, NoData):
        return DNSBLAnswer(zone, "clear")
    except TempError as exc:
        return DNSBLAnswer(zone, "error", reason=str(exc))
    codes = tuple(str(a) for a in answers if a in LOOPBACK and a not in ERROR_CODES)
    if codes:
        return DNSBLAnswer(zone, "listed", codes)
    errors = [str(a) for a in answers if a in ERROR_CODES]
    if errors:
        return DNSBLAnswer(zone, "error", tuple(errors), "the list refused the query")
    return DNSBLAnswer(zone, "error", tuple(str(a) for a in answers), "answer outside 127.0.0.0/8")


_results: weakref.WeakKeyDictionary[Session, DNSBLResult] = weakref.WeakKeyDictionary()


def dnsbl_result(session: Session) -> DNSBLResult | None:
    """The DNSBL answers recorded for ``session`` (None if it was not checked)."""
    return _results.get(session)


class DNSBL:
    """Look the client up in DNS blocklists at connect.

    ``zones``: the DNSBL zones (``["zen.spamhaus.org"]``), asked concurrently, each bounded
    by the resolver's timeout. Answers are recorded for the session (:func:`dnsbl_result`).
    ``reject=False`` (the default) annotates: a message from a listed client gets an
    ``X-DNSBL: listed in <zone> (<codes>)`` header. ``reject=True`` refuses a listed client
    at connect with ``554 5.7.1``. A zone that answers with an error never blocks anyone.
    """

    acts_on = (Connect, Data)

    def __init__(
        self,
        app: Handler,
        *,
        zones: Sequence[str],
        reject: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        if isinstance(zones, str):
            raise TypeError("zones must be a list of zone names, not one string")
        self.app = app
        self.zones = tuple(zones)
        self.reject = reject
        self.resolver = resolver

    async def check(self, session: Session) -> DNSBLResult:
        host = session.peer_host
        answers: dict[str, DNSBLAnswer] = {}
        resolver = self.resolver or default_resolver()

        async def ask(zone: str) -> None:
            answers[zone] = await lookup(host, zone, resolver=resolver)

        if parse_ip(host) is not None:
            async with anyio.create_task_group() as tg:
                for zone in self.zones:
                    tg.start_soon(ask, zone)
        result = DNSBLResult(host, tuple(answers[z] for z in self.zones if z in answers))
        _results[session] = result
        for answer in result.answers:
            if answer.status == "error":
                log.warning("session %s: DNSBL %s: %s", session.id, answer.zone, answer.reason)
        return result

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Connect):
            result = await self.check(event.session)
            if self.reject and result.listed:
                zone = result.listed[0].zone
                log.info("session %s: %s listed in %s", event.session.id, result.address, zone)
                return Reply(
                    554,
                    "5.7.1",
                    f"Service unavailable; client [{result.address}] blocked using {zone}",
                )
        elif isinstance(event, Data):
            result_ = dnsbl_result(event.session)
            if result_ is not None and result_.listed:
                listed = "; ".join(
                    f"listed in {a.zone} ({', '.join(a.codes)})" for a in result_.listed
                )
                event.message.prepend_header("X-DNSBL", listed)
        return await self.app(event)
