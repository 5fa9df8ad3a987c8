"""DMARC (RFC 7489): does an authenticated domain align with the ``From:`` domain?

:func:`evaluate_dmarc` is the pure unit: the policy record of the ``From:`` domain (or of its
organizational domain, RFC 7489 6.6.3), then identifier alignment (3.1) of the SPF result
and of each passing DKIM signature, relaxed or strict as the record says. The organizational
domain comes from the Public Suffix List, through the ``publicsuffixlist`` package.

:class:`DMARC` is the middleware: at the end of data it evaluates the message with the SPF
and DKIM results already recorded for the transaction (it checks them itself when they are
not) and records a :class:`DMARCResult` (:func:`dmarc_result`). Refusing is opt-in:
``reject=True`` answers ``550 5.7.1`` to a message failing DMARC whose domain asks for
``p=reject`` (after ``pct=`` sampling).
"""

from __future__ import annotations

import email.utils
import logging
import random
import weakref
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Literal

import attrs

from minismtp.dns import NoData, NXDomain, Resolver, TempError, default_resolver, missing_extra
from minismtp.events import Data, Event, Handler
from minismtp.types import Reply, Transaction

from .dkim import DKIMResult, dkim_result, message_source, record_results, verify_message
from .spf import SPFResult, check_sender, record_spf_result, spf_result

__all__ = [
    "DMARC",
    "DMARCRecord",
    "DMARCResult",
    "aligned",
    "dmarc_result",
    "evaluate_dmarc",
    "from_domain",
    "organizational_domain",
    "parse_record",
]

log = logging.getLogger("minismtp.contrib.dmarc")

DMARCVerdict = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]
REJECTED = Reply(550, "5.7.1", "Email rejected per DMARC policy")


@lru_cache(maxsize=1)
def public_suffix_list() -> Any:
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:
        raise missing_extra("publicsuffixlist", "DMARC") from None
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (``a.b.example.co.uk`` ->
    ``example.co.uk``); a public suffix itself is its own organizational domain."""
    domain = domain.rstrip(".").lower()
    found: str | None = public_suffix_list().privatesuffix(domain)
    return found or domain


def aligned(a: str, b: str, mode: Literal["r", "s"]) -> bool:
    """RFC 7489 3.1: strict is the same domain; relaxed the same organizational domain."""
    a, b = a.rstrip(".").lower(), b.rstrip(".").lower()
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


@attrs.frozen
class DMARCRecord:
    """The tags of a ``v=DMARC1`` record that a receiver acts on (RFC 7489 6.3)."""

    p: Policy
    sp: Policy | None = None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100


_POLICIES: dict[str, Policy] = {"none": "none", "quarantine": "quarantine", "reject": "reject"}
_MODES: dict[str, Literal["r", "s"]] = {"r": "r", "s": "s"}


def parse_record(text: str) -> DMARCRecord | None:
    """A DMARC record, or None if ``text`` is not a usable one (RFC 7489 6.6.3)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    p = _POLICIES.get(tags.get("p", "").lower())
    if p is None:
        # 6.6.3: an invalid or missing p= with a valid rua= is p=none; without one, no record.
        if "rua" not in tags:
            return None
        p = "none"
    try:
        pct = min(max(int(tags.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    return DMARCRecord(
        p,
        _POLICIES.get(tags.get("sp", "").lower()),
        _MODES.get(tags.get("adkim", "r").lower(), "r"),
        _MODES.get(tags.get("aspf", "r").lower(), "r"),
        pct,
    )


@attrs.frozen
class DMARCResult:
    """The DMARC evaluation of a message.

    ``policy`` is the policy the domain asks for (``sp=`` for a subdomain), ``disposition``
    what it comes to after ``pct=`` sampling (``none`` for a pass); both None without a record.
    """

    result: DMARCVerdict
    from_domain: str | None
    policy: Policy | None = None
    disposition: Policy | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""


def from_domain(values: Iterable[str]) -> tuple[str | None, str]:
    """The RFC5322.From domain of a message from its ``From:`` field values, or None and why
    not (RFC 7489 6.6.1: no usable From, or several with different domains)."""
    values = list(values)
    if not values:
        return None, "no From header"
    domains = set()
    for _, address in email.utils.getaddresses(values):
        _, at, domain = address.rpartition("@")
        if at and domain:
            domains.add(domain.rstrip(".").lower())
    if not domains:
        return None, "no domain in From"
    if len(domains) > 1:
        return None, "From addresses of several domains"
    return domains.pop(), ""


async def _record(name: str, resolver: Resolver) -> DMARCRecord | None:
    try:
        records = await resolver.txt(f"_dmarc.{name}")
    except (NXDomain, NoData):
        return None
    texts = [r.decode("utf-8", "replace") for r in records]
    found = [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")]
    if len(found) != 1:
        return None  # 6.6.3: several records is no record
    return parse_record(found[0])


async def evaluate_dmarc(
    domain: str | None,
    spf: SPFResult | None,
    dkim: DKIMResult | None,
    *,
    resolver: Resolver | None = None,
    sample: Callable[[], float] = random.random,
    no_domain_reason: str = "no From domain",
) -> DMARCResult:
    """RFC 7489 6.6: DMARC for a message from ``domain`` (its ``From:`` domain, see
    :func:`from_domain`) given its SPF and DKIM results. ``sample`` draws in [0, 1) for
    ``pct=``. DNS errors are results (``temperror``), never raised."""
    if domain is None:
        return DMARCResult("permerror", None, reason=no_domain_reason)
    resolver = resolver or default_resolver()
    organizational = organizational_domain(domain)
    try:
        record = await _record(domain, resolver)
        subdomain_policy = False
        if record is None and organizational != domain:
            record = await _record(organizational, resolver)
            subdomain_policy = True
    except TempError as exc:
        return DMARCResult("temperror", domain, reason=str(exc))
    if record is None:
        return DMARCResult("none", domain, reason="no DMARC record")
    spf_ok = spf is not None and spf.result == "pass" and aligned(spf.domain, domain, record.aspf)
    dkim_domains = dkim.passing_domains() if dkim is not None else ()
    dkim_ok = any(aligned(d, domain, record.adkim) for d in dkim_domains)
    policy = record.sp if subdomain_policy and record.sp is not None else record.p
    if spf_ok or dkim_ok:
        return DMARCResult("pass", domain, policy, "none", spf_ok, dkim_ok)
    disposition: Policy = policy
    if record.pct < 100 and sample() * 100 >= record.pct:
        # 6.6.4: a message outside the sample gets the next less strict policy.
        disposition = "quarantine" if policy == "reject" else "none"
    return DMARCResult("fail", domain, policy, disposition, reason="no aligned identifier")


_results: weakref.WeakKeyDictionary[Transaction, DMARCResult] = weakref.WeakKeyDictionary()


def dmarc_result(transaction: Transaction) -> DMARCResult | None:
    """The DMARC result recorded for ``transaction`` (None if it was not checked)."""
    return _results.get(transaction)


def record_dmarc_result(transaction: Transaction, result: DMARCResult) -> None:
    _results[transaction] = result


def message_from_domain(event: Data) -> tuple[str | None, str]:
    """The From domain of the message at the Data stage (its parsed header section)."""
    headers = event.message.headers
    # The raw field values: the email package's structured address parsing (headerregistry)
    # costs more than the rest of the DMARC evaluation; email.utils.getaddresses suffices.
    values = [value for name, value in headers.raw_items() if name.lower() == "from"]
    return from_domain(values)


class DMARC:
    """Evaluate DMARC at the end of data and record the result (:func:`dmarc_result`).

    It uses the results of :class:`~minismtp.contrib.spf.SPF` and
    :class:`~minismtp.contrib.dkim.DKIM` when they ran on the transaction, and checks them
    itself otherwise. ``reject=True``: a message failing DMARC whose disposition is
    ``reject`` gets ``550 5.7.1`` (RFC 7489 6.6.4, RFC 7372); by default nothing is refused.
    """

    acts_on = (Data,)

    def __init__(
        self,
        app: Handler,
        *,
        resolver: Resolver | None = None,
        reject: bool = False,
        sample: Callable[[], float] = random.random,
    ) -> None:
        public_suffix_list()
        self.app = app
        self.resolver = resolver
        self.reject = reject
        self.sample = sample

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Data):
            result = await evaluate_transaction(event, self.resolver, self.sample)
            if self.reject and result.result == "fail" and result.disposition == "reject":
                return REJECTED
        return await self.app(event)


async def evaluate_transaction(
    event: Data, resolver: Resolver | None, sample: Callable[[], float] = random.random
) -> DMARCResult:
    """DMARC for the message of ``event``, checking SPF and DKIM first if nobody did."""
    transaction = event.transaction
    spf = spf_result(transaction)
    if spf is None:
        session = event.session
        spf = await check_sender(
            session.peer_host,
            str(transaction.mail_from),
            session.helo_name or "",
            resolver=resolver,
            receiver=session.hostname,
        )
        record_spf_result(transaction, spf)
    dkim = dkim_result(transaction)
    if dkim is None:
        dkim, arc = await verify_message(message_source(event), resolver=resolver)
        record_results(transaction, dkim, arc)
    domain, why = message_from_domain(event)
    result = await evaluate_dmarc(
        domain, spf, dkim, resolver=resolver, sample=sample, no_domain_reason=why
    )
    record_dmarc_result(transaction, result)
    return result
