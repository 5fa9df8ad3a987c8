"""The Store contract (what App(store=...) needs), and the Maildir as a store: a message
spooled in its tmp/ is stored by a rename, never a second copy."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from minismtp import Maildir as TopLevelMaildir
from minismtp.app import App
from minismtp.maildir import Maildir as OldMaildir
from minismtp.message import Message
from minismtp.stores import Store
from minismtp.stores.maildir import Maildir
from minismtp.testing import TestClient
from minismtp.types import Address, Reply, Transaction

pytestmark = pytest.mark.anyio

BODY = b"Subject: stored\r\n\r\n" + b"0123456789abcdef" * 4 + b"\r\n"


class ListStore:
    """A store that keeps what it gets in a list (durable enough for a test)."""

    spool_dir: Path | None = None

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.opened = self.closed = 0
        self.messages: list[bytes] = []

    async def open(self) -> None:
        self.opened += 1

    async def put(self, message: Message) -> Mapping[Address, Reply] | None:
        if self.fail:
            raise OSError(5, "Input/output error")
        self.messages.append(message.data)
        return None

    async def close(self) -> None:
        self.closed += 1


def test_the_maildir_is_a_store_and_keeps_its_old_imports() -> None:
    assert OldMaildir is Maildir is TopLevelMaildir
    assert isinstance(Maildir("x"), Store) and isinstance(ListStore(), Store)
    assert isinstance(App(maildir="x").store, Maildir)
    assert App(store=ListStore()).maildir is None
    with pytest.raises(ValueError, match="not both"):
        App(store=ListStore(), maildir="x")


async def test_a_store_is_opened_used_and_closed_by_the_serving_period() -> None:
    store = ListStore()
    app = App(hostname="mx.test", store=store)
    async with TestClient(app) as client:
        assert store.opened == 1
        assert (await client.send_message("a@example.org", "b@example.com", BODY))[-1].code == 250
    assert store.closed == 1
    assert [data.endswith(BODY) for data in store.messages] == [True]


async def test_a_store_that_raises_is_451_and_the_session_goes_on(tmp_path: Path) -> None:
    store = ListStore(fail=True)
    app = App(hostname="mx.test", store=store, spool_dir=tmp_path, spool_memory=16)
    async with TestClient(app) as client:
        reply = (await client.send_message("a@example.org", "b@example.com", BODY))[-1]
        assert reply == Reply(451, "4.3.0", "Requested action aborted: local error in processing")
        assert os.listdir(tmp_path) == []  # the spool file went with the transaction
        store.fail = False
        assert (await client.send_message("a@example.org", "b@example.com", BODY))[-1].code == 250


async def test_a_spooled_message_is_renamed_into_new_not_copied(tmp_path: Path) -> None:
    app = App(hostname="mx.test", maildir=tmp_path, spool_memory=16)
    spooled: list[tuple[Path, int]] = []

    @app.on_data
    def where(tx: Transaction, message: Message) -> None:
        assert message.path is not None
        spooled.append((message.path, os.stat(message.path).st_ino))

    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", BODY)
    [(path, inode)] = spooled
    assert path.parent == tmp_path / "tmp"
    [stored] = (tmp_path / "new").iterdir()
    assert os.stat(stored).st_ino == inode and stored.read_bytes().endswith(BODY)
    assert list((tmp_path / "tmp").iterdir()) == []
    with client.messages[0] as message:
        assert message.path == stored
    assert stored.exists()  # closing a stored message leaves the stored file alone


async def test_a_message_in_memory_is_written_to_tmp_then_renamed(tmp_path: Path) -> None:
    app = App(hostname="mx.test", maildir=tmp_path)
    async with TestClient(app) as client:
        await client.send_message("a@example.org", "b@example.com", BODY)
    [stored] = (tmp_path / "new").iterdir()
    [message] = client.messages
    assert message.path == stored and stored.read_bytes() == message.data


async def test_maildir_tmp_files_older_than_36_hours_go_at_start_up(tmp_path: Path) -> None:
    """The Maildir specification: a file in tmp/ untouched for 36 hours is left over."""
    box = Maildir(tmp_path)
    box.create()
    old, recent = tmp_path / "tmp" / "old", tmp_path / "tmp" / "recent"
    old.write_bytes(b"x")
    recent.write_bytes(b"x")
    past = time.time() - 37 * 3600
    os.utime(old, (past, past))
    async with TestClient(App(maildir=box)):
        pass
    assert sorted(os.listdir(tmp_path / "tmp")) == ["recent"]
