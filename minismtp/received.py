"""The ``Received:`` trace header of RFC 5321 4.4, prepended to every accepted message.

Postfix's layout, one clause per line::

    Received: from client.example.org ([192.0.2.7])
    \tby mx.example.com with ESMTPS id 6123A4B5C6D7E1F2A3B4C
    \tfor <bob@example.com>; Tue, 05 Mar 2024 10:11:12 +0100

``for`` names the recipient only when there is exactly one, so that a message for several
people does not show each of them the others (RFC 5321 7.2).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time

from minismtp.types import Session, Transaction

# What a HELO name may be written as in the From-domain (a domain or an address literal, and
# the UTF-8 of RFC 6531). Anything else -- spaces, parentheses, semicolons -- would break the
# header's syntax, so such a name is written as "unknown".
_HELO_TOKEN = re.compile(r"[A-Za-z0-9.\-_:\[\]\u0080-\U0010ffff]+")
# What a socket path may show of itself in a comment: no parentheses, backslash or controls.
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9._/+=,:@~-]")


@functools.lru_cache(maxsize=4096)  # peers come back, and a lookup costs less than a parse
def address_literal(host: str) -> str | None:
    """``host`` as an RFC 5321 address literal (``[192.0.2.7]``, ``[IPv6:2001:db8::1]``)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


_date_cache: tuple[int, str] = (-1, "")
# RFC 5322 3.3: English names, whatever the locale (so not time.strftime's %a and %b).
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(when: float) -> str:
    """``when`` as an RFC 5322 date-time in local time; computed once per second."""
    global _date_cache
    second = int(when)
    cached_second, date = _date_cache
    if cached_second != second:
        # A few lines rather than email.utils.formatdate, whose import (the email package,
        # datetime, calendar) costs the server half a megabyte.
        t = time.localtime(second)
        sign, offset = ("-", -t.tm_gmtoff) if t.tm_gmtoff < 0 else ("+", t.tm_gmtoff)
        hours, minutes = divmod(offset // 60, 60)
        date = (
            f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
        )
        _date_cache = (second, date)
    return date


def with_protocol(session: Session, transaction: Transaction) -> str:
    """The ``with`` word: SMTP, ESMTP, ESMTPS, LMTP, LMTPS (RFC 3848) or UTF8SMTP(S),
    UTF8LMTP(S) (RFC 6531 3.7.3)."""
    if transaction.smtputf8 and session.esmtp:
        return f"UTF8{session.protocol.removeprefix('E')}"
    return session.protocol


def received_header(
    session: Session,
    transaction: Transaction,
    message_id: str,
    *,
    by: str,
    when: float | None = None,
) -> bytes:
    """The ``Received:`` header (CRLF-terminated) for a message accepted in ``transaction``."""
    recipients = transaction.rcpt_to
    for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = rfc5322_date(time.time() if when is None else when)
    from_by_with = _from_by_with(
        session.helo_name, session.peer_host, by, with_protocol(session, transaction)
    )
    return f"{from_by_with} id {message_id}{for_clause}; {date}\r\n".encode()


@functools.lru_cache(maxsize=1024)  # the same for every message of a session, and of a client
def _from_by_with(helo: str | None, peer_host: str, by: str, protocol: str) -> str:
    from_domain = helo if helo and _HELO_TOKEN.fullmatch(helo) else "unknown"
    literal = address_literal(peer_host)
    if literal:
        tcp_info = f" ({literal})"
    elif peer_host.startswith("/"):
        # A unix-domain socket has no client address: the socket's path stands for it, in a
        # comment (RFC 5322 3.2.2), written as Postfix names such a socket.
        tcp_info = f" (unix:{_UNSAFE_IN_COMMENT.sub('?', peer_host)})"
    else:
        tcp_info = ""
    return f"Received: from {from_domain}{tcp_info}\r\n\tby {by} with {protocol}"
