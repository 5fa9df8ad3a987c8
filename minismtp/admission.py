"""Which connections the server takes: its limits, and its stress.

- A bound on concurrent connections (``max_connections``): past it, ``421 4.7.0`` and close.
- A bound on those from one client address (``max_connections_per_address``, as Postfix's
  ``smtpd_client_connection_count_limit``; an IPv6 client by its /64). The client is the
  connection's peer, counted at accept; behind a load balancer (``proxy_protocol``) every
  peer is the balancer, so the client is the one its PROXY header names, counted once the
  header is read (:meth:`Admission.client_slot`).
- Under stress (more than ``stress_threshold`` of the connections taken), shorter idle and
  data-rate deadlines (``stress_idle_timeout``), as Postfix does: logged once as it begins,
  once as it ends.

Refusals are logged, one line per limit per ten seconds at most. :class:`Admission` counts;
the server (:mod:`minismtp.server`) holds one, asks it at every accept and tells it when a
connection ends.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

import attrs

from minismtp.config import ServerConfig
from minismtp.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS
from minismtp.types import Reply

# The server's logger: refusals and stress are the server's news.
log = logging.getLogger("minismtp.server")

# anyio.current_time() looks the backend up on every call; these are our own timestamps.
_now = time.monotonic


@attrs.define(eq=False)
class Admission:
    """The connections open, by the server and by client address, and the stress they make.

    ``stress_changed`` is called with the new :attr:`idle_timeout` as stress begins and as it
    ends (the server cuts the reads under way short as it begins: ``Connection.hurry``).
    """

    config: ServerConfig
    stress_changed: Callable[[float], None]
    #: Accepted and not yet closed, TLS handshakes included.
    active: int = attrs.field(default=0, init=False)
    #: Open, by :func:`address_key`.
    per_address: dict[str, int] = attrs.field(factory=dict, init=False)
    #: The idle timeout in force: ``config.idle_timeout``, or ``stress_idle_timeout`` while
    #: :attr:`under_stress`.
    idle_timeout: float = attrs.field(init=False)
    under_stress: bool = attrs.field(default=False, init=False)
    #: The per-address limit counts peers at accept (no PROXY header to wait for).
    _by_peer: bool = attrs.field(init=False)
    #: The per-address limit counts the client a PROXY header names, once it is read
    #: (:meth:`client_slot`).
    by_client: bool = attrs.field(init=False)
    _stress_above: float = attrs.field(init=False)  # more open than this: stress
    _stressed_at: float = attrs.field(default=float("-inf"), init=False)  # more open, last seen
    _refusals: _Refusals = attrs.field(factory=lambda: _Refusals("--max-connections"), init=False)
    _address_refusals: _Refusals = attrs.field(
        factory=lambda: _Refusals("--max-connections-per-address"), init=False
    )

    def __attrs_post_init__(self) -> None:
        config = self.config
        self.idle_timeout = config.idle_timeout
        limited = config.max_connections_per_address > 0
        self._by_peer = limited and not config.proxy_protocol
        self.by_client = limited and config.proxy_protocol
        self._stress_above = config.stress_threshold * config.max_connections

    def admit(self, peer: tuple[str, int]) -> Reply | None:
        """Count the connection from ``peer`` in; or the reply that refuses it (the refusal
        noted): all ``max_connections`` are taken, or ``max_connections_per_address`` from
        its address. :meth:`release` counts it out."""
        config = self.config
        if self.active >= config.max_connections:
            self._refusals.note(peer[0], self.active)
            return TOO_MANY_CONNECTIONS
        if self._by_peer:
            key = address_key(peer[0])
            if key is not None:
                refusal = self._count_in(key)
                if refusal is not None:
                    return refusal
        self.active += 1
        if self.active > self._stress_above:
            self._stressed_at = _now()
            if not self.under_stress:
                self._begin_stress()
        return None

    def release(self, peer: tuple[str, int]) -> None:
        """The connection from ``peer`` that :meth:`admit` let in has ended."""
        self.active -= 1
        if self._by_peer:
            key = address_key(peer[0])
            if key is not None:
                self._count_out(key)

    def client_slot(self) -> ClientSlot:
        """A connection's place in the per-address count, to be taken once its PROXY header
        names the client (see :attr:`by_client`)."""
        return ClientSlot(self)

    def _count_in(self, key: str) -> Reply | None:
        count = self.per_address.get(key, 0)
        if count >= self.config.max_connections_per_address:
            self._address_refusals.note(key, count)
            return TOO_MANY_FROM_ADDRESS
        self.per_address[key] = count + 1
        return None

    def _count_out(self, key: str) -> None:
        count = self.per_address.pop(key, 0) - 1
        if count > 0:
            self.per_address[key] = count

    # -- stress -----------------------------------------------------------------------------

    def watch_stress(self, now: float) -> None:
        """The server's clock, while :attr:`under_stress`: stress ends once no more than the
        threshold have been open for a whole stress timeout, so a load that hovers at the
        threshold does not log a line per client."""
        if self.active > self._stress_above:
            self._stressed_at = now
        elif now - self._stressed_at >= self.idle_timeout:
            self._end_stress()

    def _begin_stress(self) -> None:
        """Past the threshold: reads that start from now on get the short timeout, and so
        do the reads under way (counted from their start: the server's ``stress_changed``)."""
        config = self.config
        self.under_stress = True
        timeout = self.idle_timeout = min(config.idle_timeout, config.stress_idle_timeout)
        log.warning(
            "under stress: %d of %d connections open (--max-connections); idle and data-rate "
            "timeouts cut to %g s until the load falls",
            self.active,
            config.max_connections,
            timeout,
        )
        self.stress_changed(timeout)

    def _end_stress(self) -> None:
        self.under_stress = False
        self.idle_timeout = self.config.idle_timeout
        log.info(
            "stress over: %d connections open; timeouts back to %g s",
            self.active,
            self.idle_timeout,
        )
        self.stress_changed(self.idle_timeout)


@attrs.define(eq=False)
class ClientSlot:
    """One connection's place in the per-address count when its client is named by a PROXY
    header: :meth:`take` once the header is read, :meth:`release` when the connection ends
    (a no-op if nothing was taken)."""

    admission: Admission
    _key: str | None = None

    def take(self, client: tuple[str, int]) -> Reply | None:
        """Count the connection in for ``client``; or the reply that refuses it."""
        key = address_key(client[0])
        if key is None:
            return None
        refusal = self.admission._count_in(key)
        if refusal is None:
            self._key = key
        return refusal

    def release(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            self.admission._count_out(key)


@attrs.define
class _Refusals:
    """Connections refused for one limit: a flood must not flood the log as well, so one line
    per ten seconds at most."""

    option: str
    count: int = 0  # since the last line
    logged_at: float = float("-inf")

    def note(self, source: str, open_: int) -> None:
        self.count += 1
        now = _now()
        if now - self.logged_at >= 10.0:
            where = " from that address" if self.option.endswith("address") else ""
            log.warning(
                "refused %d connection(s), the last from %s: %d open%s (%s)",
                self.count,
                source,
                open_,
                where,
                self.option,
            )
            self.count = 0
            self.logged_at = now


def address_key(host: str) -> str | None:
    """What the per-address limit counts a client by: its IPv4 address, an IPv6 client by its
    /64 (what one site or one customer is usually given, so a host cannot step round the
    limit by changing its interface identifier), an IPv4-mapped one as IPv4; None for a
    unix-domain socket's client, which has no address (or a path)."""
    if ":" not in host:
        # The kernel's dotted quad is canonical already, and so is a PROXY header's (the
        # parser writes it with ipaddress).
        return host if host[:1].isdigit() else None
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


__all__ = ["Admission", "ClientSlot", "address_key"]
