"""Regression tests for what an adversarial review broke: crashes, unchecked
C input, key locks across fork(), SNI with shared keys, misuse.

Each test failed (or crashed the interpreter) before its fix.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable

import pytest

import tlsctl
from conftest import bio_pair, connect, needs_c_defer, needs_native
from tlsctl import ResumeStatus, TicketDecision, TicketKey, _bind
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
TLS13 = ssl.TLSVersion.TLSv1_3
lib = _bind.lib


def _never(*args: Any) -> Any:
    raise AssertionError("a ticket callback ran for a connection made before it")


# --- callbacks installed while older connections are alive ----------------


@pytest.mark.parametrize("policy", ["defer", "suppress", "immediate"])
def test_callbacks_set_on_a_live_patched_context_ignore_older_connections(
    policy: str,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    """Connections tracked in C carry a tagged integer in tlsctl's SSL slot;
    the ticket callbacks once handed it to Python as an object (segfault at
    the first write, or when such a connection resumed).  Callbacks apply
    to connections made after the call; older ones are left as they were."""
    server = server_ctx(maximum_version=tls_version)
    client = client_ctx()
    session = connect(server, client).client.session  # stock ticket
    assert session is not None and session.has_ticket
    tlsctl.patch(server, tickets=policy)
    counter = TicketCounter(client)
    older = bio_pair(server, client)
    older.handshake()
    resuming = bio_pair(server, client, session=session)  # handshake later
    seen: list[Any] = []

    def on_issue(conn: Any) -> bytes:
        seen.append(conn)
        return b"new"

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        seen.append(conn)
        return TicketDecision.USE_RENEW

    tlsctl.set_ticket_callbacks(server, on_issue=on_issue, on_resume=on_resume)
    gc.collect()
    before = counter.count
    older.exchange()  # deferred tickets are made here: no on_issue for them
    resuming.handshake()
    resuming.exchange()
    assert resuming.client.session_reused
    assert seen == []
    if tls_version == TLS13:
        # older: 2 (made at its first write, or in its handshake and still
        # unread); the resumed one: 1
        expected = {"defer": 2 + 1, "suppress": 0, "immediate": 2 + 1}[policy]
        assert counter.count - before == expected
    newer = connect(server, client)  # made after the call: callbacks run
    assert all(conn is newer.server for conn in seen)
    # suppress sends no TLS 1.3 ticket; TLS 1.2 tickets are stock
    assert bool(seen) == (policy != "suppress" or tls_version != TLS13)


@needs_native
def test_callbacks_set_after_issue_tickets_on_an_unpatched_context(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    client = client_ctx()
    counter = TicketCounter(client)
    pair = connect(server, client)
    tlsctl.issue_tickets(pair.server, 2)  # tags the connection in C
    tlsctl.set_ticket_callbacks(server, on_issue=_never, on_resume=_never)
    before = counter.count
    pair.exchange()
    assert counter.count == before + 2
    assert tlsctl.connection_state(pair.server).issued == 2


def test_callbacks_toggled_while_other_threads_handshake(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """One thread removes and re-installs callbacks while others make full
    and resumed handshakes: no crash, and every connection either ignores
    the callbacks (made before them) or runs them."""
    server = tlsctl.patch(server_ctx())
    client = client_ctx()
    session = connect(server, client).client.session
    errors: list[BaseException] = []
    stop = threading.Event()

    def on_issue(conn: Any) -> bytes:
        return b"x"

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        if status.decrypted:
            return TicketDecision.USE_RENEW
        return TicketDecision.IGNORE_RENEW

    def worker() -> None:
        try:
            for i in range(60):
                connect(server, client, session if i % 2 else None)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    toggles = 0
    while not stop.is_set() or any(t.is_alive() for t in threads):
        if toggles % 2:
            tlsctl.set_ticket_callbacks(server)
        else:
            tlsctl.set_ticket_callbacks(server, on_issue=on_issue, on_resume=on_resume)
        toggles += 1
        if stop.is_set():
            break
    for t in threads:
        t.join()
    assert errors == []
    assert toggles > 2


# --- the key records are checked in C --------------------------------------


def test_c_refuses_malformed_key_records(server_ctx: CtxFactory) -> None:
    ctx = server_ctx()
    ptr, _ = _bind.ctx_pointer(ctx)
    good = bytes([80]) + bytes(range(16)) + bytes(64)
    other = bytes([48]) + bytes(range(1, 17)) + bytes(64)
    assert lib.tlsctl_set_ticket_keys(ptr, good + other, len(good + other)) == 1
    assert lib.tlsctl_ticket_key_count(ptr) == 2
    bad = [
        good[:80],  # short
        good + b"\0",  # not a whole number of records
        bytes([1]) + good[1:],  # a 1-byte "key"
        good + bytes([47]) + other[1:],  # the second key's size byte
        good + good,  # one name twice
        b"",
    ]
    for blob in bad:
        rc = lib.tlsctl_set_ticket_keys(ptr, blob or _bind.ffi.NULL, len(blob))
        assert rc == lib.TLSCTL_ERR_BAD_KEYS, blob[:1]
        assert lib.tlsctl_ticket_key_count(ptr) == 2  # left as it was


def test_many_keys_any_position_resumes(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """10,000 keys (binary search by name): a ticket under the last listed
    key resumes and reports its position."""
    keys = [TicketKey.generate() for _ in range(10_000)]
    issuer = tlsctl.set_ticket_keys(server_ctx(), [keys[-1]])
    client = client_ctx()
    session = connect(issuer, client).client.session
    seen: list[int | None] = []

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        seen.append(status.key_index)
        return TicketDecision.USE_RENEW

    server = tlsctl.set_ticket_keys(server_ctx(), keys)
    tlsctl.set_ticket_callbacks(server, on_resume=on_resume)
    assert connect(server, client, session).client.session_reused
    assert seen == [9_999]
    too_many = keys + [TicketKey.generate() for _ in range(65_537 - len(keys))]
    with pytest.raises(ValueError, match="at most 65536"):
        tlsctl.set_ticket_keys(server, too_many)


# --- SNI callback + shared keys ---------------------------------------------


@pytest.mark.parametrize("target_keys", ["none", "other"])
def test_sni_switch_uses_the_keys_of_the_context_the_handshake_started_on(
    target_keys: str,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    """OpenSSL runs the ticket key callback of the context a connection was
    created on (its session context), also after an sni_callback moved it:
    the tickets are made and read with that context's keys, so they resume
    through the same SNI switch.  (Before: a target without shared keys
    failed the first write with CALLBACK_FAILED.)"""
    key = TicketKey.generate()
    front = tlsctl.set_ticket_keys(server_ctx(maximum_version=tls_version), [key])
    target = server_ctx(maximum_version=tls_version)
    if target_keys == "other":
        tlsctl.set_ticket_keys(target, [TicketKey.generate()])
    switched: list[str | None] = []

    def sni(conn: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        switched.append(name)
        conn.context = target

    front.sni_callback = sni
    client = client_ctx()
    counter = TicketCounter(client)
    first = connect(front, client)
    assert first.server.context is target and switched == ["localhost"]
    assert counter.count >= 1
    assert set(counter.key_names) == {key.export()[:16]}
    session = first.client.session
    second = connect(front, client, session)
    assert second.client.session_reused
    assert switched == ["localhost"] * 2


# --- fork() while another thread holds a key lock ---------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_a_key_lock_is_held(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """A child forked while another thread held a context's key lock used
    to inherit it locked: its first ticket operation hung forever.  The
    lock is taken around fork() and released on both sides."""
    server = tlsctl.set_ticket_keys(server_ctx(), [TicketKey.generate()])
    client = client_ctx()
    session = connect(server, client).client.session
    ptr, _ = _bind.ctx_pointer(server)
    holder = threading.Thread(target=lib.tlsctl_test_hold_keys, args=(ptr, 400))
    holder.start()
    deadline = time.monotonic() + 10
    while not lib.tlsctl_test_keys_busy(ptr):
        assert time.monotonic() < deadline, "the holder never took the lock"
    pid = os.fork()
    if pid == 0:  # the child: one resumed handshake, then leave at once
        code = 1
        try:
            signal.alarm(10)
            code = 0 if connect(server, client, session).client.session_reused else 2
        finally:
            os._exit(code)
    holder.join()
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the ticket key lock")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# --- misuse that is refused --------------------------------------------------


@needs_native
@needs_c_defer  # issue_tickets on a patched connection
@pytest.mark.parametrize("callbacks", [False, True])
def test_issue_tickets_is_bounded_and_the_connection_recovers(
    callbacks: bool, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """Twice 2**31 - 1 tickets on a callback context once overflowed the
    pending count: every later write raised OverflowError."""
    server = tlsctl.patch(server_ctx())
    if callbacks:
        tlsctl.set_ticket_callbacks(server, on_issue=lambda conn: None)
    client = client_ctx()
    counter = TicketCounter(client)
    pair = bio_pair(server, client)
    pair.handshake()
    with pytest.raises(ValueError, match="from 1 to 16"):
        tlsctl.issue_tickets(pair.server, 2**31 - 1)
    # patch()'s 2 wait for the write too, except with the stash, where
    # OpenSSL made them in the handshake and the stash holds their bytes
    deferred = 0 if tlsctl.info().mechanism == "stash" else 2
    tlsctl.issue_tickets(pair.server, tlsctl.MAX_TICKETS - deferred)
    with pytest.raises(ValueError, match="at most 16 tickets can wait"):
        tlsctl.issue_tickets(pair.server, 1)
    pair.exchange()
    pair.exchange(b"again")  # later writes work
    state = tlsctl.connection_state(pair.server)
    assert state.issued == counter.count == tlsctl.MAX_TICKETS + 2 - deferred
    assert not state.waiting_for_write
    assert tlsctl.MAX_TICKETS == lib.TLSCTL_MAX_TICKETS


def test_patch_count_bounds_and_suppress(server_ctx: CtxFactory) -> None:
    ctx = server_ctx()
    with pytest.raises(ValueError, match="from 0 to 16"):
        tlsctl.patch(ctx, count=10**9)
    with pytest.raises(ValueError, match="tickets='suppress'"):
        tlsctl.patch(ctx, tickets="suppress", count=3)
    ctx.num_tickets = 17
    with pytest.raises(ValueError, match="num_tickets is 17"):
        tlsctl.patch(ctx)
    tlsctl.patch(ctx, count=16)
    tlsctl.patch(server_ctx(), tickets="suppress")


@needs_native
@needs_c_defer  # issue_tickets on a patched connection
def test_issue_tickets_after_unwrap_is_refused(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    pair = connect(tlsctl.patch(server_ctx()), client_ctx())
    with pytest.raises(ssl.SSLWantReadError):
        pair.server.unwrap()  # sends close_notify, waits for the client's
    with pytest.raises(tlsctl.ConnectionStateError, match="close_notify"):
        tlsctl.issue_tickets(pair.server)
    assert tlsctl.connection_state(pair.server).issued == 2


def test_half_built_connections_are_a_type_error() -> None:
    """Objects made without their constructors have no ``_sslobj``."""
    half_built: list[Any] = [
        object.__new__(ssl.SSLObject),
        socket.socket.__new__(ssl.SSLSocket),
    ]
    for conn in half_built:
        with pytest.raises(TypeError, match="no TLS state"):
            tlsctl.connection_state(conn)
        with pytest.raises(TypeError, match="no TLS state"):
            tlsctl.issue_tickets(conn)


def test_connection_moved_before_its_handshake_gets_a_process_key(
    tls_version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """A connection moved to a context without shared keys BEFORE its
    handshake has no key context of tlsctl's, yet OpenSSL runs the ticket
    key callback of the context it was made on.  It gets tickets under a
    random per-process key (resuming within the process, as OpenSSL's own
    keys would), never a failed connection.  ("No ticket" is not an option:
    OpenSSL 1.1.1 then sends a zero-length TLS 1.3 ticket, which the client
    rejects with LENGTH_MISMATCH.)"""
    key = TicketKey.generate()
    front = tlsctl.set_ticket_keys(server_ctx(maximum_version=tls_version), [key])
    target = server_ctx(maximum_version=tls_version)
    client = client_ctx()
    counter = TicketCounter(client)
    sessions: list[ssl.SSLSession | None] = [None]
    for _ in range(2):
        pair = bio_pair(front, client, session=sessions[-1])
        pair.server.context = target
        pair.handshake()
        pair.exchange()
        sessions.append(pair.client.session)
    assert pair.client.session_reused
    assert counter.count >= 1 and key.export()[:16] not in counter.key_names


# --- found by the stateful test (tests/test_statemachine.py) ------------------


@pytest.mark.parametrize(
    ("decision", "resumes", "tickets"),
    [
        (TicketDecision.USE_RENEW, True, 1),
        (TicketDecision.USE, True, 0),
        (TicketDecision.IGNORE_RENEW, False, 2),
        (TicketDecision.IGNORE, False, 0),
    ],
)
def test_deferred_tickets_follow_on_resumes_decision(
    decision: TicketDecision,
    resumes: bool,
    tickets: int,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    """Native defer once sent its tickets whatever on_resume decided (a
    renewal after USE, two after IGNORE): now exactly what stock sends
    (the README's table), on every mechanism."""
    server = tlsctl.patch(server_ctx())
    client = client_ctx()
    session = connect(server, client).client.session

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        return decision

    tlsctl.set_ticket_callbacks(server, on_resume=on_resume)
    counter = TicketCounter(client)
    pair = connect(server, client, session)
    assert pair.client.session_reused == resumes
    assert counter.count == tickets
    assert tlsctl.connection_state(pair.server).issued == tickets


@needs_native
def test_waiting_for_write_only_while_tickets_are_held(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """It reported True whenever the proxy was armed: before the handshake,
    with count=0, after unwrap()."""
    pair = bio_pair(tlsctl.patch(server_ctx()), client_ctx())
    assert not tlsctl.connection_state(pair.server).waiting_for_write  # no handshake
    pair.handshake()
    assert tlsctl.connection_state(pair.server).waiting_for_write
    with pytest.raises(ssl.SSLWantReadError):
        pair.server.unwrap()
    assert not tlsctl.connection_state(pair.server).waiting_for_write  # closing
    none = bio_pair(tlsctl.patch(server_ctx(), count=0), client_ctx())
    none.handshake()
    assert tlsctl.connection_state(none.server) == tlsctl.ConnectionState(
        "defer", False, 0
    )


@pytest.mark.skipif(
    tlsctl.info().mechanism != "stash" or not tlsctl.info().native_tickets,
    reason="the stash forced on OpenSSL 3.x (TLSCTL_MECHANISM=stash) only",
)
def test_stash_state_counts_issue_tickets(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    client = client_ctx()
    counter = TicketCounter(client)
    pair = bio_pair(tlsctl.patch(server_ctx()), client)
    pair.handshake()
    pair.exchange()
    tlsctl.issue_tickets(pair.server, 1)
    assert tlsctl.connection_state(pair.server).waiting_for_write
    pair.exchange(b"y")
    state = tlsctl.connection_state(pair.server)
    assert state.issued == counter.count == 3 and not state.waiting_for_write
