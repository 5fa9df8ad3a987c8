"""Metrics: exact Prometheus text (exposition format 0.0.4) and the GET /metrics endpoint."""

from __future__ import annotations

import functools
import http.client
import math
import re
import socket

import anyio
import pytest

from minismtp.metrics import CONTENT_TYPE, MAX_REQUEST_HEAD, Metrics, http_response, serve_metrics
from tests.helpers.certs import Certificates
from tests.helpers.clients import WireClient

# --- a small strict checker of the text exposition format 0.0.4 -----------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?[0-9]+))?")
_HELP = re.compile(r"(?:[^\\\n]|\\[\\n])*")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_exposition(text: str) -> tuple[dict[str, str], Samples]:
    """The families (name -> type) and samples of ``text``; AssertionError if not valid.

    Stricter than Prometheus where our output has no reason to differ: no blank lines, one
    HELP and one TYPE per family, TYPE before the family's samples, families contiguous,
    no duplicate series, counters non-negative.
    """
    assert text.endswith("\n"), "the last line must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    finished: set[str] = set()
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "blank line"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keyword, rest = line[2:6], line[7:]
            name, _, value = rest.partition(" ")
            assert _NAME.fullmatch(name), f"bad metric name {name!r}"
            if keyword == "HELP":
                assert name not in helps, f"second HELP for {name}"
                assert _HELP.fullmatch(value), f"bad escape in HELP of {name}"
                helps.add(name)
            else:
                assert name not in types, f"second TYPE for {name}"
                assert value in _TYPES, f"unknown type {value!r}"
                assert name not in finished and name != current, f"TYPE after samples: {name}"
                types[name] = value
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value_text, _ = match.groups()
        family = _family_of(name, types)
        if family != current:
            assert family not in finished, f"samples of {family} are not contiguous"
            if current is not None:
                finished.add(current)
            current = family
        labels = _parse_labels(labels_text or "")
        number = _parse_value(value_text)
        if types.get(family) == "counter":
            assert number >= 0, f"negative counter {name}"
        key = (name, labels)
        assert key not in samples, f"duplicate series {key}"
        samples[key] = number
    return types, samples


def _family_of(name: str, types: dict[str, str]) -> str:
    if name in types:
        return name
    for family, kind in types.items():
        if any(name == family + suffix for suffix in _SUFFIXES.get(kind, ())):
            return family
    return name  # an untyped sample is allowed


def _parse_labels(text: str) -> frozenset[tuple[str, str]]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad label at {text[pos:]!r}"
        assert match[1] not in labels, f"label {match[1]} twice"
        labels[match[1]] = match[2]
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", f"labels must be separated by commas: {text!r}"
            pos += 1
    return frozenset(labels.items())


def _parse_value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", text), text
    value = float(text)
    assert math.isfinite(value)
    return value


@pytest.mark.parametrize(
    "bad",
    [
        "x 1",  # no final newline
        "# TYPE x counter\n\nx 1\n",  # blank line
        "# TYPE x counter\n# TYPE x counter\nx 1\n",
        "# TYPE x counter\nx -1\n",
        "# TYPE x frequency\nx 1\n",
        "x 1\n# TYPE x counter\n",  # TYPE after the samples
        "# TYPE x gauge\nx 1\n# TYPE y gauge\ny 1\nx 2\n",  # interleaved families
        '# TYPE x gauge\nx{a="1"} 1\nx{a="1"} 2\n',  # duplicate series
        "# TYPE x gauge\nx{a=1} 1\n",  # unquoted label value
        '# TYPE x gauge\nx{a="1" b="2"} 1\n',  # labels without a comma
        '# TYPE x gauge\nx{a="\\q"} 1\n',  # bad escape
        "# TYPE x gauge\nx one\n",
        "# TYPE x gauge\n1x 1\n",
        "# HELP x a \\t tab\n# TYPE x gauge\nx 1\n",
    ],
)
def test_checker_refuses_invalid_exposition(bad: str) -> None:
    """The checker below is only worth its verdicts if it can say no."""
    with pytest.raises(AssertionError):
        parse_exposition(bad)


def test_checker_accepts_valid_exposition() -> None:
    text = (
        "# HELP x with \\\\ and \\n\n# TYPE x counter\n"
        'x{a="q\\"uote",b="2",} 1.5e3 1700000000000\n'
        '# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_sum 0.5\nh_count 1\n'
        "# a comment\nuntyped_thing NaN\n"
    )
    types, samples = parse_exposition(text)
    assert types == {"x": "counter", "h": "histogram"}
    assert samples[("x", frozenset({("a", 'q\\"uote'), ("b", "2")}))] == 1500.0
    assert samples[("h_count", frozenset())] == 1


# --- rendering ------------------------------------------------------------------------------

FRESH = """\
# HELP minismtp_connections_open SMTP connections open now.
# TYPE minismtp_connections_open gauge
minismtp_connections_open 0
# HELP minismtp_connections_total SMTP connections accepted.
# TYPE minismtp_connections_total counter
minismtp_connections_total 0
# HELP minismtp_transactions_total Mail transactions finished, by the reply code to their \
content (2xx: accepted).
# TYPE minismtp_transactions_total counter
# HELP minismtp_transactions_abandoned_total Mail transactions ended without a reply to their \
content (RSET, disconnect).
# TYPE minismtp_transactions_abandoned_total counter
minismtp_transactions_abandoned_total 0
# HELP minismtp_received_bytes_total Octets of SMTP received from clients.
# TYPE minismtp_received_bytes_total counter
minismtp_received_bytes_total 0
# HELP minismtp_tls_sessions_total TLS handshakes completed (STARTTLS or implicit).
# TYPE minismtp_tls_sessions_total counter
minismtp_tls_sessions_total 0
# HELP minismtp_hook_errors_total Exceptions raised by hooks and middleware.
# TYPE minismtp_hook_errors_total counter
minismtp_hook_errors_total 0
# HELP minismtp_proxy_errors_total Connections closed for a missing, bad or untrusted PROXY \
protocol header.
# TYPE minismtp_proxy_errors_total counter
minismtp_proxy_errors_total 0
"""


def test_fresh_metrics_render_exactly() -> None:
    text = Metrics().render_prometheus()
    assert text == FRESH
    types, samples = parse_exposition(text)
    assert types["minismtp_connections_open"] == "gauge"
    assert set(samples.values()) == {0}


def test_counters_after_activity_render_exactly() -> None:
    depth = [0]
    metrics = Metrics(channel_depth=lambda: depth[0])
    for _ in range(3):
        metrics.connection_opened()
    metrics.connection_closed()
    for code in (250, 250, 552, 550, 250, 451):
        metrics.transaction_finished(code)
    metrics.transactions_abandoned += 4
    metrics.bytes_received += 1234
    metrics.tls_sessions += 1
    metrics.hook_errors += 2
    metrics.proxy_errors += 1
    depth[0] = 7
    assert metrics.transactions_accepted == 3
    assert metrics.transactions_rejected == 3
    text = metrics.render_prometheus()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "minismtp_connections_open 2",
        "minismtp_connections_total 3",
        'minismtp_transactions_total{code="250",result="accepted"} 3',
        'minismtp_transactions_total{code="451",result="rejected"} 1',
        'minismtp_transactions_total{code="550",result="rejected"} 1',
        'minismtp_transactions_total{code="552",result="rejected"} 1',
        "minismtp_transactions_abandoned_total 4",
        "minismtp_received_bytes_total 1234",
        "minismtp_tls_sessions_total 1",
        "minismtp_hook_errors_total 2",
        "minismtp_proxy_errors_total 1",
        "minismtp_channel_depth 7",
    ]
    assert text.endswith(
        "# HELP minismtp_channel_depth Accepted messages waiting for a consumer.\n"
        "# TYPE minismtp_channel_depth gauge\nminismtp_channel_depth 7\n"
    )
    types, samples = parse_exposition(text)
    assert types["minismtp_channel_depth"] == "gauge"
    rejected = frozenset({("code", "552"), ("result", "rejected")})
    assert samples[("minismtp_transactions_total", rejected)] == 1
    depth[0] = 0
    assert "minismtp_channel_depth 0\n" in metrics.render_prometheus()


def test_response_to_each_request() -> None:
    """HTTP/1.0 (RFC 1945): 200 for GET /metrics, HEAD without body, else 404/405/400."""
    metrics = Metrics()
    body = metrics.render_prometheus().encode()
    ok = http_response(metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, payload = ok.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.0 200 OK",
        f"Content-Type: {CONTENT_TYPE}".encode(),
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
    ]
    assert payload == body
    assert http_response(metrics, b"GET /metrics?x=1 HTTP/1.0\n\n").endswith(body)
    head_only = http_response(metrics, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head_only.startswith(b"HTTP/1.0 200 OK\r\n") and head_only.endswith(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}\r\n".encode() in head_only
    for request, status in [
        (b"GET / HTTP/1.0\r\n\r\n", b"404"),
        (b"GET /metricsx HTTP/1.0\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.0\r\n\r\n", b"405"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"GET /metrics SMTP/1.0\r\n\r\n", b"400"),
        (b"\r\n\r\n", b"400"),
    ]:
        assert http_response(metrics, request).startswith(b"HTTP/1.0 " + status + b" ")
    assert b"Allow: GET, HEAD\r\n" in http_response(metrics, b"PUT /metrics HTTP/1.0\r\n\r\n")


def test_broken_depth_callback_is_a_500_not_a_crash() -> None:
    def broken() -> int:
        raise RuntimeError("channel gone")

    response = http_response(Metrics(channel_depth=broken), b"GET /metrics HTTP/1.0\r\n\r\n")
    assert response.startswith(b"HTTP/1.0 500 ")


# --- the endpoint, on asyncio and trio ------------------------------------------------------


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` on a plain blocking socket and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_http(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == len(body)
    return int(status_line.split()[1]), headers, body


@pytest.mark.anyio
async def test_endpoint_serves_current_metrics() -> None:
    metrics = Metrics()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, metrics, "127.0.0.1", 0)
            assert port > 0
            request = b"GET /metrics HTTP/1.0\r\n\r\n"
            status, headers, body = parse_http(
                await anyio.to_thread.run_sync(raw_request, port, request)
            )
            assert status == 200
            assert headers["Content-Type"] == CONTENT_TYPE
            assert body.decode() == FRESH
            metrics.connection_opened()
            metrics.transaction_finished(250)
            _, _, body = parse_http(await anyio.to_thread.run_sync(raw_request, port, request))
            _, samples = parse_exposition(body.decode())
            assert samples[("minismtp_connections_total", frozenset())] == 1
            accepted = frozenset({("code", "250"), ("result", "accepted")})
            assert samples[("minismtp_transactions_total", accepted)] == 1
            status, _, _ = parse_http(
                await anyio.to_thread.run_sync(raw_request, port, b"GET /other HTTP/1.0\r\n\r\n")
            )
            assert status == 404
            tg.cancel_scope.cancel()


def stdlib_get(port: int) -> tuple[int, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@pytest.mark.anyio
async def test_endpoint_with_a_real_http_client() -> None:
    """http.client speaks HTTP/1.1, as Prometheus does; our HTTP/1.0 answer must satisfy it."""
    metrics = Metrics(channel_depth=lambda: 3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, metrics, "127.0.0.1", 0)
            status, content_type, body = await anyio.to_thread.run_sync(stdlib_get, port)
            tg.cancel_scope.cancel()
    assert (status, content_type) == (200, CONTENT_TYPE)
    assert body.decode() == metrics.render_prometheus()
    assert parse_exposition(body.decode())[1][("minismtp_channel_depth", frozenset())] == 3


@pytest.mark.anyio
async def test_endpoint_survives_silent_oversized_and_vanishing_clients() -> None:
    """A client that says nothing is dropped at the deadline; one that sends too much gets
    431; one that leaves early is forgotten; the endpoint keeps answering throughout."""
    metrics = Metrics()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            serve = functools.partial(serve_metrics, request_timeout=0.2)
            port = await tg.start(serve, metrics, "127.0.0.1", 0)
            silent = await anyio.to_thread.run_sync(raw_request, port, b"")
            assert silent == b""
            partial = await anyio.to_thread.run_sync(raw_request, port, b"GET /metrics HTTP")
            assert partial == b""
            flood = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (MAX_REQUEST_HEAD + 10)
            status, _, _ = parse_http(await anyio.to_thread.run_sync(raw_request, port, flood))
            assert status == 431

            def vanish() -> None:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET /met")

            await anyio.to_thread.run_sync(vanish)
            status, _, _ = parse_http(
                await anyio.to_thread.run_sync(raw_request, port, b"GET /metrics HTTP/1.0\n\n")
            )
            assert status == 200
            tg.cancel_scope.cancel()


# --- a real server: the counters are exactly what happened ---------------------------------


@pytest.mark.anyio
async def test_server_counts_a_known_dialogue_exactly(certs: Certificates) -> None:
    """Two connections: one with an accepted message, a message the engine refuses as too
    big (552, RFC 1870), a transaction abandoned by RSET, a hook that raises (451) and a
    STARTTLS; the other refused at MAIL. Then /metrics, parsed as exposition format."""
    from minismtp.app import App
    from minismtp.server import ServerConfig, serve
    from minismtp.tls import TLSConfig
    from minismtp.types import Address, Transaction

    app = App(hostname="mx.test", max_size=100)

    @app.on_rcpt
    def explode(transaction: Transaction, rcpt: Address) -> None:
        if rcpt.local_part == "boom":
            raise RuntimeError("a bug in a hook")

    sent = 0

    async def say(client: WireClient, line: bytes) -> str:
        nonlocal sent
        sent += len(line)
        await client.send(line)
        return await client.reply()

    tls = TLSConfig(certs.cert_path, certs.key_path)
    with anyio.fail_after(20):
        async with (
            serve(app, "127.0.0.1", 0, tls=tls, config=ServerConfig(shutdown_grace=1)) as server,
            anyio.create_task_group() as tg,
        ):
            assert server.metrics is app.metrics
            metrics_port = await tg.start(serve_metrics, app.metrics, "127.0.0.1", 0)
            client = WireClient(await anyio.connect_tcp("127.0.0.1", server.port))
            assert (await client.reply()).startswith("220")
            for line, code in [
                (b"EHLO c\r\n", "250"),
                (b"MAIL FROM:<a@example.com>\r\n", "250"),
                (b"RCPT TO:<b@example.com>\r\n", "250"),
                (b"DATA\r\n", "354"),
                (b"Subject: x\r\n\r\nhi\r\n.\r\n", "250"),
                (b"MAIL FROM:<a@example.com>\r\n", "250"),
                (b"RCPT TO:<b@example.com>\r\n", "250"),
                (b"DATA\r\n", "354"),
                (b"x" * 200 + b"\r\n.\r\n", "552"),
                (b"MAIL FROM:<a@example.com>\r\n", "250"),
                (b"RCPT TO:<boom@example.com>\r\n", "451"),
                (b"RSET\r\n", "250"),
                (b"STARTTLS\r\n", "220"),
            ]:
                assert (await say(client, line)).startswith(code), line
            await client.starttls(certs.client_context())
            assert (await say(client, b"QUIT\r\n")).startswith("221")
            await anyio.aclose_forcefully(client.stream)
            async with await anyio.connect_tcp("127.0.0.1", server.port) as raw:
                other = WireClient(raw)
                assert (await other.reply()).startswith("220")
                assert (await say(other, b"MAIL FROM:<a@example.com>\r\n")).startswith("503")
                assert (await say(other, b"QUIT\r\n")).startswith("221")
            await server.stop()  # returns once every connection is closed
            response = await anyio.to_thread.run_sync(
                raw_request, metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n"
            )
            tg.cancel_scope.cancel()
    status, _, body = parse_http(response)
    assert status == 200
    types, samples = parse_exposition(body.decode())
    assert types["minismtp_transactions_total"] == "counter"
    values = {name if not labels else f"{name}{dict(labels)['code']}": v
              for (name, labels), v in samples.items()}  # fmt: skip
    # The encrypted QUIT is counted as received too: bytes after decryption.
    assert values == {
        "minismtp_connections_open": 0,
        "minismtp_connections_total": 2,
        "minismtp_transactions_total250": 1,
        "minismtp_transactions_total552": 1,
        "minismtp_transactions_abandoned_total": 1,
        "minismtp_received_bytes_total": sent,
        "minismtp_tls_sessions_total": 1,
        "minismtp_hook_errors_total": 1,
        "minismtp_proxy_errors_total": 0,
        "minismtp_channel_depth": 1,
    }
