"""Where a message's content goes as it streams in: memory up to a threshold, then a file.

A :class:`Spool` takes the pieces the engine hands on (our ``Received:`` header first). Up to
``memory_limit`` octets it keeps them in memory (the usual small message never touches the
disk); past it, it writes everything to a file in ``directory`` and then appends each piece.
With a Maildir store that directory is the Maildir's ``tmp/``, so that storing the message is
an fsync and a rename into ``new/``, never a second copy.

Who owns the file: the spool, until a store moves it somewhere (:meth:`Spool.moved`). The
spool removes a file it owns when it is closed, and, as a safe default, when it is garbage
collected. Files left by a process that died are removed when a server starts
(:func:`clean_directory`): in a spool directory, those no running process holds a lock on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from minismtp.ids import new_id

try:
    import fcntl
except ImportError:  # Windows: files are cleaned by age only
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("minismtp.spool")

Piece = bytes | memoryview

DEFAULT_MEMORY = 256 * 1024
#: The names of spool files, so that a cleaning finds ours only (a spool directory may be
#: the system's temporary directory).
PREFIX = "minismtp-spool-"
# Pieces are gathered and written with one writev() per this many octets.
_WRITE_SIZE = 128 * 1024
_IOV_MAX = 1024
_COPY_BLOCK = 1024 * 1024
#: Maildir tmp/ files older than this are left over (the Maildir specification's 36 hours).
STALE_AFTER = 36 * 3600.0


def default_directory() -> Path:
    return Path(tempfile.gettempdir())


@attrs.define(eq=False)
class _File:
    """The spool's file, apart from the spool, so that a finaliser may close it."""

    fd: int
    path: Path
    owned: bool = True  # removed when released; False once a store moved it

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.owned:
            self.owned = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not remove spool file %s: %s", self.path, exc)


@attrs.define(eq=False)
class Spool:
    """The octets of one message: ``write()`` them, ``finish()``, then read them.

    ``directory`` is where the file goes once more than ``memory_limit`` octets came
    (None: the system's temporary directory); ``lock``: hold a lock on the file while it is
    in use, so that a cleaning at another process's start-up leaves it alone.
    """

    directory: Path | None = None
    memory_limit: int = DEFAULT_MEMORY
    lock: bool = True
    #: Octets written so far.
    size: int = 0
    #: Where a store put the message (a Maildir's ``new/`` file), when it is not the spool's.
    stored_at: Path | None = None
    # The pieces written: all of them while in memory; with a file, those not yet written to
    # it (one writev() for many).
    _pieces: list[Piece] = attrs.field(factory=list)
    _pending: int = 0  # octets in _pieces, with a file
    _memory: bytes | None = None  # the whole content, once finished in memory
    _file: _File | None = None
    _closed: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> Spool:
        spool = cls()
        spool._memory = data
        spool.size = len(data)
        return spool

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, owned: bool = False) -> Spool:
        """A spool over an existing file; ``owned``: remove it when the spool is closed."""
        path = Path(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        spool = cls(directory=path.parent, lock=False)
        spool._adopt(_File(fd, path, owned))
        spool.size = os.fstat(fd).st_size
        return spool

    # -- writing ---------------------------------------------------------------------------

    def write(self, piece: Piece) -> None:
        """Append ``piece``; raises OSError (a full disk...), after which the spool is closed."""
        size = len(piece)
        if not size:
            return
        self.size += size
        self._pieces.append(piece)
        if self._file is None:
            if self.size > self.memory_limit:
                self._guard(self._spill)
        else:
            self._pending += size
            if self._pending >= _WRITE_SIZE:
                self._guard(self._flush)

    def finish(self) -> None:
        """All is written: the pieces in memory are joined (letting go of the reads they
        came in), or the last ones written to the file. Reading finishes first by itself."""
        if self._file is None:
            if self._memory is None or self._pieces:
                self._memory = b"".join((self._memory or b"", *self._pieces))
                self._pieces = []
        elif self._pieces:
            self._guard(self._flush)

    def _guard(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException:
            self.close()
            raise

    def _spill(self) -> None:
        """Past the memory limit: everything so far goes to a new file."""
        directory = self.directory or default_directory()
        path = directory / f"{PREFIX}{os.getpid()}-{new_id()}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        self._adopt(_File(fd, path))
        self._lock(fd)
        self._flush()

    def _lock(self, fd: int) -> None:
        """Say that the file is in use, to a cleaning at another process's start-up. Where
        the file system has no such locks (some network ones), its age will have to do."""
        if self.lock and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _adopt(self, file: _File) -> None:
        self._file = file
        weakref.finalize(self, file.release)

    def _flush(self) -> None:
        assert self._file is not None
        _write_all(self._file.fd, self._pieces)
        self._pieces = []
        self._pending = 0

    # -- reading ---------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The file, if the content is in one (the spool's, or where a store put it)."""
        if self._file is not None:
            return self._file.path
        return self.stored_at

    @property
    def in_memory(self) -> bool:
        return self._file is None

    @property
    def fd(self) -> int:
        """The spool file's descriptor (-1 without a file)."""
        self.finish()
        return self._file.fd if self._file is not None else -1

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the message is closed: its content is gone")

    def read_all(self) -> bytes:
        """The whole content (loads a file whole)."""
        self._check_open()
        self.finish()
        if self._file is None:
            assert self._memory is not None
            return self._memory
        return self.read(0, self.size)

    def read(self, start: int, end: int) -> bytes:
        """Octets ``start`` to ``end`` (at most the size)."""
        self._check_open()
        self.finish()
        end = min(end, self.size)
        if self._file is None:
            assert self._memory is not None
            return self._memory[start:end]
        parts = []
        while start < end:
            part = os.pread(self._file.fd, min(end - start, _COPY_BLOCK * 16), start)
            if not part:
                break
            parts.append(part)
            start += len(part)
        return b"".join(parts)

    def open(self) -> BinaryIO:
        """A new binary file object over the content, seekable, read-only."""
        self._check_open()
        self.finish()
        if self._file is None:
            assert self._memory is not None
            return io.BytesIO(self._memory)  # shares the bytes until written to
        return open(self._file.path, "rb")  # the caller closes it

    def blocks(self, size: int) -> Iterator[bytes | memoryview]:
        """The content in pieces of ``size`` octets at most (blocking reads for a file)."""
        self._check_open()
        self.finish()
        if self._file is None:
            assert self._memory is not None
            view = memoryview(self._memory)
            for start in range(0, len(view), size):
                yield view[start : start + size]
            return
        for start in range(0, self.size, size):
            yield self.read(start, start + size)

    def copy_to(self, fd: int) -> None:
        """Write the whole content to ``fd`` (in the kernel, where it can)."""
        self._check_open()
        self.finish()
        if self._file is None:
            assert self._memory is not None
            _write_all(fd, [self._memory])
        else:
            _copy_range(self._file.fd, fd, 0, self.size)

    # -- editing and handing over ----------------------------------------------------------

    def replace_head(self, length: int, head: bytes) -> None:
        """Put ``head`` in place of the first ``length`` octets. In memory: one copy; in a
        file: one copy of the rest on disk, into a new file renamed over the old one."""
        self._check_open()
        self.finish()
        if self._file is None:
            assert self._memory is not None
            self._memory = b"".join((head, memoryview(self._memory)[length:]))
            self.size = len(self._memory)
            return
        old = self._file
        path = old.path.with_name(f"{old.path.name}.edit")
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, [head])
            _copy_range(old.fd, fd, length, self.size - length)
            self._lock(fd)
            os.replace(path, old.path)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):
            os.close(old.fd)
        old.fd = fd
        self.size = len(head) + self.size - length

    def fsync(self) -> None:
        self.finish()
        if self._file is not None:
            os.fsync(self._file.fd)

    def moved(self, path: Path) -> None:
        """A store renamed the spool's file to ``path``: it is the store's now, not removed
        when the spool closes."""
        assert self._file is not None
        self._file.path = path
        self._file.owned = False

    def close(self) -> None:
        """Let go of the content: the memory, and the file unless a store has it."""
        self._closed = True
        self._pieces = []
        self._memory = None
        if self._file is not None:
            self._file.release()


def _write_all(fd: int, pieces: list[Piece]) -> None:
    if not hasattr(os, "writev"):  # Windows
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
        return
    views = [memoryview(piece) for piece in pieces if len(piece)]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        # Drop what went out: whole pieces, then the front of the one it stopped in.
        done = 0
        while done < len(views) and written >= len(views[done]):
            written -= len(views[done])
            done += 1
        del views[:done]
        if written:
            views[0] = views[0][written:]


def _copy_range(source: int, target: int, offset: int, count: int) -> None:
    """Copy ``count`` octets of ``source`` from ``offset`` to ``target``'s position."""
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while count > 0:
                done = copy_file_range(source, target, min(count, 1 << 30), offset)
                if not done:
                    break
                offset += done
                count -= done
            return
        except OSError:  # across file systems on old kernels, or not supported there
            pass
    if sys.platform.startswith("linux"):
        try:
            while count > 0:
                done = os.sendfile(target, source, offset, min(count, 1 << 30))
                if not done:
                    break
                offset += done
                count -= done
            return
        except OSError:
            pass
    while count > 0:
        block = os.pread(source, min(count, _COPY_BLOCK), offset)
        if not block:
            break
        _write_all(target, [block])
        offset += len(block)
        count -= len(block)


def open_directory(directory: Path) -> None:
    """Make ``directory`` ready for spool files: created if missing, cleaned of left-overs."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A few seconds' grace: another worker may have created a file and not yet locked it.
    clean_directory(directory, older_than=5.0)


def clean_directory(
    directory: Path, *, prefix: str | None = PREFIX, older_than: float = 0.0
) -> int:
    """Remove left-over spool files in ``directory``; returns how many.

    With a ``prefix``, only files of that name are looked at, and one a running process holds
    a lock on (a spool in use, also by another worker process) is left alone. Files changed
    within ``older_than`` seconds are left alone too (a Maildir's ``tmp/``: 36 hours).
    """
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if prefix is not None and not entry.name.startswith(prefix):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            if prefix is not None and not _unlocked(entry.path):
                continue
            os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d left-over spool file(s) from %s", removed, directory)
    return removed


def _unlocked(path: str) -> bool:
    """Whether no process holds the lock of the spool file at ``path``."""
    if fcntl is None:
        return time.time() - os.stat(path).st_mtime > STALE_AFTER
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held: a spool in use
    except OSError:  # no locks on this file system: the age decides
        return time.time() - os.fstat(fd).st_mtime > STALE_AFTER
    finally:
        os.close(fd)
    return True
