"""Where tlsctl meets every new connection: the stdlib's own
``SSLContext.wrap_socket`` and ``SSLContext.wrap_bio``.

Theory of operation
===================

Every stdlib TLS connection is made by one of these two methods (asyncio,
uvloop, trio and ``SSLSocket.accept`` call them too).  The first call of
``tlsctl.patch()`` or ``set_ticket_callbacks()`` in a process replaces them,
on the ssl module's real ``SSLContext`` class (``_bind.STDLIB_CONTEXT``, not
whatever ``ssl.SSLContext`` names at the time: truststore swaps that name),
with the two functions below.  A context that tlsctl configured carries its
*plan* (``PLAN_ATTR`` in its ``__dict__``): a callable that applies its
policy to a new server connection (``_binding``'s C ``apply``, see
``_policy.install_plan``).  While injection
is on (``_inject``), a context without a plan gets one, or ``False``
(stock), from ``adopter`` at its first server-side connection.  For any
other context, and for the client side, the hooks only call the original.

Why here and not in ``sslsocket_class`` / ``sslobject_class`` (earlier
versions installed factory classes there): those are the user's knobs.  A
class assigned after ``patch()`` replaced tlsctl's factory and silently
dropped the policy; now ``type(conn)`` is always whatever class the user set,
at any time, and tlsctl still sees the connection.

For a server socket the plan must run before the handshake (its per
connection ticket count, the stash, a callback record), which
``SSLSocket._create`` would run itself: the hook asks for the connection
without the handshake and then does what ``_create`` does (ssl.py,
3.9 .. 3.15): the ``ValueError`` for a non-blocking socket, the handshake,
and closing the socket if either fails.

A plan may instead be a ``BioPlan`` (the python mechanism, ``_pyhold``):
its ``sock`` part (a plan, or ``None`` for stock) serves ``wrap_socket``,
and its ``bio`` part is called with the connection and its outgoing
``MemoryBIO``, which an ``SSLObject`` does not expose.

Invariant: a context without a plan, and every client-side connection, gets
exactly the stock behaviour; the hooks keep the originals' signatures.
"""

from __future__ import annotations

import ssl

from tlsctl._bind import STDLIB_CONTEXT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["PLAN_ATTR", "BioPlan", "install", "installed"]

PLAN_ATTR = "_tlsctl_plan"


class BioPlan:
    """A plan in two parts: ``sock(conn)`` for ``wrap_socket`` (``None``:
    stock) and ``bio(conn, outgoing)`` for ``wrap_bio``."""

    __slots__ = ("bio", "sock")

    def __init__(
        self,
        sock: Callable[[Any], None] | None,
        bio: Callable[[Any, ssl.MemoryBIO], None],
    ) -> None:
        self.sock = sock
        self.bio = bio


# The methods the hooks replaced (set by install()).
_original: dict[str, Any] = {}

# While injection is on (_inject), the function that makes the plan of a
# context serving its first server-side connection: the plan, or False
# (stock from then on; a plan of None means "not examined yet").
adopter: Callable[[Any], Any] | None = None


def _wrap_socket(
    self: ssl.SSLContext,
    sock: Any,
    server_side: bool = False,
    do_handshake_on_connect: bool = True,
    suppress_ragged_eofs: bool = True,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> ssl.SSLSocket:
    plan = self.__dict__.get(PLAN_ATTR) if server_side else None
    if plan is None and server_side and adopter is not None:
        plan = adopter(self)
    if type(plan) is BioPlan:
        plan = plan.sock
    if not plan:
        conn: ssl.SSLSocket = _original["wrap_socket"](
            self,
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
        )
        return conn
    conn = _original["wrap_socket"](
        self, sock, server_side, False, suppress_ragged_eofs, server_hostname, session
    )
    setattr(conn, "do_handshake_on_connect", do_handshake_on_connect)  # noqa: B010
    if getattr(conn, "_sslobj", None) is None:
        return conn  # not connected: no SSL yet, as stock
    try:
        plan(conn)
        if do_handshake_on_connect:
            if conn.gettimeout() == 0.0:
                raise ValueError(
                    "do_handshake_on_connect should not be specified for "
                    "non-blocking sockets"
                )
            conn.do_handshake()
    except BaseException:  # stock closes on OSError/ValueError; a ticket
        conn.close()  # callback may raise anything: never leak the socket
        raise
    return conn


def _wrap_bio(
    self: ssl.SSLContext,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> ssl.SSLObject:
    conn: ssl.SSLObject = _original["wrap_bio"](
        self, incoming, outgoing, server_side, server_hostname, session
    )
    if server_side:
        plan = self.__dict__.get(PLAN_ATTR)
        if plan is None and adopter is not None:
            plan = adopter(self)
        if type(plan) is BioPlan:
            plan.bio(conn, outgoing)
        elif plan:
            plan(conn)
    return conn


_HOOKS = {"wrap_socket": _wrap_socket, "wrap_bio": _wrap_bio}


def installed() -> bool:
    """The hooks are in place on the stdlib's SSLContext class."""
    return all(STDLIB_CONTEXT.__dict__.get(n) is f for n, f in _HOOKS.items())


def install() -> None:
    """Put the hooks in place (idempotent; keeps what was there, signature
    and docstring included, as the original)."""
    for name, hook in _HOOKS.items():
        current = STDLIB_CONTEXT.__dict__[name]
        if current is hook:
            continue
        _original[name] = current
        hook.__doc__ = current.__doc__
        hook.__qualname__ = current.__qualname__
        hook.__name__ = current.__name__
        hook.__wrapped__ = current  # type: ignore[attr-defined]
        setattr(STDLIB_CONTEXT, name, hook)
