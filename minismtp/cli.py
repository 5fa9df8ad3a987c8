"""``minismtp run [module:app]``: serve an App from the command line.

Like uvicorn: the App is imported from ``module:attribute`` (the current directory is on the
import path), every problem found before serving -- an App that cannot be imported, a bad
option, a port in use, a certificate that does not load, a Maildir that cannot be written --
is one line on stderr and exit status 2, and SIGTERM or SIGINT stops the server gracefully
(a second one closes every session at once). SIGHUP reads the TLS certificate and key again.
With ``--workers N`` this process binds the sockets and supervises N worker processes
(:mod:`minismtp.workers`).

This module runs the server (and the signals); the parser is in :mod:`minismtp.cli_parser`,
what is served and its checks in :mod:`minismtp.cli_loading`, the listening sockets, all bound
before anything is announced, in :mod:`minismtp.cli_listeners`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Sequence

import anyio
import anyio.abc

from minismtp import allocator, dns, logs
from minismtp.cli_listeners import Listeners, announce, bind_all, inherited_listeners, label
from minismtp.cli_loading import (
    check_store,
    choose_loop,
    import_app,
    load_app,
    open_store,
    server_config,
    startup_problem,
)
from minismtp.cli_parser import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_LEVELS,
    LOOPS,
    UsageError,
    build_parser,
    resolve_tcp,
    usage_error,
)
from minismtp.metrics import serve_metrics
from minismtp.server import ServableApp, Server, serve
from minismtp.tls import TLSConfig
from minismtp.workers import (
    READY,
    Supervisor,
    report_status,
    watch_parent,
    worker_command,
)

log = logging.getLogger("minismtp.cli")


# -- serving ------------------------------------------------------------------------------------


async def _serve(
    app: ServableApp,
    tls: TLSConfig | None,
    args: argparse.Namespace,
    loop_name: str,
    listeners: Listeners,
) -> int:
    config = server_config(args)
    worker = args.worker_index is not None
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    reload_signal = getattr(signal, "SIGHUP", None)
    wanted = [*stop_signals, *([reload_signal] if reload_signal is not None else [])]
    serving = False
    # Open before announcing the address, so that a signal right after it is not lost.
    with anyio.open_signal_receiver(*wanted) as signals:
        try:
            running = serve(
                app,
                args.host,
                args.port,
                tls=tls,
                require_tls=args.require_tls,
                config=config,
                sockets=listeners.plain,
                tls_sockets=listeners.tls,
            )
            async with running as server, anyio.create_task_group() as extras:
                if listeners.metrics:
                    await extras.start(_serve_metrics, server, listeners.metrics[0])
                serving = True
                if worker:
                    await extras.start(watch_parent)
                    report_status(args.status_fd, READY)
                    log.info("worker %d (pid %d) serving", args.worker_index, os.getpid())
                else:
                    announce(listeners, label(args, loop_name))
                async for signum in signals:
                    if signum in stop_signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        break
                    _reload(server)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(_hurry, server, signals, stop_signals)
                    await server.stop()
                    tasks.cancel_scope.cancel()
                extras.cancel_scope.cancel()
        except Exception as exc:
            if serving:
                raise  # a bug while serving: its traceback
            # The App could not start: a Maildir that cannot be written, a startup hook.
            return _fail(args, startup_problem(exc))
    return 0


async def _serve_metrics(
    server: Server, sockets: list[socket.socket], *, task_status: anyio.abc.TaskStatus[int]
) -> None:
    await serve_metrics(server.metrics, None, 0, sockets=sockets, task_status=task_status)


def _fail(args: argparse.Namespace, problem: str) -> int:
    """Say ``problem`` in one line and give exit status 2; a worker tells its parent, which
    says it once for all the tries (see :mod:`minismtp.workers`)."""
    if getattr(args, "status_fd", None) is not None:
        report_status(args.status_fd, problem.encode("utf-8", "replace"))
    else:
        print(f"minismtp: error: {problem}", file=sys.stderr)
    return 2


def _supervise(
    argv: Sequence[str], args: argparse.Namespace, loop_name: str, listeners: Listeners
) -> int:
    """The parent of ``--workers N``: bound already; start the workers, keep them running."""
    announce(listeners, label(args, f"{loop_name}, {args.workers} workers"))
    plain_fds = [sock.fileno() for sock in listeners.plain]
    tls_fds = [sock.fileno() for sock in listeners.tls]
    metrics_fds = [[sock.fileno() for sock in sockets] for sockets in listeners.metrics]
    supervisor = Supervisor(
        worker_command(argv, plain_fds, tls_fds, metrics_fds),
        args.workers,
        [*plain_fds, *tls_fds, *(fd for fds in metrics_fds for fd in fds)],
    )
    try:
        status = anyio.run(supervisor.run)
    finally:
        listeners.close()
    if supervisor.failure is not None:
        print(f"minismtp: error: {supervisor.failure}", file=sys.stderr)
    return status


def _reload(server: Server) -> None:
    if server.tls is None:
        log.info("SIGHUP: no TLS certificate to reload")
    else:
        server.reload_tls()


async def _hurry(
    server: Server, signals: AsyncIterator[signal.Signals], stop_signals: set[signal.Signals]
) -> None:
    """During a graceful stop, a second SIGTERM or SIGINT closes every session at once."""
    async for signum in signals:
        if signum in stop_signals:
            log.info("%s again: closing every session now", signal.Signals(signum).name)
            server.abort()
        else:
            _reload(server)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would say it as the top parser; the hint names the subcommand's --help.
        prog = f"{parser.prog} {args.command}" if args.command else parser.prog
        parser.exit(2, usage_error(prog, f"unrecognized arguments: {' '.join(unknown)}"))
    if args.command == "run":
        resolve_tcp(args)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logs.configure(args.log_level)
    if getattr(args, "resolver", None) is not None:  # run and consume alike
        host, port = args.resolver
        dns.configure([host], port)
    # As uvicorn does: ``minismtp run myapp:app`` finds myapp.py where the user stands.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "consume":
        from minismtp import consume

        return consume.main(args)
    try:
        backend, backend_options, loop_name = choose_loop(args.loop)
        # The parent of --workers loads the App too: a bad one is one line and exit 2 here.
        app, tls = load_app(args)
        server_config(args)
        supervising = args.workers > 1 and args.worker_index is None
        if supervising:
            check_store(app)
        listeners = inherited_listeners(args) if args.worker_index is not None else bind_all(args)
    except UsageError as exc:
        if args.log_level == "debug" and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        return _fail(args, str(exc))
    if supervising:
        return _supervise(argv, args, loop_name, listeners)
    allocator.tune()  # large messages without a page fault per page (see the module)
    try:
        result: int = anyio.run(
            _serve,
            app,
            tls,
            args,
            loop_name,
            listeners,
            backend=backend,
            backend_options=backend_options,
        )
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 130
    finally:
        listeners.close()  # those serve() did not take (closing twice does no harm)
    if args.worker_index is not None:
        # The parent may pass on a signal that crossed our exit (systemd signals every process
        # of the unit unless KillMode=mixed): the stop is done, it must not kill us now.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return result


# What the command line's modules export, importable from here as before the split.
__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOG_LEVELS",
    "LOOPS",
    "Listeners",
    "UsageError",
    "build_parser",
    "choose_loop",
    "import_app",
    "main",
    "open_store",
]
