"""What the key file tests (test_keyfiles.py, test_keyfiles_lifetime.py)
share: waits against a deadline, atomic writes, the watchers' threads and
a maker of watchers that stops them.  Not a test module: pytest does not
collect it.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tlsctl import TicketKey
from tlsctl._keyfiles import KeyWatcher, watch_ticket_keys
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
Watch = Callable[..., KeyWatcher]

FAST = 0.05  # the watchers' interval
DEADLINE = 5.0  # the longest any condition is waited for


def wait_for(condition: Callable[[], object], what: str) -> float:
    """Poll ``condition`` until it holds; fail after ``DEADLINE`` seconds.
    Returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"timed out after {DEADLINE} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def write_atomic(path: Path, data: bytes) -> None:
    """Vault Agent / consul-template style: a temporary file renamed over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ids(keys: list[TicketKey]) -> list[str]:
    return [k.id for k in keys]


def ticket_names(counter: TicketCounter) -> set[bytes]:
    names = set(counter.key_names)
    counter.key_names.clear()
    return names


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tlsctl-keys:")]


def watchers() -> Iterator[Watch]:
    """The test modules' ``watch`` fixture: watch_ticket_keys, every
    watcher stopped at teardown."""
    made: list[KeyWatcher] = []

    def make(*args: Any, **kw: Any) -> KeyWatcher:
        watcher = watch_ticket_keys(*args, **kw)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.stop()
