"""Ticket keys read from files and reloaded when the files change.

Theory of operation
===================

Loading
    ``watch_ticket_keys(ctx, paths)`` reads one ``TicketKey`` per path with
    ``TicketKey.from_file`` (nginx's 80- or 48-byte files; regular files
    only, symbolic links followed) and installs them with
    ``set_ticket_keys`` in every context given: the first file's key
    encrypts, every key decrypts.  This first load is synchronous and
    strict: a missing, unreadable or malformed file raises, since it is a
    configuration error and there are no previous keys to fall back on.

Noticing a change
    A daemon thread (one per watcher) wakes every ``interval`` seconds on a
    ``threading.Event`` timeout and takes each path's *signature*: the
    ``os.stat`` of the file (symbolic links followed: ``st_dev``,
    ``st_ino``, ``st_size``, ``st_mtime_ns``, plus ``st_ctime_ns`` and
    ``st_mode`` so that a ``chmod`` that fixes a permission is noticed)
    and every symbolic link met while resolving the path, component by
    component (where it is, what it points to, its inode).  The second
    half catches a Kubernetes Secret update, which swaps the ``..data``
    link of the volume atomically (``key -> ..data/key`` itself never
    changes), even if the new file's ``stat`` happened to match the old
    one.  A write-then-rename (Vault Agent, consul-template, ``ticket-key``)
    gives the file a new inode.  A path whose signature changed is read
    again; the signature is taken *before* the read, so a change racing
    the read is seen at the next check.  ``reload()`` re-reads every file
    at once, whatever the signatures say.

Keeping the keys
    Each path keeps its last good key.  A file that is missing,
    half-written (not 80 or 48 bytes), not a regular file, unreadable, or
    whose key's name clashes with another file's key, leaves everything
    installed as it was: handshakes go on resuming.  The keys are
    re-installed (``set_ticket_keys`` on every context) only when the list
    actually changes; the same key in two files is listed once.  Replaced
    ``TicketKey`` objects are dropped (the C side wipes its own copies).

Reporting a problem
    Once per distinct problem and path: when a path's problem text
    changes, or it reappears after the file was good again.  Each report
    goes to the ``tlsctl`` logger at WARNING (the operator's channel: a
    background thread has no caller, and logging reaches the service's
    log pipeline with a timestamp) *and* to ``warnings.warn`` as a
    ``KeyFileWarning`` (the program's channel: filterable by category,
    ``-W error::tlsctl.KeyFileWarning`` in a test suite, ``pytest.warns``).
    The warnings module's own filters apply on top: its ``default`` action
    shows a given text once per location.  A warning turned into an error
    by a filter is raised by ``reload()`` (after the check is complete)
    and swallowed in the thread.  Messages name the path and the problem;
    never key bytes.  A successful reload is logged at INFO with the keys'
    ``id`` fingerprints.

Contexts and lifetime
    The watcher keeps weak references to its contexts: once every one of
    them is gone, its thread ends by itself and drops its keys.  Otherwise
    it runs until ``stop()`` (or the end of a ``with`` block); being a
    daemon thread, it never keeps the interpreter alive.  A context has
    one running watcher at most (two would install their own files' keys
    in turn).  ``threading`` and ``logging`` are imported by the first
    watcher, not by importing this module (``ssl`` imports neither).

Fork
    ``os.register_at_fork`` hooks (installed once) quiesce every running
    watcher before ``fork()``: its thread is stopped and joined, and its
    locks are held across the fork, so nothing of tlsctl runs or holds a
    lock while the process is copied.  After the fork, in the parent *and*
    in the child, each watcher that was running gets a fresh thread.  So a
    watcher made in a pre-forking master (gunicorn's ``preload_app``) keeps
    reloading in every worker.  A fork waits for a check in progress (a
    few ``stat`` calls and reads of at most 81 bytes).  Python 3.12 sees a
    single-threaded process at the fork; 3.13+ counts threads after the
    parent's hooks ran, so it still issues its ``DeprecationWarning``
    about forking a multi-threaded process (the thread it counts is the
    parent's restarted watcher, which has nothing in progress).

Only POSIX paths are handled (tlsctl supports POSIX systems only).
"""

from __future__ import annotations

import _thread
import os
import ssl
import warnings
import weakref
from collections.abc import Iterable, Sequence

from tlsctl import _bind
from tlsctl._keyfork import _INTERNAL, _REGISTRY, _RUNNING, _install_fork_hooks
from tlsctl._keysig import _combine, _read, _same, _Signature, _signature
from tlsctl._record import final
from tlsctl._tickets import TicketKey, set_ticket_keys

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported lazily: neither is imported by ssl
    import threading
    from types import TracebackType
    from typing import Callable, Union

    StrPath = Union[str, "os.PathLike[str]"]

__all__ = ["KeyFileWarning", "KeyWatcher", "watch_ticket_keys"]

_LOGGER = "tlsctl"
_INSTALL = "<set_ticket_keys>"  # the key of ``errors`` when installing failed
_WATCHER_ATTR = "_tlsctl_key_watcher"  # a weak reference to a context's watcher


class KeyFileWarning(UserWarning):
    """A watched ticket key file is missing, half-written or invalid.

    Issued once per distinct problem by the watcher that
    ``watch_ticket_keys`` returns; the previous keys stay in use.  The
    message names the path and the problem, never key bytes.
    """


@final
class KeyWatcher:
    """Keeps ticket keys loaded from files current; see ``watch_ticket_keys``.

    Made by ``watch_ticket_keys`` only.  Use it as a context manager, or
    call ``stop()``, to end the watching thread; the keys stay installed.
    """

    _contexts: tuple[weakref.ref[ssl.SSLContext], ...]
    _paths: tuple[str, ...]
    _interval: float
    _sigs: list[_Signature]
    _slots: list[TicketKey]
    _keys: tuple[TicketKey, ...]
    _problems: dict[str, str]
    _last_error: str | None
    _checks: int
    _lock: _thread.LockType  # one check at a time
    _state: _thread.LockType  # guards _stopped, _thread and _event
    _stopped: bool
    _thread: threading.Thread | None
    _event: threading.Event | None
    # Injection's watcher (_inject) serves the contexts it adopted, which
    # come and go: their list comes from this function, and the watcher
    # keeps watching while there is none.
    _provider: Callable[[], list[ssl.SSLContext]] | None

    def __init__(self) -> None:
        raise TypeError("use tlsctl.watch_ticket_keys() to make a KeyWatcher")

    @classmethod
    def _new(
        cls,
        contexts: Sequence[ssl.SSLContext],
        paths: tuple[str, ...],
        interval: float,
        sigs: list[_Signature],
        slots: list[TicketKey],
        keys: Sequence[TicketKey],
    ) -> KeyWatcher:
        self = cls.__new__(cls)
        self._contexts = tuple(weakref.ref(c) for c in contexts)
        self._paths = paths
        self._interval = interval
        self._sigs = sigs
        self._slots = slots
        self._keys = tuple(keys)
        self._problems = {}
        self._last_error = None
        self._checks = 0
        self._lock = _thread.allocate_lock()
        self._state = _thread.allocate_lock()
        self._stopped = False
        self._thread = None
        self._event = None
        self._provider = None
        return self

    # --- public ----------------------------------------------------------

    @property
    def keys(self) -> list[TicketKey]:
        """The keys installed now, in ``set_ticket_keys`` order (a copy)."""
        return list(self._keys)

    @property
    def errors(self) -> dict[str, str]:
        """The problems standing now, by path (a copy; empty when every
        file's key is loaded).  ``'<set_ticket_keys>'`` stands for a failed
        installation, ``'<watcher>'`` for an unexpected error of a check."""
        return dict(self._problems)

    @property
    def last_error(self) -> str | None:
        """The most recent problem reported (kept after it is fixed), or
        ``None`` if there never was one."""
        return self._last_error

    @property
    def paths(self) -> tuple[str, ...]:
        """The watched files (absolute), the first one's key encrypting."""
        return self._paths

    @property
    def interval(self) -> float:
        """Seconds between two checks."""
        return self._interval

    @property
    def contexts(self) -> list[ssl.SSLContext]:
        """The contexts still alive that receive the keys."""
        if self._provider is not None:
            return self._provider()
        return [c for c in (r() for r in self._contexts) if c is not None]

    @property
    def running(self) -> bool:
        """Whether the watching thread is alive."""
        thread = self._thread
        return not self._stopped and thread is not None and thread.is_alive()

    def reload(self) -> bool:
        """Re-read every file now, in the calling thread.

        Installs the keys if they changed and reports new problems like the
        thread does (so a ``KeyFileWarning`` made an error by a warnings
        filter is raised here, once the check is complete).  Works after
        ``stop()`` too.  Returns whether the installed keys changed.
        """
        with self._lock:
            changed, reports, loaded = self._check(force=True)
        self._emit(reports, loaded, stacklevel=3)
        return changed

    def stop(self) -> None:
        """Stop watching and wait for the thread to end (idempotent).

        The keys stay installed in the contexts; ``reload()`` still works.
        """
        with self._state:
            self._stopped = True
            event, thread = self._event, self._thread
            self._event = self._thread = None
        self._end(event, thread)
        with _REGISTRY:
            _RUNNING.discard(self)

    def __enter__(self) -> KeyWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ids = ", ".join(k.id for k in self._keys)
        return (
            f"<KeyWatcher paths={list(self._paths)!r} keys=[{ids}] "
            f"running={self.running} errors={len(self._problems)}>"
        )

    # --- the check ---------------------------------------------------------

    def _check(self, force: bool) -> tuple[bool, list[str], list[str]]:
        """One check (``_lock`` held): ``(keys changed, problems to report,
        ids of the keys installed, if they changed)``."""
        contexts = self.contexts
        if not contexts and self._provider is None:
            return False, [], []
        self._checks += 1
        problems = dict(self._problems)
        try:
            changed = self._update(contexts, problems, force)
        except Exception as exc:  # never lets the thread die
            problems[_INTERNAL] = f"unexpected {type(exc).__name__}: {exc}"
            changed = False
        reports = [
            message
            for where, message in problems.items()
            if self._problems.get(where) != message
        ]
        self._problems = problems
        if reports:
            self._last_error = reports[-1]
        return changed, reports, [k.id for k in self._keys] if changed else []

    def _update(
        self, contexts: list[ssl.SSLContext], problems: dict[str, str], force: bool
    ) -> bool:
        problems.pop(_INTERNAL, None)
        sigs, slots = list(self._sigs), list(self._slots)
        for i, path in enumerate(self._paths):
            sig = _signature(path)  # before the read: a racing change is seen next
            if sig == sigs[i] and not force:
                continue
            sigs[i] = sig
            key, problem = _read(path)
            if key is None:
                problems[path] = problem or "unreadable"
            else:
                slots[i] = key
                problems.pop(path, None)
        keys, clash = _combine(self._paths, slots)
        if clash is not None:
            # Commit nothing read: the files are read again at each check
            # until the clash is gone; the installed keys stay.
            problems[clash[0]] = clash[1]
            return False
        self._sigs, self._slots = sigs, slots
        if _same(keys, self._keys) and _INSTALL not in problems:
            return False
        try:
            for ctx in contexts:
                set_ticket_keys(ctx, keys)
        except Exception as exc:  # retried at each check while it fails
            problems[_INSTALL] = f"installing the ticket keys failed: {exc}"
            return False
        problems.pop(_INSTALL, None)
        changed = not _same(keys, self._keys)
        self._keys = tuple(keys)  # the replaced keys are dropped here
        return changed

    def _emit(self, reports: list[str], loaded: list[str], stacklevel: int) -> None:
        """Report outside the locks: handlers and filters are user code."""
        import logging

        log = logging.getLogger(_LOGGER)
        if loaded:
            log.info(
                "ticket keys reloaded: %s (from %s)",
                ", ".join(loaded),
                ", ".join(self._paths),
            )
        for message in reports:
            text = f"{message}; the last good ticket keys stay in use"
            log.warning("%s", text)
            warnings.warn(text, KeyFileWarning, stacklevel=stacklevel)

    # --- the thread --------------------------------------------------------

    def _run(self, event: threading.Event) -> None:
        while not event.wait(self._interval):
            with self._lock:
                _, reports, loaded = self._check(force=False)
            if not self.contexts and self._provider is None:
                self._retire()
                return
            try:
                self._emit(reports, loaded, stacklevel=2)
            except Exception:  # a warnings filter set to "error"; no caller
                pass

    def _start(self) -> None:
        """Start a thread (``_state`` held, no thread running)."""
        import threading

        event = threading.Event()
        thread = threading.Thread(
            target=self._run,
            args=(event,),
            name=f"tlsctl-keys:{os.path.basename(self._paths[0])}",
            daemon=True,
        )
        thread.start()
        self._event, self._thread = event, thread

    def _pause(self) -> None:
        """End the thread, to be started again (``_state`` held)."""
        event, thread = self._event, self._thread
        self._event = self._thread = None
        self._end(event, thread)

    @staticmethod
    def _end(event: threading.Event | None, thread: threading.Thread | None) -> None:
        import threading

        if event is not None:
            event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _retire(self) -> None:
        """Every context is gone (in the thread): end, dropping the keys.
        Never waits for ``_REGISTRY``: a fork may hold it while joining us."""
        self._stopped = True
        with self._lock:
            self._slots, self._keys = [], ()
        if _REGISTRY.acquire(False):
            try:
                _RUNNING.discard(self)
            finally:
                _REGISTRY.release()


# --- the entry point ---------------------------------------------------------


def _contexts(ctx: object) -> list[ssl.SSLContext]:
    items: Iterable[object]
    if issubclass(type(ctx), ssl.SSLContext):
        items = [ctx]
    elif isinstance(ctx, Iterable) and not isinstance(ctx, (str, bytes)):
        items = ctx
    else:
        raise TypeError(
            f"ctx must be an ssl.SSLContext or a sequence of them, "
            f"not {type(ctx).__name__}"
        )
    contexts: list[ssl.SSLContext] = []
    for item in items:
        # type(), not isinstance(): as _bind.ctx_pointer, a mock cannot pass.
        if not issubclass(type(item), ssl.SSLContext):
            raise TypeError(
                f"ctx must hold ssl.SSLContext objects, not {type(item).__name__}"
            )
        assert isinstance(item, ssl.SSLContext)
        if not any(item is c for c in contexts):
            contexts.append(item)
    if not contexts:
        raise ValueError("watch_ticket_keys() needs at least one context")
    return contexts


def _paths(paths: object) -> tuple[str, ...]:
    items: Iterable[object]
    if isinstance(paths, (str, os.PathLike)):
        items = [paths]
    elif isinstance(paths, Iterable) and not isinstance(
        paths, (bytes, bytearray, memoryview)
    ):
        items = paths
    else:
        raise TypeError(
            f"paths must be a path or a sequence of paths (str or "
            f"os.PathLike[str]), not {type(paths).__name__}"
        )
    names: list[str] = []
    for item in items:
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
        if not isinstance(name, str):
            raise TypeError(
                f"a key file path is a str or os.PathLike[str], "
                f"not {type(item).__name__}"
            )
        if not name:
            raise ValueError("a key file path is empty")
        names.append(name if os.path.isabs(name) else os.path.join(os.getcwd(), name))
    if not names:
        raise ValueError("watch_ticket_keys() needs at least one key file path")
    return tuple(names)


def _refuse_watched(contexts: Sequence[ssl.SSLContext]) -> None:
    """``ValueError`` if a context already has a watcher that was not
    stopped: two would install their own files' keys in turn."""
    for ctx in contexts:
        ref = getattr(ctx, _WATCHER_ATTR, None)
        other = ref() if isinstance(ref, weakref.ref) else None
        if isinstance(other, KeyWatcher) and not other._stopped:
            raise ValueError(
                f"this context is already watched by {other!r}; stop() it "
                f"first (one watcher per context)"
            )


def _check_interval(interval: object) -> float:
    import threading

    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise TypeError(
            f"interval is a number of seconds, not {type(interval).__name__}"
        )
    seconds = float(interval)
    if not 0 < seconds <= threading.TIMEOUT_MAX:  # NaN fails too
        raise ValueError(
            f"interval must be a positive number of seconds, not {interval}"
        )
    return seconds


def _watch_for(
    provider: Callable[[], list[ssl.SSLContext]],
    paths: Sequence[str],
    interval: float = 1.0,
) -> KeyWatcher:
    """A watcher of ``paths`` for ``provider()``'s contexts, whichever they
    are at each check (injection's adopted contexts).  Loads the files now
    (raising as ``watch_ticket_keys``) and installs nothing itself: the
    caller gives new contexts ``watcher.keys``."""
    names = _paths(list(paths))
    seconds = _check_interval(interval)
    sigs = [_signature(p) for p in names]
    slots = [TicketKey.from_file(p) for p in names]
    keys, clash = _combine(names, slots)
    if clash is not None:
        raise ValueError(clash[1])
    watcher = KeyWatcher._new([], names, seconds, sigs, slots, keys)
    watcher._provider = provider
    with _REGISTRY:
        _install_fork_hooks()
        with watcher._state:
            watcher._start()
        _RUNNING.add(watcher)
    return watcher


def watch_ticket_keys(
    ctx: ssl.SSLContext | Iterable[ssl.SSLContext],
    paths: StrPath | Iterable[StrPath],
    *,
    interval: float = 1.0,
) -> KeyWatcher:
    """Load ticket keys from files into ``ctx`` and reload them when the files
    change.

    ``paths`` names nginx ``ssl_session_ticket_key`` files (80 or 48 bytes;
    a single path is taken as ``[path]``).  Their keys go to
    ``set_ticket_keys``: the first file's key encrypts new tickets, every
    key decrypts.  Rotate by writing the files atomically (write a
    temporary file, then rename it over the old one, as Vault Agent and
    consul-template do; a Kubernetes Secret volume updates atomically
    already): new key into the first file, the key it replaces into the
    second.

    ``ctx`` is one server context or a sequence of them (an SNI setup's
    contexts): all of them get the same keys, so a ticket issued through
    one resumes through any.  A context has one watcher at a time (stop the
    old one to watch other files).  Relative paths are resolved against
    the current directory now.

    The files are read once, synchronously, before this returns; then a
    daemon thread checks them every ``interval`` seconds (their ``stat``
    and the symbolic links leading to them) and re-reads those that
    changed.  A file found missing, half-written or invalid leaves every
    installed key in place, is reported once per distinct problem (a
    ``WARNING`` on the ``tlsctl`` logger and a ``KeyFileWarning``), and its
    next good version is loaded.  The watcher follows ``os.fork()``: the
    parent and the child each keep a watching thread.  It ends when
    ``stop()`` is called, when its ``with`` block ends, or by itself when
    every context it serves has been garbage-collected.

    Returns the ``KeyWatcher``: ``stop()``, ``reload()``, ``keys``,
    ``errors``, ``last_error``.

    Raises:
        TypeError: ``ctx`` is not an ``ssl.SSLContext`` (or a sequence of
            them), ``paths`` not a path or a sequence of paths, or
            ``interval`` not a number.
        ValueError: no context, no path, a non-positive ``interval``, a key
            file that is not a regular file of 80 or 48 bytes, two files
            with different keys of the same name, a client-only context, a
            context that already has a running watcher.
        OSError: a key file cannot be read, e.g. ``FileNotFoundError``.
        UnsupportedError, BindingError: as ``set_ticket_keys``.
    """
    contexts = _contexts(ctx)
    names = _paths(paths)
    seconds = _check_interval(interval)
    _refuse_watched(contexts)
    for c in contexts:  # every context proven usable before any is changed
        _bind.require_server_kind(_bind.ctx_pointer(c)[1], "tlsctl.watch_ticket_keys()")
    sigs = [_signature(p) for p in names]  # before the reads
    slots = [TicketKey.from_file(p) for p in names]
    keys, clash = _combine(names, slots)
    if clash is not None:
        raise ValueError(clash[1])
    for c in contexts:
        set_ticket_keys(c, keys)
    watcher = KeyWatcher._new(contexts, names, seconds, sigs, slots, keys)
    with _REGISTRY:
        _install_fork_hooks()
        _refuse_watched(contexts)  # again: another thread may have won the race
        with watcher._state:
            watcher._start()
        _RUNNING.add(watcher)
        _RUNNING.difference_update([w for w in _RUNNING if w._stopped])
        for c in contexts:
            setattr(c, _WATCHER_ATTR, weakref.ref(watcher))
    return watcher
