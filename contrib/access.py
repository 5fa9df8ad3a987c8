"""Client access by network: allow and deny lists of CIDR ranges, decided at connect."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from minismtp.events import Connect, Event, Handler
from minismtp.net import IPNetwork, parse_ip, parse_networks
from minismtp.types import Reply

__all__ = ["ClientAccess"]

log = logging.getLogger("minismtp.contrib.access")

ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")


class ClientAccess:
    """Serve or refuse a client by its address: ``ClientAccess(app, allow=[...], deny=[...])``.

    Acts at **connect**: a refused client's greeting is ``554 5.7.1 Access denied`` and the
    connection closes (RFC 5321 3.1: a 554 greeting means no service).

    ``allow`` and ``deny`` hold CIDR ranges (``192.0.2.0/24``, ``2001:db8::/32``) or single
    addresses. The most specific range that holds the client decides, as in a routing
    table, so ``deny=["10.0.0.0/8"], allow=["10.1.2.0/24"]`` serves 10.1.2.x only of that
    block; a range in both lists denies. A client in no range is served when ``allow`` is
    empty, and refused when it is not (an allow list). An IPv4-mapped IPv6 peer is matched as
    its IPv4 address; a peer that is not an IP (a UNIX socket) matches no range.
    """

    acts_on = (Connect,)

    def __init__(
        self,
        app: Handler,
        *,
        allow: Iterable[str | IPNetwork] = (),
        deny: Iterable[str | IPNetwork] = (),
    ) -> None:
        self.app = app
        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)
        # Longest prefix first; at equal length deny before allow.
        rules = [(n, False) for n in self.deny] + [(n, True) for n in self.allow]
        self._rules = sorted(rules, key=lambda rule: (-rule[0].prefixlen, rule[1]))

    def allows(self, host: str) -> bool:
        address = parse_ip(host)
        if address is not None:
            for network, allowed in self._rules:
                if address.version == network.version and address in network:
                    return allowed
        return not self.allow

    async def __call__(self, event: Event) -> Reply:
        if isinstance(event, Connect) and not self.allows(event.session.peer_host):
            log.info("session %s from %s: access denied", event.session.id, event.session.peer_host)
            return ACCESS_DENIED
        return await self.app(event)
