"""An inbound MX for example.com: domain filter, size limit, connection limit, greylisting,
sender authentication, DNS blocklists.

Every accepted message is stored in a Maildir, fsynced before the 250::

    $ MX_MAILDIR=/var/mail/inbound MX_DNSBL=zen.spamhaus.org \\
        minismtp run examples.mx:app --host 0.0.0.0 --port 25 --resolver 127.0.0.1

(``MX_DNSBL``: blocklist zones, comma-separated, none by default; ``--resolver``: a local
resolver, as DNSBLs refuse queries through the big public ones.)

Middleware runs in the reverse order of ``add_middleware`` (the last added runs first), so a
connection meets them in this order:

1. ``ConnectionLimit`` at connect: at most 10 connections at once and 30 new ones a minute
   per client (IPv4 address or IPv6 /64), else ``421 4.7.0``;
2. ``DNSBL`` at connect, when zones are given: a listed client gets ``554 5.7.1`` (after the
   connection limit, so that a flood costs no DNS queries);
3. ``RecipientDomainFilter`` at RCPT: only example.com and its subdomains, else
   ``550 5.7.1 Relay access denied`` -- before greylisting, so that relay attempts are
   refused outright rather than greylisted;
4. ``MessageSizeLimit``: ``SIZE 26214400`` in EHLO, ``552 5.3.4`` for a larger ``SIZE=`` at
   MAIL or a larger message while it streams in;
5. ``Greylist`` at RCPT: a new (client /24, sender, recipient) gets ``451 4.7.1`` and passes
   when it comes back after 5 minutes;
6. ``Authenticate``: SPF at MAIL, DKIM, ARC and DMARC at the end of data, and the
   ``Authentication-Results:`` header; a message failing DMARC for a domain that publishes
   ``p=reject`` gets ``550 5.7.1``, everything else is only annotated (RFC 7489 10.1 advises
   against refusing on SPF alone).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from minismtp import App
from minismtp.contrib.auth import Authenticate
from minismtp.contrib.dnsbl import DNSBL
from minismtp.contrib.domains import RecipientDomainFilter
from minismtp.contrib.greylist import Greylist
from minismtp.contrib.ratelimit import ConnectionLimit
from minismtp.contrib.size import MessageSizeLimit
from minismtp.dns import Resolver

MAX_MESSAGE_SIZE = 25 * 1024 * 1024


def create_app(
    maildir: str | os.PathLike[str],
    *,
    hostname: str = "mx.example.com",
    greylist_delay: float = 300.0,
    clock: Callable[[], float] = time.time,
    dnsbl_zones: Sequence[str] = (),
    resolver: Resolver | None = None,
) -> App:
    """The MX; ``clock`` is the greylist's (a test moves it on instead of waiting),
    ``resolver`` the DNS of the authentication and DNSBL checks (default: the system's)."""
    app = App(hostname=hostname, maildir=maildir)
    app.add_middleware(Authenticate, reject_dmarc=True, resolver=resolver)
    app.add_middleware(Greylist, delay=greylist_delay, clock=clock)
    app.add_middleware(MessageSizeLimit, max_bytes=MAX_MESSAGE_SIZE)
    app.add_middleware(RecipientDomainFilter, domains=["example.com", "*.example.com"])
    if dnsbl_zones:
        app.add_middleware(DNSBL, zones=dnsbl_zones, reject=True, resolver=resolver)
    app.add_middleware(ConnectionLimit, per_ip=10, per_ip_per_minute=30)
    return app


app = create_app(
    os.environ.get("MX_MAILDIR", "./maildir"),
    hostname=os.environ.get("MX_HOSTNAME", "mx.example.com"),
    dnsbl_zones=[zone for zone in os.environ.get("MX_DNSBL", "").split(",") if zone],
)
