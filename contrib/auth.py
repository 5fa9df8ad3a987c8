"""Sender authentication in one middleware: SPF, DKIM, ARC, DMARC and one
``Authentication-Results:`` header (RFC 8601).

::

    from minismtp.contrib.auth import Authenticate

    app.add_middleware(Authenticate)

At MAIL the sender's SPF is checked; at the end of data the DKIM signatures and the ARC chain
are verified and DMARC evaluated; then any ``Authentication-Results:`` header already in the
message that claims our authserv-id is removed (RFC 8601 5: a forgery could make our own
downstream filters trust it) and ours is prepended::

    Authentication-Results: mx.example.net;
        spf=pass smtp.mailfrom=alice@example.com;
        dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b=Vx3mUJ2p;
        arc=none;
        dmarc=pass (p=reject) header.from=example.com

The results are on the transaction for hooks: :func:`auth_results`. Nothing is refused by
default; the switches, each with its RFC 7372 code: ``reject_spf_fail`` (``550 5.7.23`` at
MAIL), ``reject_spf_temperror`` (``451 4.7.24`` at MAIL), ``reject_dmarc`` (``550 5.7.1``
at the end of data, for a DMARC ``fail`` whose domain asks for ``p=reject``).
"""

from __future__ import annotations

import logging
import random
import re
import weakref
from collections.abc import Callable

import attrs

from minismtp.dns import Resolver, default_resolver
from minismtp.events import Data, Event, Handler, Mail
from minismtp.types import Reply, Transaction

from .dkim import (
    MAX_SIZE,
    ARCResult,
    DKIMResult,
    dkimpy,
    message_source,
    record_results,
    verify_message,
)
from .dmarc import (
    REJECTED,
    DMARCResult,
    evaluate_dmarc,
    message_from_domain,
    public_suffix_list,
    record_dmarc_result,
)
from .spf import SPFResult, check_sender, printable, record_spf_result, spf_result

__all__ = [
    "Authenticate",
    "AuthenticationResults",
    "auth_results",
    "authserv_id_of",
    "format_authentication_results",
]

log = logging.getLogger("minismtp.contrib.auth")

HEADER = "Authentication-Results"
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_TOKEN = re.compile(r"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f-\xff]+")


@attrs.frozen
class AuthenticationResults:
    """What :class:`Authenticate` found for one transaction (None: not checked), and the
    ``Authentication-Results:`` value it prepended."""

    spf: SPFResult | None = None
    dkim: DKIMResult | None = None
    arc: ARCResult | None = None
    dmarc: DMARCResult | None = None
    header: str | None = None


def _quote(text: str) -> str:
    """An RFC 8601 ``value``: a token as is, anything else as a quoted-string."""
    text = printable(text)
    if _TOKEN.fullmatch(text):
        return text
    # No quoted-pairs: parsers differ on unescaping them, and a reason loses nothing without.
    return '"' + text.replace("\\", "/").replace('"', "'") + '"'


def _reason(reason: str) -> str:
    return f" reason={_quote(reason)}" if reason else ""


def _spf_part(spf: SPFResult) -> str:
    if spf.identity == "helo":
        return f"spf={spf.result}{_reason(_spf_reason(spf))} smtp.helo={_quote(spf.domain)}"
    local, _, domain = spf.sender.rpartition("@")
    # RFC 8601 2.3: a local-part that is no dot-atom would need quoting; the domain is enough.
    if _DOT_ATOM.fullmatch(local) and _TOKEN.fullmatch(domain):
        mailfrom = spf.sender  # a pvalue may be local-part@domain unquoted
    else:
        mailfrom = _quote(domain)
    return f"spf={spf.result}{_reason(_spf_reason(spf))} smtp.mailfrom={mailfrom}"


def _spf_reason(spf: SPFResult) -> str:
    return spf.reason if spf.result in ("permerror", "temperror") else ""


def _dkim_parts(dkim: DKIMResult) -> list[str]:
    if not dkim.signatures:
        return ["dkim=none"]
    parts = []
    for s in dkim.signatures:
        part = f"dkim={s.result}{_reason(s.reason)} header.d={_quote(s.domain)}"
        if s.selector:
            part += f" header.s={_quote(s.selector)}"
        if s.algorithm:
            part += f" header.a={_quote(s.algorithm)}"
        if s.b:
            part += f" header.b={_quote(s.b)}"
        parts.append(part)
    return parts


def _dmarc_part(dmarc: DMARCResult) -> str:
    comment = ""
    if dmarc.policy is not None:
        comment = f" (p={dmarc.policy}"
        if dmarc.result == "fail" and dmarc.disposition != dmarc.policy:
            comment += f" dis={dmarc.disposition}"
        comment += ")"
    reason = dmarc.reason if dmarc.result in ("permerror", "temperror") else ""
    part = f"dmarc={dmarc.result}{comment}{_reason(reason)}"
    if dmarc.from_domain:
        part += f" header.from={_quote(dmarc.from_domain)}"
    return part


def format_authentication_results(
    authserv_id: str,
    *,
    spf: SPFResult | None = None,
    dkim: DKIMResult | None = None,
    arc: ARCResult | None = None,
    dmarc: DMARCResult | None = None,
    fold: str = "\r\n\t",
) -> str:
    """The value of an ``Authentication-Results:`` header (RFC 8601 2.2), one result per
    folded line (``fold=" "`` for a single line); ``none`` when nothing was checked."""
    parts: list[str] = []
    if spf is not None:
        parts.append(_spf_part(spf))
    if dkim is not None:
        parts.extend(_dkim_parts(dkim))
    if arc is not None:
        parts.append(f"arc={arc.result}")
    if dmarc is not None:
        parts.append(_dmarc_part(dmarc))
    if not parts:
        return f"{authserv_id}; none"
    return f"{authserv_id};{fold}" + f";{fold}".join(parts)


def authserv_id_of(value: str) -> str | None:
    """The authserv-id an ``Authentication-Results:`` value starts with (RFC 8601 2.2),
    comments skipped; None if there is none."""
    text = value.strip()
    while text.startswith("("):  # a comment (nested ones included) before the id
        depth, end = 0, len(text)
        for index, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                end = index
                break
        text = text[end + 1 :].strip()
    match = re.match(r'"((?:[^"\\]|\\.)*)"|([^\s;()]+)', text)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def claims(authserv_id: str) -> Callable[[str, str], bool]:
    """A ``drop_headers`` predicate: an ``Authentication-Results:`` field claiming
    ``authserv_id`` (case-insensitively, RFC 8601 5)."""
    ours = authserv_id.lower()

    def predicate(name: str, value: str) -> bool:
        if name.lower() != HEADER.lower():
            return False
        found = authserv_id_of(re.sub(r"\r?\n[ \t]", " ", value))
        return found is not None and found.lower() == ours

    return predicate


_results: weakref.WeakKeyDictionary[Transaction, AuthenticationResults] = (
    weakref.WeakKeyDictionary()
)


def auth_results(transaction: Transaction) -> AuthenticationResults | None:
    """What :class:`Authenticate` found for ``transaction`` (None if it did not run).

    At MAIL and RCPT only ``spf`` is set; from the end of data on, all of them."""
    return _results.get(transaction)


class Authenticate:
    """SPF at MAIL; DKIM, ARC, DMARC and the ``Authentication-Results:`` header at the end of
    data (see the module docstring).

    Options: ``authserv_id`` (default: the server's hostname), ``resolver`` (default:
    :func:`minismtp.dns.default_resolver`), ``reject_spf_fail``, ``reject_spf_temperror``,
    ``reject_dmarc`` (all False), ``arc`` (verify ARC, default True), ``dkim_max_size``
    (octets; larger messages get ``dkim=policy``, default 16 MiB), ``dkim_minkey`` (RSA
    bits, default 1024), ``spf_timeout`` (seconds for one SPF evaluation, default 20).
    """

    acts_on = (Mail, Data)

    def __init__(
        self,
        app: Handler,
        *,
        authserv_id: str | None = None,
        resolver: Resolver | None = None,
        reject_spf_fail: bool = False,
        reject_spf_temperror: bool = False,
        reject_dmarc: bool = False,
        arc: bool = True,
        dkim_max_size: int = MAX_SIZE,
        dkim_minkey: int = 1024,
        spf_timeout: float = 20.0,
        sample: Callable[[], float] = random.random,
    ) -> None:
        dkimpy()
        public_suffix_list()
        self.app = app
        self.authserv_id = authserv_id
        self.resolver = resolver
        self.reject_spf_fail = reject_spf_fail
        self.reject_spf_temperror = reject_spf_temperror
        self.reject_dmarc = reject_dmarc
        self.arc = arc
        self.dkim_max_size = dkim_max_size
        self.dkim_minkey = dkim_minkey
        self.spf_timeout = spf_timeout
        self.sample = sample

    async def _spf(self, event: Mail | Data) -> SPFResult:
        session = event.session
        result = await check_sender(
            session.peer_host,
            str(event.transaction.mail_from),
            session.helo_name or "",
            resolver=self.resolver or default_resolver(),
            receiver=session.hostname,
            time_limit=self.spf_timeout,
        )
        record_spf_result(event.transaction, result)
        return result

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Mail):
            spf = await self._spf(event)
            _results[event.transaction] = AuthenticationResults(spf=spf)
            if spf.result == "fail" and self.reject_spf_fail:
                text = spf.explanation or f"SPF check failed for {spf.domain}"
                return Reply(550, "5.7.23", printable(text))
            if spf.result == "temperror" and self.reject_spf_temperror:
                return Reply(451, "4.7.24", f"Temporary SPF error for {spf.domain}")
        elif isinstance(event, Data):
            results = await self.authenticate(event)
            dmarc = results.dmarc
            if (
                self.reject_dmarc
                and dmarc is not None
                and dmarc.result == "fail"
                and dmarc.disposition == "reject"
            ):
                return REJECTED
        return await self.app(event)

    async def authenticate(self, event: Data) -> AuthenticationResults:
        """Everything done at the end of data, the header included; the results, recorded."""
        transaction = event.transaction
        resolver = self.resolver or default_resolver()
        spf = spf_result(transaction) or await self._spf(event)
        dkim, arc = await verify_message(
            message_source(event),
            resolver=resolver,
            arc=self.arc,
            max_size=self.dkim_max_size,
            minkey=self.dkim_minkey,
        )
        record_results(transaction, dkim, arc)
        domain, why = message_from_domain(event)
        dmarc = await evaluate_dmarc(
            domain, spf, dkim, resolver=resolver, sample=self.sample, no_domain_reason=why
        )
        record_dmarc_result(transaction, dmarc)
        authserv_id = self.authserv_id or event.session.hostname
        header = format_authentication_results(
            authserv_id, spf=spf, dkim=dkim, arc=arc, dmarc=dmarc
        )
        message = event.message
        dropped = message.drop_headers(claims(authserv_id))
        if dropped:
            log.info(
                "session %s: removed %d Authentication-Results header(s) claiming %s",
                event.session.id,
                dropped,
                authserv_id,
            )
        message.prepend_header(HEADER, header)
        results = AuthenticationResults(spf, dkim, arc, dmarc, header)
        _results[transaction] = results
        return results
