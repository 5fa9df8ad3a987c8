"""minismtp: an asynchronous SMTP receiving server framework on anyio.

The public API lives here; everything else is in modules named for what they hold
(``minismtp.events`` for middleware authors, ``minismtp.testing`` for tests,
``minismtp.protocol`` for the sans-I/O engine).
"""

from minismtp.app import App
from minismtp.events import (
    Connect,
    Data,
    DataChunk,
    Disconnect,
    Event,
    Handler,
    Helo,
    Mail,
    Rcpt,
)
from minismtp.message import Message
from minismtp.protocol import Limits
from minismtp.server import Server, SmtpServer, serve
from minismtp.stores import Store
from minismtp.stores.maildir import Maildir
from minismtp.types import Address, Reply, Session, TLSInfo, Transaction

__version__ = "0.1.0"

__all__ = [
    "Address",
    "App",
    "Connect",
    "Data",
    "DataChunk",
    "Disconnect",
    "Event",
    "Handler",
    "Helo",
    "Limits",
    "Mail",
    "Maildir",
    "Message",
    "Rcpt",
    "Reply",
    "Server",
    "Session",
    "SmtpServer",
    "Store",
    "TLSInfo",
    "Transaction",
    "__version__",
    "serve",
]
