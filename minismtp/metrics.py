"""Counters and gauges of a running server, in Prometheus's text format on a tiny HTTP endpoint.

:class:`Metrics` is plain state: the server bumps its integer attributes on the hot path
(``metrics.bytes_received += len(data)``), which costs an attribute store and needs no lock in
single-threaded async code. :meth:`Metrics.render_prometheus` writes the text exposition format
0.0.4, and :func:`serve_metrics` answers ``GET /metrics`` with it, on anyio with nothing else.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Sequence

import anyio
import attrs
from anyio.abc import (
    ByteStream,
    Listener,
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskStatus,
)
from anyio.streams.stapled import MultiListener

log = logging.getLogger("minismtp.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class Metrics:
    """What the server has done since it started, per process.

    ``transactions`` counts finished mail transactions by the reply code that ended them: the
    answer to the message content (DATA or the last BDAT), 2xx meaning accepted, whether the
    App gave it or the engine did (a message too big); ``transactions_abandoned`` those that
    ended without one (RSET, a new EHLO, a lost connection).
    ``channel_depth`` is read when the metrics are rendered, e.g.
    ``lambda: app.messages.statistics().current_buffer_used``.
    """

    connections_open: int = 0
    connections_total: int = 0
    transactions: dict[int, int] = attrs.field(factory=dict)
    transactions_abandoned: int = 0
    bytes_received: int = 0
    tls_sessions: int = 0
    hook_errors: int = 0
    proxy_errors: int = 0
    channel_depth: Callable[[], int] | None = None

    def connection_opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def transaction_finished(self, code: int) -> None:
        """A transaction ended with ``code`` in answer to its content (250: accepted)."""
        self.transactions[code] = self.transactions.get(code, 0) + 1

    @property
    def transactions_accepted(self) -> int:
        return sum(n for code, n in self.transactions.items() if 200 <= code < 300)

    @property
    def transactions_rejected(self) -> int:
        return sum(n for code, n in self.transactions.items() if not 200 <= code < 300)

    def render_prometheus(self) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP minismtp_{name} {help_text}")
            lines.append(f"# TYPE minismtp_{name} {kind}")

        family("connections_open", "gauge", "SMTP connections open now.")
        lines.append(f"minismtp_connections_open {self.connections_open}")
        family("connections_total", "counter", "SMTP connections accepted.")
        lines.append(f"minismtp_connections_total {self.connections_total}")
        family(
            "transactions_total",
            "counter",
            "Mail transactions finished, by the reply code to their content (2xx: accepted).",
        )
        for code in sorted(self.transactions):
            result = "accepted" if 200 <= code < 300 else "rejected"
            lines.append(
                f'minismtp_transactions_total{{code="{code}",result="{result}"}} '
                f"{self.transactions[code]}"
            )
        family(
            "transactions_abandoned_total",
            "counter",
            "Mail transactions ended without a reply to their content (RSET, disconnect).",
        )
        lines.append(f"minismtp_transactions_abandoned_total {self.transactions_abandoned}")
        family("received_bytes_total", "counter", "Octets of SMTP received from clients.")
        lines.append(f"minismtp_received_bytes_total {self.bytes_received}")
        family("tls_sessions_total", "counter", "TLS handshakes completed (STARTTLS or implicit).")
        lines.append(f"minismtp_tls_sessions_total {self.tls_sessions}")
        family("hook_errors_total", "counter", "Exceptions raised by hooks and middleware.")
        lines.append(f"minismtp_hook_errors_total {self.hook_errors}")
        family(
            "proxy_errors_total",
            "counter",
            "Connections closed for a missing, bad or untrusted PROXY protocol header.",
        )
        lines.append(f"minismtp_proxy_errors_total {self.proxy_errors}")
        if self.channel_depth is not None:
            family("channel_depth", "gauge", "Accepted messages waiting for a consumer.")
            lines.append(f"minismtp_channel_depth {self.channel_depth()}")
        lines.append("")
        return "\n".join(lines)


MAX_REQUEST_HEAD = 8192


def http_response(metrics: Metrics, head: bytes) -> bytes:
    """The whole HTTP/1.0 response to a request whose head (up to the blank line) is ``head``."""
    request_line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", "bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return _response("404 Not Found", "not found: try /metrics\n")
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", "use GET\n", extra="Allow: GET, HEAD\r\n")
    try:
        body = metrics.render_prometheus()
    except Exception:
        log.exception("rendering the metrics failed")
        return _response("500 Internal Server Error", "rendering the metrics failed\n")
    return _response("200 OK", body, content_type=CONTENT_TYPE, with_body=method == b"GET")


def _response(
    status: str,
    body: str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    with_body: bool = True,
) -> bytes:
    payload = body.encode("utf-8")
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (payload if with_body else b"")


async def _answer(metrics: Metrics, request_timeout: float, stream: ByteStream) -> None:
    async with stream:
        with anyio.move_on_after(request_timeout):
            head = b""
            try:
                while b"\r\n\r\n" not in head and b"\n\n" not in head:
                    if len(head) > MAX_REQUEST_HEAD:
                        await stream.send(_response("431 Request Header Fields Too Large", ""))
                        return
                    head += await stream.receive()
                await stream.send(http_response(metrics, head))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass  # the client left; nothing to answer


async def serve_metrics(
    metrics: Metrics,
    host: str | None,
    port: int,
    *,
    request_timeout: float = 10.0,
    sockets: Sequence[socket.socket] = (),
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host``:``port`` until cancelled; start it with
    ``port = await task_group.start(serve_metrics, metrics, host, port)``, which gives the
    port bound (useful with port 0). Other paths get 404, other methods 405.

    ``sockets``: listening sockets bound already (``minismtp run`` binds every listener
    before it announces any); ``host`` and ``port`` are then not bound.
    """
    listener: Listener[SocketStream]
    if sockets:
        listener = MultiListener([await SocketListener.from_socket(sock) for sock in sockets])
    else:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(SocketAttribute.local_port)
        log.debug("metrics on http://%s:%d/metrics", host or "*", bound)
        task_status.started(bound)
        await listener.serve(functools.partial(_answer, metrics, request_timeout))
