"""Ticket policies for stdlib ``ssl`` server contexts.

Theory of operation
===================

OpenSSL's TLS 1.3 server writes ``num_tickets`` NewSessionTicket messages as
soon as it has read the client's Finished, inside whatever call drove the
handshake, whether or not the application ever writes (OpenSSL issue 7948).
A client that uploads and closes without reading then has unread bytes in
its kernel buffer, its kernel answers the close with RST, and the server's
kernel throws away upload data the server had not read yet.  With client
certificates the tickets are large enough to fill small socket buffers and
deadlock a handshake against a client that writes before it reads.

``defer`` (the default) does what BoringSSL does: no ticket during the
handshake, the tickets go out with the server's first application write.

* At ``patch()`` time the context gets ``SSL_CTX_set_num_tickets(0)``, so the
  handshake itself never writes a ticket, and its ``sslsocket_class`` /
  ``sslobject_class`` become thin factories around the classes the user had
  set.  A factory only overrides ``_create``: it builds the user's own class,
  records the policy on a server-side connection and, for ``defer``, arms it.

* Arming stores a ``_ConnState`` in the instance ``__dict__`` and shadows the
  write entry points (``send`` and ``write`` on ``SSLSocket``; ``write`` on
  ``SSLObject``) with a ``_WriteHook`` in the instance ``__dict__``.
  ``sendall``, ``sendfile`` and ``makefile`` all end in ``self.send``.  The
  connection keeps its own type; ``type(conn)`` is the user's class.

* The first write through a hook makes ONE C call, ``tlsctl_queue_tickets``:
  for a finished TLS 1.3 server handshake it calls ``SSL_new_session_ticket``
  N times (``count``, or one after a resumed handshake, as stock OpenSSL
  does).  The hook then writes those tickets with ``_sslobj.do_handshake()``,
  deletes itself from the instance ``__dict__`` and calls the class's write
  method: ticket records first, then the application record, all inside the
  caller's one write call.  Every later write is the class method itself:
  zero overhead.

* Why flush with ``do_handshake()`` instead of letting ``SSL_write`` emit
  the tickets?  When the socket accepts only part of a ticket record (small
  buffers, large client-certificate tickets, timeout or non-blocking
  sockets), ``SSL_write`` returns WANT_WRITE and its retry with the caller's
  buffer fails OpenSSL's pending-write length check (``SSL_R_BAD_LENGTH``).
  ``SSL_do_handshake`` resumes a partial ticket write cleanly (measured).

* Why not queue the tickets right after the handshake?  Because after
  ``SSL_new_session_ticket()`` the server's next ``SSL_read`` also runs the
  state machine and flushes them (measured; see FACTS.md), which is exactly
  the out-of-turn write we remove.  So tickets are queued immediately before
  a write and never earlier.

* If the first write happens before the handshake finished (an implicit
  handshake with ``do_handshake_on_connect=False``), the hook first drives
  the handshake with ``_sslobj.do_handshake()``, which is what ``SSL_write``
  would do itself and raises the same ``SSLWantReadError`` /
  ``SSLWantWriteError`` on non-blocking sockets.  The hook stays armed until
  the tickets are queued, so a retried write is handled the same way.

* TLS 1.2 connections and client-side connections are left exactly as
  stock: the hook disarms without calling OpenSSL.  ``renew_on_resume``
  installs a C session-ticket decrypt callback (no Python per handshake).

* ``issue_tickets(conn, n)`` uses the same hook: it records ``n`` pending
  tickets and re-arms, so they too go out with the server's next write.

State per connection lives in the connection itself; the policy is fixed
when the connection is created, so re-patching a context changes only the
connections created after it.
"""

from __future__ import annotations

import ssl
import weakref
from dataclasses import dataclass
from typing import Any, Union, cast

from tlsctl import _bind
from tlsctl._errors import (
    ConnectionStateError,
    OpenSSLError,
    UnsupportedError,
)

__all__ = ["ConnectionState", "connection_state", "issue_tickets", "patch"]

Connection = Union[ssl.SSLSocket, ssl.SSLObject]

POLICIES = ("defer", "suppress", "immediate")
_MAX_COUNT = 2**31 - 1  # tlsctl_queue_tickets takes C ints

_ORIGINAL_ATTR = "_tlsctl_original_num_tickets"
_POLICY_ATTR = "_tlsctl_policy"
_STATE_ATTR = "_tlsctl_state"


@dataclass(frozen=True)
class _Policy:
    tickets: str
    count: int
    renew_on_resume: bool

    @property
    def resumed_count(self) -> int:
        # Stock OpenSSL sends at most one ticket after a resumed handshake.
        return min(self.count, 1) if self.renew_on_resume else 0


class _ConnState:
    """Per-connection bookkeeping, stored in the connection's ``__dict__``."""

    __slots__ = ("extra", "first", "flushing", "issued", "policy", "ptr")

    def __init__(self, policy: _Policy | None) -> None:
        self.policy = policy
        self.first = policy is not None and policy.tickets == "defer"
        self.extra = 0  # tickets asked for with issue_tickets(), not yet queued
        self.issued = 0  # tickets tlsctl queued so far
        self.flushing = False  # queued tickets not yet fully written
        self.ptr: Any = None  # validated SSL *, cached after the first proof


@dataclass(frozen=True)
class ConnectionState:
    """What tlsctl knows about one connection (``tlsctl.connection_state``).

    Attributes:
        policy: the ticket policy of the context when the connection was
            created (``"defer"``, ``"suppress"``, ``"immediate"``), or ``None``
            when that context was not patched.
        waiting_for_write: tickets are being held back until the server's
            next application write.
        issued: tickets tlsctl has queued on this connection so far.  Tickets
            that OpenSSL sends by itself (``"immediate"``) are not counted.
    """

    policy: str | None
    waiting_for_write: bool
    issued: int


def _hook_names(conn: Connection) -> tuple[str, ...]:
    return ("send", "write") if isinstance(conn, ssl.SSLSocket) else ("write",)


class _WriteHook:
    """Instance-level stand-in for a write method until tickets are queued.

    Holds the connection weakly so arming creates no reference cycle (a
    cycle would delay closing the socket until the cyclic GC runs).
    """

    __slots__ = ("name", "ref")

    def __init__(self, conn: Connection, name: str) -> None:
        self.ref = weakref.ref(conn)
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        conn = self.ref()
        assert conn is not None  # the caller holds it
        _before_write(conn)
        return getattr(type(conn), self.name)(conn, *args, **kwargs)


def _arm(conn: Connection) -> None:
    d = conn.__dict__
    for name in _hook_names(conn):
        d[name] = _WriteHook(conn, name)


def _disarm(conn: Connection) -> None:
    d = conn.__dict__
    for name in _hook_names(conn):
        d.pop(name, None)


def _before_write(conn: Connection) -> None:
    state: _ConnState = conn.__dict__[_STATE_ATTR]
    sslobj = cast(Any, conn)._sslobj
    if sslobj is None:  # unwrapped or closed: stock behaviour from now on
        _disarm(conn)
        return
    if state.ptr is None:
        state.ptr = _bind.ssl_pointer(conn)
    if not state.flushing:
        full = resumed = state.extra
        if state.first:
            assert state.policy is not None
            full += state.policy.count
            resumed += state.policy.resumed_count
        lib = _bind.lib
        rc = lib.tlsctl_queue_tickets(state.ptr, full, resumed)
        if rc == lib.TLSCTL_ERR_HANDSHAKE:
            # The write would run the handshake itself; run it first so the
            # tickets can be queued between the handshake and the data.
            # Raises SSLWantReadError etc. exactly as the write would, and
            # we stay armed for the retry.
            sslobj.do_handshake()
            rc = lib.tlsctl_queue_tickets(state.ptr, full, resumed)
        if rc < 0:
            _disarm(conn)
            raise OpenSSLError(
                "SSL_new_session_ticket failed before the first write",
                _bind.openssl_errors(),
            )
        state.issued += rc
        state.first = False
        state.extra = 0
        state.flushing = rc > 0
    if state.flushing:
        # Write the queued tickets through the handshake driver, not through
        # SSL_write: if the socket takes only part of a ticket record,
        # SSL_write returns WANT_WRITE, and its retry with the caller's
        # (shorter) buffer then fails ssl3_write_bytes' length check
        # (SSL_R_BAD_LENGTH), because the pending record is the ticket.
        # SSL_do_handshake retries cleanly.  On a non-blocking socket this
        # raises SSLWantWriteError from the caller's write, which retries.
        sslobj.do_handshake()
        state.flushing = False
    _disarm(conn)


def _make_factory(base: type, policy: _Policy) -> type:
    def _create(cls: type, *args: Any, **kwargs: Any) -> Any:
        conn = base._create(*args, **kwargs)  # type: ignore[attr-defined]
        if conn.server_side and conn._sslobj is not None:
            state = conn.__dict__[_STATE_ATTR] = _ConnState(policy)
            if state.first:
                _arm(conn)
        return conn

    return type(
        base.__name__,
        (base,),
        {
            "__module__": base.__module__,
            "__doc__": f"tlsctl factory creating {base.__qualname__} "
            f"connections with tickets={policy.tickets!r}",
            "_create": classmethod(_create),
            "_tlsctl_base": base,
        },
    )


def _user_class(cls: type) -> type:
    """The class the user set, looking through a factory of ours."""
    base: type = cls.__dict__.get("_tlsctl_base", cls)
    return base


def _check_count(count: object, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name} must be an int, not {type(count).__name__}")
    if not 0 <= count <= _MAX_COUNT:
        raise ValueError(f"{name} must be between 0 and {_MAX_COUNT}, got {count}")
    return count


def patch(
    ctx: ssl.SSLContext,
    *,
    tickets: str = "defer",
    count: int | None = None,
    renew_on_resume: bool = True,
) -> ssl.SSLContext:
    """Set the TLS 1.3 session ticket policy of a server ``ssl.SSLContext``.

    Call it before ``wrap_socket`` / ``wrap_bio`` (or before handing the
    context to asyncio, trio, ...).  Returns ``ctx``.

    Args:
        ctx: an ``ssl.SSLContext`` (or subclass) made with
            ``PROTOCOL_TLS_SERVER`` or ``PROTOCOL_TLS``.
        tickets: ``"defer"`` (default) sends no NewSessionTicket during the
            handshake; a TLS 1.3 server connection sends its tickets
            immediately before its first application data, in the same write,
            and a server that never writes never sends any.  ``"suppress"``
            sends none (tickets issued earlier still resume).
            ``"immediate"`` is OpenSSL's own timing.
        count: tickets after a full handshake; default: the context's
            ``num_tickets`` when it was first patched (OpenSSL's default is
            2).  After a resumed handshake at most one is sent, as stock.
        renew_on_resume: ``False`` resumes a session from a ticket without
            issuing a new one (for FTPS data channels and the like).

    Patching again replaces the policy for connections created afterwards.
    A ``sslsocket_class`` / ``sslobject_class`` set on the context before
    patching keeps working; set it before ``patch()``.  Client-side and TLS
    1.2 connections behave exactly as stock.

    Raises:
        TypeError: ``ctx`` is not an ``ssl.SSLContext``, or a wrong argument type.
        ValueError: unknown policy, bad count, or a client-only context.
        BindingError: tlsctl could not bind, or ``ctx`` is not proven to
            belong to the bound OpenSSL; ``ctx`` is left untouched.
        UnsupportedError: ``"defer"`` without native ticket issuing
            (OpenSSL < 3.0).
    """
    ptr, kind = _bind.ctx_pointer(ctx)
    if tickets not in POLICIES:
        raise ValueError(f"tickets must be one of {POLICIES}, got {tickets!r}")
    if count is not None:
        count = _check_count(count)
    if not isinstance(renew_on_resume, bool):
        raise TypeError("renew_on_resume must be a bool")
    lib = _bind.lib
    if kind == lib.TLSCTL_KIND_CLIENT:
        raise ValueError(
            "tlsctl.patch() needs a context that can serve (PROTOCOL_TLS_SERVER "
            "or PROTOCOL_TLS); this one was made with PROTOCOL_TLS_CLIENT"
        )
    info = _bind.info()
    if tickets == "defer" and info.mechanism is None:
        raise UnsupportedError(
            f"tickets='defer' needs SSL_new_session_ticket (OpenSSL 3.0+); "
            f"{info.openssl_version} lacks it"
        )

    original = ctx.__dict__.get(_ORIGINAL_ATTR)
    if original is None:
        original = int(lib.SSL_CTX_get_num_tickets(ptr))
    policy = _Policy(tickets, original if count is None else count, renew_on_resume)
    num = policy.count if tickets == "immediate" else 0
    if lib.SSL_CTX_set_num_tickets(ptr, num) != 1:
        raise OpenSSLError("SSL_CTX_set_num_tickets failed", _bind.openssl_errors())
    mode = lib.TLSCTL_RENEW_STOCK if renew_on_resume else lib.TLSCTL_RENEW_NEVER
    if lib.tlsctl_set_renewal(ptr, mode) != 1:
        raise OpenSSLError(
            "SSL_CTX_set_session_ticket_cb failed", _bind.openssl_errors()
        )

    ctx.sslsocket_class = _make_factory(_user_class(ctx.sslsocket_class), policy)
    ctx.sslobject_class = _make_factory(_user_class(ctx.sslobject_class), policy)
    ctx.__dict__[_ORIGINAL_ATTR] = original
    ctx.__dict__[_POLICY_ATTR] = policy
    return ctx


def issue_tickets(conn: Connection, count: int = 1) -> None:
    """Queue ``count`` fresh tickets on a server-side TLS 1.3 connection.

    They go out with the server's next application write, ahead of its data
    (like ``defer``, and for the same reason: queued any earlier, OpenSSL
    would also flush them from the next read).  ``conn`` may come from any
    server context, patched or not.

    Raises:
        TypeError: ``conn`` is not an ``ssl.SSLSocket`` / ``ssl.SSLObject``,
            or ``count`` is not an int.
        ValueError: ``count`` < 1.
        ConnectionStateError: client side, TLS 1.2, handshake not finished,
            or the connection is closed.
        UnsupportedError: OpenSSL < 3.0 has no ``SSL_new_session_ticket``.
        BindingError: tlsctl is not bound, or ``conn`` is not proven to
            belong to the bound OpenSSL.
    """
    ptr = _bind.ssl_pointer(conn)
    count = _check_count(count)
    if count < 1:
        raise ValueError("count must be at least 1")
    lib = _bind.lib
    rc = lib.tlsctl_check_issue(ptr)
    if rc == lib.TLSCTL_ERR_CLIENT:
        raise ConnectionStateError("issue_tickets() needs a server-side connection")
    if rc == lib.TLSCTL_ERR_HANDSHAKE:
        raise ConnectionStateError(
            "issue_tickets() needs a finished handshake; call it after do_handshake()"
        )
    if rc == lib.TLSCTL_ERR_NOT_TLS13:
        raise ConnectionStateError(
            "issue_tickets() needs TLS 1.3; TLS 1.2 tickets are sent in the "
            "handshake only"
        )
    if rc == lib.TLSCTL_ERR_NO_NATIVE:
        raise UnsupportedError(
            f"issue_tickets() needs SSL_new_session_ticket (OpenSSL 3.0+); "
            f"{_bind.info().openssl_version} lacks it"
        )
    state = conn.__dict__.get(_STATE_ATTR)
    if state is None:
        state = conn.__dict__[_STATE_ATTR] = _ConnState(None)
    state.ptr = ptr
    state.extra += count
    _arm(conn)


def connection_state(conn: Connection) -> ConnectionState:
    """Report the ticket policy and ticket bookkeeping of one connection."""
    if not _bind.is_connection(conn):
        raise TypeError(
            f"expected an ssl.SSLSocket or ssl.SSLObject, got {type(conn).__name__}"
        )
    state: _ConnState | None = conn.__dict__.get(_STATE_ATTR)
    if state is None:
        return ConnectionState(policy=None, waiting_for_write=False, issued=0)
    armed = isinstance(conn.__dict__.get("write"), _WriteHook)
    return ConnectionState(
        policy=state.policy.tickets if state.policy else None,
        waiting_for_write=armed,
        issued=state.issued,
    )
