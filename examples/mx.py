"""An inbound MX for example.com: domain filter, size limit, connection limit, greylisting.

Every accepted message is stored in a Maildir, fsynced before the 250::

    $ MX_MAILDIR=/var/mail/inbound minismtp run examples.mx:app --host 0.0.0.0 --port 25

Middleware runs in the reverse order of ``add_middleware`` (the last added runs first), so a
connection meets them in this order:

1. ``ConnectionLimit`` at connect: at most 10 connections at once and 30 new ones a minute
   per client (IPv4 address or IPv6 /64), else ``421 4.7.0``;
2. ``RecipientDomainFilter`` at RCPT: only example.com and its subdomains, else
   ``550 5.7.1 Relay access denied`` -- before greylisting, so that relay attempts are
   refused outright rather than greylisted;
3. ``MessageSizeLimit``: ``SIZE 26214400`` in EHLO, ``552 5.3.4`` for a larger ``SIZE=`` at
   MAIL or a larger message while it streams in;
4. ``Greylist`` at RCPT: a new (client /24, sender, recipient) gets ``451 4.7.1`` and passes
   when it comes back after 5 minutes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from minismtp.contrib.domains import RecipientDomainFilter
from minismtp.contrib.greylist import Greylist
from minismtp.contrib.ratelimit import ConnectionLimit
from minismtp.contrib.size import MessageSizeLimit

from minismtp import App

MAX_MESSAGE_SIZE = 25 * 1024 * 1024


def create_app(
    maildir: str | os.PathLike[str],
    *,
    hostname: str = "mx.example.com",
    greylist_delay: float = 300.0,
    clock: Callable[[], float] = time.time,
) -> App:
    """The MX; ``clock`` is the greylist's (a test moves it on instead of waiting)."""
    app = App(hostname=hostname, maildir=maildir)
    app.add_middleware(Greylist, delay=greylist_delay, clock=clock)
    app.add_middleware(MessageSizeLimit, max_bytes=MAX_MESSAGE_SIZE)
    app.add_middleware(RecipientDomainFilter, domains=["example.com", "*.example.com"])
    app.add_middleware(ConnectionLimit, per_ip=10, per_ip_per_minute=30)
    return app


app = create_app(
    os.environ.get("MX_MAILDIR", "./maildir"),
    hostname=os.environ.get("MX_HOSTNAME", "mx.example.com"),
)
