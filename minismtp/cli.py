"""``minismtp run [module:app]``: serve an App from the command line.

Like uvicorn: the App is imported from ``module:attribute`` (the current directory is on the
import path), every problem found before serving -- an App that cannot be imported, a bad
option, a port in use, a certificate that does not load -- is one line on stderr and exit
status 2, and SIGTERM or SIGINT stops the server gracefully (a second one closes every session
at once). SIGHUP reads the TLS certificate and key again.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import ssl
import sys
import traceback
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import anyio
import attrs

from minismtp import __version__
from minismtp.app import default_app
from minismtp.server import ServableApp, Server, ServerConfig, serve
from minismtp.tls import TLSConfig

log = logging.getLogger("minismtp.cli")

DEFAULT_PORT = 2525  # unprivileged; an MX listens on 25 (--port 25)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOOPS = ("auto", "asyncio", "uvloop", "trio")
_DEFAULTS = ServerConfig()


class UsageError(Exception):
    """A problem with what was asked for: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the user asked for --help if they want it.
        self.exit(2, f"minismtp: error: {message} (see 'minismtp run --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minismtp",
        description="An asynchronous SMTP receiving server framework.",
    )
    parser.add_argument("--version", action="version", version=f"minismtp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    run = commands.add_parser(
        "run",
        help="serve an App",
        description=(
            "Serve an App over SMTP. Without APP, serve the embedded default, which stores "
            "every message in a Maildir (--maildir) and logs one line per message. "
            "SIGTERM or SIGINT stops gracefully: sessions in a mail transaction may finish it "
            "(--shutdown-grace), the others get 421. SIGHUP reloads the TLS certificate."
        ),
    )
    run.add_argument(
        "app",
        nargs="?",
        metavar="APP",
        help="the App to serve, as module:attribute (e.g. examples.hello:app); "
        "the current directory is on the import path",
    )
    run.add_argument(
        "--factory",
        action="store_true",
        help="APP names a function that takes no arguments and returns the App",
    )
    net = run.add_argument_group("listening")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    net.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    net.add_argument(
        "--hostname",
        help="the server's name in the greeting, EHLO and Received: headers "
        "(default: the App's, or this machine's name for the embedded default)",
    )
    net.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: auto picks uvloop when it is installed, else asyncio "
        "(default: %(default)s)",
    )
    limits = run.add_argument_group("limits")
    limits.add_argument(
        "--max-size",
        type=_positive_int,
        metavar="BYTES",
        help="largest message accepted, advertised as SIZE (default: 33554432, 32 MiB)",
    )
    limits.add_argument(
        "--max-recipients",
        type=_positive_int,
        metavar="N",
        help="recipients per message; more get 452 4.5.3 (default: 100)",
    )
    limits.add_argument(
        "--timeout",
        type=_seconds,
        default=_DEFAULTS.idle_timeout,
        metavar="SECONDS",
        help="idle time allowed per command before 421 4.4.2 (default: %(default)g); "
        "message content is timed by a minimum data rate instead",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive_int,
        default=_DEFAULTS.max_connections,
        metavar="N",
        help="concurrent connections; more get 421 4.7.0 (default: %(default)s)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=_DEFAULTS.shutdown_grace,
        metavar="SECONDS",
        help="on SIGTERM, how long a transaction in progress may take to finish "
        "(default: %(default)g)",
    )
    tls = run.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (a chain file, leaf first, is fine); enables STARTTLS",
    )
    tls.add_argument(
        "--tls-key", metavar="FILE", help="PEM private key (default: in --tls-cert's file)"
    )
    tls.add_argument(
        "--tls-port",
        type=_port,
        metavar="PORT",
        help="also listen on PORT with implicit TLS (RFC 8314, e.g. 465)",
    )
    tls.add_argument(
        "--require-tls",
        action="store_true",
        help="refuse MAIL before STARTTLS with 530 5.7.0",
    )
    store = run.add_argument_group("embedded default")
    store.add_argument(
        "--maildir",
        metavar="DIR",
        help="Maildir the embedded default stores messages in (default: ./maildir)",
    )
    run.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="log messages of this level and above (default: %(default)s)",
    )
    return parser


def import_app(spec: str, *, factory: bool = False) -> ServableApp:
    """The App named by ``module:attribute`` (a dotted attribute path is fine)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"APP must be module:attribute, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module itself raised: still one line, not a traceback
        raise UsageError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if factory:
        if not callable(target):
            raise UsageError(f"{spec} is not callable, but --factory was given")
        try:
            target = target()
        except Exception as exc:
            raise UsageError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not (callable(target) and hasattr(target, "serving") and hasattr(target, "limits")):
        hint = " (a factory? add --factory)" if callable(target) else ""
        raise UsageError(f"{spec} is not an App{hint}")
    app: ServableApp = target
    return app


def choose_loop(loop: str) -> tuple[str, dict[str, Any], str]:
    """anyio's backend, its options, and the name to print for ``--loop``."""
    if loop == "trio":
        try:
            import trio  # noqa: F401
        except ImportError:
            raise UsageError("--loop trio: trio is not installed (pip install trio)") from None
        return "trio", {}, "trio"
    if loop in ("auto", "uvloop") and sys.platform != "win32":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if loop == "uvloop":
                raise UsageError(
                    "--loop uvloop: uvloop is not installed (pip install 'minismtp[uvloop]')"
                ) from None
        else:
            return "asyncio", {"use_uvloop": True}, "asyncio+uvloop"
    elif loop == "uvloop":
        raise UsageError("--loop uvloop: uvloop does not run on Windows")
    return "asyncio", {}, "asyncio"


def _configure_app(app: ServableApp, args: argparse.Namespace) -> None:
    if args.hostname:
        app.hostname = args.hostname
    if args.max_size is not None:
        app.limits = attrs.evolve(app.limits, max_message_size=args.max_size)
    if args.max_recipients is not None:
        app.limits = attrs.evolve(app.limits, max_recipients=args.max_recipients)


def _load(args: argparse.Namespace) -> tuple[ServableApp, TLSConfig | None]:
    if args.app is None:
        app: ServableApp = default_app(maildir=args.maildir or "./maildir", hostname=args.hostname)
    elif args.maildir is not None:
        raise UsageError("--maildir is for the embedded default; give your App a maildir")
    else:
        app = import_app(args.app, factory=args.factory)
    _configure_app(app, args)
    if args.tls_cert is None:
        for option in ("tls_key", "tls_port"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} needs --tls-cert")
        if args.require_tls:
            raise UsageError("--require-tls needs --tls-cert")
        return app, None
    try:
        tls = TLSConfig(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise UsageError(f"cannot load the TLS certificate {args.tls_cert!r}: {exc}") from exc
    return app, tls


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(
    app: ServableApp,
    tls: TLSConfig | None,
    args: argparse.Namespace,
    loop_name: str,
) -> int:
    config = ServerConfig(
        idle_timeout=args.timeout,
        max_connections=args.max_connections,
        shutdown_grace=args.shutdown_grace,
    )
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    reload_signal = getattr(signal, "SIGHUP", None)
    wanted = [*stop_signals, *([reload_signal] if reload_signal is not None else [])]
    # Open before announcing the address, so that a signal right after it is not lost.
    with anyio.open_signal_receiver(*wanted) as signals:
        try:
            running = serve(
                app,
                args.host,
                args.port,
                tls=tls,
                tls_port=args.tls_port,
                require_tls=args.require_tls,
                config=config,
            )
            async with running as server:
                for address in server.addresses:
                    print(f"minismtp listening on {_format_address(address)} ({loop_name})")
                for address in server.tls_addresses:
                    print(
                        f"minismtp listening on {_format_address(address)} "
                        f"with implicit TLS ({loop_name})"
                    )
                sys.stdout.flush()
                async for signum in signals:
                    if signum in stop_signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        break
                    _reload(server)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(_hurry, server, signals, stop_signals)
                    await server.stop()
                    tasks.cancel_scope.cancel()
        except OSError as exc:
            # The port is in use, or the Maildir cannot be created: said once, exit 2.
            print(f"minismtp: error: {exc}", file=sys.stderr)
            return 2
    return 0


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # As uvicorn does: ``minismtp run myapp:app`` finds myapp.py where the user stands.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        backend, backend_options, loop_name = choose_loop(args.loop)
        app, tls = _load(args)
    except UsageError as exc:
        if args.log_level == "debug" and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"minismtp: error: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = anyio.run(
            _serve, app, tls, args, loop_name, backend=backend, backend_options=backend_options
        )
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 130
    return result
