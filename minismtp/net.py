"""IP addresses and networks as the server and the middleware read them.

An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack socket reports) is the
IPv4 address it carries; networks are written in CIDR notation, host bits zero.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(host: str) -> IPAddress | None:
    """The IP address of a peer host, IPv4-mapped IPv6 unwrapped; None if it is not an IP
    (a UNIX socket path, an empty peer)."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Networks from CIDR strings (``192.0.2.0/24``, ``2001:db8::/32``; a bare address is a
    single host), or networks already made.

    Host bits set (``10.1.2.3/8``) are refused: that is more often a typo than a wish, and
    would silently match a different network than the operator meant.
    """
    networks: list[IPNetwork] = []
    for value in values:
        if isinstance(value, IPNetwork):
            networks.append(value)
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError as exc:
            raise ValueError(f"not a network in CIDR notation: {value!r} ({exc})") from None
    return tuple(networks)


__all__ = ["IPAddress", "IPNetwork", "parse_ip", "parse_networks"]
