"""glibc's allocator, set for a server that takes messages of megabytes.

By default glibc maps fresh pages for every allocation above a threshold (128 KiB, raised as
such blocks are freed, to 32 MiB at most) and hands freed memory back to the system as soon
as 128 KiB of it lie free at the top of the heap. A server that allocates and frees blocks
above that threshold all the time pays a page fault on each of their pages, every time.

``minismtp run`` therefore fixes the threshold at 32 MiB and trims only past 64 MiB free, so
such blocks come from the heap and are used again. This was made when a message was held
whole (its reads, the unstuffed content, the message: blocks of megabytes, about a tenth of
the CPU of a dot-stuffed 10 MB message). Message content now streams into a spool, and the
largest blocks left are a read and a content piece (up to 256 KiB, above glibc's starting
threshold): the settings no longer change what memory a burst of large messages leaves
behind, but they still save a third or more of the CPU per MB of a large message
(``tests/bench/README.md``, "Memory" and "glibc's allocator").

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
