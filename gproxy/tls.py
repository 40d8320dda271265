"""TLS settings of a route and the contexts made from them, once per (re)load.

Loading a certificate is part of loading the config: a file that cannot be read, is no PEM
certificate, or whose key does not belong to it, is a configuration error at start, in
`gproxy check-config` and at a reload (which then changes nothing). A reload that loads them
again makes the next handshakes use the new files (certificate rotation); connections made
before keep the session they have.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field


class CertificateError(ValueError):
    """A TLS file that cannot be used; the message says which and why, in one line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenTls:
    """Workers connect to the route's listen address over TLS."""

    cert: str
    key: str | None = None
    """None: the key is in the `cert` file."""
    client_ca: str | None = None
    """Every worker must present a certificate signed by one of these CAs (mutual TLS)."""
    context: ssl.SSLContext = field(compare=False, repr=False)
    """Made from the files when they were loaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTls:
    """gproxy connects to the route's gearmand (in practice, a TLS terminator in front of it) over TLS."""

    server_name: str
    """Sent as SNI and checked against gearmand's certificate (the upstream host by default)."""
    ca: str | None = None
    """None: the system's CAs."""
    cert: str | None = None
    """gproxy's own certificate for mutual TLS (None: none is presented)."""
    key: str | None = None
    context: ssl.SSLContext = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RouteTls:
    """What of a route is TLS: its workers' side, its gearmand's side, both or neither."""

    listen: ListenTls | None = None
    upstream: UpstreamTls | None = None


PLAIN = RouteTls()


def server_context(cert: str, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    """The context gproxy accepts workers with: TLS 1.2 or later, OpenSSL's default ciphers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The context gproxy connects to gearmand with: the certificate is always verified, and
    its name checked (against the route's server_name)."""
    if ca is None:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # this CA only, not the system's too
        _load_ca(context, ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        _load_chain(context, cert, key)
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        files = repr(cert) if key is None else f"{cert!r} and {key!r}"
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(f"the key in {key or cert!r} does not belong to the certificate in {cert!r}") from None
        raise CertificateError(
            f"{files}: expected a PEM certificate{'' if key else ' and its private key'} ({_openssl(exc)})"
        ) from None
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename or cert!r}: {exc.strerror}") from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise CertificateError(f"{ca!r}: expected PEM CA certificates ({_openssl(exc)})") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {ca!r}: {exc.strerror}") from None


def _openssl(exc: ssl.SSLError) -> str:
    """OpenSSL's words for it, without the C source's place."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return "OpenSSL: " + text.split(" (_ssl.c:")[0]
