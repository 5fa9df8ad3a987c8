"""A Maildir per recipient: the last hop's store, with one outcome per recipient.

``Mailboxes("/var/mail/vhosts")`` delivers a message into ``<root>/<domain>/<local-part>/``
(a Maildir: ``tmp/``, ``new/``, ``cur/``) for each of its recipients; ``mailbox=`` maps a
recipient to its Maildir otherwise. A recipient whose delivery fails gets its own reply, and
the others are still delivered:

- no mailbox for the recipient (the mapping gives None, or the folder does not exist):
  ``550 5.1.1``;
- the disk or the user's quota is full (``ENOSPC``, ``EDQUOT``): ``452 4.2.2``;
- any other ``OSError``: ``451 4.3.0``.

:meth:`Mailboxes.put` returns those replies as ``{Address: Reply}`` (an empty mapping when
every recipient was delivered); the App answers each recipient with its own in LMTP, and
folds them in SMTP. A recipient missing from the mapping has its copy on disk: written and
fsynced, linked into ``new/``, and ``new/`` fsynced, before ``put`` returns.

The message is written once at most: a large message was spooled as it came in into
``<root>/.spool/`` (the store's ``spool_dir``), and every mailbox gets a hard link to that
file; a small one, held in memory, is written into the first mailbox and linked into the
others. (A Maildir message is never changed in place: a mail reader renames it into ``cur/``
with its flags.) Where a link cannot be made (another file system) the mailbox gets its own
copy. Files left in ``.spool/`` by a server that died are removed after 36 hours, as a
Maildir's ``tmp/``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import attrs

from minismtp.replies import LOCAL_ERROR
from minismtp.spool import STALE_AFTER, Spool, clean_directory
from minismtp.stores.maildir import DirectorySync, _safe_hostname, unique_name
from minismtp.types import Address, Reply

if TYPE_CHECKING:
    from minismtp.message import Message

logger = logging.getLogger("minismtp.stores.mailboxes")

NO_SUCH_MAILBOX = Reply(550, "5.1.1", "No such mailbox")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")

#: Where a recipient's mail goes: a Maildir's path, or None for "no such mailbox".
MailboxMap = Callable[[Address], "str | os.PathLike[str] | None"]

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# link() fails with these where a copy still works: across file systems, on a file system
# without hard links, or past a file's link count.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


def _plain(part: str) -> bool:
    """A part that can be a folder name as it is: no quoting, no path tricks."""
    return bool(part) and part[0] not in '."' and "/" not in part and "\0" not in part


def _reply_for(error: OSError) -> Reply:
    return MAILBOX_FULL if error.errno in _FULL else LOCAL_ERROR


@attrs.define(eq=False)
class _Delivery:
    """What the blocking part of one put did: outcomes, and the folders to fsync."""

    failed: dict[Path | None, Reply] = attrs.field(factory=dict)
    linked: list[Path] = attrs.field(factory=list)  # the mailboxes with the message in new/


@attrs.define(eq=False)
class Mailboxes:
    """A Maildir per recipient under ``root`` (see the module docstring).

    ``mailbox`` maps a recipient to its Maildir (default: ``root/<domain>/<local-part>``,
    both lower-cased; a quoted local part, a part starting with a dot or holding a slash, or
    an address without a domain has no mailbox). ``create``: make a missing mailbox instead
    of refusing the recipient. ``hostname`` goes into the file names (Maildir's rule).
    """

    root: Path = attrs.field(converter=Path)
    mailbox: MailboxMap | None = None
    create: bool = False
    hostname: str = attrs.field(factory=_safe_hostname)
    _syncs: dict[Path, DirectorySync] = attrs.field(factory=dict, init=False)

    @property
    def spool_dir(self) -> Path:
        """Where the App spools large messages: beside the mailboxes, so that each gets a
        link to that file rather than a copy."""
        return self.root / ".spool"

    def path_for(self, address: Address) -> Path | None:
        """The Maildir ``address`` is delivered into, or None if it can have none."""
        if self.mailbox is not None:
            mapped = self.mailbox(address)
            return None if mapped is None else Path(mapped)
        local, domain = address.local_part.lower(), address.domain.lower()
        if not (_plain(local) and _plain(domain)) or domain.startswith("["):
            return None
        return self.root / domain / local

    def exists(self, address: Address) -> bool:
        """Whether ``address`` has a mailbox (blocking: a ``stat``), for an ``on_rcpt`` hook
        that refuses unknown recipients before the data."""
        path = self.path_for(address)
        return path is not None and (self.create or path.is_dir())

    async def open(self) -> None:
        """Check ``root`` at startup (created when missing), make the spool folder, and clean
        it of what deliveries that never finished left there."""

        def check() -> None:
            try:
                self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(exc.errno, f"mailbox root {self.root}: {exc.strerror}") from exc
            clean_directory(self.spool_dir, prefix=None, older_than=STALE_AFTER)

        await anyio.to_thread.run_sync(check)

    async def close(self) -> None:
        self._syncs.clear()

    async def put(self, message: Message) -> Mapping[Address, Reply]:
        """Deliver ``message`` to each recipient's mailbox; the failed ones' replies."""
        recipients = message.rcpt_to
        paths = {address: self.path_for(address) for address in recipients}
        name = unique_name(self.hostname)
        delivery = await anyio.to_thread.run_sync(self._deliver, message, paths, name)
        failed = delivery.failed
        if delivery.linked:
            async with anyio.create_task_group() as tasks:
                for mailbox in delivery.linked:
                    tasks.start_soon(self._commit, mailbox, failed)
        replies = {address: failed[path] for address, path in paths.items() if path in failed}
        for address, reply in replies.items():
            logger.info("not delivered to <%s> (%s): %s", address, paths[address], reply)
        return replies

    async def _commit(self, mailbox: Path, failed: dict[Path | None, Reply]) -> None:
        new = mailbox / "new"
        sync = self._syncs.get(new)
        if sync is None:
            sync = self._syncs[new] = DirectorySync(new)
        try:
            await sync.added()
        except OSError as exc:
            logger.error("fsync of %s failed: %s", new, exc)
            failed[mailbox] = _reply_for(exc)
        finally:
            # Nobody waits on it any more: let it go (a server may serve many mailboxes).
            if sync.idle:
                self._syncs.pop(new, None)

    # -- the blocking part, in a worker thread ----------------------------------------------

    def _deliver(
        self, message: Message, paths: Mapping[Address, Path | None], name: str
    ) -> _Delivery:
        delivery = _Delivery()
        spool = message.spool
        source: Path | None = None  # the file every mailbox links to
        written: Path | None = None  # that file, when this delivery wrote it (in a tmp/)
        if not spool.in_memory and spool.path is not None:
            spool.fsync()  # the spool file itself: linked, never copied
            source = spool.path
        try:
            for mailbox in dict.fromkeys(paths.values()):  # each mailbox once, in RCPT order
                if mailbox is None:
                    delivery.failed[None] = NO_SUCH_MAILBOX
                    continue
                try:
                    self._prepare(mailbox)
                    if source is None:
                        source = written = self._write(spool, mailbox / "tmp" / name)
                    self._link(spool, source, mailbox, name)
                except FileNotFoundError:
                    delivery.failed[mailbox] = NO_SUCH_MAILBOX
                except OSError as exc:
                    logger.error("delivery into %s failed: %s", mailbox, exc)
                    delivery.failed[mailbox] = _reply_for(exc)
                else:
                    delivery.linked.append(mailbox)
        finally:
            if written is not None:
                written.unlink(missing_ok=True)
        return delivery

    def _prepare(self, mailbox: Path) -> None:
        """The mailbox must exist (or be created); its tmp/, new/ and cur/ are made if not."""
        if self.create:
            mailbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not mailbox.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such mailbox", str(mailbox))
        for sub in ("tmp", "new", "cur"):
            try:
                (mailbox / sub).mkdir(mode=0o700)
            except FileExistsError:
                pass

    def _write(self, spool: Spool, path: Path) -> Path:
        """The message's bytes into ``path``, fsynced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                spool.copy_to(fd)  # in the kernel, from a spool file
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _link(self, spool: Spool, source: Path, mailbox: Path, name: str) -> None:
        """``mailbox/new/name``: a link to the first copy, or a copy of its own."""
        target = mailbox / "new" / name
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
        tmp = self._write(spool, mailbox / "tmp" / name)
        try:
            os.rename(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
