"""Binding a unix-domain socket: stale files replaced, live servers and other files left alone."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from minismtp.unix import SocketInUse, bind_unix_socket


def _connects(path: Path | str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
        except OSError:
            return False
        return True


def test_bind_listens_with_the_mode_asked(tmp_path: Path) -> None:
    bound = bind_unix_socket(tmp_path / "lmtp.sock", 0o660)
    try:
        mode = os.stat(tmp_path / "lmtp.sock").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert _connects(tmp_path / "lmtp.sock")
    finally:
        bound.close()
    assert not (tmp_path / "lmtp.sock").exists()


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bound = bind_unix_socket("s.sock")
    try:
        assert bound.path == str(tmp_path / "s.sock")
        assert bound.socket.getsockname() == str(tmp_path / "s.sock")
    finally:
        bound.close()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a server that died
    assert path.exists() and not _connects(path)
    bound = bind_unix_socket(path)
    try:
        assert _connects(path)
    finally:
        bound.close()


def test_a_live_server_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    live = bind_unix_socket(path)
    try:
        with pytest.raises(SocketInUse, match=r"a server is listening on .*live\.sock already"):
            bind_unix_socket(path)
        assert _connects(path)  # still the first server's
    finally:
        live.close()


def test_a_file_that_is_no_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_bytes(b"data")
    with pytest.raises(OSError, match="not a socket, left alone"):
        bind_unix_socket(path)
    assert path.read_bytes() == b"data"


def test_a_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=f"cannot listen on {tmp_path}/no/such/dir.sock"):
        bind_unix_socket(tmp_path / "no" / "such" / "dir.sock")


def test_close_leaves_a_socket_file_another_server_put_there(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = bind_unix_socket(path)
    first.socket.close()  # died without cleaning up: the next server replaces the file
    second = bind_unix_socket(path)
    try:
        first.close()
        assert _connects(path)
    finally:
        second.close()
    assert not path.exists()
