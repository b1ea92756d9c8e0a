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

* At ``patch()`` time the context records its policy and gets a *plan*
  (``_wrap``): the function the ``wrap_socket`` / ``wrap_bio`` hooks apply
  to each new server connection before its handshake.  Every plan of a bound
  tlsctl is the same C function (``make_apply`` in ``tlsctl._binding``,
  ``src/_tlsctl_c/apply.c``), configured per context: the policy, the count,
  the stash, whether the context has ticket callbacks.  A connection costs
  tlsctl no Python frame (a Python version cost several per cent of a
  handshake; figures in docs/performance.md, "Behind the design").  The
  policy and the count of tickets issued live in the SSL's ex_data under
  tlsctl's own index, as a tagged integer: no Python object per idle
  connection.

* Every write path of ``SSLSocket`` and ``SSLObject`` ends in
  ``self._sslobj.write(data)``: ``send`` / ``sendall`` / ``sendfile`` /
  ``write`` / ``makefile`` and ``SSLObject.write`` (asyncio, trio).  The
  plan replaces ``_sslobj`` (the ``_ssl._SSLSocket``) with the C
  ``FirstWriteProxy``, whose ``write`` sends the tickets and then stores the
  real object back.  That is a plain store to an attribute the connection
  already has: its class, its attribute layout and CPython's specialised
  attribute lookups stay exactly as stock, so every later write costs what
  it costs without tlsctl (callgrind counts the same instructions per write
  either way).  Shadowing methods in the instance ``__dict__`` or swapping
  ``__class__`` instead cost every write for the life of the connection
  (docs/performance.md, "Behind the design").  Other attributes are
  forwarded to the real object while the proxy stands.

* The proxy's state is one of ``STATES`` (``TLSCTL_STATE_*`` in
  ``tlsctl.h``): ``due`` (tickets go with the next write), ``flushing``
  (queued, not all written yet: a socket took part of them), ``guarded``
  (nothing due; the context has ticket callbacks, which may still run in
  this connection's handshake) and ``stock`` (the real object is back).
  docs/design.md has the table of which connection takes which path.

* The first write of a ``due`` connection calls ``SSL_new_session_ticket``
  N times (``count``, or the context's ``num_tickets`` read when the
  connection was made; at most one after a resumed handshake, as stock).
  On a socket it writes them with ``do_handshake()`` while the stash filter
  captures them, then performs the caller's write: ticket records and the
  application record leave in one ``write()``.  With the stash (OpenSSL
  1.1.1, or ``TLSCTL_MECHANISM=stash``) OpenSSL made the tickets in the
  handshake and the filter holds them; the first write releases them in
  front of its record, and the filter leaves the chain.

* Why flush with ``do_handshake()`` instead of letting ``SSL_write`` emit
  the tickets?  When the socket accepts only part of a ticket record (small
  buffers, large client-certificate tickets, timeout or non-blocking
  sockets), ``SSL_write`` returns WANT_WRITE and its retry with the caller's
  buffer fails OpenSSL's pending-write length check (``SSL_R_BAD_LENGTH``).
  ``SSL_do_handshake`` resumes a partial ticket write cleanly (measured).
  A memory BIO (``SSLObject``: asyncio, trio) takes every byte, so there
  ``SSL_write`` writes the tickets itself (its state machine runs before
  the data) and the extra call is skipped.

* Why not queue the tickets right after the handshake?  Because after
  ``SSL_new_session_ticket()`` the server's next ``SSL_read`` also runs the
  state machine and flushes them (measured, OpenSSL 3.0), which is exactly
  the out-of-turn write we remove.  So tickets are queued immediately before
  a write and never earlier.

* If the first write happens before the handshake finished (an implicit
  handshake with ``do_handshake_on_connect=False``), the proxy first drives
  the handshake with ``do_handshake()``, which is what ``SSL_write`` would
  do itself and raises the same ``SSLWantReadError`` / ``SSLWantWriteError``
  on non-blocking sockets.  The proxy stays in place until the tickets are
  written, so a retried write continues where it stopped.

* Ticket callbacks: on such a context each connection also gets a
  ``_CallbackRecord`` in its SSL's ex_data, and its proxy also stands in for
  ``do_handshake`` and ``read``: an exception a callback raised is kept in
  the record and re-raised by the proxy once OpenSSL has returned (with
  OpenSSL's ``SSLError`` as its ``__context__``).  The proxy retires when
  the TLS 1.3 handshake is done and nothing is due; on TLS 1.2 it stays
  (renegotiation may run a callback).

* TLS 1.2 connections and client-side connections are left exactly as
  stock: the proxy steps aside without calling OpenSSL.  ``renew_on_resume``
  installs a C session-ticket decrypt callback (no Python per handshake).

* ``issue_tickets(conn, n)`` uses the same proxy: ``n`` more tickets due
  with the server's next write.

The policy is fixed when the connection is created, so re-patching a
context changes only the connections created after it.  Without the
binding, ``_pyhold`` (the python mechanism) holds memory-BIO connections'
tickets in pure Python.
"""

from __future__ import annotations

import ssl
from _weakref import ref as _weakref

from tlsctl import _bind, _quickack, _wrap
from tlsctl._errors import (
    ConnectionStateError,
    OpenSSLError,
    UnsupportedError,
)
from tlsctl._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # nothing from typing at run time: import cost
    from types import ModuleType
    from typing import Any, Union

    Connection = Union[ssl.SSLSocket, ssl.SSLObject]

__all__ = ["ConnectionState", "connection_state", "issue_tickets", "patch"]


def _any(obj: object) -> Any:
    """``obj`` typed as ``Any`` (``typing.cast`` without importing typing)."""
    return obj


POLICIES = ("defer", "suppress", "immediate")
#: At most this many tickets wait for one write: ``patch()``'s ``count``
#: plus what ``issue_tickets()`` adds.  A client keeps a few tickets (one per
#: parallel connection it may open; OpenSSL's default is 2); more would only
#: make the first write slow (each costs an encryption and ~250 bytes).
MAX_TICKETS = 16

_POLICY_ATTR = "_tlsctl_policy"  # the _Policy patch() set on a context
_CALLBACKS_ATTR = "_tlsctl_callbacks"  # the holder set_ticket_callbacks() set


class _Policy(Record):
    """What ``patch()`` set on a context."""

    __slots__ = _fields = ("tickets", "count", "renew_on_resume", "stash")
    tickets: str
    count: int | None  # None: the context's num_tickets, read per connection
    renew_on_resume: bool
    stash: bool  # "defer" through the C stash instead of SSL_new_session_ticket

    def __init__(
        self, tickets: str, count: int | None, renew_on_resume: bool, stash: bool
    ) -> None:
        self._set(
            tickets=tickets, count=count, renew_on_resume=renew_on_resume, stash=stash
        )


class _CallbackRecord:
    """What ticket callbacks reach a connection through (8. in
    ``tlsctl._binding``): the SSL's ex_data holds it, the dispatcher finds
    the connection through ``conn`` (weakly: no cycle) and leaves a
    callback's exception in ``exc``, which the C proxy re-raises once the
    OpenSSL call has returned."""

    __slots__ = ("conn", "exc")

    def __init__(self, conn: Connection) -> None:
        self.conn = _weakref(conn)
        self.exc: BaseException | None = None


class ConnectionState(Record):
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

    __slots__ = _fields = ("policy", "waiting_for_write", "issued")
    policy: str | None
    waiting_for_write: bool
    issued: int

    def __init__(
        self, policy: str | None, waiting_for_write: bool, issued: int
    ) -> None:
        self._set(policy=policy, waiting_for_write=waiting_for_write, issued=issued)


# What a connection tlsctl does not (or no longer) track reports.
_UNTRACKED = ConnectionState(policy=None, waiting_for_write=False, issued=0)


def _sslobj_of(conn: Connection) -> Any:
    """``conn._sslobj``; ``TypeError`` for an object made without its
    constructor (``object.__new__(ssl.SSLObject)``), which has none."""
    try:
        return _any(conn)._sslobj
    except AttributeError:
        raise TypeError(
            f"this {type(conn).__name__} was not made by SSLContext.wrap_socket() "
            "or wrap_bio(): it has no TLS state"
        ) from None


# The C first-write proxy (None when nothing is bound: then nothing is
# armed); the python mechanism's is _pyhold.PROXY.  Both keep the real
# object in _real.
_C_PROXY: type | None = _bind.fast.get("FirstWriteProxy")


# The python mechanism's module, which sets this at the end of its import: no
# connection is managed by it before (its plans make them), and
# ``import tlsctl`` leaves it out (~0.3 ms) on a server that never uses it.
_PYHOLD: ModuleType | None = None  # tlsctl-pymech


def _c_names(prefix: str) -> dict[int, str]:
    """The C module's ``<prefix>*`` constants: {code: lower-case name}."""
    if _C_PROXY is None:
        return {}
    lib = _bind.lib
    return {
        getattr(lib, name): name[len(prefix) :].lower()
        for name in dir(lib)
        if name.startswith(prefix)
    }


#: The first-write path's states by their C codes (``TLSCTL_STATE_*`` in
#: ``src/_tlsctl_c/tlsctl.h``): ``stock``, ``due``, ``flushing``, ``guarded``;
#: see docs/design.md.
STATES: dict[int, str] = _c_names("TLSCTL_STATE_")
# Policy names by their C codes (TLSCTL_POLICY_*; NONE, a connection tracked
# for its callbacks only, is None as in ConnectionState), and back.
_POLICY_NAMES: dict[int, str | None] = {
    code: None if name == "none" else name
    for code, name in _c_names("TLSCTL_POLICY_").items()
}
_POLICY_CODES = {name: code for code, name in _POLICY_NAMES.items()}


def _real_sslobj(conn: Connection) -> Any:
    """The connection's ``_ssl._SSLSocket`` behind any proxies."""
    sslobj = _sslobj_of(conn)
    pyhold = _PYHOLD
    proxies = (_C_PROXY, None if pyhold is None else pyhold.PROXY)
    while type(sslobj) in proxies:
        sslobj = sslobj._real
    return sslobj


def _refuse_unproven(conn: Any) -> None:
    """The C ``apply``'s fallback for a connection it could not track: raise
    the reason (its SSL is not proven, or OpenSSL could not store tlsctl's
    per-connection data); ``_wrap`` closes a socket."""
    _bind.sslobj_pointer(conn._sslobj)
    raise OpenSSLError(
        "attaching tlsctl's state to a new connection failed",
        _bind.openssl_errors(),
    )


def _make_apply(
    policy: str | None, count: int | None, stash: bool, callbacks: bool
) -> Any:
    """The C plan (``renew_on_resume`` is the context's: its decrypt
    callback decides whether a resumed handshake owes a ticket)."""
    return _bind.fast["make_apply"](
        _POLICY_CODES[policy],
        -1 if count is None else count,
        stash,
        _CallbackRecord if callbacks else None,
        _refuse_unproven,
    )


def install_plan(ctx: ssl.SSLContext) -> None:
    """(Re)make the plan ``_wrap``'s hooks apply to ``ctx``'s new server
    connections, from its tlsctl settings: the policy ``patch()`` set and
    whether ``set_ticket_callbacks()`` set callbacks.  With neither, the
    context has no plan (stock).  Every bound plan is the C ``apply``
    (``make_apply``): one path for every policy, the stash and callbacks."""
    settings = ctx.__dict__
    policy: _Policy | None = settings.get(_POLICY_ATTR)
    callbacks = settings.get(_CALLBACKS_ATTR) is not None
    plan: Any
    if policy is None and not callbacks:
        settings.pop(_wrap.PLAN_ATTR, None)
        return
    if policy is not None and (
        not _bind.info().bound
        or (policy.tickets == "defer" and _bind.info().mechanism == "python")
    ):
        plan = _python_plan(policy, callbacks)
    elif policy is None:
        plan = _make_apply(None, None, False, callbacks)
    else:
        plan = _make_apply(policy.tickets, policy.count, policy.stash, callbacks)
    _wrap.install()
    settings[_wrap.PLAN_ATTR] = plan


# --- tlsctl-pymech: the python mechanism (see _pyhold) --------------------
def _python_plan(policy: _Policy, callbacks: bool) -> Any:
    """The plan of a context under the python mechanism: ``defer`` holds
    memory-BIO connections' tickets in Python; without the binding the other
    policies can only be ``immediate`` (stock, recorded).  With the binding
    (``TLSCTL_MECHANISM=python``), ``count`` and ticket callbacks are set up
    through it on every server connection, as the stash does."""
    from tlsctl import _pyhold

    if policy.tickets != "defer":
        return _pyhold.record_plan(policy.tickets)
    setup = None
    if _bind.info().bound and (policy.count is not None or callbacks):
        # no policy of the binding's (the python mechanism's is recorded by
        # _pyhold): the count on the connection (the python mechanism holds
        # what the handshake sends) and the C proxy's guard for callbacks
        setup = _make_apply(None, policy.count, False, callbacks)
    return _pyhold.make_plan(setup)


def _patch_unbound(
    target: ssl.SSLContext, tickets: str, count: int | None, renew_on_resume: bool
) -> None:
    """``patch()`` where tlsctl is not bound: the python mechanism alone."""
    _bind.check_context(target)
    count = check_settings(tickets, count, renew_on_resume)
    if target.protocol == ssl.PROTOCOL_TLS_CLIENT:
        _bind.require_server_kind(_bind.KIND_CLIENT, "tlsctl.patch()")
    if tickets == "suppress":
        _bind.require_bound(
            "tickets='suppress' (per-connection ticket control; "
            "ctx.num_tickets = 0 suppresses for the whole context)"
        )
    if count is not None:
        _bind.require_bound(
            "count= (per-connection ticket control; set ctx.num_tickets "
            "instead: the python mechanism defers what the context sends)"
        )
    if not renew_on_resume:
        _bind.require_bound("renew_on_resume=False (a C session ticket callback)")
    target.__dict__[_POLICY_ATTR] = _Policy(tickets, None, True, False)
    install_plan(target)


# --- end tlsctl-pymech ----------------------------------------------------


def _check_count(count: object, low: int, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name} must be an int, not {type(count).__name__}")
    if not low <= count <= MAX_TICKETS:
        raise ValueError(
            f"{name} must be an int from {low} to {MAX_TICKETS} (MAX_TICKETS), "
            f"got {count}"
        )
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
        count: tickets after a full handshake, 0 to ``MAX_TICKETS`` (16);
            default: the context's ``num_tickets`` when it was first patched
            (OpenSSL's default is 2).  After a resumed handshake at most one
            is sent, as stock.  Not allowed with ``"suppress"``, which sends
            none.
        renew_on_resume: ``False`` resumes a session from a ticket without
            issuing a new one (for FTPS data channels and the like).  It is
            the context's: it applies to every handshake that runs after
            the call, also of a connection made before it.

    Patching again replaces the policy for connections created afterwards.
    A ``sslsocket_class`` / ``sslobject_class`` set on the context before
    patching keeps working; set it before ``patch()``.  Client-side and TLS
    1.2 connections behave exactly as stock.

    Raises:
        TypeError: ``ctx`` is not an ``ssl.SSLContext``, or a wrong argument type.
        ValueError: unknown policy, a count out of range (also a context
            ``num_tickets`` above ``MAX_TICKETS`` when ``count`` is not
            given), a count with ``"suppress"``, or a client-only context.
        BindingError: tlsctl could not bind, or ``ctx`` is not proven to
            belong to the bound OpenSSL; ``ctx`` is left untouched.
        UnsupportedError: the context already has an SSL info callback that
            is not tlsctl's (only with the stash, on OpenSSL 1.1.1).
        NotBoundError: (a ``BindingError`` and an ``UnsupportedError``)
            without the binding, ``"suppress"``, ``count`` and
            ``renew_on_resume=False``; ``"defer"`` then works for
            memory-BIO connections only (the python mechanism: sockets stay
            stock, and a ``SocketsNotDeferredWarning`` says so once).
    """
    target = _bind.serving_context(ctx)
    if not _bind.info().bound:  # tlsctl-pymech
        _patch_unbound(target, tickets, count, renew_on_resume)
        if tickets == "defer":
            from tlsctl._pyhold import warn_sockets

            _quickack.install()
            warn_sockets(stacklevel=1)
        return ctx
    ptr, kind = _bind.ctx_pointer(target)
    count = check_settings(tickets, count, renew_on_resume)
    _bind.require_server_kind(kind, "tlsctl.patch()")
    lib = _bind.lib
    stash = tickets == "defer" and _bind.info().mechanism == "stash"

    num_tickets = int(lib.SSL_CTX_get_num_tickets(ptr))
    if count is None and num_tickets > MAX_TICKETS:
        raise ValueError(
            f"this context's num_tickets is {num_tickets}, more than tlsctl sends "
            f"with one write ({MAX_TICKETS}, MAX_TICKETS); pass count="
        )
    policy = _Policy(tickets, count, renew_on_resume, stash)
    if stash and lib.tlsctl_ctx_has_info_callback(ptr):
        raise UnsupportedError(
            "this context has an SSL info callback that is not tlsctl's; the "
            "ticket stash would shadow it on every connection"
        )
    mode = lib.TLSCTL_RENEW_STOCK if renew_on_resume else lib.TLSCTL_RENEW_NEVER
    if lib.tlsctl_set_renewal(ptr, mode) != 1:
        raise OpenSSLError(
            "SSL_CTX_set_session_ticket_cb failed", _bind.openssl_errors()
        )

    target.__dict__[_POLICY_ATTR] = policy
    install_plan(target)
    if tickets != "immediate":
        # memory-BIO servers: TCP_QUICKACK from asyncio's and trio's own
        # handshake hooks (sockets do it in C: _binding, 10.)
        _quickack.install()
    if tickets == "defer" and _bind.info().mechanism == "python":
        from tlsctl._pyhold import warn_sockets  # tlsctl-pymech

        warn_sockets(stacklevel=1)
    return ctx


def unpatch(ctx: ssl.SSLContext) -> None:
    """Take ``patch()``'s policy off ``ctx``: its new connections are stock
    again (ticket callbacks stay).  For ``extract_from_ssl``."""
    target = _bind.serving_context(ctx)
    if not _bind.info().bound:  # tlsctl-pymech
        if target.__dict__.pop(_POLICY_ATTR, None) is not None:
            install_plan(target)
        return
    ptr, _ = _bind.ctx_pointer(target)
    if target.__dict__.pop(_POLICY_ATTR, None) is None:
        return
    _bind.lib.tlsctl_set_renewal(ptr, _bind.lib.TLSCTL_RENEW_STOCK)
    install_plan(target)


def check_settings(
    tickets: object, count: object, renew_on_resume: object
) -> int | None:
    """``patch()``'s argument checks (also ``inject_into_ssl``'s); returns
    the count."""
    if tickets not in POLICIES:
        raise ValueError(f"tickets must be one of {POLICIES}, got {tickets!r}")
    if count is not None:
        count = _check_count(count, 0)
        if tickets == "suppress":
            raise ValueError(
                f"count={count} has no meaning with tickets='suppress', which "
                "sends no ticket"
            )
    if not isinstance(renew_on_resume, bool):
        raise TypeError("renew_on_resume must be a bool")
    return count


def issue_tickets(conn: Connection, count: int = 1) -> None:
    """Queue ``count`` fresh tickets on a server-side TLS 1.3 connection.

    They go out with the server's next application write, ahead of its data
    (like ``defer``, and for the same reason: queued any earlier, OpenSSL
    would also flush them from the next read).  ``conn`` may come from any
    server context, patched or not.

    Raises:
        TypeError: ``conn`` is not an ``ssl.SSLSocket`` / ``ssl.SSLObject``
            (or was made without its constructor), or ``count`` is not an int.
        ValueError: ``count`` outside 1 to ``MAX_TICKETS`` (16), or more than
            ``MAX_TICKETS`` tickets would wait for the next write.
        ConnectionStateError: client side, TLS 1.2, handshake not finished,
            or the connection is closed or unwrapped.
        UnsupportedError: OpenSSL < 3.0 has no ``SSL_new_session_ticket``.
        BindingError: tlsctl is not bound, or ``conn`` is not proven to
            belong to the bound OpenSSL.
        NotBoundError: (a ``BindingError`` and an ``UnsupportedError``)
            tlsctl is not bound here.
    """
    if not _bind.is_connection(conn):
        raise TypeError(
            f"expected an ssl.SSLSocket or ssl.SSLObject, got "
            f"{type(conn).__module__}.{type(conn).__qualname__}"
        )
    _bind.require_bound("issue_tickets()")  # tlsctl-pymech
    pyhold = _PYHOLD
    if pyhold is not None and pyhold.manages(conn):
        raise UnsupportedError(
            "issue_tickets() does not combine with the python mechanism "
            "(TLSCTL_MECHANISM=python) on the connections it set up"
        )
    ptr = _bind.sslobj_pointer(_real_sslobj(conn))
    count = _check_count(count, 1)
    lib = _bind.lib
    rc = lib.tlsctl_check_issue(ptr)
    if rc == lib.TLSCTL_ERR_CLIENT:
        raise ConnectionStateError("issue_tickets() needs a server-side connection")
    if rc == lib.TLSCTL_ERR_CLOSED:
        raise ConnectionStateError(
            "issue_tickets() on a connection that sent its close_notify (unwrap())"
        )
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
    _bind.fast["arm"](conn, count)


def connection_state(conn: Connection) -> ConnectionState:
    """Report the ticket policy and ticket bookkeeping of one connection.

    A connection that tlsctl never touched, and one that is closed or
    unwrapped (its TLS state is gone), report
    ``ConnectionState(None, False, 0)``.
    """
    if not _bind.is_connection(conn):
        raise TypeError(
            f"expected an ssl.SSLSocket or ssl.SSLObject, got {type(conn).__name__}"
        )
    sslobj = _sslobj_of(conn)
    pyhold = _PYHOLD
    python = None if sslobj is None or pyhold is None else pyhold.state_of(conn)
    if python is not None:  # tlsctl-pymech: the python mechanism's record
        return ConnectionState(*python)
    if sslobj is None or not _bind.info().bound:
        return _UNTRACKED
    report = _bind.fast["report"](sslobj)
    if report is None:
        return _UNTRACKED
    code, _state, waiting, issued = report
    return ConnectionState(_POLICY_NAMES[code], waiting, issued)


def _stash_state_of(ptr: Any) -> tuple[int, int]:
    """(bytes held back, ticket records released) of a stash connection
    (the benchmark's RSS breakdown)."""
    held = _bind.ffi.new("size_t *")
    released = _bind.ffi.new("size_t *")
    if not _bind.lib.tlsctl_stash_state(ptr, held, released):
        return 0, 0
    return int(held[0]), int(released[0])
