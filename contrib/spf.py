"""SPF (RFC 7208): is the client allowed to send mail for the sender's domain?

:func:`check_host` is the RFC's function (section 4), asynchronous, over a
:class:`~minismtp.dns.Resolver`: record selection, every mechanism and modifier, macros
(section 7), ``exp=`` explanations (6.2) and the processing limits (4.6.4: ten DNS-querying
terms, two void lookups, ten MX or PTR names per term). It gives one of ``pass fail softfail
neutral none permerror temperror``.

:class:`SPF` is the middleware: at MAIL it checks the MAIL FROM identity (the HELO identity
for the null sender ``<>``, RFC 7208 2.4) and records the result on the transaction
(:func:`spf_result`). Refusing is opt-in: ``reject_fail=True`` answers ``550 5.7.23`` to a
``fail``, ``reject_temperror=True`` answers ``451 4.7.24`` to a ``temperror`` (RFC 7372 3.2).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import urllib.parse
import weakref
from collections.abc import Callable
from typing import Literal

import anyio
import attrs

from minismtp.dns import DNSError, NoData, NXDomain, Resolver, TempError, default_resolver
from minismtp.events import Event, Handler, Mail
from minismtp.net import parse_ip
from minismtp.types import Reply, Transaction

from .spf_record import (
    MACRO,
    UNRESERVED,
    PermError,
    SPFVerdict,
    Term,
    check_macros,
    parse_record,
    select_record,
)

__all__ = [
    "SPF",
    "SPFResult",
    "SPFVerdict",
    "check_host",
    "spf_result",
]

log = logging.getLogger("minismtp.contrib.spf")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

SPF_FAIL_REPLY = "550 5.7.23"
SPF_TEMPERROR_REPLY = "451 4.7.24"

MAX_LOOKUPS = 10  # RFC 7208 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID = 2  # RFC 7208 4.6.4: lookups answering NXDOMAIN or no records
MAX_NAMES = 10  # RFC 7208 4.6.4: MX names per mx, PTR names per ptr


@attrs.frozen
class SPFResult:
    """The outcome of one SPF check.

    ``identity`` is ``"mailfrom"`` or ``"helo"`` (RFC 8601 2.7.2 ``smtp.mailfrom`` /
    ``smtp.helo``), ``sender`` the ``local@domain`` checked, ``domain`` its domain.
    ``explanation`` is the ``exp=`` text of a ``fail`` (None without one); ``reason`` says
    why a result is an error, or which mechanism matched.
    """

    result: SPFVerdict
    domain: str
    sender: str
    identity: Literal["mailfrom", "helo"] = "mailfrom"
    explanation: str | None = None
    reason: str = ""


class _TempError(Exception):
    pass


def _valid_host(domain: str) -> bool:
    """RFC 7208 4.3: a multi-label domain name whose labels are 1 to 63 octets."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return len(labels) > 1 and all(0 < len(label) <= 63 for label in labels)


def _split_sender(sender: str) -> tuple[str, str]:
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", sender
    return local or "postmaster", domain


def _in_network(ip: IP, address: IP, cidr4: int | None, cidr6: int | None) -> bool:
    if ip.version != address.version:
        return False
    bits = cidr4 if ip.version == 4 else cidr6
    if bits is None:
        return ip == address
    return ip in ipaddress.ip_network((address, bits), strict=False)


class _Check:
    """One evaluation of check_host(), with its counters shared by includes and redirects."""

    def __init__(
        self,
        resolver: Resolver,
        ip: IP,
        sender: str,
        helo: str,
        receiver: str,
        clock: Callable[[], float],
    ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.receiver = receiver
        self.clock = clock
        self.lookups = 0
        self.void = 0
        self._validated: str | None = None

    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise PermError(f"more than {MAX_LOOKUPS} DNS-querying terms (RFC 7208 4.6.4)")

    def _void(self) -> None:
        self.void += 1
        if self.void > MAX_VOID:
            raise PermError(f"more than {MAX_VOID} void lookups (RFC 7208 4.6.4)")

    async def _addresses(self, name: str, *, void_counts: bool = True) -> tuple[IP, ...]:
        try:
            if self.ip.version == 4:
                return await self.resolver.a(name)
            return await self.resolver.aaaa(name)
        except (NXDomain, NoData):
            if void_counts:
                self._void()
            return ()
        except TempError as exc:
            raise _TempError(str(exc)) from None

    async def evaluate(self, domain: str) -> tuple[SPFVerdict, str, str | None]:
        """(result, reason, explanation) of ``domain``'s record."""
        if not _valid_host(domain):
            return "none", f"invalid domain {domain!r}", None
        try:
            records = await self.resolver.txt(domain)
        except (NXDomain, NoData):
            return "none", f"no SPF record for {domain}", None
        except TempError as exc:
            raise _TempError(str(exc)) from None
        text = select_record(records)
        if text is None:
            return "none", f"no SPF record for {domain}", None
        record = parse_record(text)
        for term in record.terms:
            if await self._matches(term, domain):
                reason = f"{domain}: {term.name} matched"
                if term.qualifier == "fail" and record.exp is not None:
                    return term.qualifier, reason, await self._explain(record.exp, domain)
                return term.qualifier, reason, None
        if record.redirect is not None:
            self._count()
            target = await self._expand(record.redirect, domain)
            result, reason, explanation = await self.evaluate(target)
            if result == "none":
                raise PermError(f"redirect to {target}, which has no SPF record")
            return result, reason, explanation
        return "neutral", f"{domain}: no mechanism matched", None

    async def _matches(self, term: Term, domain: str) -> bool:
        name = term.name
        if name == "all":
            return True
        if term.network is not None:
            return self.ip in term.network
        self._count()
        target = domain if term.domain is None else await self._expand(term.domain, domain)
        if name == "include":
            result, _, _ = await self.evaluate(target)
            if result == "none":
                raise PermError(f"include:{target} has no SPF record (RFC 7208 5.2)")
            return result == "pass"
        if name == "a":
            if not _valid_host(target):
                return False
            addresses = await self._addresses(target)
            return any(_in_network(self.ip, a, term.cidr4, term.cidr6) for a in addresses)
        if name == "mx":
            if not _valid_host(target):
                return False
            try:
                exchanges = await self.resolver.mx(target)
            except (NXDomain, NoData):
                self._void()
                return False
            except TempError as exc:
                raise _TempError(str(exc)) from None
            if len(exchanges) > MAX_NAMES:
                raise PermError(f"{target}: more than {MAX_NAMES} MX records (RFC 7208 4.6.4)")
            for _, exchange in exchanges:
                if not exchange or not _valid_host(exchange):
                    continue
                for address in await self._addresses(exchange, void_counts=False):
                    if _in_network(self.ip, address, term.cidr4, term.cidr6):
                        return True
            return False
        if name == "ptr":
            return any(
                n == target.lower() or n.endswith("." + target.lower())
                for n in await self._validated_names(target)
            )
        if name == "exists":
            if not _valid_host(target):
                return False
            try:
                return bool(await self.resolver.a(target))
            except (NXDomain, NoData):
                self._void()
                return False
            except TempError as exc:
                raise _TempError(str(exc)) from None
        raise AssertionError(name)

    async def _validated_names(self, target: str | None, *, count_void: bool = True) -> list[str]:
        """RFC 7208 5.5: names of the client whose addresses include it (at most ten)."""
        try:
            names = await self.resolver.ptr(self.ip)
        except (NXDomain, NoData):
            if count_void:
                self._void()
            return []
        except TempError:
            return []  # 5.5: a failed PTR lookup is simply no match
        validated = []
        for name in names[:MAX_NAMES]:
            name = name.rstrip(".").lower()
            if target is not None and not (
                name == target.lower() or name.endswith("." + target.lower())
            ):
                continue
            try:
                addresses = await self._addresses(name, void_counts=False)
            except _TempError:
                continue
            if self.ip in addresses:
                validated.append(name)
        return validated

    async def _explain(self, spec: str, domain: str) -> str | None:
        """RFC 7208 6.2: any error while building the explanation means no explanation."""
        try:
            target = await self._expand(spec, domain)
            records = await self.resolver.txt(target)
            if len(records) != 1:
                return None
            text = records[0].decode("ascii")
            check_macros(text, exp=True)
            return await self._expand(text, domain, exp=True, truncate=False)
        except (DNSError, PermError, _TempError, UnicodeDecodeError):
            return None

    async def _macro_value(self, letter: str, domain: str) -> str:
        local, sender_domain = _split_sender(self.sender)
        if letter == "s":
            return f"{local}@{sender_domain}"
        if letter == "l":
            return local
        if letter == "o":
            return sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(self.ip.exploded.replace(":", ""))
        if letter == "p":
            if self._validated is None:
                names = await self._validated_names(domain, count_void=False)
                if not names:
                    names = await self._validated_names(None, count_void=False)
                self._validated = names[0] if names else "unknown"
            return self._validated
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver or "unknown"
        if letter == "t":
            return str(int(self.clock()))
        raise PermError(f"invalid macro letter {letter!r}")

    async def _expand(
        self, spec: str, domain: str, *, exp: bool = False, truncate: bool = True
    ) -> str:
        """RFC 7208 7.3 (and 7.4 for the explanation's letters)."""
        out: list[str] = []
        position = 0
        for match in MACRO.finditer(spec):
            out.append(spec[position : match.start()])
            position = match.end()
            letter, digits, reverse, delimiters, other = match.groups()
            if letter is None:
                out.append({"%": "%", "_": " ", "-": "%20"}[other])
                continue
            if letter.lower() in "crt" and not exp:
                raise PermError(f"macro {letter!r} outside exp= (RFC 7208 7.2)")
            value = await self._macro_value(letter.lower(), domain)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            value = ".".join(parts)
            if letter.isupper():
                value = urllib.parse.quote(value, safe=UNRESERVED)
            out.append(value)
        out.append(spec[position:])
        result = "".join(out)
        if truncate:
            # 7.3: a domain name longer than 253 octets loses labels from the left.
            while len(result) > 253 and "." in result:
                result = result.split(".", 1)[1]
        return result


async def check_host(
    ip: str | IP,
    domain: str,
    sender: str,
    *,
    helo: str = "",
    resolver: Resolver | None = None,
    receiver: str = "",
    identity: Literal["mailfrom", "helo"] = "mailfrom",
    time_limit: float | None = 20.0,
    clock: Callable[[], float] = time.time,
) -> SPFResult:
    """RFC 7208 4: the SPF result of ``ip`` sending for ``domain`` as ``sender``.

    ``sender`` is the MAIL FROM address (``postmaster@<helo>`` when checking HELO); ``helo``
    and ``receiver`` (our hostname) feed the ``%{h}`` and ``%{r}`` macros. ``time_limit``
    bounds the whole evaluation (RFC 7208 4.6.4 asks for at least 20 s); past it, the result
    is ``temperror``. DNS errors never raise: they are results.
    """
    address = ip if not isinstance(ip, str) else parse_ip(ip)
    if address is None:
        return SPFResult("none", domain, sender, identity, reason=f"not an IP address: {ip!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    check = _Check(resolver or default_resolver(), address, sender, helo, receiver, clock)
    explanation = None
    try:
        with anyio.fail_after(time_limit):
            result, reason, explanation = await check.evaluate(domain)
    except PermError as exc:
        result, reason = "permerror", str(exc)
    except _TempError as exc:
        result, reason = "temperror", str(exc)
    except TimeoutError:
        result, reason = "temperror", f"no result within {time_limit:g} s"
    return SPFResult(result, domain, sender, identity, explanation, reason)


async def check_sender(
    ip: str | IP,
    mail_from: str,
    helo: str,
    *,
    resolver: Resolver | None = None,
    receiver: str = "",
    time_limit: float | None = 20.0,
) -> SPFResult:
    """The MAIL FROM identity (RFC 7208 2.4), or HELO's for the null sender (2.3)."""
    if mail_from:
        local, _, domain = mail_from.rpartition("@")
        return await check_host(
            ip,
            domain,
            mail_from if local else f"postmaster@{domain}",
            helo=helo,
            resolver=resolver,
            receiver=receiver,
            time_limit=time_limit,
        )
    return await check_host(
        ip,
        helo,
        f"postmaster@{helo}",
        helo=helo,
        resolver=resolver,
        receiver=receiver,
        identity="helo",
        time_limit=time_limit,
    )


_results: weakref.WeakKeyDictionary[Transaction, SPFResult] = weakref.WeakKeyDictionary()


def spf_result(transaction: Transaction) -> SPFResult | None:
    """The SPF result the :class:`SPF` middleware recorded for ``transaction`` (None if it
    did not check it)."""
    return _results.get(transaction)


def record_spf_result(transaction: Transaction, result: SPFResult) -> None:
    _results[transaction] = result


class SPF:
    """Check SPF at MAIL (RFC 7208) and record the result for the transaction.

    Acts at **mail**: the MAIL FROM identity is checked (HELO's when the sender is ``<>``);
    :func:`spf_result` gives the :class:`SPFResult` to hooks and to :class:`Authenticate`.
    By default nothing is refused. ``reject_fail=True``: a ``fail`` is answered
    ``550 5.7.23`` with the domain's explanation if it has one; ``reject_temperror=True``:
    a ``temperror`` is answered ``451 4.7.24`` (RFC 7372 3.2). ``resolver`` defaults to
    :func:`minismtp.dns.default_resolver`; ``timeout`` bounds one whole check.
    """

    acts_on = (Mail,)

    def __init__(
        self,
        app: Handler,
        *,
        resolver: Resolver | None = None,
        reject_fail: bool = False,
        reject_temperror: bool = False,
        timeout: float = 20.0,
    ) -> None:
        self.app = app
        self.resolver = resolver
        self.reject_fail = reject_fail
        self.reject_temperror = reject_temperror
        self.timeout = timeout

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Mail):
            session = event.session
            result = await check_sender(
                session.peer_host,
                str(event.address),
                session.helo_name or "",
                resolver=self.resolver or default_resolver(),
                receiver=session.hostname,
                time_limit=self.timeout,
            )
            record_spf_result(event.transaction, result)
            log.debug("session %s: spf=%s (%s)", session.id, result.result, result.reason)
            if result.result == "fail" and self.reject_fail:
                text = result.explanation or f"SPF check failed for {result.domain}"
                return Reply(550, "5.7.23", printable(text))
            if result.result == "temperror" and self.reject_temperror:
                return Reply(451, "4.7.24", f"Temporary SPF error for {result.domain}")
        return await self.app(event)


def printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:400]
