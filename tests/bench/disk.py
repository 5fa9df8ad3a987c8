"""The disk's own rate for the durable path: small files written as a Maildir delivery writes
them, from many threads at once, with no SMTP and no event loop in the way.

Each writer thread, in a loop: creates a file in ``tmp/``, writes ``--size`` octets, fsyncs it,
closes it and renames it into ``new/``. Two ways of making the rename durable are measured:

- ``file``: nothing more (fsync file + rename). The rename is not yet durable: a crash may
  lose it. The rate a delivery that promised less would reach.
- ``group``: fsync file + rename, then wait for an fsync of ``new/`` that started after the
  rename: one writer runs it while the others that renamed meanwhile wait for the next one,
  which covers them all (a group commit, the same as ``minismtp.stores.maildir``). This is the
  Maildir store's promise (the message's data and its directory entry durable before the 250),
  and the figure the benchmark compares minismtp against.
- ``syncfs`` (not run unless asked for; Linux): the data of many files under one sync. Each
  writer creates and writes its file without an fsync, then waits for a ``syncfs()`` of the
  file system that started after its write (group commit: one writer runs it for all those
  waiting), renames the file into ``new/`` and waits for a group fsync of ``new/`` as in
  ``group``. The same promise (Linux's ``syncfs`` waits for the writeback of every file of
  the file system, as an fsync of each would, and reports its errors since Linux 5.8), with two
  syncs per group instead of one per file and one per group; but ``syncfs`` writes out every
  process's dirty data on that file system, not only ours.

    python -m tests.bench.disk [--dir DIR] [--threads 40] [--seconds 3] [--size 1024]
        [--modes file,group,syncfs] [--keep]

prints one line per mode and, last, one JSON object (``{"file": files/s, "group": files/s}``,
and ``"syncfs"`` when asked for; ``"<mode>_cpu_us"``: the CPU this process spent per file).
The files go in a fresh directory per mode under ``--dir`` (default: the system's temporary
directory), removed once every mode was measured, or left for the caller with ``--keep``: give
``--dir`` on the file system whose rate is wanted.

Removing many files makes creating files slow for a while: ext4 passes over the inodes freed
in the last 10-15 seconds when it allocates one (``find_inode_bit``, ``recently_deleted``),
which costs up to 1 ms of CPU per file created (see tests/bench/README.md). So no directory
is removed between two measurements here, and ``run.py`` removes this script's files and its
Maildirs only at the end of its run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

MODES = ("file", "group", "syncfs")
DEFAULT_MODES = ("file", "group")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(directory: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)  # the GIL is let go during the call
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


class GroupSync:
    """Group commit among threads: :meth:`covered` returns once a ``sync(directory)`` that
    started after the caller's ticket was taken has finished."""

    def __init__(self, directory: Path, sync: Callable[[Path], None] = fsync_directory) -> None:
        self.directory = directory
        self.sync = sync
        self.cond = threading.Condition()
        self.renamed = 0  # renames so far (each writer takes a ticket after its rename)
        self.synced = 0  # renames covered by a finished directory fsync
        self.running = False
        self.syncs = 0

    def ticket(self) -> int:
        with self.cond:
            self.renamed += 1
            return self.renamed

    def covered(self, ticket: int) -> None:
        with self.cond:
            while self.synced < ticket:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                upto = self.renamed
                self.cond.release()
                try:
                    self.sync(self.directory)
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.synced = max(self.synced, upto)
                    self.syncs += 1
                    self.cond.notify_all()


def writer(
    root: Path,
    index: int,
    data: bytes,
    deadline: float,
    sync: GroupSync | None,
    data_sync: GroupSync | None,
    counts: list[int],
) -> None:
    tmp, new = root / "tmp", root / "new"
    n = 0
    while time.monotonic() < deadline:
        name = f"{index}.{n}"
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            if data_sync is None:
                os.fsync(fd)
        finally:
            os.close(fd)
        if data_sync is not None:
            data_sync.covered(data_sync.ticket())
        os.rename(tmp / name, new / name)
        if sync is not None:
            sync.covered(sync.ticket())
        n += 1
    counts[index] = n


def measure(root: Path, mode: str, threads: int, seconds: float, size: int) -> tuple[float, float]:
    """Files per second that ``threads`` writers made durable (as ``mode`` says) in ``seconds``,
    in the new directory ``root``, and the CPU (user + system) of this process per file."""
    for sub in ("tmp", "new"):
        (root / sub).mkdir(parents=True)
    sync = GroupSync(root / "new") if mode in ("group", "syncfs") else None
    data_sync = GroupSync(root / "tmp", syncfs) if mode == "syncfs" else None
    counts = [0] * threads
    data = b"X" * (size - 2) + b"\r\n"
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    deadline = started + seconds
    workers = [
        threading.Thread(target=writer, args=(root, i, data, deadline, sync, data_sync, counts))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    files = max(1, sum(counts))
    return files / elapsed, cpu / files * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--threads", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="file, group, syncfs (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the files for the caller")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    top = Path(tempfile.mkdtemp(prefix="minismtp-disk-", dir=args.dir))
    rates: dict[str, float] = {}
    try:
        for mode in modes:
            rate, cpu = measure(top / mode, mode, args.threads, args.seconds, args.size)
            rates[mode], rates[f"{mode}_cpu_us"] = rate, cpu
            print(
                f"{mode:5}: {rate:8,.0f} files/s, CPU {cpu:5,.0f} µs/file ({args.threads} "
                f"threads, {args.size} octets)",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    print(json.dumps(rates), flush=True)


if __name__ == "__main__":
    main()
