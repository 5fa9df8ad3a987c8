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

__all__ = [
    "SPF",
    "SPFResult",
    "SPFVerdict",
    "check_host",
    "spf_result",
]

log = logging.getLogger("minismtp.contrib.spf")

SPFVerdict = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
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


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


_QUALIFIERS: dict[str, SPFVerdict] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)", re.S)
_DIRECTIVE = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9._-]*)(.*)", re.S)
_CIDR = re.compile(r"(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?\Z")
_TOPLABEL = re.compile(
    r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?\Z"
)
_MACRO_END = re.compile(r"(?:%\{[A-Za-z][0-9]*r?[.+,/_=-]*\}|%%|%_|%-)\Z", re.I)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)(r?)([.+,/_=-]*)\}|(.)|\Z)", re.I | re.S)
_UNRESERVED = "-._~"  # RFC 3986 2.3, kept by URL escaping of upper-case macros (RFC 7208 7.3)


@attrs.frozen
class _Term:
    qualifier: SPFVerdict
    name: str  # mechanism, lower case
    domain: str | None  # domain-spec, unexpanded
    cidr4: int | None = None
    cidr6: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@attrs.frozen
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None
    exp: str | None


def _valid_domain_spec(spec: str) -> bool:
    """RFC 7208 7.1: ``domain-end = ( "." toplabel [ "." ] ) / macro-expand``."""
    if not spec or any(ord(c) < 0x21 or ord(c) > 0x7E for c in spec):
        return False
    if _MACRO_END.search(spec):
        return True
    _, dot, top = (spec[:-1] if spec.endswith(".") else spec).rpartition(".")
    return bool(dot) and bool(_TOPLABEL.match(top))


def _check_macros(spec: str, *, exp: bool = False) -> None:
    """Syntax of a macro-string (RFC 7208 7.1), before any lookup: errors are permerror."""
    for match in _MACRO.finditer(spec):
        letter, digits, _, _, other = match.groups()
        if letter is None:
            if other is None or other not in "%_-":
                raise _PermError(f"invalid macro in {spec!r}")
            continue
        if letter.lower() not in "slodiphv" + ("crt" if exp else ""):
            raise _PermError(f"invalid macro letter {letter!r}")
        if digits and int(digits) == 0:
            raise _PermError("macro transformer 0")


def _parse(text: str) -> _Record:
    terms: list[_Term] = []
    redirect = exp = None
    for word in text.split(" ")[1:]:
        if not word:
            continue
        modifier = _MODIFIER.fullmatch(word)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            _check_macros(value, exp=False)
            if name in ("redirect", "exp"):
                if not _valid_domain_spec(value):
                    raise _PermError(f"invalid domain in {word!r}")
                if (redirect if name == "redirect" else exp) is not None:
                    raise _PermError(f"more than one {name}= (RFC 7208 6)")
                if name == "redirect":
                    redirect = value
                else:
                    exp = value
            continue
        directive = _DIRECTIVE.fullmatch(word)
        if directive is None:
            raise _PermError(f"unknown term {word!r}")
        terms.append(_parse_mechanism(directive, word))
    return _Record(tuple(terms), redirect, exp)


def _parse_mechanism(directive: re.Match[str], word: str) -> _Term:
    qualifier = _QUALIFIERS[directive.group(1) or "+"]
    name, rest = directive.group(2).lower(), directive.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"invalid term {word!r}")
        return _Term(qualifier, name, None)
    if name in ("include", "exists", "ptr"):
        if name == "ptr" and not rest:
            return _Term(qualifier, name, None)
        if not rest.startswith(":") or not _valid_domain_spec(rest[1:]):
            raise _PermError(f"invalid term {word!r}")
        _check_macros(rest[1:])
        return _Term(qualifier, name, rest[1:])
    if name in ("a", "mx"):
        cidr = _CIDR.search(rest)
        if cidr is None:
            raise _PermError(f"invalid term {word!r}")
        spec = rest[: cidr.start()]
        cidr4, cidr6 = cidr.groups()
        if (cidr4 is not None and int(cidr4) > 32) or (cidr6 is not None and int(cidr6) > 128):
            raise _PermError(f"invalid prefix length in {word!r}")
        domain = None
        if spec:
            if not spec.startswith(":") or not _valid_domain_spec(spec[1:]):
                raise _PermError(f"invalid term {word!r}")
            domain = spec[1:]
            _check_macros(domain)
        return _Term(
            qualifier,
            name,
            domain,
            int(cidr4) if cidr4 is not None else None,
            int(cidr6) if cidr6 is not None else None,
        )
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _PermError(f"invalid term {word!r}")
        address, slash, prefix = rest[1:].partition("/")
        try:
            ip = ipaddress.IPv4Address(address) if name == "ip4" else ipaddress.IPv6Address(address)
        except ValueError:
            raise _PermError(f"invalid address in {word!r}") from None
        bits: int = ip.max_prefixlen
        if slash:
            if not re.fullmatch(r"0|[1-9][0-9]{0,2}", prefix) or int(prefix) > bits:
                raise _PermError(f"invalid prefix length in {word!r}")
            bits = int(prefix)
        network = ipaddress.ip_network((ip, bits), strict=False)
        return _Term(qualifier, name, None, network=network)
    raise _PermError(f"unknown mechanism {name!r}")


def _select(records: tuple[bytes, ...]) -> str | None:
    """RFC 7208 4.5: the one record starting ``v=spf1`` (then a space or its end)."""
    found = [r for r in records if r[:6].lower() == b"v=spf1" and r[6:7] in (b"", b" ")]
    if not found:
        return None
    if len(found) > 1:
        raise _PermError("more than one v=spf1 record (RFC 7208 4.5)")
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise _PermError("non-ASCII characters in the record (RFC 7208 3.1)") from None


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
            raise _PermError(f"more than {MAX_LOOKUPS} DNS-querying terms (RFC 7208 4.6.4)")

    def _void(self) -> None:
        self.void += 1
        if self.void > MAX_VOID:
            raise _PermError(f"more than {MAX_VOID} void lookups (RFC 7208 4.6.4)")

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
        text = _select(records)
        if text is None:
            return "none", f"no SPF record for {domain}", None
        record = _parse(text)
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
                raise _PermError(f"redirect to {target}, which has no SPF record")
            return result, reason, explanation
        return "neutral", f"{domain}: no mechanism matched", None

    async def _matches(self, term: _Term, domain: str) -> bool:
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
                raise _PermError(f"include:{target} has no SPF record (RFC 7208 5.2)")
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
                raise _PermError(f"{target}: more than {MAX_NAMES} MX records (RFC 7208 4.6.4)")
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
            _check_macros(text, exp=True)
            return await self._expand(text, domain, exp=True, truncate=False)
        except (DNSError, _PermError, _TempError, UnicodeDecodeError):
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
        raise _PermError(f"invalid macro letter {letter!r}")

    async def _expand(
        self, spec: str, domain: str, *, exp: bool = False, truncate: bool = True
    ) -> str:
        """RFC 7208 7.3 (and 7.4 for the explanation's letters)."""
        out: list[str] = []
        position = 0
        for match in _MACRO.finditer(spec):
            out.append(spec[position : match.start()])
            position = match.end()
            letter, digits, reverse, delimiters, other = match.groups()
            if letter is None:
                out.append({"%": "%", "_": " ", "-": "%20"}[other])
                continue
            if letter.lower() in "crt" and not exp:
                raise _PermError(f"macro {letter!r} outside exp= (RFC 7208 7.2)")
            value = await self._macro_value(letter.lower(), domain)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            value = ".".join(parts)
            if letter.isupper():
                value = urllib.parse.quote(value, safe=_UNRESERVED)
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
    except _PermError as exc:
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
