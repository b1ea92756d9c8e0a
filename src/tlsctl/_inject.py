"""Injection: every server-side connection of the stdlib ``ssl`` module gets
a ticket policy, whoever made its context (``inject_into_ssl``), and the
zero-code launcher's start-up hook (``inject_from_environment``).

Theory of operation
===================

``inject_into_ssl()`` does not replace ``ssl.SSLContext`` (truststore's way):
that breaks ``isinstance`` for contexts that already exist, which uvicorn,
aiohttp and tornado check, and misses contexts made before the call.  It
uses ``_wrap``'s hooks on the stdlib class's own ``wrap_socket`` /
``wrap_bio`` instead.  The first time a context serves a server-side
connection, the hook asks ``_adopt`` for the context's plan: the context is
patched with the injected settings (``patch`` and ``set_ticket_keys``), and
every later connection of it takes the fast path as if the user had patched
it.  A context that cannot be patched (a fixed-version protocol, a
client-only method, another OpenSSL) is marked stock and never asked again.
Client-side use never reaches ``_adopt``.

Keys: contexts adopted by injection share one key list, so a ticket from any
of them resumes on all of them: servers that make a new context per
connection (gunicorn's sync and gthread workers) resume, and so do worker
processes forked after injection.  Without ``ticket_keys`` it is one random
key made at injection time (processes started otherwise, by spawn or exec,
each make their own: give them ``ticket_keys`` files).  A context whose
owner set keys (``set_ticket_keys``) keeps them; one the user patched keeps
its policy.

Injecting again replaces the settings for every context injection adopted
(rotation: ``inject_into_ssl(ticket_keys=[new, old])``).  ``extract_from_ssl``
stops it and puts every adopted context back to stock for its new
connections (policy and injected keys removed).

Invariant: ``_lock`` guards the settings and the adopted / refused sets;
adoption runs at most once per context and settings change.
"""

from __future__ import annotations

import _thread
import os
import weakref
from collections.abc import Iterable

from tlsctl import _bind, _policy, _tickets, _wrap
from tlsctl._errors import TlsctlError
from tlsctl._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["extract_from_ssl", "inject_from_environment", "inject_into_ssl"]

# The launcher's environment (``python -m tlsctl run``; also the switch for
# containers and service managers, see the README).
ENV_POLICY = "TLSCTL_INJECT"  # defer, suppress or immediate: inject at start-up
ENV_COUNT = "TLSCTL_INJECT_COUNT"
ENV_RENEW = "TLSCTL_INJECT_RENEW_ON_RESUME"  # "0" for renew_on_resume=False
ENV_KEYS = "TLSCTL_INJECT_TICKET_KEYS"  # key files, os.pathsep-separated


class _Settings(Record):
    __slots__ = _fields = (
        "tickets",
        "ticket_count",
        "renew_on_resume",
        "keys",
        "generated",
    )
    tickets: str
    ticket_count: int | None
    renew_on_resume: bool
    keys: tuple[_tickets.TicketKey, ...]
    generated: bool  # the keys are injection's own random one

    def __init__(
        self,
        tickets: str,
        ticket_count: int | None,
        renew_on_resume: bool,
        keys: tuple[_tickets.TicketKey, ...],
        generated: bool,
    ) -> None:
        self._set(
            tickets=tickets,
            ticket_count=ticket_count,
            renew_on_resume=renew_on_resume,
            keys=keys,
            generated=generated,
        )


_lock = _thread.RLock()  # not threading: its import costs every process
_settings: _Settings | None = None
_adopted: weakref.WeakSet[Any] = weakref.WeakSet()
_refused: weakref.WeakSet[Any] = weakref.WeakSet()


def _keys_of(ticket_keys: object) -> tuple[_tickets.TicketKey, ...] | None:
    if ticket_keys is None:
        return None
    if isinstance(ticket_keys, (str, bytes, os.PathLike, _tickets.TicketKey)):
        raise TypeError(
            "ticket_keys must be a sequence of TicketKey objects or key file "
            "paths, not a single one"
        )
    if not isinstance(ticket_keys, Iterable):
        raise TypeError(
            f"ticket_keys must be a sequence of TicketKey objects or key file "
            f"paths, not {type(ticket_keys).__name__}"
        )
    keys = tuple(
        k
        if isinstance(k, _tickets.TicketKey)
        else _tickets.TicketKey.from_file(k)
        for k in ticket_keys
    )
    if not keys:
        raise ValueError("ticket_keys needs at least one key")
    return keys


def inject_into_ssl(
    *,
    tickets: str = "defer",
    count: int | None = None,
    renew_on_resume: bool = True,
    ticket_keys: Sequence[_tickets.TicketKey | str | os.PathLike[str]] | None = None,
) -> None:
    """Give every server-side stdlib ``ssl`` connection a ticket policy.

    After this call each context that serves a server-side connection (made
    before or after the call, by any code: uvicorn, hypercorn, gunicorn,
    aiohttp, ...) is patched the first time it does, as
    ``patch(ctx, tickets=..., count=..., renew_on_resume=...)`` would,
    and gets the injected ticket keys.  Client-side use is untouched; a
    context tlsctl cannot serve behaves as stock.  Works with truststore's
    ``inject_into_ssl()`` in either order.  Thread-safe and idempotent;
    calling it again replaces the settings for every context it adopted
    (with new ``ticket_keys``: a rotation).

    ``ticket_keys``: ``TicketKey`` objects or key file paths (first
    encrypts, all decrypt), the same for every adopted context.  Default:
    one random key made now, shared by every context of this process and by
    processes forked from it (kept when injecting again without keys).
    Contexts whose owner called ``set_ticket_keys`` keep their keys;
    contexts the owner patched keep their policy.

    Raises:
        TypeError / ValueError: bad arguments (as ``patch``), or a key file
            of the wrong size or kind (``TicketKey.from_file``).
        OSError: a key file cannot be read.
        BindingError: tlsctl is not bound here.
    """
    global _settings
    count = _policy.check_settings(tickets, count, renew_on_resume)
    _bind.require_bound()
    keys = _keys_of(ticket_keys)
    with _lock:
        generated = keys is None
        if keys is None:
            keys = (
                _settings.keys
                if _settings is not None and _settings.generated
                else (_tickets.TicketKey.generate(),)
            )
        _settings = _Settings(tickets, count, renew_on_resume, keys, generated)
        for ctx in list(_adopted):
            _apply(ctx, _settings)
        for ctx in list(_refused):  # examine them again with the new settings
            ctx.__dict__.pop(_wrap.PLAN_ATTR, None)
        _refused.clear()
        _wrap.install()
        _wrap.adopter = _adopt


def extract_from_ssl() -> None:
    """Undo ``inject_into_ssl``: contexts it adopted are stock again for
    their new connections (policy and injected keys removed; live
    connections keep theirs), and new contexts are left alone.  Idempotent.
    """
    global _settings
    with _lock:
        _wrap.adopter = None
        for ctx in list(_adopted):
            _policy.unpatch(ctx)
            ptr, _ = _bind.ctx_pointer(_bind.serving_context(ctx))
            _bind.lib.tlsctl_clear_ticket_keys(ptr)
        for ctx in list(_refused):
            ctx.__dict__.pop(_wrap.PLAN_ATTR, None)
        _adopted.clear()
        _refused.clear()
        _settings = None


def injected() -> dict[str, Any] | None:
    """The injected settings (key ids, never key bytes), or ``None``."""
    with _lock:
        if _settings is None:
            return None
        return {
            "tickets": _settings.tickets,
            "count": _settings.ticket_count,
            "renew_on_resume": _settings.renew_on_resume,
            "ticket_keys": [k.id for k in _settings.keys],
            "generated_keys": _settings.generated,
            "contexts": len(_adopted),
        }


def _apply(ctx: Any, settings: _Settings) -> None:
    _policy.patch(
        ctx,
        tickets=settings.tickets,
        count=settings.ticket_count,
        renew_on_resume=settings.renew_on_resume,
    )
    ptr, _ = _bind.ctx_pointer(_bind.serving_context(ctx))
    if ctx in _adopted or not _bind.lib.tlsctl_ticket_key_count(ptr):
        _tickets.set_ticket_keys(ctx, settings.keys)


def _adopt(ctx: Any) -> Any:
    """``_wrap``'s question for a context serving its first server-side
    connection while injection is on: its plan, or False (stock)."""
    with _lock:
        plan = ctx.__dict__.get(_wrap.PLAN_ATTR)
        if plan is not None or _settings is None:
            return plan or False
        try:
            _apply(ctx, _settings)
            _adopted.add(ctx)
        except (TlsctlError, TypeError, ValueError):
            ctx.__dict__[_wrap.PLAN_ATTR] = False
            _refused.add(ctx)
            return False
        return ctx.__dict__.get(_wrap.PLAN_ATTR) or False


def inject_from_environment() -> bool:
    """Inject as the environment says (``TLSCTL_INJECT`` and friends; what
    ``python -m tlsctl run`` sets): the start-up hook of the launcher's
    ``sitecustomize`` and of the ``tlsctl-inject.pth`` switch.  Returns
    whether it injected.  Bad settings raise (a misconfigured server
    should not start without what it was asked for)."""
    policy = os.environ.get(ENV_POLICY)
    if not policy:
        return False
    count_text = os.environ.get(ENV_COUNT)
    try:
        count = int(count_text) if count_text else None
    except ValueError:
        raise ValueError(f"{ENV_COUNT}={count_text!r} is not a number") from None
    keys_text = os.environ.get(ENV_KEYS)
    inject_into_ssl(
        tickets=policy,
        count=count,
        renew_on_resume=os.environ.get(ENV_RENEW, "1") != "0",
        ticket_keys=keys_text.split(os.pathsep) if keys_text else None,
    )
    return True
