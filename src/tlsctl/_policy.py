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
  records the policy of a server-side connection and, for ``defer``, arms it.
  On a context without ticket callbacks, with OpenSSL 3.x, that ``_create``
  and the proxy below are C (``tlsctl._binding``, section 9 of its source):
  a connection then costs tlsctl no Python frame at all, which is what
  brought full handshakes/s from 0.96 to 0.98+ of stock (measured: the
  Python version cost ~40 us per connection more than the same OpenSSL
  calls made by hand, in the benchmark loop, where caches are cold).  The
  policy and the count of tickets issued live in the SSL's ex_data under
  tlsctl's own index, as a tagged integer: no Python object per idle
  connection.
  Contexts with ticket callbacks, and the stash (OpenSSL 1.1.1), use the
  Python ``_create`` and proxies below, which keep a ``_ConnState``.

* Every write path of both classes ends in ``self._sslobj.write(data)``:
  ``SSLSocket.send`` / ``sendall`` / ``sendfile`` / ``write`` / ``makefile``
  and ``SSLObject.write`` (asyncio, trio).  Arming replaces ``_sslobj`` (the
  ``_ssl._SSLSocket``) with a first-write proxy (``FirstWriteProxy`` in C,
  ``_FirstWriteProxy`` / ``_GuardProxy`` in Python) whose ``write`` runs the
  ticket logic and then stores the real object back.  That is a plain store
  to an attribute the connection already has: its class, its attribute
  layout and CPython's specialised attribute lookups stay exactly as stock,
  so every later write costs what it costs without tlsctl (measured with
  callgrind: 14,404 instructions per 1 KiB write either way).  Shadowing
  methods in the instance ``__dict__`` or swapping ``__class__`` instead
  cost 3-4% per write for the life of the connection (measured).  Other
  attributes are forwarded to the real object while armed.

* The first write runs ``tlsctl_queue_tickets``: for a finished TLS 1.3
  server handshake it calls ``SSL_new_session_ticket`` N times (``count``,
  or one after a resumed handshake, as stock OpenSSL does).  On a socket
  the proxy then writes those tickets with ``do_handshake()``; it restores
  the real object and performs the caller's write: ticket records first,
  then the application record, all inside the caller's one write call.

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
  queued and written, so a retried write continues where it stopped.

* TLS 1.2 connections and client-side connections are left exactly as
  stock: the proxy steps aside without calling OpenSSL.  ``renew_on_resume``
  installs a C session-ticket decrypt callback (no Python per handshake).

* ``issue_tickets(conn, n)`` uses the same proxy: it records ``n`` pending
  tickets and re-arms, so they too go out with the server's next write.

Per-connection state lives in C (above) or, for the Python path, in the
proxy while armed and then in a ``WeakKeyDictionary`` (never in the
connection's own ``__dict__``, see above); the policy is fixed when the
connection is created, so re-patching a context changes only the
connections created after it.
"""

from __future__ import annotations

import operator
import ssl
import weakref

from tlsctl import _bind, _pyhold, _quickack, _wrap
from tlsctl._errors import (
    ConnectionStateError,
    OpenSSLError,
    UnsupportedError,
)
from tlsctl._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # nothing from typing at run time: import cost
    from typing import Any, Callable, Union

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


def _no_connection() -> None:
    return None


class _ConnState:
    """Per-connection bookkeeping: in the connection's ``_FirstWriteProxy``
    while it is armed, else in ``_STATES`` (keyed weakly); see ``_state_of``.

    On a context with ticket callbacks it is also the record the C shim
    keeps in the connection's SSL ex_data: the dispatcher finds the
    connection through ``conn`` and leaves a callback's exception in
    ``exc`` for the proxy to re-raise once the OpenSSL call has returned.
    """

    __slots__ = (
        "conn",
        "count",
        "exc",
        "extra",
        "first",
        "flushing",
        "guard",
        "issued",
        "policy",
        "ptr",
        "resumed",
    )

    def __init__(self, policy: _Policy | None) -> None:
        self.policy = policy
        self.first = policy is not None and policy.tickets == "defer"
        # native defer: tickets at the first write after a full / resumed
        # handshake (stock sends at most one after a resumed one)
        self.count = self.resumed = 0
        self.extra = 0  # tickets asked for with issue_tickets(), not yet queued
        self.issued = 0  # tickets tlsctl queued so far
        self.flushing = False  # queued tickets not yet fully written
        self.ptr: Any = None  # validated SSL *, cached after the first proof
        self.guard = False  # Python ticket callbacks may run on this connection
        self.conn: Callable[[], Connection | None] = _no_connection
        self.exc: BaseException | None = None  # kept from a callback

    def pending(self) -> bool:
        """Tickets are still to be queued or written by the proxy."""
        return self.first or self.extra > 0 or self.flushing

    def take_exc(self) -> BaseException | None:
        exc, self.exc = self.exc, None
        return exc


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

_STATES: weakref.WeakKeyDictionary[Any, _ConnState] = weakref.WeakKeyDictionary()


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


def _state_of(conn: Connection) -> _ConnState | None:
    sslobj = _sslobj_of(conn)
    if type(sslobj) in _PROXIES:
        state: _ConnState = sslobj._state
        return state
    return _STATES.get(conn)


class _FirstWriteProxy:
    """The Python first-write proxy, for the stash and for contexts with
    ticket callbacks (elsewhere the C ``FirstWriteProxy`` is used): stands
    in for a connection's ``_sslobj`` until its tickets are out and, with
    callbacks, until no callback can run.

    Reaches the connection through the weak reference in its state (no
    reference cycle, so a socket still closes on ``del``).  While armed it
    is where the state lives; ``_STATES`` gets it on disarming, so an idle
    connection costs tlsctl one state and one proxy (152 bytes on 3.11).
    Every public attribute of ``_ssl._SSLSocket`` is forwarded by a
    class-level property (see ``_delegate``), so a lookup
    never takes the slow failed-lookup path into ``__getattr__``.  Its
    ``write`` re-raises an exception a ticket callback left in the
    connection's state; ``_GuardProxy`` does the same for the other calls
    that can run the handshake.
    """

    __slots__ = ("_real", "_state")

    def __init__(self, real: Any, state: _ConnState) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_real", real)
        setattr_(self, "_state", state)

    def write(self, data: Any) -> int:
        state = self._state
        conn = state.conn()
        stash = state.policy is not None and state.policy.stash
        try:
            # With the stash, the write itself releases the held tickets (in
            # C); only tickets asked for with issue_tickets() are queued here.
            if conn is not None and state.pending() and (not stash or state.extra):
                _before_write(conn, self)
            result: int = self._real.write(data)
        except BaseException:
            _reraise_callback_error(state)
            raise
        if stash and conn is not None:
            _after_stash_write(self)
        elif state.ptr is not None:
            _bind.lib.tlsctl_stash_remove(state.ptr)  # see _before_write
        _settle(self)
        return result

    def __getattr__(self, name: str) -> Any:  # anything not delegated below
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)


def _reraise_callback_error(state: _ConnState) -> None:
    """Raise the exception a ticket callback left, if any (called inside an
    ``except`` block, so the ``SSLError`` becomes its ``__context__``)."""
    exc = state.take_exc()
    if exc is not None:
        raise exc


def _settle(proxy: _FirstWriteProxy) -> None:
    """After a successful call: raise a callback's exception that OpenSSL
    did not turn into a failure, and step aside once nothing is left to do."""
    state = proxy._state
    exc = state.take_exc()
    if exc is not None:
        raise exc
    if state.pending():
        return
    if state.guard:
        if state.ptr is None:
            state.ptr = _bind.sslobj_pointer(proxy._real)
        if not _bind.lib.tlsctl_guard_done(state.ptr):
            return  # handshake unfinished, or TLS 1.2 (may renegotiate)
    conn = state.conn()
    if conn is not None:
        _disarm(conn, proxy)


def _delegate(name: str) -> property:
    # A C getter (operator.attrgetter): no Python frame on the calls a
    # handshake makes through the proxy.
    def set_(proxy: _FirstWriteProxy, value: Any) -> None:
        setattr(proxy._real, name, value)

    return property(
        operator.attrgetter(f"_real.{name}"),
        set_,
        doc=f"forwarded to _ssl._SSLSocket.{name}",
    )


for _name in dir(_bind.SSL_SOCKET_TYPE):
    if not _name.startswith("_") and _name != "write":
        setattr(_FirstWriteProxy, _name, _delegate(_name))
del _name


class _GuardProxy(_FirstWriteProxy):
    """The proxy of a connection whose context has ticket callbacks: it also
    intercepts the other calls that can run the handshake (and so a
    callback) to re-raise what a callback left.  A separate class, so plain
    ``defer`` connections pay no Python frame on those calls (measured: about
    8 us per handshake in the benchmark loop, where caches are cold)."""

    __slots__ = ()

    def do_handshake(self) -> None:
        try:
            self._real.do_handshake()
        except BaseException:
            _reraise_callback_error(self._state)
            raise
        _settle(self)

    def read(self, *args: Any) -> Any:
        try:
            data = self._real.read(*args)
        except BaseException:
            _reraise_callback_error(self._state)
            raise
        _settle(self)
        return data


_PROXIES = (_FirstWriteProxy, _GuardProxy)  # the Python ones, with a _state
# The C first-write proxy (None when nothing is bound: then nothing is armed).
_C_PROXY: type | None = _bind.fast.get("FirstWriteProxy")
_ALL_PROXIES = (*_PROXIES, _C_PROXY) if _C_PROXY is not None else _PROXIES
_ALL_PROXIES = (*_ALL_PROXIES, _pyhold.PROXY)  # the python mechanism's
# Policy names by the C module's TLSCTL_POLICY_* codes.
_POLICY_NAMES = (None, "defer", "suppress", "immediate")


def _real_sslobj(conn: Connection) -> Any:
    sslobj = _sslobj_of(conn)
    return sslobj._real if type(sslobj) in _ALL_PROXIES else sslobj


def _arm(conn: Connection, state: _ConnState) -> None:
    any_conn = _any(conn)
    if state.conn() is not conn:
        state.conn = weakref.ref(conn)
    if type(any_conn._sslobj) not in _PROXIES:
        proxy = _GuardProxy if state.guard else _FirstWriteProxy
        any_conn._sslobj = proxy(any_conn._sslobj, state)


def _disarm(conn: Connection, proxy: _FirstWriteProxy) -> None:
    any_conn = _any(conn)
    if any_conn._sslobj is proxy:  # not closed or unwrapped meanwhile
        any_conn._sslobj = proxy._real
    _STATES[conn] = proxy._state
    if not proxy._state.guard:  # the dispatcher no longer needs it
        proxy._state.conn = _no_connection


def _policy_counts(state: _ConnState) -> tuple[int, int]:
    """The tickets the policy still owes at the first write: after a full
    and after a resumed handshake (none with the stash: OpenSSL made them)."""
    if state.first and state.policy is not None and not state.policy.stash:
        return state.count, state.resumed
    return 0, 0


def _before_write(conn: Connection, proxy: _FirstWriteProxy) -> None:
    """Queue the tickets due now and write them ahead of the caller's data.
    Leaves the proxy in place; ``_settle`` removes it afterwards."""
    state = proxy._state
    sslobj = proxy._real
    if state.ptr is None:
        state.ptr = _bind.sslobj_pointer(sslobj)
    if not state.flushing:
        full, resumed = _policy_counts(state)
        lib = _bind.lib
        rc = lib.tlsctl_queue_tickets(state.ptr, full, resumed, state.extra)
        if rc == lib.TLSCTL_ERR_HANDSHAKE:
            # The write would run the handshake itself; run it first so the
            # tickets can be queued between the handshake and the data.
            # Raises SSLWantReadError etc. exactly as the write would, and
            # the proxy stays for the retry.
            sslobj.do_handshake()
            rc = lib.tlsctl_queue_tickets(state.ptr, full, resumed, state.extra)
        if rc < 0:
            _disarm(conn, proxy)
            raise OpenSSLError(
                "SSL_new_session_ticket failed before the first write",
                _bind.openssl_errors(),
            )
        state.issued += rc
        state.first = state.first and state.policy is not None and state.policy.stash
        state.extra = 0
        state.flushing = rc > 0
    if state.flushing:
        # Write the queued tickets through the handshake driver, not through
        # SSL_write: if the socket takes only part of a ticket record,
        # SSL_write returns WANT_WRITE, and its retry with the caller's
        # (shorter) buffer then fails ssl3_write_bytes' length check
        # (SSL_R_BAD_LENGTH), because the pending record is the ticket.
        # On a socket the stash filter captures them (a captured write
        # always succeeds) and the caller's data record then takes them
        # along in one write() (tlsctl_capture).  With the stash mechanism
        # its own filter already coalesces what it releases.
        lib = _bind.lib
        stash = state.policy is not None and state.policy.stash
        capture = 0 if stash else lib.tlsctl_capture(state.ptr, 1)
        if capture < 0:
            raise OpenSSLError(
                "holding the tickets for the first write failed",
                _bind.openssl_errors(),
            )
        try:
            sslobj.do_handshake()
        finally:
            if capture:
                lib.tlsctl_capture(state.ptr, 0)
        state.flushing = False


def _install_stash(conn: Connection) -> None:
    rc = _bind.lib.tlsctl_stash_install(_bind.sslobj_pointer(_real_sslobj(conn)))
    if rc != 1:
        raise OpenSSLError(
            "installing the ticket stash on a new connection failed",
            _bind.openssl_errors(),
        )


def _after_stash_write(proxy: _FirstWriteProxy) -> None:
    state = proxy._state
    if state.ptr is None:
        state.ptr = _bind.sslobj_pointer(proxy._real)
    _, released = _stash_state_of(state.ptr)
    if _bind.lib.tlsctl_stash_remove(state.ptr):
        state.issued += released
        state.first = False


def _prepare(conn: Connection, policy: _Policy | None, callbacks: bool) -> None:
    """The plan of a context with ticket callbacks or the stash: set up a
    new server connection before its handshake (see ``_wrap``)."""
    ptr = _bind.sslobj_pointer(_real_sslobj(conn))
    lib = _bind.lib
    state = _ConnState(policy)
    if policy is not None:
        count = -1 if policy.count is None else policy.count
        if policy.stash:  # OpenSSL makes the tickets, the stash holds them
            lib.SSL_set_num_tickets(ptr, lib.tlsctl_deferred_tickets(ptr, count))
            _install_stash(conn)  # its info callback also sets TCP_QUICKACK
        elif policy.tickets == "immediate":
            if count >= 0:
                lib.SSL_set_num_tickets(ptr, count)
        else:  # no ticket in the handshake; see _binding, 9. and 10.
            lib.SSL_set_num_tickets(ptr, 0)
            lib.tlsctl_quickack_install(ptr)
            if policy.tickets == "defer":
                state.count = int(lib.tlsctl_deferred_tickets(ptr, count))
                state.resumed = min(state.count, 1) if policy.renew_on_resume else 0
    if callbacks:
        state.guard = True
        state.conn = weakref.ref(conn)  # for the dispatcher
        state.ptr = ptr
        if lib.tlsctl_conn_register(ptr, id(state)) != 1:
            raise OpenSSLError(
                "attaching tlsctl's record to a new connection failed",
                _bind.openssl_errors(),
            )
    # Only contexts with callbacks (guarded) or the stash (always "defer")
    # come here; every other server connection is set up in C.
    _arm(conn, state)


def _refuse_unproven(conn: Any) -> None:
    """The C ``apply``'s fallback for a connection it could not track: raise
    the reason (its SSL is not proven, or OpenSSL could not store tlsctl's
    per-connection data); ``_wrap`` closes a socket."""
    _bind.sslobj_pointer(conn._sslobj)
    raise OpenSSLError(
        "attaching tlsctl's state to a new connection failed",
        _bind.openssl_errors(),
    )


def install_plan(ctx: ssl.SSLContext) -> None:
    """(Re)make the plan ``_wrap``'s hooks apply to ``ctx``'s new server
    connections, from its tlsctl settings: the policy ``patch()`` set and
    whether ``set_ticket_callbacks()`` set callbacks.  With neither, the
    context has no plan (stock)."""
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
    elif policy is not None and not callbacks and not policy.stash:
        # All in C: no Python frame per connection (see the module docstring).
        plan = _bind.fast["make_apply"](
            _POLICY_NAMES.index(policy.tickets),
            -1 if policy.count is None else policy.count,
            policy.renew_on_resume,
            _refuse_unproven,
        )
    else:

        def plan(conn: Connection) -> None:
            _prepare(conn, policy, callbacks)

    _wrap.install()
    settings[_wrap.PLAN_ATTR] = plan


# --- tlsctl-pymech: the python mechanism (see _pyhold) --------------------
def _python_plan(policy: _Policy, callbacks: bool) -> Any:
    """The plan of a context under the python mechanism: ``defer`` holds
    memory-BIO connections' tickets in Python; without the binding the other
    policies can only be ``immediate`` (stock, recorded).  With the binding
    (``TLSCTL_MECHANISM=python``), ``count`` and ticket callbacks are set up
    through it on every server connection, as the stash does."""
    if policy.tickets != "defer":
        return _pyhold.record_plan(policy.tickets)
    setup = None
    if _bind.info().bound and (policy.count is not None or callbacks):
        count = policy.count

        def setup(conn: Connection) -> None:
            if count is not None:
                ptr = _bind.sslobj_pointer(_real_sslobj(conn))
                _bind.lib.SSL_set_num_tickets(ptr, count)
            if callbacks:
                _prepare(conn, None, True)

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
            _quickack.install()
            _pyhold.warn_sockets(stacklevel=1)
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
        _pyhold.warn_sockets(stacklevel=1)  # tlsctl-pymech
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
    if _pyhold.manages(conn):
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
    state = _state_of(conn)
    if state is None and _bind.fast["arm"](conn, count):
        return  # tracked in C
    if state is None:  # pragma: no cover - the slot holds a Python record
        state = _STATES[conn] = _ConnState(None)
    waiting = state.extra
    if state.first and state.policy is not None and not state.policy.stash:
        waiting += state.count
    if waiting + count > MAX_TICKETS:
        raise ValueError(
            f"at most {MAX_TICKETS} tickets can wait for one write; {waiting} "
            f"already do, {count} more asked for"
        )
    state.ptr = ptr
    state.extra += count
    _arm(conn, state)


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
    python = _pyhold.state_of(conn) if sslobj is not None else None
    if python is not None:  # tlsctl-pymech: the python mechanism's record
        return ConnectionState(*python)
    if sslobj is None or not _bind.info().bound:
        return _UNTRACKED
    state = _state_of(conn)
    if state is None:
        code = int(_bind.lib.tlsctl_conn_info(_bind.sslobj_pointer(_real_sslobj(conn))))
        if code < 0:
            return _UNTRACKED
        return ConnectionState(
            _POLICY_NAMES[code & 3], bool(_bind.fast["waiting"](sslobj)), code >> 2
        )
    armed = type(_any(conn)._sslobj) in _PROXIES
    ptr = _bind.sslobj_pointer(_real_sslobj(conn))
    full, resumed = _policy_counts(state)
    # tickets the next write sends: being flushed, or owed and due (not
    # before the handshake, after close_notify, on TLS 1.2, or where stock
    # would send none after this handshake)
    waiting = armed and (
        state.flushing
        or _bind.lib.tlsctl_pending_tickets(ptr, full, resumed, state.extra) > 0
    )
    if state.policy is not None and state.policy.stash and armed:
        held, released = _stash_state_of(ptr)
        return ConnectionState("defer", held > 0 or waiting, state.issued + released)
    return ConnectionState(
        policy=state.policy.tickets if state.policy else None,
        waiting_for_write=waiting,
        issued=state.issued,
    )


def _stash_state_of(ptr: Any) -> tuple[int, int]:
    """(bytes held back, ticket records released) of a stash connection."""
    held = _bind.ffi.new("size_t *")
    released = _bind.ffi.new("size_t *")
    if not _bind.lib.tlsctl_stash_state(ptr, held, released):
        return 0, 0
    return int(held[0]), int(released[0])
