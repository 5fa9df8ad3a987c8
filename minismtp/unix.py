"""Listening on a unix-domain socket: the last hop's usual road (Postfix ``lmtp:unix:...``).

:func:`bind_unix_socket` replaces a stale socket file (a server that died without removing
it) but never one a live server listens on (:class:`SocketInUse`), nor a file that is not a
socket. The socket is listening only once its permissions are set, so no client ever
connects through looser ones.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import attrs

_BACKLOG = 65536  # as the TCP listeners: the kernel caps it at net.core.somaxconn


class UnixSocketError(OSError):
    """A unix-domain socket cannot be listened on; its text names the path and says why."""

    def __str__(self) -> str:
        return str(self.strerror)


class SocketInUse(UnixSocketError):
    """A server is listening on the path already."""


@attrs.define(eq=False)
class UnixSocket:
    """A listening unix-domain socket bound by :func:`bind_unix_socket`."""

    path: str
    socket: socket.socket

    def close(self) -> None:
        """Close the socket and remove its file, unless a server listens there still (one
        that replaced the file; or a worker process that holds the socket yet). Whether the
        file is ours cannot be told by its inode, which the file system may reuse at once."""
        self.socket.close()
        try:
            _remove_stale(self.path)
        except OSError:
            pass


def bind_unix_socket(path: str | os.PathLike[str], mode: int | None = None) -> UnixSocket:
    """Listen on ``path`` (made absolute: it names the peer in logs and headers) with the
    permissions ``mode`` (e.g. ``0o660``; None: what the umask leaves).

    Raises :class:`SocketInUse` if a server answers on ``path``, and :class:`OSError` with
    the path in its text for anything else in the way.
    """
    path = os.path.abspath(os.fspath(path))
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            raise _cannot(path, exc) from exc
        try:
            if mode is not None:
                os.chmod(path, mode)
            sock.listen(_BACKLOG)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return UnixSocket(path, sock)


def _cannot(path: str, error: OSError) -> UnixSocketError:
    return UnixSocketError(error.errno, f"cannot listen on {path}: {error.strerror or error}")


def _remove_stale(path: str) -> None:
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise UnixSocketError(errno.EEXIST, f"cannot listen on {path}: not a socket, left alone")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left behind by a server that died
        os.unlink(path)
    except FileNotFoundError:  # removed in the meantime
        pass
    except (BlockingIOError, TimeoutError):  # a full backlog: somebody listens
        raise SocketInUse(errno.EADDRINUSE, f"a server is listening on {path} already") from None
    except OSError as exc:
        raise _cannot(path, exc) from exc
    else:
        raise SocketInUse(errno.EADDRINUSE, f"a server is listening on {path} already")
    finally:
        probe.close()
