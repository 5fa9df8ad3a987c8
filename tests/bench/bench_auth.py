"""What sender authentication costs: 1 KB DKIM-signed messages through an App with and without
``Authenticate`` (SPF, DKIM, ARC, DMARC and the header), in memory, with a FakeResolver.

    python -m tests.bench.bench_auth                  # 2 rounds of 500 messages each way
    python -m tests.bench.bench_auth --count 100 --rounds 1   # a quick sanity run

No socket and no DNS server: the in-memory test client drives the App, so the figure is the
App's CPU per message (the engine, the App, the middleware, dkimpy's RSA verification in its
worker thread), not the network's. Each message is signed with a 2048-bit RSA key (relaxed/
relaxed), its sender's SPF record passes, and its domain publishes ``p=reject``. CPU time of the
whole process is measured (the worker thread's included), alternating the two Apps per round;
the output gives messages per CPU second for each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from minismtp import App
from minismtp.contrib.auth import Authenticate
from minismtp.dns import FakeResolver
from minismtp.testing import TestClient
from tests.helpers.dkimkeys import DKIMKey, rsa_key

PEER = "192.0.2.10"


def signed_message(key: DKIMKey) -> bytes:
    head = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: benchmark\r\n\r\n"
    body = (b"x" * 70 + b"\r\n") * 13
    message = head + body.ljust(1024 - len(head) - 2, b"y") + b"\r\n"
    return key.sign(message, "example.com", canonicalize=(b"relaxed", b"relaxed"))


def build(authenticate: bool, key: DKIMKey) -> App:
    app = App(hostname="mx.example.net")
    if authenticate:
        resolver = FakeResolver(
            {
                "example.com": {"TXT": [f"v=spf1 ip4:{PEER} -all"]},
                "sel._domainkey.example.com": {"TXT": [key.record]},
                "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]},
            }
        )
        app.add_middleware(Authenticate, resolver=resolver)
    return app


async def run(app: App, message: bytes, count: int) -> float:
    """CPU seconds to accept ``count`` messages in one session."""
    async with TestClient(app, peer=(PEER, 40000)) as client:
        await client.ehlo("client.example.org")
        start = time.process_time()
        for _ in range(count):
            await client.mail("alice@example.com")
            await client.rcpt("bob@example.net")
            reply = await client.data(message)
            assert reply.code == 250, reply
            client.messages.clear()
        elapsed = time.process_time() - start
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="messages per App per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    key = rsa_key(2048)
    message = signed_message(key)
    apps = {"without": build(False, key), "with Authenticate": build(True, key)}
    rates: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(args.rounds):
        for name, app in apps.items():
            seconds = anyio.run(run, app, message, args.count)
            rates[name].append(args.count / seconds)
    print(f"1 KB signed messages, {args.count} per App per round, {args.rounds} rounds")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:>20}: {rate:8.0f} msgs per CPU second ({1e6 / rate:.0f} µs per message)")
    ratio = statistics.median(rates["with Authenticate"]) / statistics.median(rates["without"])
    print(f"{'ratio':>20}: {ratio:.3f} (with / without)")


if __name__ == "__main__":
    main()
