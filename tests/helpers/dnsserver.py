"""A tiny authoritative DNS server on loopback UDP, for tests that run ``minismtp run
--resolver``: zones as a dict, answered with dnspython's message APIs from a thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zones = Mapping[str, Mapping[str, Sequence[str]]]


def _txt(value: str) -> str:
    """A TXT value as zone-file text: split in character-strings of at most 255 octets."""
    parts = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in parts)


def answer(query: dns.message.Message, zones: Zones) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    (question,) = query.question
    name = question.name.to_text().rstrip(".").lower()
    records = zones.get(name)
    if records is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    rdtype = dns.rdatatype.to_text(question.rdtype)
    values = records.get(rdtype, ())
    if values:
        texts = [_txt(v) for v in values] if rdtype == "TXT" else list(values)
        rrset = dns.rrset.from_text_list(question.name, 300, "IN", rdtype, texts)
        response.answer.append(rrset)
    return response


@contextmanager
def dns_server(zones: Zones) -> Iterator[tuple[str, int]]:
    """Serve ``zones`` on 127.0.0.1, a free UDP port, until the block ends: ``(host, port)``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                wire, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            sock.sendto(answer(query, zones).to_wire(max_size=65535), peer)

    thread = threading.Thread(target=serve, name="test-dns", daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(5)
        sock.close()
