"""glibc's allocator, set for a server that takes messages of megabytes.

By default glibc maps fresh pages for every allocation above a threshold (128 KiB, raised as
such blocks are freed, to 32 MiB at most) and hands freed memory back to the system as soon
as 128 KiB of it lie free at the top of the heap. A server receiving large messages allocates
and frees blocks of megabytes all the time (each read, the unstuffed content, the message), so
each time the pages are mapped anew and fault on their first touch: about a tenth of the CPU
that a dot-stuffed 10 MB message costs on uvloop and on trio (figures in
``tests/bench/README.md``).

``minismtp run`` therefore fixes the threshold at 32 MiB and trims only past 64 MiB free, so
a message's blocks come from the heap and are used again by the next message. The cost: up
to 64 MiB freed after a burst of large messages stays with the process, for the next burst.
An operator who sets any of glibc's ``MALLOC_*`` variables, or malloc tunables in
``GLIBC_TUNABLES``, has chosen for themselves: the allocator is then left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its sliding threshold
TRIM_THRESHOLD = 64 * 1024 * 1024

# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's thresholds (see the module docstring); False where that is not done:
    not glibc, or the operator chose the allocator's settings."""
    if not sys.platform.startswith("linux"):
        return False
    if any(name.startswith("MALLOC_") for name in environ):
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes  # here only: 0.25 MB, for a process that serves

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's alone (musl: no mallopt)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
