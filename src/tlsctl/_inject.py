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

Keys: contexts adopted by injection share their keys, so a ticket from any
of them resumes on all of them: servers that make a new context per
connection (gunicorn's sync and gthread workers) resume, and so do worker
processes forked after injection.  By default the keys rotate hourly from a
random master made at the first injection of the process
(``rotate_ticket_keys``); processes started otherwise (spawn, exec) each
make their own: give them ``ticket_keys`` files or a ``ticket_key_master``.
Key files are watched (``_keyfiles``' watcher, serving whichever contexts
injection adopted at each check).  A context whose owner set keys keeps
them; one the user patched keeps its policy.

Injecting again replaces the settings for every context injection adopted.
``extract_from_ssl`` stops it and puts every adopted context back to stock
for its new connections (policy, injected keys and lifetime removed).

Invariant: ``_lock`` guards the settings and the adopted / refused sets;
adoption runs at most once per context and settings change.
"""

from __future__ import annotations

import _thread
import os
import weakref
from collections.abc import Iterable

from tlsctl import _bind, _keyfiles, _lifecycle, _policy, _pyhold, _tickets, _wrap
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
ENV_MASTER = "TLSCTL_INJECT_TICKET_KEY_MASTER"  # a key file
ENV_ROTATE = "TLSCTL_INJECT_ROTATE_EVERY"  # seconds; "0": no rotation
ENV_KEEP = "TLSCTL_INJECT_KEEP"
ENV_LIFETIME = "TLSCTL_INJECT_TICKET_LIFETIME"  # seconds

#: Injection's default rotation: a new key every hour, two previous ones
#: still decrypt, so a ticket stays usable 2 to 3 hours, at least OpenSSL's
#: default ticket lifetime (2 hours): forward secrecy at no resumption cost.
DEFAULT_ROTATE_EVERY = 3600
DEFAULT_KEEP = 2


class _Settings(Record):
    __slots__ = _fields = (
        "tickets",
        "ticket_count",
        "renew_on_resume",
        "keys",
        "watcher",
        "master",
        "generated_master",
        "rotate_every",
        "keep",
        "lifetime",
    )
    tickets: str
    ticket_count: int | None
    renew_on_resume: bool
    keys: tuple[_tickets.TicketKey, ...] | None  # fixed keys
    watcher: _keyfiles.KeyWatcher | None  # key files, reloaded on change
    master: _tickets.TicketKey  # rotation's master (unused with keys, watcher)
    generated_master: bool  # the master is injection's own random one
    rotate_every: int | None  # None: the master itself is one fixed key
    keep: int
    lifetime: int | None

    def __init__(
        self,
        tickets: str,
        ticket_count: int | None,
        renew_on_resume: bool,
        keys: tuple[_tickets.TicketKey, ...] | None,
        watcher: _keyfiles.KeyWatcher | None,
        master: _tickets.TicketKey,
        generated_master: bool,
        rotate_every: int | None,
        keep: int,
        lifetime: int | None,
    ) -> None:
        self._set(
            tickets=tickets,
            ticket_count=ticket_count,
            renew_on_resume=renew_on_resume,
            keys=keys,
            watcher=watcher,
            master=master,
            generated_master=generated_master,
            rotate_every=rotate_every,
            keep=keep,
            lifetime=lifetime,
        )


_lock = _thread.RLock()  # not threading: its import costs every process
_settings: _Settings | None = None
_adopted: weakref.WeakSet[Any] = weakref.WeakSet()
_refused: weakref.WeakSet[Any] = weakref.WeakSet()
_timeouts: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _keys_of(
    ticket_keys: object,
) -> tuple[tuple[_tickets.TicketKey, ...] | None, list[str] | None]:
    """(fixed keys, key files to watch) from ``ticket_keys``: paths only are
    watched; ``TicketKey`` objects (and paths among them) are fixed."""
    if ticket_keys is None:
        return None, None
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
    items = list(ticket_keys)
    if not items:
        raise ValueError("ticket_keys needs at least one key")
    if all(isinstance(k, (str, os.PathLike)) for k in items):
        return None, [os.fspath(k) for k in items]
    keys = tuple(
        k if isinstance(k, _tickets.TicketKey) else _tickets.TicketKey.from_file(k)
        for k in items
    )
    return keys, None


def inject_into_ssl(
    *,
    tickets: str = "defer",
    count: int | None = None,
    renew_on_resume: bool = True,
    ticket_keys: Sequence[_tickets.TicketKey | str | os.PathLike[str]] | None = None,
    ticket_key_master: _tickets.TicketKey | str | os.PathLike[str] | None = None,
    rotate_every: int | None = DEFAULT_ROTATE_EVERY,
    keep: int = DEFAULT_KEEP,
    ticket_lifetime: int | None = None,
) -> None:
    """Give every server-side stdlib ``ssl`` connection a ticket policy.

    After this call each context that serves a server-side connection (made
    before or after the call, by any code: uvicorn, hypercorn, gunicorn,
    aiohttp, ...) is patched the first time it does, as
    ``patch(ctx, tickets=..., count=..., renew_on_resume=...)`` would, and
    gets the injected ticket keys (and ``ticket_lifetime`` through
    ``set_ticket_lifetime``).  Client-side use is untouched; a context tlsctl
    cannot serve behaves as stock.  Works with truststore's
    ``inject_into_ssl()`` in either order.  Thread-safe and idempotent;
    calling it again replaces the settings for every context it adopted.

    Ticket keys, the same for every adopted context:

    * ``ticket_keys``: key file paths (first encrypts, all decrypt),
      reloaded when a file changes (as ``watch_ticket_keys``), or
      ``TicketKey`` objects (fixed: inject again to rotate);
    * else ``ticket_key_master`` (a ``TicketKey`` or key file): keys derived
      from it, a new one every ``rotate_every`` seconds with ``keep``
      previous ones still decrypting (``rotate_ticket_keys``), so every
      process and machine given the same master shares them;
    * else a random master made at the first injection of this process (kept
      when injecting again), rotated the same way and shared by every
      context of the process and by processes forked from it.  Default:
      every hour, 2 kept, so a ticket stays usable 2 to 3 hours, at least
      OpenSSL's default ticket lifetime.  ``rotate_every=None`` makes the
      master one fixed key instead.

    Contexts whose owner set keys (``set_ticket_keys``,
    ``rotate_ticket_keys``) keep them; contexts the owner patched keep their
    policy.

    Raises:
        TypeError / ValueError: bad arguments (as ``patch``,
            ``rotate_ticket_keys`` and ``set_ticket_lifetime``), both
            ``ticket_keys`` and ``ticket_key_master``, or a key file of the
            wrong size or kind (``TicketKey.from_file``).
        OSError: a key file cannot be read.
        NotBoundError: (a ``BindingError`` and an ``UnsupportedError``)
            tlsctl is not bound here and a setting needs the binding:
            ``"suppress"``, ``count``, ``renew_on_resume=False``,
            ``ticket_keys``, ``ticket_key_master``, ``ticket_lifetime``.
            Without the binding the policy is still injected (``defer``:
            memory-BIO connections only, see ``patch``) and the default
            key rotation is skipped; ``injected()`` says so.
    """
    global _settings
    count = _policy.check_settings(tickets, count, renew_on_resume)
    if ticket_keys is not None and ticket_key_master is not None:
        raise ValueError("give ticket_keys or ticket_key_master, not both")
    if rotate_every is not None:
        _lifecycle._int_in(rotate_every, "rotate_every", 1, 2**32 - 1)
    if not _bind.info().bound:  # tlsctl-pymech: the policy only
        _refuse_unbound(
            tickets,
            count,
            renew_on_resume,
            ticket_keys,
            ticket_key_master,
            ticket_lifetime,
        )
        keep_max = 2**31 - 1  # unused: no keys without the binding
    else:
        keep_max = _bind.lib.TLSCTL_MAX_KEEP
    _lifecycle._int_in(keep, "keep", 0, keep_max)
    if ticket_lifetime is not None:
        _lifecycle._int_in(
            ticket_lifetime, "ticket_lifetime", 1, _lifecycle.MAX_TICKET_LIFETIME
        )
    keys, paths = _keys_of(ticket_keys)
    master = (
        None if ticket_key_master is None else _lifecycle.master_key(ticket_key_master)
    )
    with _lock:
        old = _settings
        watcher = (
            None
            if paths is None
            else _keyfiles._watch_for(lambda: list(_adopted), paths)
        )
        generated = master is None
        if master is None:
            master = (
                old.master
                if old is not None and old.generated_master
                else _tickets.TicketKey.generate()
            )
        _settings = _Settings(
            tickets,
            count,
            renew_on_resume,
            keys,
            watcher,
            master,
            generated,
            rotate_every,
            keep,
            ticket_lifetime,
        )
        if old is not None and old.watcher is not None:
            old.watcher.stop()
        for ctx in list(_adopted):
            _apply(ctx, _settings)
        for ctx in list(_refused):  # examine them again with the new settings
            ctx.__dict__.pop(_wrap.PLAN_ATTR, None)
        _refused.clear()
        _wrap.install()
        _wrap.adopter = _adopt
    if tickets == "defer" and _bind.info().mechanism == "python":
        _pyhold.warn_sockets(stacklevel=1)


# --- tlsctl-pymech ----------------------------------------------------------
#: What ``injected()`` reports for keys where nothing is bound.
_KEYS_SKIPPED = (
    "skipped: ticket keys need tlsctl's binding, and tlsctl is not bound here "
    "(each context keeps OpenSSL's own per-context keys)"
)


def _refuse_unbound(
    tickets: str,
    count: int | None,
    renew_on_resume: bool,
    ticket_keys: object,
    ticket_key_master: object,
    ticket_lifetime: int | None,
) -> None:
    """``NotBoundError`` for an injection setting that needs the binding."""
    for given, what in (
        (tickets == "suppress", "tickets='suppress'"),
        (count is not None, "count="),
        (not renew_on_resume, "renew_on_resume=False"),
        (ticket_keys is not None, "ticket_keys="),
        (ticket_key_master is not None, "ticket_key_master="),
        (ticket_lifetime is not None, "ticket_lifetime="),
    ):
        if given:
            _bind.require_bound(f"inject_into_ssl({what})")


# --- end tlsctl-pymech ------------------------------------------------------


def extract_from_ssl() -> None:
    """Undo ``inject_into_ssl``: contexts it adopted are stock again for
    their new connections (policy, injected keys and lifetime removed; live
    connections keep theirs), a key file watcher stops, and new contexts are
    left alone.  Idempotent.
    """
    global _settings
    with _lock:
        _wrap.adopter = None
        if _settings is not None and _settings.watcher is not None:
            _settings.watcher.stop()
        for ctx in list(_adopted):
            _policy.unpatch(ctx)
            if not _bind.info().bound:  # tlsctl-pymech: no keys were set
                continue
            ptr, _ = _bind.ctx_pointer(_bind.serving_context(ctx))
            _bind.lib.tlsctl_clear_ticket_keys(ptr)
            if ctx in _timeouts:
                _bind.lib.SSL_CTX_set_timeout(ptr, _timeouts.pop(ctx))
        for ctx in list(_refused):
            ctx.__dict__.pop(_wrap.PLAN_ATTR, None)
        _adopted.clear()
        _refused.clear()
        _settings = None


def injected() -> dict[str, Any] | None:
    """The injected settings (key ids, never key bytes), or ``None``."""
    with _lock:
        s = _settings
        if s is None:
            return None
        keys = s.watcher.keys if s.watcher is not None else s.keys
        if not _bind.info().bound:  # tlsctl-pymech
            return {
                "tickets": s.tickets,
                "count": None,
                "renew_on_resume": True,
                "ticket_keys": _KEYS_SKIPPED,
                "watched": None,
                "master": None,
                "generated_master": False,
                "rotate_every": None,
                "keep": s.keep,
                "ticket_lifetime": None,
                "contexts": len(_adopted),
            }
        return {
            "tickets": s.tickets,
            "count": s.ticket_count,
            "renew_on_resume": s.renew_on_resume,
            "ticket_keys": None if keys is None else [k.id for k in keys],
            "watched": None if s.watcher is None else list(s.watcher.paths),
            "master": None if keys is not None else s.master.id,
            "generated_master": s.generated_master,
            "rotate_every": None if keys is not None else s.rotate_every,
            "keep": s.keep,
            "ticket_lifetime": s.lifetime,
            "contexts": len(_adopted),
        }


def _apply(ctx: Any, settings: _Settings) -> None:
    _policy.patch(
        ctx,
        tickets=settings.tickets,
        count=settings.ticket_count,
        renew_on_resume=settings.renew_on_resume,
    )
    if not _bind.info().bound:  # tlsctl-pymech: the policy only
        return
    ptr, _ = _bind.ctx_pointer(_bind.serving_context(ctx))
    if settings.lifetime is not None:
        if ctx not in _timeouts:
            _timeouts[ctx] = int(_bind.lib.SSL_CTX_get_timeout(ptr))
        _lifecycle.set_ticket_lifetime(ctx, settings.lifetime)
    if ctx not in _adopted and _bind.lib.tlsctl_ticket_key_count(ptr):
        return  # the owner's keys stay
    keys = settings.watcher.keys if settings.watcher is not None else settings.keys
    if keys is not None:
        _tickets.set_ticket_keys(ctx, keys)
    elif settings.rotate_every is None:
        _tickets.set_ticket_keys(ctx, [settings.master])
    else:
        _lifecycle.rotate_ticket_keys(
            ctx, every=settings.rotate_every, keep=settings.keep, master=settings.master
        )


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


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None


def inject_from_environment() -> bool:
    """Inject as the environment says (``TLSCTL_INJECT`` and the other
    ``TLSCTL_INJECT_*`` variables: what ``python -m tlsctl run`` sets): the
    start-up hook of the launcher's ``sitecustomize``.  Returns whether it
    injected.  Bad settings raise (a misconfigured server should not start
    without what it was asked for)."""
    policy = os.environ.get(ENV_POLICY)
    if not policy:
        return False
    keys_text = os.environ.get(ENV_KEYS)
    rotate = _env_int(ENV_ROTATE)
    keep = _env_int(ENV_KEEP)
    inject_into_ssl(
        tickets=policy,
        count=_env_int(ENV_COUNT),
        renew_on_resume=os.environ.get(ENV_RENEW, "1") != "0",
        ticket_keys=keys_text.split(os.pathsep) if keys_text else None,
        ticket_key_master=os.environ.get(ENV_MASTER) or None,
        rotate_every=DEFAULT_ROTATE_EVERY if rotate is None else (rotate or None),
        keep=DEFAULT_KEEP if keep is None else keep,
        ticket_lifetime=_env_int(ENV_LIFETIME),
    )
    return True
