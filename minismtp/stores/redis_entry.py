"""A message as a Redis stream entry, both ways: the store writes it, ``minismtp consume``
reads it back into the same :class:`~minismtp.message.Message`.

The entry's fields:

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from minismtp.message import Message
from minismtp.spool import Spool
from minismtp.stores.redis_link import Arg
from minismtp.types import Address, TLSInfo


def _peer_text(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def entry_fields(message: Message) -> list[Arg]:
    """The fields of ``message``'s entry, without the body, as XADD arguments."""
    import json  # not at the top: minismtp run loads this module (consume's parser) in every server

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


def build_message(entry: Entry, body: bytes | Spool) -> Message:
    """The Message of ``entry`` over ``body`` (the whole message, our trace header first):
    bytes held in memory, or a spool."""
    envelope = entry.envelope()
    size = envelope.pop("size")
    if isinstance(body, bytes):
        return Message.from_bytes(body, trace_length=max(0, len(body) - size), **envelope)
    return Message(spool=body, trace_length=max(0, body.size - size), **envelope)
