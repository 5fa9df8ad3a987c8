"""What one SMTP session may cost: :class:`Limits`, enforced by the engine."""

from __future__ import annotations

import attrs


@attrs.frozen
class Limits:
    """What one session may cost. Each limit follows RFC 5321 4.5.3 or Postfix's practice."""

    max_command_line: int = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # DATA lines with CRLF (RFC 5321 4.5.3.1.6); 0: unlimited
    max_message_size: int = 32 * 1024 * 1024  # advertised as SIZE (RFC 1870)
    max_recipients: int = 100  # RFC 5321 4.5.3.1.8 asks for at least 100
    max_errors: int = 20  # bad commands before 421 and close
    max_junk_commands: int = 100  # NOOP, RSET, VRFY, EXPN, HELP without a message in between
    accept_bare_line_endings: bool = False  # True: normalise bare CR/LF to CRLF, not 550
    # Octets of a message's content the App keeps in memory; past it, the spool is a file.
    spool_memory: int = 256 * 1024


__all__ = ["Limits"]
