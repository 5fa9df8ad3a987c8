"""Durable delivery into a Maildir (https://cr.yp.to/proto/maildir.html): a store.

A message is in ``tmp/`` (a large one was spooled there as it came in; a small one, held in
memory, is written there now), fsynced, renamed into ``new/`` under a name no other delivery
uses, and ``new/`` itself is fsynced: only then does :meth:`Maildir.put` return, so the
``250`` that follows promises a message that survives a crash or a power cut.

The directory fsync is a group commit: deliveries that finish their rename while another
delivery's directory fsync is running wait for the next one, which covers all of them at once.
Under load many messages share one fsync of ``new/``; a lone message pays for its own.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import attrs

from minismtp.spool import STALE_AFTER, clean_directory

if TYPE_CHECKING:
    from minismtp.message import Message


@attrs.define(eq=False)
class DirectorySync:
    """Group commit of one folder: an entry made in it (a rename, a link) is durable once an
    fsync of the folder that started after it is done; entries made while an fsync runs share
    the next one."""

    path: Path
    made: int = 0  # entries made in the folder
    synced: int = 0  # of which covered by a finished fsync
    syncs: int = 0  # fsyncs finished
    syncing: anyio.Event | None = None

    @property
    def idle(self) -> bool:
        """Nobody waits for an fsync of this folder."""
        return self.syncing is None and self.synced >= self.made

    async def added(self) -> None:
        """Count an entry just made in the folder in; return once an fsync covers it."""
        self.made += 1
        ticket = self.made
        while self.synced < ticket:
            syncing = self.syncing
            if syncing is not None:
                # An fsync is running, but it may have started before our entry: wait for it,
                # then look again (the loop may make us the leader of the next one).
                await syncing.wait()
                continue
            covered = self.made
            self.syncing = done = anyio.Event()
            try:
                await anyio.to_thread.run_sync(fsync_directory, self.path)
                self.syncs += 1
                self.synced = max(self.synced, covered)
            finally:
                self.syncing = None
                done.set()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Maildir", "MaildirError", "check_writable", "unique_name"]

_counter = itertools.count(1)


def _safe_hostname() -> str:
    # The Maildir spec escapes the two characters that would break a file name or its flags.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


def unique_name(hostname: str) -> str:
    """A Maildir file name: ``<seconds>.M<µs>P<pid>Q<delivery>R<random>.<host>``.

    The time, process id and per-process delivery counter make it unique on this host (also
    across worker processes); the random part guards against a pid reused within one second.
    """
    now = time.time_ns() // 1000
    seconds, micros = divmod(now, 1_000_000)
    rand = os.urandom(4).hex()
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}R{rand}.{hostname}"


class MaildirError(OSError):
    """A Maildir that cannot be used; the text names the path and the problem."""


def _problem(exc: OSError) -> str:
    """``path: what went wrong``, as an operator reads it (not ``[Errno 20] ...``)."""
    what = (exc.strerror or str(exc)).lower()
    return f"{exc.filename}: {what}" if exc.filename is not None else what


def check_writable(path: str | os.PathLike[str]) -> None:
    """Create the folders of the Maildir at ``path`` and a file in its ``tmp/``, then remove
    the file: at start-up, so that a Maildir that cannot be written fails then, with
    :class:`MaildirError`, and not with a 451 for every message (blocking: run it in a thread).
    """
    root = Path(path)
    try:
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = root / "tmp" / f".minismtp-check.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        error = MaildirError(f"cannot write the Maildir {os.fspath(path)!r}: {_problem(exc)}")
        error.errno = exc.errno
        raise error from exc


@attrs.define(eq=False)
class Maildir:
    """A Maildir at ``path`` (``tmp/``, ``new/`` and ``cur/`` are created when missing).

    A :class:`~minismtp.stores.Store`: large messages are spooled into its ``tmp/``."""

    path: Path = attrs.field(converter=Path)
    hostname: str = attrs.field(factory=_safe_hostname)
    _created: bool = attrs.field(default=False, init=False)
    _new_sync: DirectorySync = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._new_sync = DirectorySync(self.new)

    @property
    def directory_syncs(self) -> int:
        """How many times ``new/`` was fsynced (fewer than deliveries under load: group commit)."""
        return self._new_sync.syncs

    @property
    def new(self) -> Path:
        return self.path / "new"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def spool_dir(self) -> Path:
        """Large messages are spooled in ``tmp/``: storing one is a rename."""
        return self.tmp

    def create(self) -> None:
        """Create the Maildir's folders (blocking; :meth:`open` runs it in a thread)."""
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._created = True

    async def open(self) -> None:
        """Create the folders and check that a file can be written in ``tmp/``, so that a bad
        path shows at startup (:class:`MaildirError`), not at the first mail; remove what
        ``tmp/`` holds from deliveries that never finished (older than 36 hours, as the
        Maildir specification says)."""
        await anyio.to_thread.run_sync(check_writable, self.path)
        self._created = True
        await anyio.to_thread.run_sync(self.clean_tmp)

    def clean_tmp(self, older_than: float = STALE_AFTER) -> int:
        """Remove files in ``tmp/`` not changed for ``older_than`` seconds; returns how many."""
        return clean_directory(self.tmp, prefix=None, older_than=older_than)

    async def close(self) -> None:
        """Nothing to let go of: every put() is complete when it returns."""

    async def put(self, message: Message) -> None:
        """Store ``message`` durably in ``new/``; return once it is on disk.

        :attr:`Message.path` is then the file in ``new/``. A message spooled in ``tmp/`` is
        that file, renamed; one in memory (or spooled elsewhere) is written out first.
        """
        await anyio.to_thread.run_sync(self._store, unique_name(self.hostname), message)
        await self._new_sync.added()

    async def deliver(self, data: bytes) -> Path:
        """Store ``data`` (a whole message) durably in ``new/``; returns the file's path."""
        from minismtp.message import Message

        message = Message.from_bytes(data)
        await self.put(message)
        path = message.path
        assert path is not None
        return path

    def _store(self, name: str, message: Message) -> Path:
        if not self._created:
            self.create()
        spool = message.spool
        new = self.new / name
        spooled = spool.path
        if spooled is not None and not spool.in_memory and spooled.parent == self.tmp:
            # Spooled here as it came in: the file is the message, fsync it and rename it.
            spool.fsync()
            os.rename(spooled, new)
            spool.moved(new)
            return new
        self._write(name, spool.copy_to)
        spool.stored_at = new
        return new

    def _write(self, name: str, write: Callable[[int], None]) -> Path:
        """Write a file in ``tmp/`` with ``write(fd)``, fsync it, rename it into ``new/``."""
        tmp = self.tmp / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            new = self.new / name
            os.rename(tmp, new)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return new
