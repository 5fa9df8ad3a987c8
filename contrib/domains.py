"""Recipient and sender domain filters: which domains this server takes mail for, and from.

Both match domains against a list of patterns:

- ``example.com`` matches exactly that domain;
- ``*.example.com`` matches every subdomain (``mx.example.com``, ``a.b.example.com``) but not
  ``example.com`` itself, as Postfix's parent-domain matching does: list both to take both;
- ``[192.0.2.1]``, ``[IPv6:2001:db8::1]`` match that address literal (RFC 5321 4.1.3); an
  address literal matches nothing else, so literals are refused unless listed.

Matching ignores case and a trailing dot; internationalised names are compared in their
ASCII (IDNA) form, so ``bücher.example`` and ``xn--bcher-kva.example`` are the same domain.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable

import attrs

from minismtp.events import Event, Handler, Mail, Rcpt
from minismtp.types import Address, Reply

__all__ = ["DomainList", "RecipientDomainFilter", "SenderDomainFilter"]

log = logging.getLogger("minismtp.contrib.domains")

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(550, "5.7.1", "Sender address rejected: domain not accepted")

#: In a sender pattern list, the null reverse-path (bounces, RFC 5321 4.5.5).
NULL_SENDER = "<>"


@functools.lru_cache(maxsize=4096)  # every RCPT asks, mostly about the same few domains
def canonical_domain(domain: str) -> str:
    """``domain`` as compared: lower case, no trailing dot, IDNA A-labels, literals normalised."""
    domain = domain.strip()
    if domain.startswith("[") and domain.endswith("]"):
        return _canonical_literal(domain[1:-1])
    domain = domain.rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a valid IDN: compared as written, so it matches only itself
    return domain


def _canonical_literal(inner: str) -> str:
    tag, colon, rest = inner.partition(":")
    try:
        if not colon:
            return f"[{ipaddress.IPv4Address(inner)}]"
        if tag.lower() == "ipv6":
            return f"[ipv6:{ipaddress.IPv6Address(rest)}]"
    except ValueError:
        pass
    return f"[{inner.lower()}]"


@attrs.frozen
class DomainList:
    """A set of domain patterns (see the module docstring); ``domain in domains``."""

    exact: frozenset[str] = frozenset()
    parents: frozenset[str] = frozenset()  # "*.example.com" kept as "example.com"

    @classmethod
    def of(cls, patterns: Iterable[str]) -> DomainList:
        if isinstance(patterns, str):
            raise TypeError("give a list of domains, not one string")
        exact: set[str] = set()
        parents: set[str] = set()
        for pattern in patterns:
            if pattern.startswith("*."):
                parent = canonical_domain(pattern[2:])
                if not parent or "*" in parent or parent.startswith("["):
                    raise ValueError(f"not a domain pattern: {pattern!r}")
                parents.add(parent)
            else:
                domain = canonical_domain(pattern)
                if not domain or "*" in domain:
                    raise ValueError(f"not a domain pattern: {pattern!r} (use '*.example.com')")
                exact.add(domain)
        return cls(frozenset(exact), frozenset(parents))

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str) or not domain:
            return False
        domain = canonical_domain(domain)
        if domain in self.exact:
            return True
        if domain.startswith("["):
            return False
        # Walk up the parents: a.b.example.com -> b.example.com -> example.com -> com.
        dot = domain.find(".")
        while dot >= 0:
            parent = domain[dot + 1 :]
            if parent in self.parents:
                return True
            dot = domain.find(".", dot + 1)
        return False


class RecipientDomainFilter:
    """Accept recipients in ``domains`` only: this server is the MX of those, not a relay.

    Acts at **rcpt**: a recipient whose domain matches none of ``domains`` gets
    ``550 5.7.1 Relay access denied``; the others go on down the stack. ``<postmaster>``
    without a domain is always accepted: RFC 5321 4.5.1 requires every SMTP server to take
    it. Patterns as in the module docstring (``*.example.com`` is subdomains only).
    """

    acts_on = (Rcpt,)

    def __init__(self, app: Handler, *, domains: Iterable[str]) -> None:
        self.app = app
        self.domains = DomainList.of(domains)

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Rcpt):
            domain = event.address.domain
            if domain and domain not in self.domains:
                log.debug("session %s: relay to <%s> denied", event.session.id, event.address)
                return RELAY_DENIED
        return await self.app(event)


class SenderDomainFilter:
    """Refuse senders by domain: those in ``deny``, and, given ``allow``, those not in it.

    Acts at **mail**: a refused sender gets ``550 5.7.1 Sender address rejected: domain not
    accepted``. ``deny`` wins over ``allow``. The null sender ``<>`` (bounces and other
    delivery notifications, RFC 5321 4.5.5, which a server must not refuse for being null)
    stays acceptable whatever ``allow`` says; to refuse it anyway, put ``"<>"`` in ``deny``.
    Patterns as in the module docstring.
    """

    acts_on = (Mail,)

    def __init__(
        self,
        app: Handler,
        *,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        deny = list(deny or ())
        self.deny_null = NULL_SENDER in deny
        self.deny = DomainList.of(p for p in deny if p != NULL_SENDER)
        self.allow = (
            DomainList.of(p for p in allow if p != NULL_SENDER) if allow is not None else None
        )

    def refuses(self, sender: Address) -> bool:
        if sender.is_null:
            return self.deny_null
        if sender.domain in self.deny:
            return True
        return self.allow is not None and sender.domain not in self.allow

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Mail) and self.refuses(event.address):
            log.debug("session %s: sender <%s> denied", event.session.id, event.address)
            return SENDER_DENIED
        return await self.app(event)
