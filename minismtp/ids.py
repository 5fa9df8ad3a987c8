"""Unique identifiers for messages and sessions.

An id is 13 hex digits of the time in microseconds followed by 8 random hex digits: ids sort
by time, are unique within a process (the clock part never repeats, even when the wall clock
stands still or steps back) and, through the random part, across processes and machines. Hex
digits make it an RFC 5321 ``Atom``, fit for the ``id`` clause of a ``Received:`` header.
"""

from __future__ import annotations

import random
import time

# The random module reseeds itself in a forked child, so worker processes draw apart.
_last_us = 0


def new_id() -> str:
    """A new identifier, such as ``'6123A4B5C6D7E1F2A3B4C'``."""
    global _last_us
    now = time.time_ns() // 1000
    # Strictly increasing within the process: two ids in one microsecond still differ.
    _last_us = now if now > _last_us else _last_us + 1
    return f"{(_last_us << 32) | random.getrandbits(32):021X}"  # 13 + 8 hex digits
