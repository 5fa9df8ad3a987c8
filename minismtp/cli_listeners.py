"""``minismtp run``'s listening sockets: every one (SMTP, implicit TLS, metrics; with
``--workers``, each worker's metrics port) bound before anything is announced, so that a
port that cannot be bound is said once, naming the address and what to do about it, and
nothing is left listening."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from collections.abc import Sequence

import attrs

from minismtp.cli_parser import UsageError
from minismtp.unix import UnixSocket, bind_unix_socket
from minismtp.workers import bind_sockets


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.define
class Listeners:
    """Every listening socket of this process, bound before anything is announced."""

    plain: list[socket.socket] = attrs.field(factory=list)
    tls: list[socket.socket] = attrs.field(factory=list)
    #: The metrics endpoint's sockets, one list per worker (one list without --workers).
    metrics: list[list[socket.socket]] = attrs.field(factory=list)
    #: The --unix socket this process bound (also in ``plain``): its file goes at the end.
    unix: UnixSocket | None = None

    def close(self) -> None:
        for sock in (*self.plain, *self.tls, *(s for each in self.metrics for s in each)):
            sock.close()
        if self.unix is not None:
            self.unix.close()


_WILDCARDS = {"", "0.0.0.0", "::", None}


def _check_ports(args: argparse.Namespace) -> None:
    """Two listeners of ours on one port: said before binding, naming both options."""
    wanted: list[tuple[str, str | None, int]] = []
    if args.port is not None:
        wanted.append(("--port", args.host, args.port))
    if args.tls_port is not None:
        wanted.append(("--tls-port", args.host, args.tls_port))
    if args.metrics_port is not None:
        for index in range(args.workers):
            name = "--metrics-port"
            if args.workers > 1:
                name = f"the metrics port of worker {index} (--metrics-port + {index})"
            port = args.metrics_port + index if args.metrics_port else 0
            if port > 65535:
                raise UsageError(f"{name} would be {port}, past 65535: lower --metrics-port")
            wanted.append((name, args.metrics_host, port))
    for i, (name, host, port) in enumerate(wanted):
        for other, other_host, other_port in wanted[:i]:
            same_host = host == other_host or host in _WILDCARDS or other_host in _WILDCARDS
            if port and port == other_port and same_host:
                raise UsageError(f"{name} is {port}, as {other} is: give each its own port")


def _bind(port_option: str, host_option: str, host: str | None, port: int) -> list[socket.socket]:
    try:
        return bind_sockets(host, port)
    except OSError as exc:
        raise UsageError(bind_problem(port_option, host_option, host, port, exc)) from exc


def bind_problem(
    port_option: str, host_option: str, host: str | None, port: int, exc: OSError
) -> str:
    """What went wrong binding ``host``:``port``, and what to do about it, in one line."""
    if isinstance(exc, socket.gaierror):
        return f"{host_option} {host!r}: no such host or address ({exc.strerror})"
    where = f"{format_address((host or '*', port))} ({port_option})"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is in use by another process: stop it, or choose another port"
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return (
            f"{where}: a port below 1024 needs root or the CAP_NET_BIND_SERVICE capability "
            "(systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE); or listen above 1023 "
            "behind a firewall redirect"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine ({host_option})"
    return f"cannot listen on {where}: {(exc.strerror or str(exc)).lower()}"


def bind_all(args: argparse.Namespace) -> Listeners:
    _check_ports(args)
    listeners = Listeners()
    try:
        if args.port is not None:
            listeners.plain = _bind("--port", "--host", args.host, args.port)
        if args.unix is not None:
            try:
                listeners.unix = bind_unix_socket(args.unix, args.unix_mode)
            except OSError as exc:
                raise UsageError(str(exc)) from exc
            listeners.plain.append(listeners.unix.socket)
        if args.tls_port is not None:
            listeners.tls = _bind("--tls-port", "--host", args.host, args.tls_port)
        if args.metrics_port is not None:
            for index in range(args.workers):
                port = args.metrics_port and args.metrics_port + index
                name = "--metrics-port" if args.workers == 1 else f"--metrics-port + {index}"
                listeners.metrics.append(_bind(name, "--metrics-host", args.metrics_host, port))
    except BaseException:
        listeners.close()
        raise
    return listeners


def inherited_listeners(args: argparse.Namespace) -> Listeners:
    """A worker's sockets, bound by the parent; it closes the other workers' metrics sockets."""
    mine: list[socket.socket] = []
    for entry in args.listen_metrics_fd:
        index, _, fd = entry.partition(":")
        if int(index) == args.worker_index:
            mine.append(socket.socket(fileno=int(fd)))
        else:
            os.close(int(fd))
    return Listeners(
        [socket.socket(fileno=fd) for fd in args.listen_fd],
        [socket.socket(fileno=fd) for fd in args.listen_tls_fd],
        [mine] if mine else [],
    )


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _metrics_url(sockets: Sequence[socket.socket]) -> str:
    return f"http://{format_address(_address(sockets[0]))}/metrics"


def label(args: argparse.Namespace, loop_name: str) -> str:
    return f"LMTP, {loop_name}" if args.lmtp else loop_name


def announce(listeners: Listeners, loop: str) -> None:
    for sock in listeners.plain:
        if sock.family == socket.AF_UNIX:
            print(f"minismtp listening on unix:{sock.getsockname()} ({loop})")
        else:
            print(f"minismtp listening on {format_address(_address(sock))} ({loop})")
    for sock in listeners.tls:
        print(f"minismtp listening on {format_address(_address(sock))} with implicit TLS ({loop})")
    if len(listeners.metrics) == 1:
        print(f"minismtp metrics on {_metrics_url(listeners.metrics[0])}")
    else:
        for index, sockets in enumerate(listeners.metrics):
            print(f"minismtp metrics of worker {index} on {_metrics_url(sockets)}")
    sys.stdout.flush()
