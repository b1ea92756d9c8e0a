"""Ticket lifetimes and automatic key rotation.

Theory of operation
===================

Session tickets are only as forward-secret as their keys: OpenSSL's built-in
keys are random per context and never change while the process lives, so one
compromise decrypts every session of the process's lifetime.

``set_ticket_lifetime`` sets the context's session timeout
(``SSL_CTX_set_timeout``), which is both what clients are told (TLS 1.3
``ticket_lifetime``, TLS 1.2 lifetime hint) and the age past which OpenSSL
refuses a presented session (a full handshake; measured on 1.1.1 and 3.x,
TLS 1.2 and 1.3).

``rotate_ticket_keys`` makes the ticket key callback (C, ``keys.c``) derive
its keys from a master and the time window ``floor(now / every)``:
HKDF-SHA256 (RFC 5869; salt ``"tlsctl ticket keys"``, info
``"tlsctl rotation v1" || every || window``, both 8-byte big-endian) gives an
80-byte key per window.  The current window's key encrypts; the ``keep``
previous windows' keys and the next window's (clocks of a fleet differ a
little) decrypt, and a ticket under an older key renews under the current
one.  The keys are remade lazily, inside the key callback, when the window
changes: no thread, nothing to stop, nothing that breaks across ``fork()``.
Every process and machine holding the same master derives the same keys at
the same time: a fleet rotates without any coordination or shared storage.
Without a master, a random one is made per call (per process).  Masters and
derived keys live in C and are wiped when replaced or when the context is
freed.
"""

from __future__ import annotations

import os

from tlsctl import _bind
from tlsctl._errors import OpenSSLError, UnsupportedError
from tlsctl._tickets import TicketKey

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

__all__ = ["MAX_TICKET_LIFETIME", "rotate_ticket_keys", "set_ticket_lifetime"]

#: RFC 8446, 4.6.1: a ticket lifetime is at most 7 days.
MAX_TICKET_LIFETIME = 7 * 24 * 3600


def _int_in(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value}")
    return value


def set_ticket_lifetime(ctx: ssl.SSLContext, seconds: int) -> ssl.SSLContext:
    """Set how long a session ticket of ``ctx`` lives: the lifetime clients
    are told (TLS 1.3 ``ticket_lifetime``, TLS 1.2 lifetime hint) and the
    age after which the server refuses the ticket (full handshake).

    OpenSSL's default is 7200 seconds (2 hours); the maximum is 7 days
    (``MAX_TICKET_LIFETIME``, RFC 8446).  Applies to sessions made after the
    call.  Works on TLS 1.2 and 1.3, OpenSSL 1.1.1 and 3.x.  Returns ``ctx``.

    Raises:
        TypeError / ValueError: ``seconds`` not an int from 1 to 604800, or
            ``ctx`` not a server-capable ``ssl.SSLContext``.
        BindingError: tlsctl is not bound, or ``ctx`` is not proven to
            belong to the bound OpenSSL.
    """
    ptr, kind = _bind.ctx_pointer(_bind.serving_context(ctx))
    seconds = _int_in(seconds, "seconds", 1, MAX_TICKET_LIFETIME)
    _bind.require_server_kind(kind, "tlsctl.set_ticket_lifetime()")
    if _bind.lib.tlsctl_set_lifetime(ptr, seconds) != 1:  # pragma: no cover
        raise OpenSSLError("SSL_CTX_set_timeout failed", _bind.openssl_errors())
    return ctx


def master_key(master: object) -> TicketKey:
    """A rotation master from a ``TicketKey`` or a key file path."""
    if isinstance(master, TicketKey):
        return master
    if isinstance(master, (str, os.PathLike)):
        return TicketKey.from_file(master)
    raise TypeError(
        f"master must be a TicketKey or a key file path, not {type(master).__name__}"
    )


def rotate_ticket_keys(
    ctx: ssl.SSLContext,
    *,
    every: int,
    keep: int = 2,
    master: TicketKey | str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Rotate the session ticket keys of ``ctx`` automatically.

    A new encryption key every ``every`` seconds; the ``keep`` previous keys
    still decrypt (their tickets resume and are renewed under the new key),
    and so does the next window's (clock skew in a fleet).  With ``master``
    (a ``TicketKey`` or a key file, e.g. from ``python -m tlsctl
    ticket-key``) the keys are derived from it and the time window
    (HKDF-SHA256, see docs/keys.md), so every process and machine given the
    same master and ``every`` uses the same keys at the same time: a fleet
    rotates without coordination.  Without it, a random master is made now:
    keys are private to this context (give several contexts of one process
    the same ``master`` to share them).

    A ticket stays usable for between ``keep * every`` and ``(keep + 1) *
    every`` seconds, so with the default ticket lifetime (2 hours) and
    ``every=3600, keep=2`` rotation costs no resumption at all.  Rotation
    runs lazily in C when a ticket is made or presented: no thread.
    Replaces keys set with ``set_ticket_keys`` (and a later
    ``set_ticket_keys`` ends the rotation).  Returns ``ctx``.

    Raises:
        TypeError / ValueError: bad arguments (``every`` an int from 1 to
            2**32 - 1 seconds, ``keep`` from 0 to 64), a bad master file, or
            a client-only context.
        UnsupportedError: the bound OpenSSL has no ticket key callback or
            HMAC.
        BindingError: tlsctl is not bound, or ``ctx`` is not proven to
            belong to the bound OpenSSL.
    """
    ptr, kind = _bind.ctx_pointer(_bind.serving_context(ctx))
    every = _int_in(every, "every", 1, 2**32 - 1)
    lib = _bind.lib
    keep = _int_in(keep, "keep", 0, lib.TLSCTL_MAX_KEEP)
    raw = bytearray(os.urandom(80) if master is None else master_key(master).export())
    _bind.require_server_kind(kind, "tlsctl.rotate_ticket_keys()")
    try:
        rc = lib.tlsctl_set_rotation(
            ptr, _bind.ffi.from_buffer(raw), len(raw), every, keep
        )
    finally:
        raw[:] = bytes(len(raw))  # the copy we made; C keeps its own
    if rc == lib.TLSCTL_ERR_NO_KEYS:
        raise UnsupportedError(
            f"{_bind.info().openssl_version} offers no ticket key callback or "
            "HMAC-SHA256 for derived keys"
        )
    if rc != 1:
        raise OpenSSLError("deriving the ticket keys failed", _bind.openssl_errors())
    return ctx
