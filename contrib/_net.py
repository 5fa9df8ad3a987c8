"""Helpers shared by the contrib middleware: client keys and a bounded map (addresses and
networks are :mod:`minismtp.net`'s).

Client addresses are grouped the way mail operators count them: an IPv4 client by its
address (or its /24 for greylisting, as big senders retry from a neighbouring address), an
IPv6 client by its /64, the smallest network a site is usually given. An IPv4-mapped IPv6
address (``::ffff:192.0.2.1``, what a dual-stack socket reports) counts as the IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from minismtp.net import parse_ip

K = TypeVar("K")
V = TypeVar("V")


def client_key(host: str, *, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The key a client is counted under: its IPv4 address (or network of ``ipv4_prefix``
    bits), its IPv6 network of ``ipv6_prefix`` bits; a host that is not an IP, as written."""
    address = parse_ip(host)
    if address is None:
        return host
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    if prefix == address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network((address, prefix), strict=False))


def _at_least_one(_: object, __: object, value: int) -> None:
    if value < 1:
        raise ValueError("max_entries must be at least 1")


@attrs.define(eq=False)
class BoundedMap(Generic[K, V]):
    """A dict of at most ``max_entries`` items; past that the least recently used goes.

    Reading with :meth:`get` or writing counts as a use. Memory stays bounded whatever the
    number of clients, at the price of forgetting the quietest ones first.
    """

    max_entries: int = attrs.field(validator=_at_least_one)
    _items: OrderedDict[K, V] = attrs.field(factory=OrderedDict, init=False)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        items = self._items
        items[key] = value
        items.move_to_end(key)
        if len(items) > self.max_entries:
            items.popitem(last=False)

    def __delitem__(self, key: K) -> None:
        del self._items[key]

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)
