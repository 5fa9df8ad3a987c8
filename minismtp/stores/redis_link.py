"""The connection to Redis: one way to send commands on either backend, and its outages.

On asyncio (and uvloop) a :class:`Link` is ``redis.asyncio``. On trio it is redis' synchronous
client, one command (or one pipeline) per worker thread through :func:`anyio.to_thread.run_sync`:
redis' asyncio client runs on asyncio only, and its synchronous client's connection pool is
thread-safe. A thread call is not abandoned when cancelled, so a command is never cut off
halfway through its reply.

:class:`Outage` is what the store and the consumer both keep while Redis fails: since when,
the backoff before the next try, one log line when it fails and one when it is back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread
import attrs

from minismtp import stores
from minismtp.stores.redis_url import RedisURL, redacted
from minismtp.wires import running_asyncio

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_asyncio

Arg = str | bytes | int | float


def import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError(
            "the Redis store needs the redis package: pip install 'minismtp[redis]'"
        ) from None
    return redis


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
    redis = import_redis()
    from redis.backoff import NoBackoff

    retry_class = redis.asyncio.retry.Retry if running_asyncio() else redis.retry.Retry
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
    redis = import_redis()
    options = _client_options(timeout)
    client: Any
    if running_asyncio():
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
    redis = import_redis()
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
        raise OSError(f"cannot reach Redis at {parsed.where}: {reason(exc)}") from exc
    except TypeError as exc:  # an unknown query parameter, passed on to the connection
        raise ValueError(f"Redis URL {redacted(url)!r}: {exc}") from None
    finally:
        client.close()


def reason(exc: BaseException) -> str:
    """One line: redis-py's class names the failure (OutOfMemoryError, ReadOnlyError, ...)
    and drops the server's prefix (OOM, READONLY) from the text."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, stores.StoreUnavailable):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def quietly(call: Callable[[], Awaitable[object]], seconds: float) -> None:
    """``call()`` shielded from cancellation, for ``seconds`` at most, its errors ignored:
    clean-up that must neither raise nor hang."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(seconds):
        try:
            await call()
        except Exception:
            pass


@attrs.define(eq=False)
class Outage:
    """Redis failing, as one client sees it: one log line when it fails, one when it is back
    (not one per message), and a backoff (``backoff``, doubled up to ``backoff_max`` while
    failures go on) before the next try."""

    logger: logging.Logger
    then: str  # what the client does meanwhile, for the log line
    counted: str | None = None  # what the failures are, when the recovery line counts them
    where: str = ""
    since: float | None = None
    reason: str = ""
    delay: float = 0.0
    retry_at: float = 0.0
    failures: int = 0

    def waiting(self) -> bool:
        """Whether the backoff after a failure still runs (counted as one more failure)."""
        if self.since is not None and time.monotonic() < self.retry_at:
            self.failures += 1
            return True
        return False

    def failed(self, exc: BaseException, where: str, backoff: float, backoff_max: float) -> float:
        """Record a failure of Redis at ``where``; the seconds to wait before the next try."""
        now = time.monotonic()
        self.reason = reason(exc)
        if self.since is None:
            self.since = now
            self.where = where
            self.delay = backoff
            self.failures = 0
            self.logger.error("Redis at %s failed: %s; %s", where, self.reason, self.then)
        else:
            self.delay = min(backoff_max, self.delay * 2)
        self.failures += 1
        self.retry_at = now + self.delay
        return self.delay

    def recovered(self) -> None:
        """A command worked: log that Redis is back, if it was down."""
        if self.since is None:
            return
        seconds = time.monotonic() - self.since
        if self.counted is None:
            self.logger.warning("Redis at %s works again after %.1f s", self.where, seconds)
        else:
            self.logger.warning(
                "Redis at %s works again after %.1f s; %d %s meanwhile",
                self.where,
                seconds,
                self.failures,
                self.counted,
            )
        self.since = None
        self.failures = 0
