"""minismtp: an asynchronous SMTP receiving server framework on anyio."""

from minismtp.types import Address, Message, Reply, Session, TLSInfo, Transaction

__version__ = "0.1.0"

__all__ = ["Address", "Message", "Reply", "Session", "TLSInfo", "Transaction", "__version__"]
