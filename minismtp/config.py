"""The server's settings, shared by the CLI, the Python API and the connection driver."""

from __future__ import annotations

import os
from typing import Literal

import attrs

from minismtp.net import IPNetwork
from minismtp.proxy import LOOPBACK

# How many bytes one connection may read on asyncio or uvloop before it stops reading until
# the event loop's next turn. uvloop (libuv) reads a ready socket up to 32 times in a row,
# and the fast path (minismtp.inline) feeds each read through the engine right there: a
# client streaming a large message took most of every turn, and the other sessions, accepts
# and greetings waited behind it. 128 KiB is half of one full read (asyncio: 256 KiB, uvloop:
# 250 kB), so a client that streams gets one read per turn, as on trio, whose wire yields
# after every read; at 256 KiB uvloop read twice per turn and kept a new client waiting twice
# as long (the figures are in tests/bench/README.md, "Fairness").
TURN_SIZE = 128 * 1024


def _inline_default() -> bool:
    # The switch for the whole server test suite (and for an operator who suspects the fast
    # path): MINISMTP_INLINE=0 runs every App call in the connection's task.
    return os.environ.get("MINISMTP_INLINE", "1") != "0"


@attrs.frozen
class ServerConfig:
    """Timeouts and limits of the network layer (the SMTP limits are the App's ``limits``)."""

    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: the server waits 5 minutes per command
    min_data_rate: float = 500.0  # bytes/s during DATA/BDAT, as Postfix; 0: the idle timeout
    max_session_duration: float | None = 3600.0
    max_connections: int = 1000
    # From one client address (an IPv6 client: its /64), as Postfix's
    # smtpd_client_connection_count_limit; with proxy_protocol, the client the header names,
    # counted once it is read; 0: no limit.
    max_connections_per_address: int = 50
    # More than stress_threshold * max_connections open: the server is under stress (Postfix's
    # word) and the idle timeout and the data-rate deadline shrink to stress_idle_timeout
    # (Postfix: 300 s -> 10 s), so idle and trickling clients give their slots back. 1.0: never.
    stress_threshold: float = 0.8
    stress_idle_timeout: float = 10.0
    shutdown_grace: float = 30.0  # seconds a transaction in progress gets to finish
    # After the grace period and the 421s, how long sessions get to end before they are
    # cancelled outright (a client that stopped reading, an App call that hangs). It also
    # bounds the App's handling of each connection's Disconnect event.
    shutdown_cancel_after: float = 5.0
    read_size: int = 64 * 1024
    # On asyncio and uvloop, a connection that has read more than this stops reading until
    # the event loop's next turn, so that one fast sender cannot hold the loop (see TURN_SIZE).
    turn_size: int = TURN_SIZE
    # "auto": an asyncio Protocol on asyncio/uvloop, the socket with trio's own waits on trio;
    # "stream": anyio streams everywhere (the portable path, for comparison and debugging).
    transport: Literal["auto", "stream"] = "auto"
    # On the asyncio Protocol path: run App calls that need no waiting straight from the
    # socket's callback (minismtp.inline). False: every call in the connection's task.
    inline: bool = attrs.field(factory=_inline_default)
    # The PROXY protocol (v1 and v2): each connection must start with a header from one of
    # the trusted proxies, naming the client; anything else is closed without a greeting.
    proxy_protocol: bool = False
    proxy_trusted: tuple[IPNetwork, ...] = LOOPBACK
    proxy_timeout: float = 5.0  # a proxy sends its header at once
    # LMTP (RFC 2033) instead of SMTP: LHLO, and one reply per recipient after the data.
    lmtp: bool = False


__all__ = ["TURN_SIZE", "ServerConfig"]
