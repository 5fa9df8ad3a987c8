"""Durable Maildir delivery: tmp/, fsync, rename into new/, fsync new/, group commit."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from minismtp.maildir import Maildir, unique_name
from minismtp.stores import maildir

pytestmark = pytest.mark.anyio

NAME = re.compile(r"(\d+)\.M(\d{1,6})P(\d+)Q(\d+)R([0-9a-f]{8})\.(.+)")


async def test_put_stores_the_bytes_in_new_and_leaves_tmp_empty(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "mail")
    data = b"Received: x\r\nSubject: t\r\n\r\nbody\r\n\x00\xff\r\n"
    path = await box.deliver(data)
    assert path.parent == tmp_path / "mail" / "new"
    assert path.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["cur", "new", "tmp"]
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert box.directory_syncs == 1


async def test_open_creates_the_folders_up_front(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "a" / "b")
    await box.open()
    assert all((tmp_path / "a" / "b" / sub).is_dir() for sub in ("tmp", "new", "cur"))


async def test_open_fails_at_startup_on_a_bad_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        await Maildir(tmp_path / "file" / "mail").open()


def test_unique_name_follows_the_maildir_convention() -> None:
    names = {unique_name("host") for _ in range(1000)}
    assert len(names) == 1000
    for name in names:
        match = NAME.fullmatch(name)
        assert match is not None, name
        assert int(match[3]) == os.getpid()
        assert match[6] == "host"


def test_hostname_slash_and_colon_are_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "a/b:c")
    assert Maildir("x").hostname == r"a\057b\072c"


async def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Maildir(tmp_path)
    await box.open()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        await box.deliver(b"data\r\n")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "new").iterdir()) == []


async def test_group_commit_every_put_returns_after_an_fsync_that_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each put returns only once a directory fsync that saw its file is done; the first fsync
    is held until every file is renamed, so the rest share one more fsync (group commit)."""
    box = Maildir(tmp_path)
    await box.open()
    count = 30
    covered: set[str] = set()
    renamed = threading.Condition()
    written = 0
    real_write = Maildir._write
    real_sync = maildir.fsync_directory

    def write(self: Maildir, name: str, content: Callable[[int], None]) -> Path:
        nonlocal written
        path = real_write(self, name, content)
        with renamed:
            written += 1
            renamed.notify_all()
        return path

    def sync_directory(path: Path) -> None:
        with renamed:  # hold the first fsync until every delivery has renamed its file
            assert renamed.wait_for(lambda: written == count, timeout=10)
        seen = set(os.listdir(path))  # what this fsync is sure to cover
        real_sync(path)
        covered.update(seen)

    monkeypatch.setattr(Maildir, "_write", write)
    monkeypatch.setattr(maildir, "fsync_directory", sync_directory)
    returned: list[Path] = []

    async def put(i: int) -> None:
        path = await box.deliver(b"message %d\r\n" % i)
        assert path.name in covered
        returned.append(path)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for i in range(count):
                tasks.start_soon(put, i)
    assert len(returned) == count
    # Two fsyncs when every rename is seen by the event loop before the first ends; under load
    # a few late ones may need a third or fourth. Without group commit it would be 30.
    assert box.directory_syncs < 10
    assert sorted(p.read_bytes() for p in returned) == sorted(
        b"message %d\r\n" % i for i in range(count)
    )


async def test_a_lone_put_pays_for_its_own_fsync(tmp_path: Path) -> None:
    box = Maildir(tmp_path)
    for i in range(3):
        await box.deliver(b"%d" % i)
    assert box.directory_syncs == 3
