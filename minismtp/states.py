"""What the engine is doing (:class:`State`), and what :meth:`~minismtp.protocol.Engine.next_event`
tells its caller besides the App's events: :data:`NEED_DATA`, :class:`StartTLS`, :class:`Closed`.

Shared by the engine (:mod:`minismtp.protocol`) and its command handlers
(:mod:`minismtp.commands`), which move it from state to state.
"""

from __future__ import annotations

import enum

import attrs


class NeedData:
    """Write out :meth:`Engine.data_to_send`, then feed the engine more of the client's bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@attrs.frozen
class StartTLS:
    """The 220 for STARTTLS is queued: write it, do the handshake, then call ``tls_started``."""


@attrs.frozen
class Closed:
    """The session is over: write out what is queued and close the connection."""


#: The engine's one instance of each (the caller may compare with ``is`` or ``isinstance``).
START_TLS = StartTLS()
END = Closed()


class State(enum.Enum):
    CONNECT = "connect"  # Connect event not yet asked for
    COMMAND = "command"
    DATA = "data"  # reading dot-terminated content
    BDAT = "bdat"  # reading a counted chunk
    ENDING = "ending"  # the content is complete: its last chunks, then Data
    TLS = "tls"  # waiting for the handshake
    CLOSED = "closed"


# The states read on every command and read, as plain globals: an Enum member lookup costs
# several times a global's.
CONNECT, COMMAND, DATA, BDAT = State.CONNECT, State.COMMAND, State.DATA, State.BDAT
ENDING, TLS, CLOSED = State.ENDING, State.TLS, State.CLOSED

__all__ = [
    "BDAT",
    "CLOSED",
    "COMMAND",
    "CONNECT",
    "DATA",
    "END",
    "ENDING",
    "NEED_DATA",
    "START_TLS",
    "TLS",
    "Closed",
    "NeedData",
    "StartTLS",
    "State",
]
