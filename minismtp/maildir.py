"""Kept for imports written before stores had a package: see :mod:`minismtp.stores.maildir`."""

from minismtp.stores.maildir import Maildir, MaildirError, check_writable, unique_name

__all__ = ["Maildir", "MaildirError", "check_writable", "unique_name"]
