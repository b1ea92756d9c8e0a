"""The tlsctl exception hierarchy.

Invariant: every failure tlsctl raises on purpose is a ``TlsctlError`` (or a
plain ``TypeError`` / ``ValueError`` for a wrong argument), and a failure that
came from OpenSSL carries OpenSSL's error text in ``openssl_errors``.

    TlsctlError
     +-- BindingError        nothing could be bound, or an object is not from
     |                       the bound OpenSSL instance
     +-- UnsupportedError    this OpenSSL (or interpreter) lacks the feature
     +-- NotBoundError       (BindingError and UnsupportedError) the call
     |                       needs the binding, which this interpreter lacks
     +-- ConnectionStateError  the connection cannot do that now
     |                       (client side, TLS 1.2, before the handshake)
     +-- OpenSSLError        an OpenSSL call failed
"""

from __future__ import annotations

__all__ = [
    "BindingError",
    "ConnectionStateError",
    "NotBoundError",
    "OpenSSLError",
    "TlsctlError",
    "UnsupportedError",
]


class TlsctlError(Exception):
    """Base class of every exception tlsctl raises on purpose.

    ``openssl_errors`` holds the OpenSSL error-queue entries (text) drained
    when the failure came from OpenSSL, oldest first; empty otherwise.
    """

    def __init__(self, message: str, openssl_errors: tuple[str, ...] = ()) -> None:
        if openssl_errors:
            message = f"{message} (OpenSSL: {'; '.join(openssl_errors)})"
        super().__init__(message)
        self.openssl_errors = openssl_errors


class BindingError(TlsctlError):
    """tlsctl is not bound to the interpreter's OpenSSL, or an object is not
    proven to belong to the bound instance.  ``tlsctl.info().reason`` says why
    binding failed."""


class UnsupportedError(TlsctlError):
    """The bound OpenSSL lacks what the call needs (for example native ticket
    issuing, which needs OpenSSL 3.0)."""


class NotBoundError(BindingError, UnsupportedError):
    """The call needs tlsctl's binding to the interpreter's OpenSSL, and
    this interpreter has none (PyPy, uv's python-build-standalone builds,
    ``TLSCTL_BINDING=off``; ``tlsctl.info().reason`` says why).  Both a
    ``BindingError`` (what it was before the python mechanism existed) and an
    ``UnsupportedError`` (a feature this interpreter lacks)."""


class ConnectionStateError(TlsctlError):
    """The connection cannot do this in its current role or state: client
    side, a TLS 1.2 connection, or the handshake has not finished."""


class OpenSSLError(TlsctlError):
    """An OpenSSL call failed; ``openssl_errors`` has OpenSSL's own text."""
