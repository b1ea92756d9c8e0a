"""``fork()`` and key-file watchers (``_keyfiles``): each running watcher's
thread is quiesced before a fork and a fresh one started on both sides
after it, with the watcher's locks held across the fork, so a child never
inherits a lock held by a thread it does not have."""

from __future__ import annotations

import _thread
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tlsctl._keyfiles import KeyWatcher

_INTERNAL = "<watcher>"  # the key of ``errors`` when a check itself failed

_REGISTRY = _thread.allocate_lock()  # guards _RUNNING and _FORKING
_RUNNING: set[KeyWatcher] = set()  # watchers whose thread should run
_FORKING: list[KeyWatcher] = []  # quiesced by _before_fork, in lock order
_hooks = False


def _before_fork() -> None:
    """Quiesce every running watcher: no thread, locks held across fork()."""
    _REGISTRY.acquire()
    for watcher in list(_RUNNING):
        watcher._state.acquire()
        _FORKING.append(watcher)
        try:
            watcher._pause()
        except Exception:  # pragma: no cover - join() of a started thread
            pass  # the child starts a fresh thread all the same
        watcher._lock.acquire()  # no check in progress (reload() included)


def _after_fork() -> None:
    """In the parent and in the child: release, and start fresh threads."""
    try:
        for watcher in _FORKING:
            watcher._lock.release()
            try:
                if not watcher._stopped:
                    watcher._start()
            except Exception as exc:  # e.g. no thread can be started
                watcher._problems[_INTERNAL] = (
                    f"the watching thread could not be restarted after fork(): {exc}"
                )
                watcher._last_error = watcher._problems[_INTERNAL]
            finally:
                watcher._state.release()
        for watcher in [w for w in _RUNNING if w._stopped]:
            _RUNNING.discard(watcher)
    finally:
        _FORKING.clear()
        _REGISTRY.release()


def _install_fork_hooks() -> None:
    """Once, ``_REGISTRY`` held.  ``threading`` and ``logging`` are imported
    first, so that their own after-fork hooks run before ours."""
    global _hooks
    if not _hooks:
        import logging  # noqa: F401
        import threading  # noqa: F401

        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork,
            after_in_child=_after_fork,
        )
        _hooks = True
