"""contrib._net: how clients are keyed, and the bounded map behind the counters."""

from __future__ import annotations

import pytest

from minismtp.contrib._net import BoundedMap, client_key


@pytest.mark.parametrize(
    ("host", "by_address", "by_network"),
    [
        ("192.0.2.77", "192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("2001:DB8::1", "2001:db8::/64", "2001:db8::/64"),
        ("::ffff:192.0.2.77", "192.0.2.77", "192.0.2.0/24"),  # IPv4-mapped: the IPv4 client
        ("fe80::1%eth0", "fe80::/64", "fe80::/64"),  # the zone id is not part of the client
        ("/run/smtp.sock", "/run/smtp.sock", "/run/smtp.sock"),
        ("", "", ""),
    ],
)
def test_client_key(host: str, by_address: str, by_network: str) -> None:
    assert client_key(host) == by_address
    assert client_key(host, ipv4_prefix=24) == by_network


def test_bounded_map_forgets_the_least_recently_used() -> None:
    items: BoundedMap[str, int] = BoundedMap(3)
    for i, key in enumerate("abc"):
        items[key] = i
    assert items.get("a") == 0  # a use: "b" is now the oldest
    items["d"] = 3
    assert list(items) == ["c", "a", "d"]
    assert "b" not in items and len(items) == 3
    assert items.pop("c") == 2 and items.pop("c") is None


def test_bounded_map_needs_room() -> None:
    with pytest.raises(ValueError):
        BoundedMap[str, int](0)
