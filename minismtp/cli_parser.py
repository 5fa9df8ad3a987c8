"""``minismtp``'s command line: the parser of ``run`` (and, through
:func:`minismtp.consume.add_parser`, of ``consume``), its option types, and its one-line
errors (:class:`UsageError`, exit status 2)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from minismtp import __version__
from minismtp.server import ServerConfig

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
        self.exit(2, usage_error(self.prog, message))


def usage_error(prog: str, message: str) -> str:
    """The line a usage error prints: the message, and the --help of ``prog`` (the command,
    or a subcommand: ``minismtp run``)."""
    return f"minismtp: error: {message} (see '{prog} --help')\n"


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


def resolve_tcp(args: argparse.Namespace) -> None:
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
        type=_octets,
        default=_DEFAULTS.max_connections_per_address,
        metavar="N",
        help="concurrent connections from one client address (an IPv6 client: its /64; "
        "with --proxy-protocol, the client its header names); more get 421 4.7.0; 0: no "
        "limit (default: %(default)s)",
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
