"""Kept for imports written before stores had a package: see :mod:`minismtp.stores.maildir`."""

from minismtp.stores.maildir import Maildir, unique_name

__all__ = ["Maildir", "unique_name"]
