"""trustme certificates written out as PEM files."""

from __future__ import annotations

import shutil
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


@attrs.frozen
class RenewedCertificate:
    """The files a server is started with (``args``), holding the ``first`` certificate until
    :meth:`renew` puts the ``second`` in their place, as an operator renewing it does."""

    first: Certificates
    second: Certificates
    cert: Path
    key: Path

    @classmethod
    def issue(cls, directory: Path) -> RenewedCertificate:
        first = issue_certificates(directory / "first")
        second = issue_certificates(directory / "second")
        renewed = cls(first, second, directory / "cert.pem", directory / "key.pem")
        shutil.copy(first.cert_path, renewed.cert)
        shutil.copy(first.key_path, renewed.key)
        return renewed

    @property
    def args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))

    def renew(self) -> None:
        shutil.copy(self.second.cert_path, self.cert)
        shutil.copy(self.second.key_path, self.key)
