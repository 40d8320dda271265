"""Certificates for TLS tests, made by trustme (the trio project's test CA): files, as
gproxy's config, haproxy and Perl's IO::Socket::SSL take them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as separate PEM files and as one (haproxy's `crt`)."""

    cert: Path
    key: Path
    both: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed `server` and `client`."""
    server: Identity
    """For 127.0.0.1 and localhost."""
    client: Identity
    other_ca: Path
    """A CA that signed only `stranger`: trusting it is trusting the wrong one."""
    stranger: Identity
    """A certificate for 127.0.0.1 and localhost too, from the other CA."""
    directory: Path

    def reissue_server(self, name: str) -> Identity:
        """A new certificate for the server from the same CA (a rotation), in new files."""
        return _identity(self._ca, self.directory / name, "127.0.0.1", "localhost")

    _ca: trustme.CA


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(organization_name="gproxy tests"), trustme.CA(organization_name="someone else")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    return Pki(
        ca=directory / "ca.pem",
        server=_identity(ca, directory / "server", "127.0.0.1", "localhost"),
        client=_identity(ca, directory / "client", "worker.gproxy.test"),
        other_ca=directory / "other-ca.pem",
        stranger=_identity(other, directory / "stranger", "127.0.0.1", "localhost"),
        directory=directory,
        _ca=ca,
    )


def _identity(ca: trustme.CA, stem: Path, *names: str) -> Identity:
    issued = ca.issue_cert(*names)
    cert, key, both = (stem.with_name(f"{stem.name}{suffix}") for suffix in ("-cert.pem", "-key.pem", ".pem"))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    issued.private_key_and_cert_chain_pem.write_to_path(str(both))
    return Identity(cert, key, both)
