"""Redis URLs as minismtp reads them: ``redis://host:port/db?stream=NAME&...``.

One URL names the server (for redis-py) and carries minismtp's own options, for the store
(:class:`~minismtp.stores.redis.RedisStreamStore`) and for ``minismtp consume`` alike. Errors
and log lines show a URL through :func:`redacted`: never with its password.
"""

from __future__ import annotations

import math
import urllib.parse

import attrs

DEFAULT_STREAM = "minismtp"
SCHEMES = ("redis", "rediss", "unix")
MIB = 1024 * 1024


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
