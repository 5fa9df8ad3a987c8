"""The replies the server layer sends on its own, outside the engine's dialogue.

The engine answers commands; these end a connection for reasons only the server knows (its
clocks, its limits, a shutdown). One module, so the lifecycle (:mod:`minismtp.server`), the
connection driver (:mod:`minismtp.connection`) and the wires' accept paths share one copy.
"""

from __future__ import annotations

from minismtp.types import Reply

IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address")
TALKED_FIRST = Reply(554, "5.5.1", "Protocol error: talked before greeting")

__all__ = [
    "DATA_TOO_SLOW",
    "IDLE_TIMEOUT",
    "SESSION_TOO_LONG",
    "SHUTTING_DOWN",
    "TALKED_FIRST",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_ADDRESS",
]
