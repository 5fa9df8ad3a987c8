"""``minismtp run [module:app]``: serve an App from the command line.

Like uvicorn: the App is imported from ``module:attribute`` (the current directory is on the
import path), every problem found before serving -- an App that cannot be imported, a bad
option, a port in use, a certificate that does not load, a Maildir that cannot be written --
is one line on stderr and exit status 2, and SIGTERM or SIGINT stops the server gracefully
(a second one closes every session at once). SIGHUP reads the TLS certificate and key again.
With ``--workers N`` this process binds the sockets and supervises N worker processes
(:mod:`minismtp.workers`).

Every listener (SMTP, implicit TLS, metrics; with ``--workers``, each worker's metrics port) is
bound here, before anything is announced, so that a port that cannot be bound is said once,
naming the address and what to do, and nothing is left listening.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

import anyio
import anyio.abc
import attrs

from minismtp import __version__, allocator, dns, logs
from minismtp.app import App, default_app
from minismtp.maildir import MaildirError
from minismtp.metrics import serve_metrics
from minismtp.proxy import LOOPBACK, parse_networks
from minismtp.server import ServableApp, Server, ServerConfig, serve
from minismtp.tls import TLSConfig, TLSLoadError
from minismtp.unix import UnixSocket, bind_unix_socket
from minismtp.workers import (
    READY,
    Supervisor,
    bind_sockets,
    report_status,
    watch_parent,
    worker_command,
)

log = logging.getLogger("minismtp.cli")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2525  # unprivileged; an MX listens on 25 (--port 25)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOOPS = ("auto", "asyncio", "uvloop", "trio")
BARE_LF = ("reject", "normalize")
_DEFAULTS = ServerConfig()


class UsageError(Exception):
    """A problem with what was asked for: one line on stderr, exit status 2."""


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        # The width argparse would get from shutil.get_terminal_size(), whose import (with
        # zlib, bz2 and lzma) would cost the server half a megabyte of memory.
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit():
            width = int(columns)
        else:
            try:
                width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
                width = 80
        super().__init__(prog, width=width - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the user asked for --help if they want it.
        self.exit(2, f"minismtp: error: {message} (see '{self.prog} --help')\n")


N = TypeVar("N", int, float)


def _number(
    convert: Callable[[str], N], what: str, accept: Callable[[N], bool], why: str
) -> Callable[[str], N]:
    """An argparse ``type`` that converts, then checks the range, with one-line errors."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{why}: {text}")
        return value

    return parse


_positive_int = _number(int, "a whole number", lambda value: value >= 1, "must be at least 1")
_octets = _number(int, "a whole number", lambda value: value >= 0, "must not be negative")
_count = _octets
_port = _number(int, "a port number", lambda value: 0 <= value <= 65535, "not a port number")
_seconds = _number(
    float, "a number of seconds", lambda value: value > 0, "must be more than 0 seconds"
)

# RFC 5321 4.1.2 Domain (RFC 1035 labels, digits first allowed by RFC 1123), up to 253 octets.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*", re.ASCII)


def _hostname(text: str) -> str:
    """``--hostname``: a domain name or an address literal (RFC 5321 4.1.3), as it goes into
    the greeting and every ``Received:`` header."""
    if _DOMAIN.fullmatch(text):
        return text
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else None
    if literal is not None:
        tagged = literal[:5].lower() == "ipv6:"
        try:
            version = ipaddress.ip_address(literal[5:] if tagged else literal).version
        except ValueError:
            pass
        else:
            if (version == 6) == tagged:  # an IPv6 address needs its "IPv6:" tag, and only it
                return text
    raise argparse.ArgumentTypeError(
        f"not a domain name or an address literal like [192.0.2.1]: {text!r}"
    )


def _log_level(text: str) -> str:
    return text.lower()  # DEBUG, Debug and debug alike; choices= checks it after


def _nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address: a DNS server to ask."""
    host, port = text, 53
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"not IP[:PORT]: {text!r}")
        if rest:
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {host!r}") from None
    return host, port


def _file_mode(text: str) -> int:
    """An argparse ``type``: permissions in octal (``0660``), without the special bits."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r} (e.g. 0660)")
    return mode


def _resolve_tcp(args: argparse.Namespace) -> None:
    """The TCP address to listen on: none with --unix alone (``args.port`` None)."""
    unix_only = args.unix is not None and args.host is None and args.port is None
    if args.host is None:
        args.host = DEFAULT_HOST
    if args.port is None and not unix_only:
        args.port = DEFAULT_PORT


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
    net.add_argument("--host", help=f"address to listen on (default: {DEFAULT_HOST})")
    net.add_argument(
        "--port",
        type=_port,
        help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    net.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on a unix-domain socket at PATH: instead of TCP, or beside it when "
        "--host or --port is given too; a stale socket file is replaced",
    )
    net.add_argument(
        "--unix-mode",
        type=_file_mode,
        metavar="MODE",
        help="permissions of the --unix socket, in octal, e.g. 0660 (default: the umask's)",
    )
    net.add_argument(
        "--lmtp",
        action="store_true",
        help="speak LMTP (RFC 2033) instead of SMTP: LHLO, and a reply per recipient after "
        "the data (the last hop, behind Postfix's lmtp:unix:PATH)",
    )
    net.add_argument(
        "--hostname",
        type=_hostname,
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
        "--bare-lf",
        choices=BARE_LF,
        default="reject",
        help="a message with a bare LF or CR (not in CRLF): reject it with 550 5.5.2, or "
        "normalize it to CRLF and accept it (default: %(default)s); the end of data is "
        "CRLF.CRLF either way",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive_int,
        default=_DEFAULTS.max_connections,
        metavar="N",
        help="concurrent connections; more get 421 4.7.0 (default: %(default)s); past 80%% "
        "of them, idle and data-rate timeouts shrink to 10 s until the load falls",
    )
    limits.add_argument(
        "--max-connections-per-address",
        type=_count,
        default=_DEFAULTS.max_connections_per_address,
        metavar="N",
        help="concurrent connections from one client address (an IPv6 client: its /64); "
        "more get 421 4.7.0; 0: no limit (default: %(default)s)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=_DEFAULTS.shutdown_grace,
        metavar="SECONDS",
        help="on SIGTERM, how long a transaction in progress may take to finish "
        "(default: %(default)g)",
    )
    spool = run.add_argument_group("message content")
    spool.add_argument(
        "--spool-memory",
        type=_octets,
        metavar="BYTES",
        help="octets of a message's content held in memory; past that it goes to a file "
        "(default: 262144, 256 KiB)",
    )
    spool.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="where the files of large messages are written while they arrive (default: the "
        "Maildir's tmp/ with a Maildir, so that storing is a rename; else the system's "
        "temporary directory)",
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
    proxy = run.add_argument_group("behind a load balancer")
    proxy.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection starts with a PROXY protocol header (v1 or v2, as HAProxy "
        "sends it) naming the client; connections without a valid one are closed",
    )
    proxy.add_argument(
        "--proxy-trusted",
        action="append",
        metavar="CIDR",
        help="a network whose PROXY headers are believed; repeat for more; others are closed "
        "(default: 127.0.0.0/8 and ::1)",
    )
    proxy.add_argument(
        "--proxy-timeout",
        type=_seconds,
        default=_DEFAULTS.proxy_timeout,
        metavar="SECONDS",
        help="time allowed for the PROXY header to arrive (default: %(default)g)",
    )
    procs = run.add_argument_group("processes and metrics")
    procs.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="serve with N worker processes sharing the listening socket; this process "
        "restarts any that dies and passes signals on (default: %(default)s)",
    )
    procs.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics; worker i of --workers "
        "uses PORT+i (default: no metrics endpoint)",
    )
    procs.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    # What a worker process of --workers is given by its parent; not for people.
    for hidden in ("--listen-fd", "--listen-tls-fd"):
        run.add_argument(hidden, type=int, action="append", default=[], help=argparse.SUPPRESS)
    run.add_argument("--listen-metrics-fd", action="append", default=[], help=argparse.SUPPRESS)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    lookups = run.add_argument_group("DNS (sender authentication, DNSBL)")
    lookups.add_argument(
        "--resolver",
        type=_nameserver,
        metavar="IP[:PORT]",
        help="the DNS server that SPF, DKIM, DMARC and DNSBL middleware ask "
        "(default: those of /etc/resolv.conf)",
    )
    store = run.add_argument_group("where messages go")
    store.add_argument(
        "--maildir",
        metavar="DIR",
        help="Maildir the embedded default stores messages in (default: ./maildir)",
    )
    store.add_argument(
        "--store",
        metavar="URL",
        help="hand every message to this store before the 250, instead of the App's own: "
        "redis://host:port/db?stream=NAME (Redis Streams; pip install 'minismtp[redis]'); "
        "checked at startup",
    )
    run.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default="info",
        help="log messages of this level and above (default: %(default)s)",
    )
    from minismtp import consume

    consume.add_parser(commands)
    return parser


def import_app(spec: str, *, factory: bool = False) -> ServableApp:
    """The App named by ``module:attribute`` (a dotted attribute path is fine)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"APP must be module:attribute, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module itself raised: still one line, not a traceback
        raise UsageError(f"cannot import {module_name!r}: {_explain(exc)}") from exc
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
            raise UsageError(f"{spec}() failed: {_explain(exc)}") from exc
    if not (callable(target) and hasattr(target, "serving") and hasattr(target, "limits")):
        hint = " (a factory? add --factory)" if callable(target) else ""
        raise UsageError(f"{spec} is not an App{hint}")
    app: ServableApp = target
    return app


def _explain(exc: BaseException) -> str:
    """``Type: message (file:line)``: the exception, and where it was raised."""
    where = _raised_at(exc)
    # A SyntaxError's str() says where already, as "(file, line n)".
    message = exc.msg if isinstance(exc, SyntaxError) else exc
    return f"{type(exc).__name__}: {message}" + (f" ({where})" if where else "")


def _raised_at(exc: BaseException) -> str | None:
    """``file:line`` of the line that raised ``exc``: the last one in the user's files (under
    the current directory, shown relative to it) when there is one, else the last one; for a
    SyntaxError, the bad line. None inside the import machinery alone (no such module)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        frames = [(exc.filename, exc.lineno or 0)]
    else:
        frames = _frames(exc.__traceback__)
    here = Path.cwd()
    located: list[tuple[str, int]] = []
    for filename, line in frames:
        try:
            relative = Path(filename).resolve().relative_to(here)
        except ValueError:
            continue
        if "site-packages" not in relative.parts:  # a virtual environment in the project
            located.append((str(relative), line))
    filename, line = (located or frames or [("", 0)])[-1]
    if not filename:
        return None
    return f"{filename}:{line}" if line else filename


def _frames(tb: TracebackType | None) -> list[tuple[str, int]]:
    importlib_dir = os.path.dirname(importlib.__file__)
    frames = []
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        # importlib's own frames (frozen, or its package's files) say nothing either.
        if not filename.startswith(("<frozen", importlib_dir)):
            frames.append((filename, tb.tb_lineno))
        tb = tb.tb_next
    # Our own frames (the import call) say nothing about the user's code.
    return [frame for frame in frames if frame[0] != __file__]


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
    if args.spool_memory is not None:
        app.limits = attrs.evolve(app.limits, spool_memory=args.spool_memory)
    if args.spool_dir is not None:
        if not hasattr(app, "spool_dir"):
            raise UsageError("--spool-dir: this App has no spool_dir")
        spool_dir = Path(args.spool_dir)
        if not spool_dir.is_dir():
            raise UsageError(f"--spool-dir: not a directory: {args.spool_dir!r}")
        app.spool_dir = spool_dir
    if args.bare_lf != "reject":
        app.limits = attrs.evolve(app.limits, accept_bare_line_endings=True)


def open_store(url: str) -> Any:
    """The store a ``--store`` URL names, checked now (it answers): UsageError if not."""
    from minismtp.stores import redis as redis_store  # not imported by servers without --store

    scheme = url.partition(":")[0].lower()
    if scheme not in redis_store.SCHEMES:
        shown = redis_store.redacted(url)
        raise UsageError(
            f"--store: {shown!r} is not a store URL (redis://host:port/db?stream=NAME)"
        )
    try:
        store = redis_store.RedisStreamStore.from_url(url)
        redis_store.check(url, timeout=store.timeout)
    except (ImportError, ValueError, OSError) as exc:
        raise UsageError(f"--store: {exc}") from exc
    return store


def _load(args: argparse.Namespace) -> tuple[ServableApp, TLSConfig | None]:
    if args.store is not None and args.maildir is not None:
        raise UsageError(
            "--store and --maildir are mutually exclusive: a message goes to one place "
            "before its 250 (--store for Redis, --maildir for a local Maildir)"
        )
    store = open_store(args.store) if args.store is not None else None
    if args.app is None:
        if store is not None:
            app: ServableApp = App(hostname=args.hostname or socket.gethostname(), store=store)
        else:
            app = default_app(maildir=args.maildir or "./maildir", hostname=args.hostname)
    elif args.maildir is not None:
        raise UsageError("--maildir is for the embedded default; give your App a maildir")
    else:
        app = import_app(args.app, factory=args.factory)
        if store is not None:
            app.store = store  # type: ignore[attr-defined]
    _configure_app(app, args)
    if args.proxy_trusted is not None and not args.proxy_protocol:
        raise UsageError("--proxy-trusted needs --proxy-protocol")
    if args.unix_mode is not None and args.unix is None:
        raise UsageError("--unix-mode needs --unix")
    if args.workers > 1 and sys.platform == "win32":
        raise UsageError("--workers needs a POSIX system")
    if args.tls_cert is None:
        for option in ("tls_key", "tls_port"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} needs --tls-cert")
        if args.require_tls:
            raise UsageError("--require-tls needs --tls-cert")
        return app, None
    try:
        tls = TLSConfig(args.tls_cert, args.tls_key)
    except TLSLoadError as exc:  # names the file at fault
        raise UsageError(str(exc)) from exc
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise UsageError(f"cannot load the TLS certificate {args.tls_cert!r}: {exc}") from exc
    return app, tls


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_config(args: argparse.Namespace) -> ServerConfig:
    try:
        trusted = parse_networks(args.proxy_trusted) if args.proxy_trusted else LOOPBACK
    except ValueError as exc:
        raise UsageError(f"--proxy-trusted: {exc}") from None
    return ServerConfig(
        idle_timeout=args.timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        shutdown_grace=args.shutdown_grace,
        proxy_protocol=args.proxy_protocol,
        proxy_trusted=trusted,
        proxy_timeout=args.proxy_timeout,
        lmtp=args.lmtp,
    )


# -- listening sockets ------------------------------------------------------------------------


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
        raise UsageError(_bind_problem(port_option, host_option, host, port, exc)) from exc


def _bind_problem(
    port_option: str, host_option: str, host: str | None, port: int, exc: OSError
) -> str:
    """What went wrong binding ``host``:``port``, and what to do about it, in one line."""
    if isinstance(exc, socket.gaierror):
        return f"{host_option} {host!r}: no such host or address ({exc.strerror})"
    where = f"{_format_address((host or '*', port))} ({port_option})"
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


def _bind_all(args: argparse.Namespace) -> Listeners:
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


def _inherited(args: argparse.Namespace) -> Listeners:
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
    return f"http://{_format_address(_address(sockets[0]))}/metrics"


def _label(args: argparse.Namespace, loop_name: str) -> str:
    return f"LMTP, {loop_name}" if args.lmtp else loop_name


def _announce(listeners: Listeners, loop: str) -> None:
    for sock in listeners.plain:
        if sock.family == socket.AF_UNIX:
            print(f"minismtp listening on unix:{sock.getsockname()} ({loop})")
        else:
            print(f"minismtp listening on {_format_address(_address(sock))} ({loop})")
    for sock in listeners.tls:
        print(f"minismtp listening on {_format_address(_address(sock))} with implicit TLS ({loop})")
    if len(listeners.metrics) == 1:
        print(f"minismtp metrics on {_metrics_url(listeners.metrics[0])}")
    else:
        for index, sockets in enumerate(listeners.metrics):
            print(f"minismtp metrics of worker {index} on {_metrics_url(sockets)}")
    sys.stdout.flush()


# -- serving ------------------------------------------------------------------------------------


async def _serve(
    app: ServableApp,
    tls: TLSConfig | None,
    args: argparse.Namespace,
    loop_name: str,
    listeners: Listeners,
) -> int:
    config = _server_config(args)
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
                    _announce(listeners, _label(args, loop_name))
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
            return _fail(args, _startup_problem(exc))
    return 0


async def _serve_metrics(
    server: Server, sockets: list[socket.socket], *, task_status: anyio.abc.TaskStatus[int]
) -> None:
    await serve_metrics(server.metrics, None, 0, sockets=sockets, task_status=task_status)


def _startup_problem(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # a task group's
        exc = exc.exceptions[0]
    if isinstance(exc, MaildirError):
        return str(exc)  # names the path and the problem
    return f"the App did not start: {_explain(exc)}"


def _fail(args: argparse.Namespace, problem: str) -> int:
    """Say ``problem`` in one line and give exit status 2; a worker tells its parent, which
    says it once for all the tries (see :mod:`minismtp.workers`)."""
    if getattr(args, "status_fd", None) is not None:
        report_status(args.status_fd, problem.encode("utf-8", "replace"))
    else:
        print(f"minismtp: error: {problem}", file=sys.stderr)
    return 2


def _check_store(app: ServableApp) -> None:
    """The parent of ``--workers`` serves no App: it opens its store once, as every worker
    will, so that a store that cannot be written is said once, before any worker starts."""
    store = getattr(app, "store", None) or getattr(app, "maildir", None)
    if store is None or not hasattr(store, "open"):
        return

    async def open_and_close() -> None:
        await store.open()
        if hasattr(store, "close"):
            await store.close()

    try:
        anyio.run(open_and_close)
    except MaildirError as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:
        raise UsageError(f"the App's store did not open: {_explain(exc)}") from exc


def _supervise(
    argv: Sequence[str], args: argparse.Namespace, loop_name: str, listeners: Listeners
) -> int:
    """The parent of ``--workers N``: bound already; start the workers, keep them running."""
    _announce(listeners, _label(args, f"{loop_name}, {args.workers} workers"))
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


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Said by the subcommand's parser, so that the hint names its own --help.
        subcommand = _subparser(parser, args.command) if args.command else parser
        subcommand.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        _resolve_tcp(args)
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
        app, tls = _load(args)
        _server_config(args)
        supervising = args.workers > 1 and args.worker_index is None
        if supervising:
            _check_store(app)
        listeners = _inherited(args) if args.worker_index is not None else _bind_all(args)
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
