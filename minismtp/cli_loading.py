"""What ``minismtp run`` serves, checked before anything listens: the App imported from
``module:attribute`` (a problem in the user's module is one line naming where it was
raised), the options applied to it, its store opened, the TLS certificate loaded, the event
loop chosen."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import ssl
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

import anyio
import attrs

from minismtp.app import App, default_app
from minismtp.cli_parser import UsageError
from minismtp.maildir import MaildirError
from minismtp.proxy import LOOPBACK, parse_networks
from minismtp.server import ServableApp, ServerConfig
from minismtp.tls import TLSConfig, TLSLoadError


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


def load_app(args: argparse.Namespace) -> tuple[ServableApp, TLSConfig | None]:
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


def server_config(args: argparse.Namespace) -> ServerConfig:
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


def startup_problem(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # a task group's
        exc = exc.exceptions[0]
    if isinstance(exc, MaildirError):
        return str(exc)  # names the path and the problem
    return f"the App did not start: {_explain(exc)}"


def check_store(app: ServableApp) -> None:
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
