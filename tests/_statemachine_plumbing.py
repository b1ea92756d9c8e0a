"""Plumbing for tests/test_statemachine.py, no model in it: certificates,
Hypothesis events, a per-connection ticket counter, blocking socket calls in
threads, and the names of the exceptions an operation may end with.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl
import threading
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import event
from hypothesis.control import currently_in_test_context

import tlsctl
from _statemachine_model import Connection
from tlsctl import scenarios
from tlsctl.scenarios import TicketCounter

TIMEOUT = 10.0  # seconds: socket timeouts and thread joins (never a sleep)


@functools.cache
def _certs() -> scenarios.Certs:
    return scenarios.make_certs(client_sans=1)


def _note(label: str) -> None:
    """Count an event for ``--hypothesis-show-statistics`` (the replays
    below run outside Hypothesis)."""
    if currently_in_test_context():
        event(label)


class Counter(TicketCounter):
    """``TicketCounter`` that also keeps each connection's ticket key names
    (the client connection is the first argument of the message callback)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(ctx)
        self.by_conn: weakref.WeakKeyDictionary[Any, list[bytes]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, conn: Any, *message: Any) -> None:
        """``TicketCounter``'s message callback, then the new key name (if
        the message was a ticket) filed under ``conn``."""
        before = len(self.key_names)
        super().__call__(conn, *message)
        if len(self.key_names) > before:
            self.by_conn.setdefault(conn, []).append(self.key_names[-1])


def _traceback_names(exc: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(exc.__traceback__)]


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _write_all(server: Connection, data: bytes) -> None:
    """The server's application write: ``sendall`` on a socket, ``write``
    on a memory BIO (which takes every byte)."""
    if isinstance(server, ssl.SSLSocket):
        server.sendall(data)
    else:
        assert server.write(data) == len(data)


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


def _in_threads(
    calls: list[tuple[Callable[[], Any], socket.socket | None]],
) -> list[Outcome]:
    """Run blocking calls concurrently, one thread each; a call that fails
    shuts its end down (so the peer cannot wait for it forever).  Joined
    with a deadline: a hang shuts every end and fails the test."""
    outcomes = [Outcome() for _ in calls]

    def run(i: int) -> None:
        fn, own_end = calls[i]
        try:
            outcomes[i].value = fn()
        except BaseException as exc:
            outcomes[i].error = exc
            _shut(own_end)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    if any(thread.is_alive() for thread in threads):
        for _, end in calls:
            _shut(end)
        for thread in threads:
            thread.join(TIMEOUT)
        raise AssertionError("a blocking socket call hung (threads shut down)")
    return outcomes


def _outcome_name(exc: BaseException) -> str:
    for cls in (
        tlsctl.ConnectionStateError,
        tlsctl.UnsupportedError,
        tlsctl.BindingError,
        tlsctl.OpenSSLError,
        ssl.SSLError,
        TypeError,
        ValueError,
        OSError,
    ):
        if isinstance(exc, cls):
            return cls.__name__
    return type(exc).__name__
