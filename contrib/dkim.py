"""DKIM (RFC 6376) and ARC (RFC 8617) verification, with dkimpy, over our Resolver.

The cryptography and the canonicalisation are dkimpy's (RSA and, with PyNaCl, Ed25519). What
this module adds:

- **keys through our Resolver.** The ``s._domainkey.d`` names of every signature are read from
  the header section first and fetched concurrently through a
  :class:`~minismtp.dns.Resolver` (so the lookups run on the event loop, with its timeout and
  cache, on asyncio and trio alike); dkimpy's ``dnsfunc`` then only reads what was fetched.
  This is also how a DNS timeout becomes ``temperror`` (RFC 6376 6.1.2) and a missing key
  ``permerror``, where dkimpy alone would only say "not valid".
- **the CPU work in a worker thread** (:func:`anyio.to_thread.run_sync`): hashing a large body
  never blocks the loop.
- **a size cap.** dkimpy verifies a message held whole in memory (and canonicalises copies of
  it), so messages larger than ``max_size`` octets (16 MiB by default) are not verified:
  their signatures get ``policy`` with the reason. The message is read from its file (or
  bytes) inside the worker thread, never on the loop.

:func:`verify_dkim` and :func:`verify_arc` are the pure units; :class:`DKIM` is the middleware
that runs both at the end of data and records the results (:func:`dkim_result`).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread
import attrs

from minismtp.dns import NoData, NXDomain, Resolver, TempError, default_resolver, missing_extra
from minismtp.events import Data, Event, Handler
from minismtp.types import Reply, Transaction

__all__ = [
    "DKIM",
    "MAX_SIZE",
    "ARCResult",
    "DKIMResult",
    "DKIMSignature",
    "arc_result",
    "dkim_result",
    "verify_arc",
    "verify_dkim",
    "verify_message",
]

log = logging.getLogger("minismtp.contrib.dkim")

MAX_SIZE = 16 * 1024 * 1024
MAX_SIGNATURES = 10
DKIMVerdict = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror"]
ARCVerdict = Literal["pass", "fail", "none"]
Source = bytes | Callable[[], IO[bytes]]

_SIGNATURE_HEADERS = (b"dkim-signature", b"arc-message-signature", b"arc-seal")
_HEADER = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*?)(?=\r?\n(?![ \t])|\Z)", re.S | re.M)


def dkimpy() -> Any:
    try:
        import dkim  # type: ignore[import-untyped]
    except ImportError:
        raise missing_extra("dkimpy", "DKIM and ARC verification") from None
    return dkim


@attrs.frozen
class DKIMSignature:
    """The result of one ``DKIM-Signature`` (RFC 8601 2.7.1).

    ``b`` is the start of the signature's ``b=`` value (enough to tell two signatures of the
    same domain apart, RFC 6008); ``reason`` says why a result is not ``pass``.
    """

    result: DKIMVerdict
    domain: str
    selector: str
    algorithm: str = ""
    identity: str | None = None
    b: str = ""
    reason: str = ""


@attrs.frozen
class DKIMResult:
    """Every DKIM signature of a message, top to bottom (empty: the message is not signed)."""

    signatures: tuple[DKIMSignature, ...] = ()

    @property
    def result(self) -> str:
        """``pass`` if any signature passes, else the first one's result; ``none`` unsigned."""
        if not self.signatures:
            return "none"
        if any(s.result == "pass" for s in self.signatures):
            return "pass"
        return self.signatures[0].result

    def passing_domains(self) -> tuple[str, ...]:
        return tuple(s.domain for s in self.signatures if s.result == "pass")


@attrs.frozen
class ARCResult:
    """The ARC chain's validation status (RFC 8617 4.2.1): ``pass``, ``fail`` or ``none``."""

    result: ARCVerdict
    reason: str = ""
    instances: int = 0
    #: The ``d=`` of each ARC-Seal, newest first.
    sealers: tuple[str, ...] = ()


if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:  # not subscriptable at run time before Python 3.11
    _Adapter = logging.LoggerAdapter


class _DkimpyLog(_Adapter):
    """dkimpy logs every signature that does not verify at ERROR: for a receiver that is an
    everyday result, reported in the header; kept at DEBUG here."""

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_dkimpy_log = _DkimpyLog(logging.getLogger("minismtp.contrib.dkim.dkimpy"), {})


def _read(source: Source, max_size: int) -> bytes | None:
    """The message, or None if it is larger than ``max_size`` (the caller then reads only
    its header section)."""
    if isinstance(source, bytes):
        return source if len(source) <= max_size else None
    with source() as f:
        data = f.read(max_size + 1)
    return data if len(data) <= max_size else None


def _read_headers(source: Source, limit: int = 1024 * 1024) -> bytes:
    """The header section (up to the first empty line), at most ``limit`` octets."""
    if isinstance(source, bytes):
        data = source[:limit]
    else:
        with source() as f:
            data = f.read(limit)
    end = re.search(rb"\r?\n\r?\n", data)
    return data[: end.start() + 2] if end else data


def _headers(section: bytes) -> list[tuple[bytes, bytes]]:
    end = re.search(rb"\r?\n\r?\n", section)
    if end:
        section = section[: end.start() + 2]
    return [(m.group(1), m.group(2)) for m in _HEADER.finditer(section)]


def _tags(value: bytes) -> dict[bytes, bytes]:
    tags: dict[bytes, bytes] = {}
    for spec in re.sub(rb"\s+", b"", value).split(b";"):
        key, eq, tag_value = spec.partition(b"=")
        if eq and key:
            tags.setdefault(key.lower(), tag_value)
    return tags


def _key_names(headers: Sequence[tuple[bytes, bytes]], max_signatures: int) -> set[str]:
    """The key names to fetch: those of the first ``max_signatures`` DKIM signatures and of
    the ARC sets, at most ``2 * max_signatures + 2`` names in all (a message must not make
    us send a thousand queries)."""
    names: set[str] = set()
    signatures = 0
    for name, value in headers:
        lowered = name.lower()
        if lowered not in _SIGNATURE_HEADERS:
            continue
        if lowered == b"dkim-signature":
            signatures += 1
            if signatures > max_signatures:
                continue
        tags = _tags(value)
        if b"s" in tags and b"d" in tags:
            names.add(_key_name(tags[b"s"], tags[b"d"]))
            if len(names) >= 2 * max_signatures + 2:
                break
    return names


def _key_name(selector: bytes, domain: bytes) -> str:
    return (selector + b"._domainkey." + domain).decode("ascii", "replace").rstrip(".").lower()


class _Timeout:
    pass


_TIMEOUT = _Timeout()
Keys = Mapping[str, "bytes | _Timeout | None"]


async def _fetch_keys(names: set[str], resolver: Resolver) -> dict[str, bytes | _Timeout | None]:
    keys: dict[str, bytes | _Timeout | None] = {}

    async def fetch(name: str) -> None:
        try:
            records = await resolver.txt(name)
        except (NXDomain, NoData):
            keys[name] = None
        except TempError:
            keys[name] = _TIMEOUT
        else:
            # RFC 6376 3.6.2.2: several records for one key name are undefined; use the first.
            keys[name] = records[0]

    async with anyio.create_task_group() as tg:
        for name in sorted(names):
            tg.start_soon(fetch, name)
    return keys


def _dnsfunc(keys: Keys) -> Callable[..., bytes | None]:
    dkim = dkimpy()

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        key = keys.get(name.decode("ascii", "replace").rstrip(".").lower())
        if isinstance(key, _Timeout):
            raise dkim.DnsTimeoutError(name)
        return key

    return lookup


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace")


def _verify_signatures(
    message: bytes | None,
    headers: list[tuple[bytes, bytes]],
    keys: Keys,
    minkey: int,
    max_size: int,
    max_signatures: int,
) -> tuple[DKIMSignature, ...]:
    """Runs in a worker thread: every DKIM-Signature of the message, top to bottom."""
    dkim = dkimpy()
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    results = []
    verifier = None
    for index, value in enumerate(signatures):
        tags = _tags(value)
        domain, selector = _text(tags.get(b"d")), _text(tags.get(b"s"))
        details: dict[str, Any] = {
            "domain": domain.lower(),
            "selector": selector,
            "algorithm": _text(tags.get(b"a")),
            "identity": _text(tags[b"i"]) if b"i" in tags else None,
            "b": _text(tags.get(b"b"))[:8],
        }
        if not domain or not selector:
            results.append(DKIMSignature("permerror", **details, reason="no d= or s= tag"))
            continue
        if index >= max_signatures:
            # RFC 6376 6.1: a verifier may limit the signatures it checks.
            reason = f"not verified: more than {max_signatures} signatures"
            results.append(DKIMSignature("policy", **details, reason=reason))
            continue
        key = keys.get(_key_name(tags[b"s"], tags[b"d"]))
        if isinstance(key, _Timeout):
            results.append(DKIMSignature("temperror", **details, reason="key lookup failed"))
            continue
        if key is None:
            results.append(DKIMSignature("permerror", **details, reason="no key for signature"))
            continue
        if message is None:
            reason = f"message larger than {max_size} octets not verified"
            results.append(DKIMSignature("policy", **details, reason=reason))
            continue
        try:
            if verifier is None:
                verifier = dkim.DKIM(message, logger=_dkimpy_log, minkey=minkey)
            valid = verifier.verify(idx=index, dnsfunc=_dnsfunc(keys))
        except dkim.ValidationError as exc:
            reason = str(exc)
            if reason.startswith("body hash mismatch"):
                reason = "body hash did not verify"
            results.append(DKIMSignature("fail", **details, reason=reason))
        except (dkim.KeyFormatError, dkim.UnknownKeyTypeError) as exc:
            results.append(DKIMSignature("permerror", **details, reason=f"bad key: {exc}"))
        except dkim.DKIMException as exc:
            results.append(DKIMSignature("permerror", **details, reason=str(exc)))
        except Exception as exc:  # dkimpy on malformed input: IndexError, ValueError...
            log.debug("dkimpy failed on signature %d", index, exc_info=True)
            reason = f"malformed signature ({type(exc).__name__})"
            results.append(DKIMSignature("permerror", **details, reason=reason))
        else:
            if valid:
                results.append(DKIMSignature("pass", **details))
            else:
                results.append(DKIMSignature("fail", **details, reason="signature did not verify"))
    return tuple(results)


def _verify_arc(message: bytes | None, keys: Keys, minkey: int) -> ARCResult:
    dkim = dkimpy()
    if message is None:
        return ARCResult("none", "message too large to verify")
    try:
        verdict, instances, reason = dkim.arc_verify(
            message, logger=_dkimpy_log, dnsfunc=_dnsfunc(keys), minkey=minkey
        )
    except Exception as exc:  # dkimpy on malformed input
        log.debug("dkimpy failed on the ARC chain", exc_info=True)
        return ARCResult("fail", f"malformed ARC set ({type(exc).__name__})")
    # dkimpy answers None for a chain that an earlier sealer already reported as failed
    # (cv=fail): RFC 8617 5.2 makes that chain fail for us too.
    result: ARCVerdict = "fail" if verdict is None else verdict.decode("ascii")
    sealers = tuple(_text(i.get("as-domain")) for i in instances)
    return ARCResult(result, reason, len(instances), sealers)


async def verify_message(
    source: Source,
    *,
    resolver: Resolver | None = None,
    arc: bool = True,
    max_size: int = MAX_SIZE,
    minkey: int = 1024,
    max_signatures: int = MAX_SIGNATURES,
) -> tuple[DKIMResult, ARCResult | None]:
    """DKIM (and ARC unless ``arc=False``) results of a message.

    ``source`` is the message as bytes, or a callable opening it as a binary file (called in
    the worker thread). Keys are fetched through ``resolver`` (default:
    :func:`~minismtp.dns.default_resolver`); RSA keys shorter than ``minkey`` bits fail.
    Signatures past the first ``max_signatures`` are reported ``policy``, not verified.
    """
    dkimpy()
    resolver = resolver or default_resolver()
    message = await anyio.to_thread.run_sync(_read, source, max_size)
    section = (
        message if message is not None else await anyio.to_thread.run_sync(_read_headers, source)
    )
    headers = _headers(section)
    names = _key_names(headers, max_signatures)
    if not names:
        arc_none = ARCResult("none", "not ARC signed") if arc else None
        return DKIMResult(), arc_none
    keys = await _fetch_keys(names, resolver)
    signatures = await anyio.to_thread.run_sync(
        _verify_signatures, message, headers, keys, minkey, max_size, max_signatures
    )
    arc_result_ = None
    if arc:
        if any(name.lower() == b"arc-seal" for name, _ in headers):
            arc_result_ = await anyio.to_thread.run_sync(_verify_arc, message, keys, minkey)
        else:
            arc_result_ = ARCResult("none", "not ARC signed")
    return DKIMResult(signatures), arc_result_


async def verify_dkim(source: Source, **options: Any) -> DKIMResult:
    """The DKIM results of a message (see :func:`verify_message` for the options)."""
    dkim_, _ = await verify_message(source, arc=False, **options)
    return dkim_


async def verify_arc(source: Source, **options: Any) -> ARCResult:
    """The ARC chain validation of a message (see :func:`verify_message`)."""
    _, arc_ = await verify_message(source, arc=True, **options)
    assert arc_ is not None
    return arc_


_dkim_results: weakref.WeakKeyDictionary[Transaction, DKIMResult] = weakref.WeakKeyDictionary()
_arc_results: weakref.WeakKeyDictionary[Transaction, ARCResult] = weakref.WeakKeyDictionary()


def dkim_result(transaction: Transaction) -> DKIMResult | None:
    """The DKIM result recorded for ``transaction`` (None if it was not checked)."""
    return _dkim_results.get(transaction)


def arc_result(transaction: Transaction) -> ARCResult | None:
    """The ARC result recorded for ``transaction`` (None if it was not checked)."""
    return _arc_results.get(transaction)


def record_results(transaction: Transaction, dkim_: DKIMResult, arc_: ARCResult | None) -> None:
    _dkim_results[transaction] = dkim_
    if arc_ is not None:
        _arc_results[transaction] = arc_


def message_source(event: Data) -> Source:
    """How the middleware read the message at the Data stage: the spool's ``open()``."""
    message = event.message
    opener: Callable[[], IO[bytes]] = message.open
    return opener


class DKIM:
    """Verify DKIM signatures (and the ARC chain) at the end of data; refuse nothing.

    Acts at **data**: the results are recorded for the transaction (:func:`dkim_result`,
    :func:`arc_result`) for hooks and for :class:`~minismtp.contrib.dmarc.DMARC`. Options:
    ``resolver``, ``arc`` (verify ARC too, default True), ``max_size`` (octets; larger
    messages are not verified, default 16 MiB), ``minkey`` (RSA bits, default 1024).
    """

    acts_on = (Data,)

    def __init__(
        self,
        app: Handler,
        *,
        resolver: Resolver | None = None,
        arc: bool = True,
        max_size: int = MAX_SIZE,
        minkey: int = 1024,
    ) -> None:
        dkimpy()
        self.app = app
        self.resolver = resolver
        self.arc = arc
        self.max_size = max_size
        self.minkey = minkey

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Data):
            dkim_, arc_ = await verify_message(
                message_source(event),
                resolver=self.resolver,
                arc=self.arc,
                max_size=self.max_size,
                minkey=self.minkey,
            )
            record_results(event.transaction, dkim_, arc_)
        return await self.app(event)
