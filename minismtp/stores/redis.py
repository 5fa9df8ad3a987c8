"""Durable hand-off to Redis Streams: :class:`RedisStreamStore` (``pip install 'minismtp[redis]'``).

Every accepted message becomes one stream entry (``XADD``), which consumers in any language
read with a consumer group (``minismtp consume`` is one such consumer). The entry's fields:

``id``           our message id (the one in ``250 ... queued as <id>`` and in ``Received:``)
``mail_from``    the reverse-path, ``local@domain`` (empty for the null path ``<>``)
``rcpt_to``      a JSON list of strings
``peer``         the client's address, ``host:port`` (``[host]:port`` for IPv6)
``helo``         the HELO/EHLO name (empty if none)
``tls``          ``"1"`` or ``"0"``; with ``tls_version`` and ``tls_cipher`` when ``"1"``
``received_at``  Unix seconds, with microseconds
``size``         octets of content as the client sent it (without our ``Received:`` header)
``mail_params``  a JSON object of the MAIL parameters (``{"BODY": "8BITMIME"}``), if any
``rcpt_params``  a JSON list of one object per recipient, if any recipient had parameters
``body``         the whole message, our ``Received:`` header first; or instead
``body_key``     the name of a Redis string holding it, for bodies over ``inline_max``

A body over ``inline_max`` is written in pieces from the spool (``SET ... EX``, then
``APPEND``), never joined in memory beyond one piece. The key is born with a time to live
(``body_ttl``); the ``PERSIST`` that removes it and the ``XADD`` that names it run in one
``MULTI``: a body whose entry was never added expires instead of leaking.

What a return from :meth:`RedisStreamStore.put` (and so the ``250``) promises depends on the
server and the options; the README spells it out (``appendfsync always``: the entry is in the
append-only file, fsynced, before Redis answers; ``wait=N``: N replicas have it in memory too;
``waitaof=L,R``: fsynced locally (L=1) and on R replicas).

On asyncio (and uvloop) the store uses ``redis.asyncio``. On trio it uses redis' synchronous
client, one command (or one pipeline) per worker thread through :func:`anyio.to_thread.run_sync`:
redis' asyncio client runs on asyncio only, and its synchronous client's connection pool is
thread-safe. A thread call is not abandoned when cancelled, so a command is never cut off
halfway through its reply.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread
import attrs

from minismtp import stores
from minismtp.message import Message
from minismtp.types import Address, Reply, TLSInfo

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_asyncio

logger = logging.getLogger("minismtp.stores.redis")

DEFAULT_STREAM = "minismtp"
SCHEMES = ("redis", "rediss", "unix")
MIB = 1024 * 1024

Arg = str | bytes | int | float


class StoreUnavailable(stores.StoreUnavailable):
    """Redis did not take the message (unreachable, timing out, read-only, out of memory, too
    few replicas): nothing was acknowledged, the client is answered ``451 4.3.0``."""


def _running_asyncio() -> bool:
    asyncio = sys.modules.get("asyncio")  # not imported: not running (trio need not load it)
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError(
            "the Redis store needs the redis package: pip install 'minismtp[redis]'"
        ) from None
    return redis


# -- the URL ----------------------------------------------------------------------------------


@attrs.frozen
class RedisURL:
    """A ``redis://`` URL split into what redis-py connects with and minismtp's own options.

    ``redis://127.0.0.1:6379/0?stream=minismtp&group=workers&wait=1&wait_timeout=500``: the
    options named below are ours; any other query parameter (``ssl_cert_reqs``,
    ``health_check_interval``, ...) is passed on to redis-py.
    """

    connect: str  # the URL without our options, for redis-py
    options: dict[str, str]

    OURS = (
        "stream",
        "group",
        "consumer",
        "wait",
        "wait_timeout",
        "waitaof",
        "inline_max",
        "timeout",
    )

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        shown = redacted(url)  # errors are printed and logged: never with the password
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a valid Redis URL: {shown!r} ({exc})") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(
                f"not a Redis URL: {shown!r} (expected redis://host:port/db, rediss://... "
                "or unix:///path/to/socket)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"not a Redis URL: {shown!r} (no host)")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError(f"not a Redis URL: {shown!r} (no socket path)")
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if name in cls.OURS:
                ours[name] = value
            else:
                theirs.append((name, value))
        path = parts.path
        if parts.scheme != "unix" and path not in ("", "/"):
            db = path.lstrip("/")
            if not db.isdigit():
                raise ValueError(f"not a Redis URL: {shown!r} (the database must be a number)")
        connect = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, path, urllib.parse.urlencode(theirs), "")
        )
        return cls(connect, ours)

    @property
    def where(self) -> str:
        """Where the server is, for log lines and errors (without a password)."""
        parts = urllib.parse.urlsplit(self.connect)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{parts.port or 6379}"

    def text(self, name: str, default: str) -> str:
        value = self.options.get(name, default)
        if not value:
            raise ValueError(f"Redis URL: {name}= must not be empty")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.options.get(name)
        if value is None:
            return default
        if not value.isdigit() or int(value) < minimum:
            raise ValueError(f"Redis URL: {name}={value!r} is not a whole number >= {minimum}")
        return int(value)

    def seconds(self, name: str, default: float) -> float:
        value = self.options.get(name)
        if value is None:
            return default
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"Redis URL: {name}={value!r} is not a number of seconds > 0")
        return seconds


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for logs and reprs)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<a URL that does not parse>"
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# -- one way to send commands, on either backend ----------------------------------------------


class Link(Protocol):
    """Raw commands to one Redis server: replies as the server sent them (no redis-py reply
    callbacks), errors raised as redis-py's exceptions."""

    async def call(self, *args: Arg) -> Any: ...

    async def batch(
        self, commands: Sequence[Sequence[Arg]], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Send ``commands`` on one connection, in order; their replies (a MULTI inside
        is the caller's: EXEC's reply may hold an error per command). Without
        ``raise_on_error``, a command's error is its reply (a connection's is raised)."""
        ...

    async def reset(self) -> None:
        """Drop the idle pooled connections (after a connection failed: they may all be
        stale); those in use fail, if they are dead, by themselves."""
        ...

    async def aclose(self) -> None: ...


def _client_options(timeout: float) -> dict[str, Any]:
    redis = _import_redis()
    from redis.backoff import NoBackoff

    retry_class = redis.asyncio.retry.Retry if _running_asyncio() else redis.retry.Retry
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No silent retries: a command whose connection broke may have been executed, and a
        # retried XADD would add the message twice. The store decides (451, backoff).
        "retry": retry_class(NoBackoff(), 0),
        # RESP2 replies: arrays where RESP3 has maps, the same on every redis-py version (8.x
        # speaks RESP3 by default), which is what the raw replies are read as.
        "protocol": 2,
    }


@attrs.define
class _AsyncioLink:
    client: redis_asyncio.Redis

    async def call(self, *args: Arg) -> Any:
        return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def batch(
        self, commands: Sequence[Sequence[Arg]], *, raise_on_error: bool = True
    ) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=raise_on_error)

    async def reset(self) -> None:
        await self.client.connection_pool.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        await self.client.aclose()


@attrs.define
class _ThreadLink:
    client: redis_sync.Redis

    async def call(self, *args: Arg) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(self.client.execute_command, *args))

    def _batch(self, commands: Sequence[Sequence[Arg]], raise_on_error: bool) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return pipe.execute(raise_on_error=raise_on_error)

    async def batch(
        self, commands: Sequence[Sequence[Arg]], *, raise_on_error: bool = True
    ) -> list[Any]:
        return await anyio.to_thread.run_sync(self._batch, commands, raise_on_error)

    async def reset(self) -> None:
        await anyio.to_thread.run_sync(
            functools.partial(self.client.connection_pool.disconnect, inuse_connections=False)
        )

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.client.close)


def connect(url: str, timeout: float) -> Link:
    """A :class:`Link` to the server at ``url`` (redis-py's form, without our options), for
    the running backend: redis.asyncio on asyncio, the synchronous client in threads else."""
    redis = _import_redis()
    options = _client_options(timeout)
    client: Any
    if _running_asyncio():
        client = redis.asyncio.Redis.from_url(url, **options)
        link: Link = _AsyncioLink(client)
    else:
        client = redis.Redis.from_url(url, **options)
        link = _ThreadLink(client)
    # Raw replies: the same shapes on both clients, and none of redis-py's per-command parsing.
    client.response_callbacks.clear()
    return link


def check(url: str, timeout: float = 5.0) -> None:
    """PING the server at ``url`` (a minismtp Redis URL) now, blocking: ``ValueError`` for a
    bad URL, ``OSError`` with one line of text if it does not answer. For the CLI's startup."""
    parsed = RedisURL.parse(url)
    redis = _import_redis()
    from redis.backoff import NoBackoff

    client = redis.Redis.from_url(
        parsed.connect,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise OSError(f"cannot reach Redis at {parsed.where}: {_reason(exc)}") from exc
    except TypeError as exc:  # an unknown query parameter, passed on to the connection
        raise ValueError(f"Redis URL {redacted(url)!r}: {exc}") from None
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    """One line: redis-py's class names the failure (OutOfMemoryError, ReadOnlyError, ...)
    and drops the server's prefix (OOM, READONLY) from the text."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, StoreUnavailable):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the entry --------------------------------------------------------------------------------


def _peer_text(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def entry_fields(message: Message) -> list[Arg]:
    """The fields of ``message``'s entry, without the body, as XADD arguments."""
    import json  # not at the top: the CLI imports this module's parser side in every server

    fields: list[Arg] = [
        "id",
        message.id,
        "mail_from",
        str(message.mail_from),
        "rcpt_to",
        json.dumps([str(rcpt) for rcpt in message.rcpt_to], ensure_ascii=False),
        "peer",
        _peer_text(message.peer),
        "helo",
        message.helo_name or "",
        "tls",
        "1" if message.tls else "0",
        "received_at",
        f"{message.received_at:.6f}",
        "size",
        message.size,
    ]
    if message.tls:
        fields += ["tls_version", message.tls.version, "tls_cipher", message.tls.cipher]
    if message.mail_params:
        fields += ["mail_params", json.dumps(message.mail_params, ensure_ascii=False)]
    if any(message.rcpt_params):
        fields += ["rcpt_params", json.dumps(list(message.rcpt_params), ensure_ascii=False)]
    return fields


def _address(text: str) -> Address:
    if not text:
        return Address.null()
    local, at, domain = text.rpartition("@")
    if not at:  # <postmaster> and the like: no domain
        return Address(text, "", text)
    return Address(local, domain, text)


def _peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return text, 0


@attrs.frozen
class Entry:
    """A stream entry read back: the envelope, and where the body is."""

    stream_id: str
    fields: dict[str, bytes]

    @classmethod
    def from_reply(cls, stream_id: bytes, flat: Sequence[bytes]) -> Entry:
        it = iter(flat)
        return cls(stream_id.decode(), dict(zip(map(bytes.decode, it), it, strict=False)))

    def text(self, name: str, default: str | None = None) -> str:
        value = self.fields.get(name)
        if value is None:
            if default is None:
                raise ValueError(f"entry {self.stream_id} has no {name!r} field")
            return default
        return value.decode("utf-8", "surrogateescape")

    @property
    def message_id(self) -> str:
        return self.text("id", "")

    @property
    def body_key(self) -> bytes | None:
        return self.fields.get("body_key")

    def envelope(self) -> dict[str, Any]:
        """The keyword arguments of the Message, but for its body (ValueError if malformed)."""
        import json

        try:
            rcpt_to = json.loads(self.text("rcpt_to"))
            mail_params = json.loads(self.text("mail_params", "{}"))
            rcpt_params = json.loads(self.text("rcpt_params", "[]"))
            tls = None
            if self.text("tls", "0") == "1":
                tls = TLSInfo(self.text("tls_version", ""), self.text("tls_cipher", ""))
            return {
                "id": self.text("id"),
                "mail_from": _address(self.text("mail_from")),
                "rcpt_to": tuple(_address(str(rcpt)) for rcpt in rcpt_to),
                "peer": _peer(self.text("peer", "")),
                "helo_name": self.text("helo", "") or None,
                "tls": tls,
                "received_at": float(self.text("received_at")),
                "mail_params": dict(mail_params),
                "rcpt_params": tuple(dict(p) for p in rcpt_params) or tuple({} for _ in rcpt_to),
                "size": int(self.text("size")),
            }
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"entry {self.stream_id} is malformed: {exc}") from None


# -- the store --------------------------------------------------------------------------------


async def _pieces(message: Message, size: int) -> AsyncIterator[bytes]:
    """The whole message (trace header first) in pieces of ``size`` octets (the last shorter),
    from the spool: never more than one piece joined in memory."""
    piece = bytearray()
    async for chunk in message.chunks(size):
        if not piece and len(chunk) == size:
            yield bytes(chunk)
            continue
        piece += chunk
        if len(piece) >= size:
            yield bytes(piece[:size])
            del piece[:size]
    if piece:
        yield bytes(piece)


@attrs.define(eq=False)
class _Add:
    """One message's XADD in a group commit, and what became of it (an id, or an error)."""

    command: list[Arg]
    outcome: Any = None
    taken: anyio.Event | None = None  # set when the pipeline that took it is done


@attrs.define(eq=False)
class RedisStreamStore:
    """Each message an entry of the Redis stream ``stream`` before the ``250``.

    ``RedisStreamStore.from_url("redis://host:6379/0?stream=inbound&wait=1")`` reads the
    options from a URL (see :class:`RedisURL`): ``stream``, ``wait`` (replicas that must
    acknowledge: ``WAIT``), ``wait_timeout`` (milliseconds, for ``WAIT`` and ``WAITAOF``),
    ``waitaof`` (``L,R``: ``WAITAOF L R``, Redis 7.2+), ``inline_max`` (largest body put in
    the entry itself, in octets) and ``timeout`` (seconds for a connection or a reply).

    When Redis fails (unreachable, timeout, ``READONLY``, ``OOM``, too few replicas), ``put``
    raises :class:`StoreUnavailable` and the client gets ``451 4.3.0``. For a moment after a
    failure (``backoff``, doubled up to ``backoff_max`` while failures go on) messages are
    refused at once, without waiting for Redis; then the next message tries again. One log
    line when Redis fails, one when it is back: not one per message.
    """

    url: str = attrs.field(repr=lambda url: repr(redacted(url)))
    stream: str = DEFAULT_STREAM
    wait_replicas: int = 0
    wait_timeout: float = 1.0  # seconds
    waitaof_local: int = 0
    waitaof_replicas: int = 0
    inline_max: int = MIB
    piece_size: int = MIB
    body_ttl: int = 3600  # seconds a body key lives until the XADD that names it persists it
    timeout: float = 5.0
    backoff: float = 0.1
    backoff_max: float = 2.0
    max_in_flight: int = 4  # XADD pipelines on their way at once (see _commit)
    #: Stores that write files want the spool there; a Redis store takes the body from anywhere.
    spool_dir: Path | None = None
    _link: Link | None = attrs.field(default=None, init=False)
    _down_since: float | None = attrs.field(default=None, init=False)
    _down_reason: str = attrs.field(default="", init=False)
    _retry_at: float = attrs.field(default=0.0, init=False)
    _delay: float = attrs.field(default=0.0, init=False)
    _refused: int = attrs.field(default=0, init=False)
    _queue: list[_Add] = attrs.field(factory=list, init=False)  # XADDs waiting for a batch
    _in_flight: int = attrs.field(default=0, init=False)  # pipelines on their way
    _slot_free: anyio.Event | None = attrs.field(default=None, init=False)

    @classmethod
    def from_url(cls, url: str) -> RedisStreamStore:
        """The store a ``--store`` URL describes (ValueError with the reason if it is bad)."""
        parsed = RedisURL.parse(url)
        for name in ("group", "consumer"):
            if name in parsed.options:
                raise ValueError(f"Redis URL: {name}= is for minismtp consume, not for a store")
        waitaof = parsed.options.get("waitaof")
        local = replicas = 0
        if waitaof is not None:
            local_text, _, replicas_text = waitaof.partition(",")
            if not (local_text in ("0", "1") and replicas_text.isdigit()):
                raise ValueError(
                    f"Redis URL: waitaof={waitaof!r} must be L,R (L 0 or 1, R replicas)"
                )
            local, replicas = int(local_text), int(replicas_text)
        return cls(
            parsed.connect,
            stream=parsed.text("stream", DEFAULT_STREAM),
            wait_replicas=parsed.integer("wait", 0),
            wait_timeout=parsed.integer("wait_timeout", 1000, minimum=1) / 1000,
            waitaof_local=local,
            waitaof_replicas=replicas,
            inline_max=parsed.integer("inline_max", MIB),
            timeout=parsed.seconds("timeout", 5.0),
        )

    @property
    def where(self) -> str:
        return RedisURL.parse(self.url).where

    def describe(self) -> str:
        """What a 250 promises with these settings, for the startup log line."""
        extra = ""
        if self.wait_replicas:
            extra += f", WAIT {self.wait_replicas}"
        if self.waitaof_local or self.waitaof_replicas:
            extra += f", WAITAOF {self.waitaof_local} {self.waitaof_replicas}"
        return f"redis stream {self.stream!r} at {self.where}{extra}"

    async def open(self) -> None:
        """Connect and check: PING, the stream's type, WAITAOF support if it is asked for.
        Raises OSError with one line of text."""
        if self._link is not None:
            return
        try:
            link = connect(self.url, self.timeout)
        except (ValueError, TypeError) as exc:
            raise OSError(f"Redis URL {redacted(self.url)!r}: {exc}") from None
        redis = _import_redis()
        try:
            await link.call("PING")
            kind = await link.call("TYPE", self.stream)
            if kind not in (b"stream", b"none"):
                raise OSError(
                    f"Redis key {self.stream!r} at {self.where} is a {kind.decode()}, not a stream"
                )
            if self.waitaof_local or self.waitaof_replicas:
                info = await link.call("INFO", "server")
                version = _info_field(info, "redis_version")
                if _version(version) < (7, 2):
                    raise OSError(f"waitaof= needs Redis 7.2 or later; {self.where} runs {version}")
            if self.wait_replicas or self.waitaof_replicas:
                info = await link.call("INFO", "replication")
                connected = int(_info_field(info, "connected_slaves") or 0)
                wanted = max(self.wait_replicas, self.waitaof_replicas)
                if connected < wanted:
                    logger.warning(
                        "Redis at %s has %d replica(s) connected; every message will wait for %d"
                        " and be refused (451) until they are",
                        self.where,
                        connected,
                        wanted,
                    )
        except redis.RedisError as exc:
            await _close_quietly(link)
            raise OSError(f"cannot reach Redis at {self.where}: {_reason(exc)}") from exc
        except BaseException:
            await _close_quietly(link)
            raise
        self._link = link
        logger.info("storing messages in %s", self.describe())

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await _close_quietly(link)

    async def __aenter__(self) -> RedisStreamStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def put(self, message: Message) -> Mapping[Address, Reply] | None:
        """Add ``message`` to the stream; return once Redis has it as durably as configured."""
        link = self._link
        if link is None:
            raise RuntimeError("RedisStreamStore.put() before open()")
        if self._down_since is not None and time.monotonic() < self._retry_at:
            self._refused += 1
            raise StoreUnavailable(f"Redis at {self.where} unavailable: {self._down_reason}")
        redis = _import_redis()
        try:
            await self._add(link, message)
        except (redis.RedisError, StoreUnavailable) as exc:
            await self._failed(link, exc)
            raise StoreUnavailable(
                f"Redis at {self.where} did not take message {message.id}: {_reason(exc)}"
            ) from exc
        if self._down_since is not None:
            self._recovered()
        return None

    async def _add(self, link: Link, message: Message) -> None:
        fields = entry_fields(message)
        if message.size <= self.inline_max:
            xadd: list[Arg] = ["XADD", self.stream, "*", *fields, "body", message.data]
            await self._commit(link, _Add(xadd))
            return
        key = f"{self.stream}:body:{message.id}"
        refused = True  # until the MULTI is sent: no entry names the key, it may go
        try:
            first = True
            async for piece in _pieces(message, self.piece_size):
                if first:
                    await link.call("SET", key, piece, "EX", self.body_ttl)
                    first = False
                else:
                    await link.call("APPEND", key, piece)
            xadd = ["XADD", self.stream, "*", *fields, "body_key", key]
            refused = False  # a lost reply leaves it unknown: PERSIST and XADD, or the TTL
            try:
                replies = await link.batch(
                    [["MULTI"], ["PERSIST", key], xadd, ["EXEC"], *self._durability()]
                )
            except _import_redis().ResponseError:
                refused = True  # a command refused while queued (OOM...): EXEC aborted
                raise
            executed = replies[3]
            if executed is None or any(isinstance(reply, Exception) for reply in executed):
                refused = True
                errors = [reply for reply in executed or () if isinstance(reply, Exception)]
                raise errors[0] if errors else StoreUnavailable("the transaction was aborted")
            self._check_durability(replies, 4)  # the entry stays: at-least-once
        except BaseException:
            if refused:
                # Sooner than its time to live: nothing names the key.
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                    try:
                        await link.call("DEL", key)
                    except Exception:
                        pass
            raise

    async def _commit(self, link: Link, add: _Add) -> None:
        """Group commit: up to ``max_in_flight`` pipelines on their way at once; a message that
        finds them all busy waits, and the next free one takes every message waiting (one
        pipeline, one WAIT/WAITAOF for all). Under light load each message goes alone, at
        once; under heavy load the client's cost per message falls."""
        self._queue.append(add)
        try:
            while add.taken is None:
                if self._in_flight < self.max_in_flight:
                    batch, self._queue = self._queue, []
                    done = anyio.Event()
                    for queued in batch:
                        queued.taken = done
                    self._in_flight += 1
                    try:
                        await self._flush(link, batch)
                    finally:
                        self._in_flight -= 1
                        done.set()
                        if self._slot_free is not None:
                            self._slot_free.set()
                            self._slot_free = None
                    break
                if self._slot_free is None:
                    self._slot_free = anyio.Event()
                await self._slot_free.wait()
            else:
                await add.taken.wait()
        except BaseException:
            if add in self._queue:  # cancelled before a pipeline took it: none will
                self._queue.remove(add)
            raise
        if isinstance(add.outcome, BaseException):
            raise add.outcome

    async def _flush(self, link: Link, batch: list[_Add]) -> None:
        durability = self._durability()
        try:
            if len(batch) == 1 and not durability:
                replies: list[Any] = [await link.call(*batch[0].command)]
            else:
                commands = [add.command for add in batch] + durability
                replies = await link.batch(commands, raise_on_error=False)
                self._check_durability(replies, len(batch))
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else StoreUnavailable("cancelled")
            for add in batch:
                add.outcome = failure
            raise
        for add, reply in zip(batch, replies, strict=False):
            add.outcome = reply

    def _durability(self) -> list[list[Arg]]:
        timeout_ms = max(1, round(self.wait_timeout * 1000))
        commands: list[list[Arg]] = []
        if self.wait_replicas:
            commands.append(["WAIT", self.wait_replicas, timeout_ms])
        if self.waitaof_local or self.waitaof_replicas:
            commands.append(["WAITAOF", self.waitaof_local, self.waitaof_replicas, timeout_ms])
        return commands

    def _check_durability(self, replies: list[Any], first: int) -> None:
        index = first
        for reply in replies[first:]:
            if isinstance(reply, Exception):
                raise reply
        if self.wait_replicas:
            acknowledged = int(replies[index])
            if acknowledged < self.wait_replicas:
                raise StoreUnavailable(
                    f"WAIT: {acknowledged} of {self.wait_replicas} replica(s) acknowledged"
                )
            index += 1
        if self.waitaof_local or self.waitaof_replicas:
            local, replicas = (int(n) for n in replies[index])
            if local < self.waitaof_local or replicas < self.waitaof_replicas:
                raise StoreUnavailable(
                    f"WAITAOF: fsynced locally {local}/{self.waitaof_local}, "
                    f"on {replicas}/{self.waitaof_replicas} replica(s)"
                )

    async def _failed(self, link: Link, exc: BaseException) -> None:
        now = time.monotonic()
        reason = _reason(exc)
        if self._down_since is None:
            self._down_since = now
            self._delay = self.backoff
            self._refused = 0
            logger.error(
                "Redis at %s failed: %s; answering 451 until it works again", self.where, reason
            )
        else:
            self._delay = min(self.backoff_max, self._delay * 2)
        self._refused += 1
        self._down_reason = reason
        self._retry_at = now + self._delay
        redis = _import_redis()
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            # The idle connections may be as dead as this one: the next try opens new ones.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                try:
                    await link.reset()
                except Exception:
                    pass

    def _recovered(self) -> None:
        assert self._down_since is not None
        logger.warning(
            "Redis at %s works again after %.1f s; %d message(s) were answered 451 meanwhile",
            self.where,
            time.monotonic() - self._down_since,
            self._refused,
        )
        self._down_since = None
        self._refused = 0


async def _close_quietly(link: Link) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await link.aclose()
        except Exception:
            pass


def _info_field(info: bytes, name: str) -> str:
    for line in info.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)
