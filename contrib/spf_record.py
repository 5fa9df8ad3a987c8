"""The SPF record's syntax (RFC 7208 4.5, 4.6, 5, 6 and 7.1): which TXT record is the SPF
record, its terms parsed, and its macro-strings checked before any lookup. Every error here
is a permerror (:class:`PermError`); evaluating the record is :mod:`minismtp.contrib.spf`'s.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import attrs

SPFVerdict = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]


class PermError(Exception):
    pass


_QUALIFIERS: dict[str, SPFVerdict] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)", re.S)
_DIRECTIVE = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9._-]*)(.*)", re.S)
_CIDR = re.compile(r"(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?\Z")
_TOPLABEL = re.compile(
    r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?\Z"
)
_MACRO_END = re.compile(r"(?:%\{[A-Za-z][0-9]*r?[.+,/_=-]*\}|%%|%_|%-)\Z", re.I)
MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)(r?)([.+,/_=-]*)\}|(.)|\Z)", re.I | re.S)
UNRESERVED = "-._~"  # RFC 3986 2.3, kept by URL escaping of upper-case macros (RFC 7208 7.3)


@attrs.frozen
class Term:
    qualifier: SPFVerdict
    name: str  # mechanism, lower case
    domain: str | None  # domain-spec, unexpanded
    cidr4: int | None = None
    cidr6: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@attrs.frozen
class Record:
    terms: tuple[Term, ...]
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


def check_macros(spec: str, *, exp: bool = False) -> None:
    """Syntax of a macro-string (RFC 7208 7.1), before any lookup: errors are permerror."""
    for match in MACRO.finditer(spec):
        letter, digits, _, _, other = match.groups()
        if letter is None:
            if other is None or other not in "%_-":
                raise PermError(f"invalid macro in {spec!r}")
            continue
        if letter.lower() not in "slodiphv" + ("crt" if exp else ""):
            raise PermError(f"invalid macro letter {letter!r}")
        if digits and int(digits) == 0:
            raise PermError("macro transformer 0")


def parse_record(text: str) -> Record:
    terms: list[Term] = []
    redirect = exp = None
    for word in text.split(" ")[1:]:
        if not word:
            continue
        modifier = _MODIFIER.fullmatch(word)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            check_macros(value, exp=False)
            if name in ("redirect", "exp"):
                if not _valid_domain_spec(value):
                    raise PermError(f"invalid domain in {word!r}")
                if (redirect if name == "redirect" else exp) is not None:
                    raise PermError(f"more than one {name}= (RFC 7208 6)")
                if name == "redirect":
                    redirect = value
                else:
                    exp = value
            continue
        directive = _DIRECTIVE.fullmatch(word)
        if directive is None:
            raise PermError(f"unknown term {word!r}")
        terms.append(_parse_mechanism(directive, word))
    return Record(tuple(terms), redirect, exp)


def _parse_mechanism(directive: re.Match[str], word: str) -> Term:
    qualifier = _QUALIFIERS[directive.group(1) or "+"]
    name, rest = directive.group(2).lower(), directive.group(3)
    if name == "all":
        if rest:
            raise PermError(f"invalid term {word!r}")
        return Term(qualifier, name, None)
    if name in ("include", "exists", "ptr"):
        if name == "ptr" and not rest:
            return Term(qualifier, name, None)
        if not rest.startswith(":") or not _valid_domain_spec(rest[1:]):
            raise PermError(f"invalid term {word!r}")
        check_macros(rest[1:])
        return Term(qualifier, name, rest[1:])
    if name in ("a", "mx"):
        cidr = _CIDR.search(rest)
        if cidr is None:
            raise PermError(f"invalid term {word!r}")
        spec = rest[: cidr.start()]
        cidr4, cidr6 = cidr.groups()
        if (cidr4 is not None and int(cidr4) > 32) or (cidr6 is not None and int(cidr6) > 128):
            raise PermError(f"invalid prefix length in {word!r}")
        domain = None
        if spec:
            if not spec.startswith(":") or not _valid_domain_spec(spec[1:]):
                raise PermError(f"invalid term {word!r}")
            domain = spec[1:]
            check_macros(domain)
        return Term(
            qualifier,
            name,
            domain,
            int(cidr4) if cidr4 is not None else None,
            int(cidr6) if cidr6 is not None else None,
        )
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise PermError(f"invalid term {word!r}")
        address, slash, prefix = rest[1:].partition("/")
        try:
            ip = ipaddress.IPv4Address(address) if name == "ip4" else ipaddress.IPv6Address(address)
        except ValueError:
            raise PermError(f"invalid address in {word!r}") from None
        bits: int = ip.max_prefixlen
        if slash:
            if not re.fullmatch(r"0|[1-9][0-9]{0,2}", prefix) or int(prefix) > bits:
                raise PermError(f"invalid prefix length in {word!r}")
            bits = int(prefix)
        network = ipaddress.ip_network((ip, bits), strict=False)
        return Term(qualifier, name, None, network=network)
    raise PermError(f"unknown mechanism {name!r}")


def select_record(records: tuple[bytes, ...]) -> str | None:
    """RFC 7208 4.5: the one record starting ``v=spf1`` (then a space or its end)."""
    found = [r for r in records if r[:6].lower() == b"v=spf1" and r[6:7] in (b"", b" ")]
    if not found:
        return None
    if len(found) > 1:
        raise PermError("more than one v=spf1 record (RFC 7208 4.5)")
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise PermError("non-ASCII characters in the record (RFC 7208 3.1)") from None
