"""trustme certificates written out as PEM files."""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import trustme


@attrs.frozen
class Certificates:
    """A trustme CA and a server certificate for localhost/127.0.0.1, written out as PEM."""

    ca: trustme.CA
    cert_path: Path  # the chain: leaf first, then the CA
    key_path: Path
    ca_path: Path

    def client_context(self) -> ssl.SSLContext:
        """What a careful client uses: verify the server against the trustme CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue_certificates(directory: Path, common_name: str = "localhost") -> Certificates:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "mx.test", common_name=common_name)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, ca_path = (directory / n for n in ("cert.pem", "key.pem", "ca.pem"))
    leaf.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_path))
    return Certificates(ca, cert_path, key_path, ca_path)
