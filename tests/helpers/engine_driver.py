"""Drive the sans-I/O engine with plain bytes, as the protocol tests do (no App, no network)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from minismtp.events import Connect, Data, DataChunk, Event, Helo, Mail, Rcpt
from minismtp.protocol import NEED_DATA, Closed, Engine, Limits, StartTLS
from minismtp.types import Reply, Session, TLSInfo

Responder = Callable[[Event], Reply | None]


CHUNK_OK = Reply(250, "2.0.0", "OK")


def accept_all(event: Event) -> Reply:
    if isinstance(event, DataChunk):
        return CHUNK_OK
    if isinstance(event, Connect):
        return Reply(220, None, "mx.test ESMTP")
    if isinstance(event, Helo):
        return (
            Reply(250, None, ("mx.test", *event.keywords))
            if event.esmtp
            else Reply(250, None, "mx.test")
        )
    if isinstance(event, Mail):
        return Reply(250, "2.1.0", "OK")
    if isinstance(event, Rcpt):
        return Reply(250, "2.1.5", "OK")
    assert isinstance(event, Data)
    return Reply(250, "2.0.0", "OK queued")


@attrs.define
class Run:
    out: bytes
    events: list[Event]
    closed: bool
    engine: Engine

    @property
    def replies(self) -> list[str]:
        """Each reply after the greeting, as its last line (multi-line replies folded)."""
        return [reply.splitlines()[-1] for reply in split_replies(self.out)][1:]

    @property
    def codes(self) -> list[str]:
        """``code`` or ``code status`` of each reply after the greeting."""
        result = []
        for line in self.replies:
            parts = line.split(" ")
            status = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() else None
            result.append(f"{parts[0]} {status}" if status and parts[0][0] != "3" else parts[0])
        return result

    @property
    def messages(self) -> list[bytes]:
        """The content of each Data event: the chunks of its transaction, joined."""
        return [self.content(event) for event in self.events if isinstance(event, Data)]

    def content(self, data: Data) -> bytes:
        return b"".join(
            bytes(event.chunk)
            for event in self.events
            if isinstance(event, DataChunk) and event.transaction is data.transaction
        )

    @property
    def app_events(self) -> list[Event]:
        """The events without the DataChunks (which depend on how the reads cut the data)."""
        return [event for event in self.events if not isinstance(event, DataChunk)]


def split_replies(out: bytes) -> list[str]:
    replies: list[str] = []
    current: list[str] = []
    for line in out.decode("utf-8").split("\r\n")[:-1]:
        current.append(line)
        if line[3:4] != "-":
            replies.append("\n".join(current))
            current = []
    assert not current, f"unterminated multi-line reply: {current}"
    return replies


def drive(
    chunks: bytes | Iterable[bytes],
    *,
    limits: Limits | None = None,
    respond: Responder | None = None,
    tls_available: bool = False,
    require_tls: bool = False,
    handshake: bool = True,
    lmtp: bool = False,
) -> Run:
    """Feed ``chunks`` (then EOF) through a fresh engine, answering App events.

    ``respond`` may return None to fall back to accepting. A StartTLS is completed at once
    (as if the handshake succeeded) unless ``handshake`` is false. ``lmtp``: an LMTP session.
    """
    pending = [chunks] if isinstance(chunks, bytes) else list(chunks)
    pending.reverse()
    engine = Engine(
        Session(hostname="mx.test", peer=("192.0.2.7", 4000)),
        limits,
        tls_available=tls_available,
        require_tls=require_tls,
        lmtp=lmtp,
    )
    out = bytearray()
    events: list[Event] = []
    while True:
        event = engine.next_event()
        if event is NEED_DATA:
            out += engine.data_to_send()
            engine.receive_data(pending.pop() if pending else b"")
        elif isinstance(event, Closed):
            out += engine.data_to_send()
            return Run(bytes(out), events, True, engine)
        elif isinstance(event, StartTLS):
            out += engine.data_to_send()
            if not handshake:
                return Run(bytes(out), events, False, engine)
            engine.tls_started(TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
        else:
            assert isinstance(event, Event)
            events.append(event)
            reply = respond(event) if respond else None
            engine.respond(reply or accept_all(event))
