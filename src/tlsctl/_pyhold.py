"""The python mechanism: ``defer`` for memory-BIO servers without the binding.

Theory of operation
===================

Where tlsctl cannot bind to the interpreter's OpenSSL (PyPy, whose ``_ssl``
is not CPython's; uv's python-build-standalone builds, which link OpenSSL
statically with hidden symbols; ``TLSCTL_BINDING=off``), no OpenSSL call can
be made on a connection.  Memory-BIO connections (``ssl.SSLObject``:
asyncio, uvloop, trio, anyio) need none: everything the server writes goes
into its outgoing ``MemoryBIO``, which Python code can read and write.

* When the server's TLS 1.3 handshake finishes, in ``do_handshake()`` (or in
  a ``read()`` that ran the handshake), OpenSSL has just appended exactly
  its NewSessionTicket records to the outgoing BIO (the server's own flight
  went out in an earlier call, before the client could send its Finished).
  The proxy snapshots ``outgoing.pending`` before every call and takes out
  only what the call appended.  A ``MemoryBIO`` is FIFO, so it reads
  everything, writes back the older part (whatever the application had not
  drained yet) and holds the new part.
* Records are sequence-numbered: none may be dropped or reordered.  So after
  every later call that appended bytes (``write``, ``shutdown`` for
  ``unwrap()``, a ``read`` that answers a KeyUpdate or sends an alert...),
  the proxy splices: the older bytes, then the held tickets, then the new
  bytes.  The tickets leave with the server's first record after the
  handshake, in the same buffer.  A connection closed without a write never
  sends them.
* A ``write`` that itself finishes the handshake already puts the tickets
  ahead of its data: nothing is held.  TLS 1.2 (tickets are part of the
  handshake) and a handshake that wrote no ticket hold nothing either.
* Until the tickets are released (or nothing is held) the connection's
  ``_sslobj`` is ``_HoldProxy``, which forwards everything else to the real
  ``_ssl._SSLSocket`` (public names through class-level properties, the
  rest through ``__getattr__``).  Afterwards the real object is put back:
  the connection is the stock object again.  Its bookkeeping (policy, bytes
  held, ticket records released) stays in ``_STATES``, keyed weakly by the
  connection, for ``tlsctl.connection_state``.

Sockets (``wrap_socket``): OpenSSL writes to the kernel directly, and
nothing outside OpenSSL can hold the tickets back, so socket connections
stay exactly as stock, and the first ``patch()`` of the process says so
once (``SocketsNotDeferredWarning``).

What needs the binding and so is unavailable here (``NotBoundError``, both
an ``UnsupportedError`` and a ``BindingError``): ``tickets="suppress"`` and
``count=`` (per-connection ``SSL_set_num_tickets``), ``renew_on_resume=
False`` (a C session ticket callback), ``issue_tickets``, ticket callbacks,
ticket keys, their rotation and lifetime.  The context's own
``num_tickets`` is the user's knob and works: the python mechanism defers
whatever the handshake wrote.

``TLSCTL_MECHANISM=python`` forces this mechanism where the binding works
(a testing aid): then ``count=`` and ticket callbacks still work through
the binding (``setup`` below), and sockets are stock as on an interpreter
tlsctl cannot bind.

Invariant: the proxy never drops, duplicates or reorders a byte of the
outgoing BIO; it only moves the records one call appended after the
handshake to the front of the next call's.
"""

from __future__ import annotations

import operator
import ssl
import sys
import weakref

from tlsctl import _bind, _policy, _wrap

TYPE_CHECKING = False
if TYPE_CHECKING:  # nothing from typing at run time: import cost
    from typing import Any, Callable

__all__ = [
    "SocketsNotDeferredWarning",
    "make_plan",
    "manages",
    "record_plan",
    "state_of",
    "support",
    "warn_sockets",
]


class SocketsNotDeferredWarning(UserWarning):
    """``tickets="defer"`` holds tickets back on memory-BIO connections only:
    on this interpreter (the python mechanism) ``ssl`` sockets send their
    tickets right after the handshake, as stock.  Emitted once per process,
    at the first ``patch()`` (or ``inject_into_ssl()``) that asks for
    ``defer``."""


class _State:
    """One connection's bookkeeping (in ``_STATES``)."""

    __slots__ = ("done", "held", "issued", "policy")

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.done = False  # the handshake is known to have finished
        self.held = b""  # ticket records taken out of the outgoing BIO
        self.issued = 0  # ticket records released


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _records(data: bytes) -> int:
    """Number of TLS records in ``data`` (whole records, as OpenSSL wrote)."""
    count = offset = 0
    while offset + 5 <= len(data):
        offset += 5 + int.from_bytes(data[offset + 3 : offset + 5], "big")
        count += 1
    return count


class _HoldProxy:
    """Stands in for a server ``SSLObject``'s ``_sslobj`` (``_ssl._SSLSocket``)
    from its creation until its held tickets are released, or until its
    handshake finished without anything to hold."""

    __slots__ = ("_conn", "_out", "_real", "_state")

    def __init__(self, conn: Any, real: Any, out: ssl.MemoryBIO, state: _State) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_conn", weakref.ref(conn))  # no cycle through conn
        setattr_(self, "_real", real)
        setattr_(self, "_out", out)
        setattr_(self, "_state", state)

    # The calls that can make OpenSSL write a record.  Whether the handshake
    # has finished is known from the calls themselves: do_handshake(),
    # read() and write() return normally only after it (version() would not
    # do: PyPy's answers before the handshake, CPython's does not).
    def do_handshake(self) -> None:
        before, finished = self._out.pending, False
        try:
            self._real.do_handshake()
            finished = True
        finally:
            self._after(before, finished, True)

    def read(self, *args: Any) -> Any:
        before, finished = self._out.pending, False
        try:
            data = self._real.read(*args)
            finished = True
            return data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            finished = self._probe()  # the read may have run the handshake
            raise
        finally:
            self._after(before, finished, True)

    def write(self, data: Any) -> int:
        before, finished = self._out.pending, False
        try:
            written: int = self._real.write(data)
            finished = True
            return written
        finally:
            self._after(before, finished, False)

    def shutdown(self) -> Any:
        before = self._out.pending
        try:
            return self._real.shutdown()
        finally:
            self._after(before, False, False)

    def _probe(self) -> bool:
        """Whether the handshake has finished: ``SSL_do_handshake`` on a
        finished one returns at once, and on an unfinished one waiting for
        the client (the read just consumed all it had) it wants to read and
        writes nothing."""
        if self._state.done:
            return True
        try:
            self._real.do_handshake()
        except ssl.SSLError:
            return False
        return True

    def _after(self, before: int, finished: bool, may_hold: bool) -> None:
        """After a call (returned or raised): splice or hold what it wrote.
        ``finished``: the call proved the handshake finished; ``may_hold``:
        what it wrote may be the handshake's tickets (not so for a write,
        whose data record already follows them)."""
        state, out = self._state, self._out
        grown = out.pending > before
        if state.held:
            if grown:  # older bytes, the held tickets, then the new records
                data = out.read()
                out.write(b"".join((data[:before], state.held, data[before:])))
                state.issued += _records(state.held)
                state.held = b""
                self._step_aside()
            return
        if state.done or not finished:
            return  # handshake unfinished (or failed): nothing to do yet
        state.done = True
        if may_hold and grown and self._real.version() == "TLSv1.3":
            data = out.read()  # FIFO: keep the older part, hold the new part
            if before:
                out.write(data[:before])
            state.held = data[before:]
            return
        self._step_aside()  # TLS 1.2, no ticket, or a write took them along

    def _step_aside(self) -> None:
        conn = self._conn()
        if conn is not None and getattr(conn, "_sslobj", None) is self:
            conn._sslobj = self._real

    def __getattr__(self, name: str) -> Any:  # anything not delegated below
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)


def _delegate(name: str) -> property:
    def set_(proxy: _HoldProxy, value: Any) -> None:
        setattr(proxy._real, name, value)

    return property(
        operator.attrgetter(f"_real.{name}"),
        set_,
        doc=f"forwarded to _ssl._SSLSocket.{name}",
    )


for _name in dir(_bind.SSL_SOCKET_TYPE):
    if not _name.startswith("_") and _name not in _HoldProxy.__dict__:
        setattr(_HoldProxy, _name, _delegate(_name))
del _name

#: The proxy type, for ``_policy`` (it unwraps ``_real`` like its own).
PROXY = _HoldProxy


def make_plan(setup: Callable[[Any], None] | None) -> _wrap.BioPlan:
    """The plan of a ``defer`` context under the python mechanism:
    ``setup(conn)`` (binding work when tlsctl is bound: ``count``, ticket
    callbacks) runs for every server connection; memory-BIO connections then
    get the hold proxy; sockets are otherwise stock."""

    def bio(conn: ssl.SSLObject, outgoing: ssl.MemoryBIO) -> None:
        if setup is not None:
            setup(conn)
        any_conn: Any = conn
        state = _STATES[conn] = _State("defer")
        any_conn._sslobj = _HoldProxy(conn, any_conn._sslobj, outgoing, state)

    return _wrap.BioPlan(setup, bio)


def record_plan(policy: str) -> _wrap.BioPlan:
    """The plan of a context whose policy is stock without the binding
    (``"immediate"``): only remember the policy, for ``connection_state``."""

    def record(conn: Any, outgoing: Any = None) -> None:
        _STATES[conn] = _State(policy)

    return _wrap.BioPlan(record, record)


def manages(conn: object) -> bool:
    """``conn`` was set up by a plan of this module."""
    try:
        return conn in _STATES
    except TypeError:  # not weakly referenceable
        return False


def state_of(conn: object) -> tuple[str, bool, int] | None:
    """(policy, tickets held, ticket records released), or ``None`` when
    this module did not set ``conn`` up."""
    try:
        state = _STATES.get(conn)
    except TypeError:
        return None
    if state is None:
        return None
    return state.policy, bool(state.held), state.issued


# ------------------------------------------------------------ what works

_warned = False


def _sockets_why() -> str:
    info = _bind.info()
    if info.bound:
        return "TLSCTL_MECHANISM=python forces the python mechanism (a testing aid)"
    return (
        f"tlsctl cannot bind to this interpreter's OpenSSL ({info.reason}), and "
        "a socket's OpenSSL writes its tickets to the kernel itself, where "
        "nothing can hold them back"
    )


def warn_sockets(stacklevel: int = 1) -> None:
    """Emit ``SocketsNotDeferredWarning`` once per process; ``stacklevel``
    counts from the caller of this function's caller."""
    global _warned
    if _warned:
        return
    _warned = True
    import warnings

    warnings.warn(
        SocketsNotDeferredWarning(
            "tlsctl: tickets='defer' holds TLS 1.3 session tickets back on "
            "memory-BIO connections only (asyncio, uvloop, trio, anyio: the "
            "python mechanism); ssl sockets (wrap_socket) send them right after "
            f"the handshake, as stock: {_sockets_why()}"
        ),
        stacklevel=stacklevel + 2,
    )


#: What needs the binding (shown by ``support()``).
NEEDS_BINDING = (
    "tickets='suppress'",
    "count=",
    "renew_on_resume=False",
    "issue_tickets",
    "ticket callbacks",
    "set_ticket_keys / watch_ticket_keys",
    "rotate_ticket_keys",
    "set_ticket_lifetime",
    "inject_into_ssl's ticket keys and lifetime",
)


def _mapped_libssl() -> list[str]:
    """Shared libssl files mapped into this process (Linux), else ``[]``."""
    import os

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libssl" in line}
    except OSError:
        return []
    return sorted({os.path.realpath(p) for p in paths if p.startswith("/")})


def support() -> list[tuple[str, str]]:
    """What tlsctl does on this interpreter, as (subject, verdict) lines,
    for ``python -m tlsctl doctor``."""
    info = _bind.info()
    lines: list[tuple[str, str]] = []
    if info.mechanism == "python":
        lines.append(
            (
                "memory-BIO servers",
                "tickets='defer' works (asyncio, uvloop, trio, anyio; the "
                "python mechanism holds the tickets in the outgoing MemoryBIO)",
            )
        )
        lines.append(("ssl sockets", f"stock: {_sockets_why()}"))
    elif info.mechanism is not None:
        works = f"tickets='defer' works ({info.mechanism})"
        lines.append(("memory-BIO servers", works))
        lines.append(("ssl sockets", works))
    if not info.bound:
        lines.append(("tickets='immediate'", "works (stock)"))
        lines.append(("needs the binding", "unavailable: " + ", ".join(NEEDS_BINDING)))
        libssl = _mapped_libssl()
        impl = sys.implementation.name
        if libssl:
            lines.append(
                (
                    "shared libssl",
                    f"{', '.join(libssl)} is mapped into this process"
                    + (
                        f" ({impl}'s ssl links it), but tlsctl binds natively "
                        "only under CPython: unused"
                        if impl != "cpython"
                        else ", but tlsctl does not bind to it: unused"
                    ),
                )
            )
        else:
            lines.append(
                (
                    "shared libssl",
                    "none mapped: this interpreter's ssl has OpenSSL linked in "
                    "statically (as python-build-standalone does)",
                )
            )
    return lines


# Last, once everything above exists: from now on _policy asks this module
# about connections (its plans are the only way to one of them), and no
# thread sees it half made.
_policy._PYHOLD = sys.modules[__name__]
