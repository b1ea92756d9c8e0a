"""A stateful property-based test of tlsctl (Hypothesis ``RuleBasedStateMachine``).

Hypothesis drives random sequences of everything a server application can do
with tlsctl, on two server contexts and two client contexts (one capped at
TLS 1.2, one at TLS 1.3), and checks a model of what must happen after every
step.  Everything is real: OpenSSL handshakes over memory BIOs
(``SSLObject`` pairs) and over blocking sockets (``socket.socketpair()`` and
TCP on 127.0.0.1), certificates from ``trustme``.

Running it
----------
``python -m pytest tests/test_statemachine.py`` runs the same 40 programs
every time (derandomized, so a red run is reproducible; 5 to 8 s here) and
the replays at the end of the module; ``TLSCTL_MECHANISM=stash`` runs the
same on the OpenSSL 1.1.1 mechanism.  Soaked on OpenSSL 3.0.19 (Python
3.11) and 3.5.9 (Python 3.13), both mechanisms.  For a soak, ask for
more programs (``TLSCTL_FUZZ_EXAMPLES``, default 40) and optionally longer
ones (``TLSCTL_FUZZ_STEPS``, default 30)::

    TLSCTL_FUZZ_EXAMPLES=5000 python -m pytest tests/test_statemachine.py
    TLSCTL_FUZZ_EXAMPLES=5000 TLSCTL_FUZZ_STEPS=60 TLSCTL_MECHANISM=stash \\
        python -m pytest tests/test_statemachine.py --hypothesis-show-statistics

(About 0.2 s of CPU a program here: 5000 take 15 to 25 minutes, depending
on the machine's load.)  ``--hypothesis-show-statistics`` shows what the
programs reached (handshakes by version, policy and outcome, on_resume's
decisions by policy, callback exceptions, tickets written on connections
older than their context's settings, ...).  Hypothesis keeps failing programs in
``.hypothesis/`` and replays them first.

What the model tracks
---------------------
Per server context (``Server``): the policy ``patch()`` last set (``Policy``:
``tickets``, ``count``, ``renew_on_resume``), the ticket callbacks
(``Callbacks``: how ``on_issue`` and ``on_resume`` behave), the shared ticket
keys (``None``: OpenSSL's own per-context keys) and the name of those
built-in keys once a ticket has shown it.

Per connection (``Conn``): its transport, the client's TLS version, the
policy and "guarded" flag (callbacks set) fixed when it was created, the
session the client offered, its phase (``new`` -> ``open`` -> ``unwrapped``
/ ``closed``, or ``failed``), whether the server has written yet, the
application bytes in flight each way, and its tickets: those OpenSSL sends
by its own timing (``immediate``, unpatched, TLS 1.2), those the stash holds,
those ``defer`` will send with the first write, those ``issue_tickets`` asked
for, the number tlsctl has sent (``issued``) and the key name each ticket
must carry.  Sessions the clients received (``Session``) remember the key
name and appdata of their ticket, so the model predicts whether an offered
session decrypts, what ``on_resume`` sees and decides, whether the
handshake resumes, and how many tickets follow (the README's tables).

Invariants (checked after every step, or by the step itself)
------------------------------------------------------------
* **No crash**, and every exception is expected: a ``TlsctlError`` subclass
  or ``TypeError`` / ``ValueError`` where the documentation says so, an
  ``ssl.SSLError`` where the model expects a failed handshake (a callback
  returned ``ABORT``), or the marker exception (``Boom``) a callback raised.
  A marker raised during an operation must come out of that very operation,
  as the same object, with the callback's frame in its traceback (README:
  "re-raised, traceback intact, from the call that ran it"); a marker never
  comes out of an operation in which no callback raised.
* **Tickets received = tickets reported.**  Once the client has read
  everything the server sent, the NewSessionTicket messages it read
  (``TicketCounter``, per connection) equal the tickets OpenSSL sent by its
  own timing plus ``connection_state(conn).issued`` (tlsctl's: ``defer``'s,
  the stash's and ``issue_tickets``'), and ``issued`` equals the model's
  count.  Each ticket carries the expected key name (the first shared key,
  or the context's own key).
* **Nothing out of turn.**  Under ``defer`` and ``suppress`` a TLS 1.3
  server emits nothing between the end of its handshake and its first
  application write (memory BIO: ``s_out`` stays empty; socket: nothing is
  readable on the client's socket), and at no time does a server read,
  ``issue_tickets`` or a context change make the server emit anything.  A
  write on a memory BIO emits exactly its tickets and one data record.
* **waiting_for_write** is true exactly while tickets are held for the next
  application write (handshake finished, TLS 1.3, at least one ticket
  pending, connection not shut down).
* **Callbacks** run only for connections created while the context had
  callbacks, once per ticket made (``on_issue``) and once per offered ticket
  (``on_resume``), with the connection itself, the appdata sealed into the
  offered ticket (``None`` iff it did not decrypt) and a ``ResumeStatus``
  whose ``decrypted`` / ``renew`` / ``key_index`` / ``key_id`` match the keys.
* A connection nobody used during a step (other connections' operations,
  context changes, drops, ``gc.collect()``) sends nothing during it.
* A connection dropped without closing is gone after ``gc.collect()``.

Product bugs
------------
The rules reach the bugs fixed in 8b66a00 (``set_ticket_callbacks()`` while
connections made before it are alive, then a write or a resumption on them:
a segfault; counts above ``MAX_TICKETS``; ``count`` with ``"suppress"``;
``issue_tickets()`` after ``unwrap()``) and those this test found, fixed in
64b1b04 (native ``defer`` ignored on_resume's decision; native
``waiting_for_write`` was true with nothing held; the stash's
``connection_state()`` forgot ``issue_tickets()``), and assert the fixed
behaviour.  A bug not fixed yet is tolerated only where a ``BUG_*``
constant below says so, exactly as narrowly as the deviation; set it to
``False`` once the bug is fixed.  ``test_bug_replay`` runs a short
program for each of them (random programs reach them too, but not in every
bounded run).  Not reached: a ClientHello with thousands of PSK identities
(Python's client offers one session; test_resume_amplification covers it).
"""

from __future__ import annotations

import functools
import gc
import os
import select
import socket
import ssl
import threading
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tlsctl
from conftest import split_records
from tlsctl import ResumeStatus, TicketDecision, TicketKey, scenarios
from tlsctl.scenarios import LOCALHOST, TicketCounter

pytestmark = pytest.mark.skipif(
    tlsctl.info().mechanism is None, reason="needs a defer mechanism (native or stash)"
)

# ---------------------------------------------------------------------------
# Bugs found by this test and not fixed yet.  Each flag makes the model
# expect exactly the deviation described (nothing more); False expects the
# documented behaviour.  test_bug_replay has a short program for each.

#: (None open.)

# ---------------------------------------------------------------------------

MECHANISM = tlsctl.info().mechanism  # "native" or "stash": how "defer" works
NATIVE_TICKETS = tlsctl.info().native_tickets  # issue_tickets() available
MAX_TICKETS = tlsctl.MAX_TICKETS  # tickets that may wait for one write
V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
TIMEOUT = 10.0  # seconds: socket timeouts and thread joins (never a sleep)
MAX_CONNS = 5
MAX_SESSIONS = 6
DEFAULT_NUM_TICKETS = 2  # OpenSSL's num_tickets, what an unpatched context sends

EXAMPLES = int(os.environ.get("TLSCTL_FUZZ_EXAMPLES", "0"))
STEPS = int(os.environ.get("TLSCTL_FUZZ_STEPS", "0"))

Connection = Union[ssl.SSLObject, ssl.SSLSocket]


@functools.cache
def _certs() -> scenarios.Certs:
    return scenarios.make_certs(client_sans=1)


def _note(label: str) -> None:
    """Count an event for ``--hypothesis-show-statistics`` (the replays
    below run outside Hypothesis)."""
    if currently_in_test_context():
        event(label)


class Boom(Exception):
    """What a raising callback raises: a fresh object every time."""


# --- strategies ------------------------------------------------------------

#: None, small counts, the bound, and past it (refused)
COUNTS = st.one_of(
    st.none(), st.integers(0, 3), st.sampled_from([MAX_TICKETS, 17, 2**31 - 1])
)
VERSIONS = st.sampled_from([V13, V12])
#: patch() arguments it accepts: (tickets, count, renew_on_resume)
VALID_POLICIES = st.tuples(
    st.sampled_from([*tlsctl.POLICIES, "defer"]),
    st.one_of(st.none(), st.integers(0, 3)),
    st.booleans(),
).map(lambda p: (p[0], None if p[0] == "suppress" else p[1], p[2]))

# --- model records ---------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    tickets: str
    count: int
    renew: bool


ISSUE_KINDS = ("none", "appdata", "raise", "bad_type", "too_big")
#: What an on_issue of these kinds makes the call that ran it raise.
FAILING_ISSUE = {"raise": "marker", "bad_type": "TypeError", "too_big": "ValueError"}
RESUME_KINDS = (
    "mirror",  # what OpenSSL would decide itself
    "use_renew",
    "use",
    "ignore_renew",
    "ignore",
    "abort",
    "raise",
    "bad_type",
    "bad_value",
)


# Callbacks that let the handshake go on are drawn more often than failing ones.
ISSUE = st.sampled_from([None, None, "none", "appdata", "appdata", *ISSUE_KINDS[2:]])
RESUME = st.sampled_from([None, None, "mirror", *RESUME_KINDS])
#: (on_issue kind, on_resume kind); half the time none at all, so that many
#: connections are made without callbacks (tracked in C, not Python)
CALLBACKS = st.one_of(st.just((None, None)), st.tuples(ISSUE, RESUME))


@dataclass
class Call:
    """One callback call, as the callback saw it."""

    kind: str  # "issue" or "resume"
    conn: weakref.ref[Any]
    appdata: bytes | None = None
    status: ResumeStatus | None = None
    returned: object = None
    raised: Boom | None = None


class Callbacks:
    """The callables given to ``set_ticket_callbacks`` and what they do."""

    def __init__(
        self, log: list[Call], tag: int, issue: str | None, resume: str | None
    ) -> None:
        self.log = log
        self.issue_kind = issue
        self.resume_kind = resume
        self.appdata = f"cb{tag}".encode()

    def __repr__(self) -> str:
        return f"Callbacks(issue={self.issue_kind}, resume={self.resume_kind})"

    def on_issue(self, conn: Any) -> Any:
        call = Call("issue", weakref.ref(conn))
        self.log.append(call)
        kind = self.issue_kind
        if kind == "raise":
            call.raised = Boom("on_issue")
            raise call.raised
        call.returned = {
            "none": None,
            "appdata": self.appdata,
            "bad_type": 5,
            "too_big": b"x" * 16385,
        }[str(kind)]
        return call.returned

    def on_resume(self, conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        call = Call("resume", weakref.ref(conn), appdata, status)
        self.log.append(call)
        kind = self.resume_kind
        if kind == "raise":
            call.raised = Boom("on_resume")
            raise call.raised
        if kind == "mirror":
            if status.renew:
                call.returned = TicketDecision.USE_RENEW
            elif status.decrypted:
                call.returned = TicketDecision.USE
            else:
                call.returned = TicketDecision.IGNORE_RENEW
        else:
            call.returned = {
                "use_renew": TicketDecision.USE_RENEW,
                "use": TicketDecision.USE,
                "ignore_renew": TicketDecision.IGNORE_RENEW,
                "ignore": TicketDecision.IGNORE,
                "abort": TicketDecision.ABORT,
                "bad_type": "yes",
                "bad_value": 9,
            }[str(kind)]
        return call.returned


@dataclass(eq=False)
class Server:
    name: str
    ctx: ssl.SSLContext
    policy: Policy | None = None
    renew_never: bool = False  # the last patch() said renew_on_resume=False
    callbacks: Callbacks | None = None
    keys: list[TicketKey] | None = None
    builtin_name: bytes | None = None  # OpenSSL's own key name, once seen
    changes: int = 0  # patch() and set_ticket_callbacks() calls so far

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Session:
    version: ssl.TLSVersion
    session: ssl.SSLSession
    origin: Server  # the context that made the ticket
    key_name: bytes
    shared: bool  # under a shared key (set_ticket_keys), not OpenSSL's own
    appdata: bytes


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


@dataclass(eq=False)
class Conn:
    """One server/client pair and what the model expects of it."""

    ident: int
    transport: str  # "bio", "socketpair" or "tcp"
    server_model: Server
    version: ssl.TLSVersion  # the client's maximum_version
    policy: Policy | None  # fixed at creation
    guarded: bool  # the context had callbacks at creation
    num_tickets: int  # OpenSSL's own tickets per full handshake (SSL copy)
    session: Session | None
    server: Connection | None = None
    client: Connection | None = None
    # memory BIOs (transport "bio")
    s_in: ssl.MemoryBIO | None = None
    s_out: ssl.MemoryBIO | None = None
    c_in: ssl.MemoryBIO | None = None
    c_out: ssl.MemoryBIO | None = None
    # sockets: a duplicate of each end, only to shut it down (unblocking the
    # peer) and to poll the client's receive queue
    s_ctl: socket.socket | None = None
    c_ctl: socket.socket | None = None
    phase: str = "new"  # new, open, failed, unwrapped, closed
    written: bool = False  # the server made an application write
    resumed: bool = False
    to_client: int = 0  # application bytes written by the server, unread
    openssl_tickets: int = 0  # sent by OpenSSL's own timing (not tlsctl's)
    held: int = 0  # held by the stash
    deferred: int = 0  # native "defer": tickets due with the first write
    extra: int = 0  # asked for with issue_tickets(), not yet sent
    issued: int = 0  # expected connection_state().issued
    expected_keys: list[tuple[Server, bytes | None]] = field(default_factory=list)
    appdata: bytes = b""  # what the connection's newest ticket carries
    sent_shutdown: bool = False  # the server sent close_notify
    saved: int = 0  # tickets received when the client's session was last saved
    born: int = 0  # the context's ``changes`` when the connection was made
    synced: bool = True  # everything the server sent has reached the client side

    def __repr__(self) -> str:
        return f"conn{self.ident}"

    @property
    def tls13(self) -> bool:
        return self.version is V13

    @property
    def stash(self) -> bool:
        return (
            self.policy is not None
            and self.policy.tickets == "defer"
            and MECHANISM == "stash"
        )

    @property
    def native_defer(self) -> bool:
        return (
            self.policy is not None
            and self.policy.tickets == "defer"
            and MECHANISM == "native"
        )

    def tickets_due(self) -> int:
        """Tickets the server's next application write sends first."""
        if not self.tls13 or self.phase != "open" or self.sent_shutdown:
            return 0
        due = self.extra
        if not self.written:
            due += self.held + self.deferred
        return due


# --- helpers ----------------------------------------------------------------


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


# --- the state machine ------------------------------------------------------


@dataclass
class HandshakePlan:
    """What the model expects of a handshake."""

    error: str | None  # None, "marker", "SSLError", "TypeError", "ValueError"
    resumed: bool
    resume_call: bool  # on_resume runs
    decrypts: bool
    renew: bool
    key_index: int | None
    openssl_tickets: int  # made by OpenSSL during the handshake
    deferred: int  # native defer: due with the first write
    issue_calls: int  # on_issue calls during the handshake


class TlsctlMachine(RuleBasedStateMachine):
    """Two server contexts, a client context per TLS version, up to
    ``MAX_CONNS`` connections; the rules below are what an application does,
    the invariants what must hold after each of them (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        certs = _certs()
        self.servers = [
            Server(f"server{i}", scenarios.server_context(certs)) for i in range(2)
        ]
        self.clients: dict[ssl.TLSVersion, ssl.SSLContext] = {}
        self.counters: dict[ssl.TLSVersion, Counter] = {}
        for version in (V12, V13):
            ctx = scenarios.client_context(certs, maximum_version=version)
            self.clients[version] = ctx
            self.counters[version] = Counter(ctx)
        self.conns: list[Conn] = []
        self.sessions: list[Session] = []
        self.log: list[Call] = []  # callback calls of the current step
        self.next_ident = 0
        self.next_tag = 0
        self.dropped: list[tuple[str, weakref.ref[Any]]] = []
        self.touched: set[int] = set()  # connections used by the current step
        self.quiet: set[int] = set()  # caught up at the end of the last step

    def teardown(self) -> None:
        _note(f"connections made: {min(self.next_ident, 8)}")
        for conn in self.conns:
            self._close_sockets(conn)
        self.conns.clear()

    # -- small helpers ------------------------------------------------------

    def _pick(self, index: int) -> Conn:
        return self.conns[index % len(self.conns)]

    def _client_tickets(self, conn: Conn) -> list[bytes]:
        counter = self.counters[conn.version]
        return list(counter.by_conn.get(conn.client, []))

    def _close_sockets(self, conn: Conn) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for end in (conn.server, conn.client):
                if isinstance(end, ssl.SSLSocket):
                    end.close()
            for ctl in (conn.s_ctl, conn.c_ctl):
                if ctl is not None:
                    ctl.close()

    def _server_pending_output(self, conn: Conn) -> int | None:
        """Bytes the server emitted that the client has not taken in yet
        (None: cannot tell, a socket over TCP may still have bytes in
        flight, which only weakens the check)."""
        if conn.transport == "bio":
            assert conn.s_out is not None
            return conn.s_out.pending
        assert conn.c_ctl is not None
        if conn.phase == "closed":
            return None
        return 1 if _readable(conn.c_ctl) else 0

    def _caught_up(self, conn: Conn) -> bool:
        """The client has taken in everything the model says the server
        sent, so any byte it can read now is new output."""
        if conn.phase != "open" or conn.to_client or not conn.synced:
            return False
        received = len(self._client_tickets(conn))
        return (
            received == conn.openssl_tickets + conn.issued
            and self._server_pending_output(conn) == 0
        )

    def _assert_silent(self, conn: Conn, caught_up: bool, what: str) -> None:
        """If the client was caught up before ``what``, the server sent
        nothing during it."""
        if caught_up and conn.phase == "open":
            assert self._server_pending_output(conn) in (0, None), (
                f"{what} made the server write"
            )

    def _run(
        self, conn: Conn | None, fn: Callable[[], Any], expect: set[str]
    ) -> Outcome:
        """Run one server-side operation and check its exception against the
        model: ``expect`` names the outcomes allowed ("ok", "marker",
        "SSLError", "TypeError", "ValueError", "ConnectionStateError", ...).
        A marker raised by a callback during the call must be what it
        raises."""
        del self.log[:]
        outcome = Outcome()
        try:
            outcome.value = fn()
        except BaseException as exc:
            outcome.error = exc
        self._check_outcome(outcome, expect)
        return outcome

    def _check_outcome(self, outcome: Outcome, expect: set[str]) -> None:
        markers = [c.raised for c in self.log if c.raised is not None]
        error = outcome.error
        if markers:
            _note("a callback's exception re-raised")
            assert error is markers[0], (
                f"a callback raised {markers[0]!r} but the call "
                f"{'returned normally' if error is None else f'raised {error!r}'}"
            )
            names = _traceback_names(error)
            assert "on_issue" in names or "on_resume" in names, names
            assert "marker" in expect, f"unexpected callback exception {error!r}"
            return
        if error is None:
            assert "ok" in expect, f"expected one of {expect}, the call succeeded"
            return
        assert not isinstance(error, Boom), f"stale marker {error!r} re-raised"
        name = _outcome_name(error)
        if name not in expect:
            raise AssertionError(f"expected one of {expect}, got {error!r}") from error

    def _learn_key(self, server: Server, expected: bytes | None, got: bytes) -> None:
        if expected is not None:
            assert got == expected, "ticket not under the first shared key"
        elif server.builtin_name is None:
            server.builtin_name = got
        else:
            assert got == server.builtin_name, "ticket under an unknown key"

    # -- the model's predictions --------------------------------------------

    def _plan_handshake(self, conn: Conn, by_write: bool = False) -> HandshakePlan:
        """What the connection's handshake must do: whether the offered
        ticket decrypts (keys), what on_resume sees and decides, whether it
        resumes, and the tickets that follow (README's tables)."""
        server = conn.server_model
        session = conn.session
        callbacks = server.callbacks if conn.guarded else None
        decrypts = renew = False
        key_index: int | None = None
        if session is not None:
            if server.keys is not None:
                names = [k.export()[:16] for k in server.keys]
                if session.key_name in names:
                    key_index = names.index(session.key_name)
                decrypts = key_index is not None
                renew = decrypts and (conn.tls13 or key_index != 0)
            else:
                decrypts = not session.shared and session.origin is server
                renew = decrypts and conn.tls13
        resume_call = (
            session is not None
            and callbacks is not None
            and callbacks.resume_kind is not None
        )
        error: str | None = None
        decision: TicketDecision | None = None
        if session is not None:
            if decrypts:
                decision = TicketDecision.USE_RENEW if renew else TicketDecision.USE
            else:
                decision = TicketDecision.IGNORE_RENEW
        if resume_call:
            assert callbacks is not None
            kind = callbacks.resume_kind
            if kind == "raise":
                error = "marker"
            elif kind == "abort":
                error = "SSLError"
            elif kind == "bad_type":
                error = "TypeError"
            elif kind == "bad_value":
                error = "ValueError"
            elif kind in ("use", "use_renew") and not decrypts:
                error = "ValueError"
            elif kind != "mirror":
                decision = {
                    "use_renew": TicketDecision.USE_RENEW,
                    "use": TicketDecision.USE,
                    "ignore_renew": TicketDecision.IGNORE_RENEW,
                    "ignore": TicketDecision.IGNORE,
                }[str(kind)]
        # renew_on_resume=False turns USE_RENEW into USE: the context's
        # setting when the handshake runs (README).
        if decision is TicketDecision.USE_RENEW and server.renew_never:
            decision = TicketDecision.USE
        resumed = decision in (TicketDecision.USE, TicketDecision.USE_RENEW)
        # OpenSSL's own tickets during the handshake (README's table).
        if not conn.tls13:
            if resumed:
                made = 1 if decision is TicketDecision.USE_RENEW else 0
            else:
                made = 0 if decision is TicketDecision.IGNORE else 1
        elif resumed:
            made = (
                min(1, conn.num_tickets) if decision is TicketDecision.USE_RENEW else 0
            )
        else:
            made = 0 if decision is TicketDecision.IGNORE else conn.num_tickets
        # Native "defer": what stock would send in the handshake, with the
        # first write instead (at most one after a resumption).
        deferred = 0
        if conn.native_defer and conn.tls13:
            assert conn.policy is not None
            if resumed:
                renewing = decision is TicketDecision.USE_RENEW
                deferred = min(conn.policy.count, 1) if renewing else 0
            elif decision is not TicketDecision.IGNORE:
                deferred = conn.policy.count
        # on_issue runs for each ticket made in the handshake, and, when the
        # server's first write drives the handshake, for the deferred ones.
        made_here = made + (deferred if by_write else 0)
        issue_calls = 0
        issuing = callbacks.issue_kind if callbacks is not None else None
        if error is None and issuing is not None and made_here:
            issue_calls = made_here
            if issuing in FAILING_ISSUE:
                error, issue_calls = FAILING_ISSUE[issuing], 1
        return HandshakePlan(
            error,
            resumed,
            resume_call,
            decrypts,
            renew,
            key_index,
            made,
            deferred,
            issue_calls,
        )

    def _key_for_new_ticket(self, server: Server) -> bytes | None:
        """The key name the server's next ticket must carry (None: its own
        built-in key, learned from the first ticket)."""
        return server.keys[0].export()[:16] if server.keys is not None else None

    def _check_callback_log(
        self, conn: Conn, plan: HandshakePlan | None, issue_calls: int
    ) -> None:
        """The callbacks of the current step ran for this connection only,
        as often as the model says, and saw what the model says."""
        resumes = [c for c in self.log if c.kind == "resume"]
        issues = [c for c in self.log if c.kind == "issue"]
        for call in self.log:
            seen = call.conn()
            assert seen is None or conn.server is None or seen is conn.server, (
                "a callback got another connection"
            )
        assert len(issues) == issue_calls, (len(issues), issue_calls)
        for call in issues:
            if isinstance(call.returned, bytes) and len(call.returned) < 100:
                conn.appdata = call.returned
        if plan is None:
            assert not resumes
            return
        assert len(resumes) == (1 if plan.resume_call else 0), resumes
        session = conn.session
        for call in resumes:
            assert session is not None and call.status is not None
            status = call.status
            assert status.decrypted is plan.decrypts, status
            assert status.renew is plan.renew, status
            assert status.key_index == plan.key_index, status
            assert status.key_id == TicketKey(session.key_name + bytes(64)).id
            if plan.decrypts:
                assert call.appdata == session.appdata, (call.appdata, session)
            else:
                assert call.appdata is None

    # -- rules: contexts ------------------------------------------------------

    @initialize(
        servers=st.lists(
            st.tuples(
                st.one_of(st.none(), VALID_POLICIES, VALID_POLICIES),
                CALLBACKS,
                st.sampled_from(["own", "fresh", "share"]),
            ),
            min_size=2,
            max_size=2,
        ),
        seeds=st.lists(
            st.tuples(
                st.integers(0, 1),
                VERSIONS,
                st.sampled_from(["exchanged", "exchanged", "handshaken", "created"]),
                st.sampled_from(["bio", "bio", "socketpair", "tcp"]),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def configure(
        self,
        servers: list[tuple[tuple[str, int | None, bool] | None, Any, str]],
        seeds: list[tuple[int, ssl.TLSVersion, str, str]],
    ) -> None:
        """Start from configured contexts (a policy, callbacks, keys) and a
        few connections: exchanged ones (the clients get sessions) and idle
        ones (handshaken or not, no write yet), so that the interesting
        states (resumption under every policy and callback, connections
        older than the context's current settings) are a few steps away.
        Every later rule can still change everything."""
        for which, (policy, callbacks, keys) in enumerate(servers):
            if policy is not None:
                self.patch(which, *policy)
            if callbacks != (None, None):
                self.set_callbacks(which, callbacks)
            if keys != "own":
                self.set_keys(which, keys)
        for which, version, stage, transport in seeds:
            handshake = "later" if stage == "created" else "now"
            newest = [i for i, s in enumerate(self.sessions) if s.version is version]
            pick = newest[-1] if newest and stage != "exchanged" else None
            self.new_connection(which, version, pick, transport, handshake)
            conn = self.conns[-1]
            if stage == "exchanged" and conn.phase == "open":
                self._server_write(conn, 5)
            if stage == "exchanged" and conn.phase == "open":
                self._client_read(conn)

    @rule(
        which=st.integers(0, 1),
        tickets=st.sampled_from([*tlsctl.POLICIES, "bogus"]),
        count=COUNTS,
        renew=st.booleans(),
        serve=st.booleans(),
    )
    def patch(
        self,
        which: int,
        tickets: str,
        count: int | None,
        renew: bool,
        serve: bool = False,
    ) -> None:
        """Patch or re-patch (new connections only); ``serve``: then use the
        context's live connections (see ``_serve``)."""
        server = self.servers[which]
        valid = tickets in tlsctl.POLICIES
        if count is not None:
            in_range = 0 <= count <= MAX_TICKETS
            valid = valid and in_range and tickets != "suppress"
        outcome = self._run(
            None,
            lambda: tlsctl.patch(
                server.ctx, tickets=tickets, count=count, renew_on_resume=renew
            ),
            {"ok"} if valid else {"ValueError"},
        )
        if outcome.error is None:
            assert outcome.value is server.ctx
            # count=None: the context's num_tickets when first patched (2)
            default = DEFAULT_NUM_TICKETS
            server.policy = Policy(tickets, default if count is None else count, renew)
            server.renew_never = not renew
            server.changes += 1
        if serve:
            self._serve(server)

    @rule(which=st.integers(0, 1), callbacks=CALLBACKS, serve=st.booleans())
    def set_callbacks(
        self, which: int, callbacks: tuple[str | None, str | None], serve: bool = False
    ) -> None:
        """Set, replace (both None: remove) the context's ticket callbacks;
        ``serve``: then use every live connection of the context (handshake
        the new ones, an exchange on the open ones), as a server that changes
        its callbacks while connections are in use."""
        issue, resume = callbacks
        server = self.servers[which]
        if issue is None and resume is None:
            self._run(None, lambda: tlsctl.set_ticket_callbacks(server.ctx), {"ok"})
            server.callbacks = None
        else:
            self._set_callbacks(server, issue, resume)
        server.changes += 1
        if serve:
            self._serve(server)

    def _serve(self, server: Server) -> None:
        """Use every live connection of ``server``: handshake the new ones,
        an exchange on the open ones (as a server does whose settings change
        while connections are in use)."""
        for conn in list(self.conns):
            if conn.server_model is not server:
                continue
            if conn.phase == "new" and conn.server is not None:
                self._handshake(conn, by_write=False)
            if conn.phase == "open" and not conn.sent_shutdown:
                self._server_write(conn, 3)
            if conn.phase == "open":
                self._client_read(conn)

    def _set_callbacks(
        self, server: Server, issue: str | None, resume: str | None
    ) -> None:
        self.next_tag += 1
        new = Callbacks(self.log, self.next_tag, issue, resume)
        self._run(
            None,
            lambda: tlsctl.set_ticket_callbacks(
                server.ctx,
                on_issue=new.on_issue if issue else None,
                on_resume=new.on_resume if resume else None,
            ),
            {"ok"},
        )
        server.callbacks = new

    @rule(
        which=st.integers(0, 1),
        action=st.sampled_from(
            ["fresh", "fresh48", "rotate", "retire", "share", "empty", "same_name"]
        ),
    )
    def set_keys(self, which: int, action: str) -> None:
        """Shared keys: fresh ones, rotation (a new key first, the old ones
        still decrypt), retiring the old ones, the other context's keys (each
        then resumes the other's tickets), and two refused lists."""
        server = self.servers[which]
        other = self.servers[1 - which]
        keys = list(server.keys or [])
        if action in ("empty", "same_name"):
            key = TicketKey.generate()
            bad = [key, TicketKey(key.export()[:16] + os.urandom(64))]
            refused = bad if action == "same_name" else []
            self._run(
                None,
                lambda: tlsctl.set_ticket_keys(server.ctx, refused),
                {"ValueError"},
            )
            return
        if action == "fresh":
            keys = [TicketKey.generate()]
        elif action == "fresh48":
            keys = [TicketKey(os.urandom(48))]
        elif action == "rotate":
            keys = [TicketKey.generate(), *keys][:3]
        elif action == "retire":
            keys = keys[:1] or [TicketKey.generate()]
        else:
            keys = list(other.keys or [TicketKey.generate()])
            if other.keys is None:
                self._run(None, lambda: tlsctl.set_ticket_keys(other.ctx, keys), {"ok"})
                other.keys = list(keys)
        self._run(None, lambda: tlsctl.set_ticket_keys(server.ctx, keys), {"ok"})
        server.keys = keys

    # -- rules: connections ---------------------------------------------------

    @precondition(lambda self: len(self.conns) < MAX_CONNS)
    @rule(
        which=st.integers(0, 1),
        version=VERSIONS,
        session_pick=st.one_of(st.none(), st.integers(0, MAX_SESSIONS - 1)),
        transport=st.sampled_from(["bio", "bio", "socketpair", "tcp"]),
        handshake=st.sampled_from(["later", "now", "on_connect"]),
    )
    def new_connection(
        self,
        which: int,
        version: ssl.TLSVersion,
        session_pick: int | None,
        transport: str,
        handshake: str,
    ) -> None:
        """A new connection pair on a memory BIO, a socketpair or TCP on
        127.0.0.1, the client offering one of its sessions or none; its
        handshake ``later`` (a rule), ``now``, or ``on_connect`` (sockets:
        inside ``wrap_socket``, which must re-raise a callback's exception)."""
        server = self.servers[which]
        session: Session | None = None
        if session_pick is not None and self.sessions:
            session = self.sessions[session_pick % len(self.sessions)]
            version = session.version
        policy = server.policy
        if policy is None:
            num_tickets = DEFAULT_NUM_TICKETS
        elif policy.tickets == "immediate" or (
            policy.tickets == "defer" and MECHANISM == "stash"
        ):
            num_tickets = policy.count
        else:
            num_tickets = 0
        self.next_ident += 1
        conn = Conn(
            self.next_ident,
            transport,
            server,
            version,
            policy,
            server.callbacks is not None,
            num_tickets,
            session,
            born=server.changes,
        )
        client_ctx = self.clients[version]
        ssl_session = session.session if session else None
        if transport == "bio":
            conn.s_in, conn.s_out, conn.c_in, conn.c_out = (
                ssl.MemoryBIO() for _ in range(4)
            )
            conn.server = server.ctx.wrap_bio(conn.s_in, conn.s_out, server_side=True)
            conn.client = client_ctx.wrap_bio(
                conn.c_in,
                conn.c_out,
                server_hostname="localhost",
                session=ssl_session,
            )
            self.conns.append(conn)
            if handshake != "later":
                self._handshake(conn, by_write=False)
            return
        if transport == "socketpair":
            s_raw, c_raw = socket.socketpair()
        else:
            with socket.create_server((LOCALHOST, 0)) as listener:
                c_raw = socket.create_connection(listener.getsockname(), TIMEOUT)
                s_raw, _ = listener.accept()
        s_raw.setblocking(True)  # the server end is a plain blocking socket
        c_raw.settimeout(TIMEOUT)  # the client end may not wait forever
        conn.s_ctl, conn.c_ctl = s_raw.dup(), c_raw.dup()
        conn.client = client_ctx.wrap_socket(
            c_raw,
            server_hostname="localhost",
            session=ssl_session,
            do_handshake_on_connect=False,
        )
        self.conns.append(conn)
        if handshake != "on_connect":
            conn.server = server.ctx.wrap_socket(
                s_raw, server_side=True, do_handshake_on_connect=False
            )
            if handshake == "now":
                self._handshake(conn, by_write=False)
            return
        # wrap_socket() runs the handshake itself (and re-raises from it).
        plan = self._plan_handshake(conn)
        client = conn.client
        del self.log[:]
        outcomes = _in_threads(
            [
                (
                    lambda: server.ctx.wrap_socket(s_raw, server_side=True),
                    conn.s_ctl,
                ),
                (client.do_handshake, conn.c_ctl),
            ]
        )
        self._finish_handshake(conn, plan, outcomes, by_write=False)

    @precondition(lambda self: len(self.conns) < MAX_CONNS)
    @rule(
        which=st.integers(0, 1),
        version=VERSIONS,
        transport=st.sampled_from(["bio", "socketpair", "tcp"]),
    )
    def reconnect(self, which: int, version: ssl.TLSVersion, transport: str) -> None:
        """What a client does: connect with its newest session (if it has
        one), handshake, send a request, read the response."""
        newest = [i for i, s in enumerate(self.sessions) if s.version is version]
        pick = newest[-1] if newest else None
        self.new_connection(which, version, pick, transport, "now")
        conn = self.conns[-1]
        if conn.phase == "open":
            self._client_write_server_read(conn, 10)
        if conn.phase == "open":
            self._server_write(conn, 20)
        if conn.phase == "open":
            self._client_read(conn)

    @precondition(lambda self: any(c.phase == "new" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), by_write=st.booleans())
    def handshake(self, index: int, by_write: bool) -> None:
        """Handshake a connection made with ``later``."""
        fresh = [c for c in self.conns if c.phase == "new"]
        self._handshake(fresh[index % len(fresh)], by_write)

    def _handshake(self, conn: Conn, by_write: bool) -> None:
        """Handshake explicitly (``do_handshake``) or implicitly, by the
        server's first write."""
        self.touched.add(conn.ident)
        plan = self._plan_handshake(conn, by_write)
        data = b"h" * 7
        server, client = conn.server, conn.client
        assert server is not None and client is not None
        del self.log[:]
        if by_write:

            def server_step() -> Any:
                return _write_all(server, data)

        else:
            server_step = server.do_handshake
        if conn.transport == "bio":
            outcomes = self._bio_handshake(conn, server_step)
        else:
            outcomes = _in_threads(
                [(server_step, conn.s_ctl), (client.do_handshake, conn.c_ctl)]
            )
        self._finish_handshake(conn, plan, outcomes, by_write, data)

    def _bio_handshake(
        self, conn: Conn, server_step: Callable[[], Any]
    ) -> list[Outcome]:
        """Drive a memory-BIO handshake; moves nothing the server writes
        after its handshake finished (left in s_out for the checks)."""
        assert conn.server is not None and conn.client is not None
        assert conn.s_in is not None and conn.c_out is not None
        assert conn.s_out is not None and conn.c_in is not None
        server_out, client_out = Outcome(), Outcome()
        server_done = client_done = False
        for _ in range(10):
            if not client_done:
                try:
                    client_out.value = conn.client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
                except BaseException as exc:
                    client_out.error = exc
                    return [server_out, client_out]
            conn.s_in.write(conn.c_out.read())
            if not server_done:
                try:
                    server_out.value = server_step()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                except BaseException as exc:
                    server_out.error = exc
                    # let the client see the alert, if any
                    conn.c_in.write(conn.s_out.read())
                    try:
                        conn.client.do_handshake()
                    except BaseException as client_exc:
                        client_out.error = client_exc
                    return [server_out, client_out]
                if not (server_done and client_done):
                    conn.c_in.write(conn.s_out.read())
            if server_done and client_done:
                return [server_out, client_out]
        raise AssertionError("memory-BIO handshake did not finish")

    def _finish_handshake(
        self,
        conn: Conn,
        plan: HandshakePlan,
        outcomes: list[Outcome],
        by_write: bool,
        data: bytes = b"",
    ) -> None:
        self.touched.add(conn.ident)
        server_out, client_out = outcomes
        expect = {"ok"} if plan.error is None else {plan.error}
        policy = conn.policy.tickets if conn.policy else "stock"
        result = plan.error or ("resumed" if plan.resumed else "full")
        offered = " (ticket offered)" if conn.session else ""
        _note(f"handshake: {conn.version.name} {policy}: {result}{offered}")
        if conn.born != conn.server_model.changes:
            _note(
                f"handshake of a connection older than its context's settings{offered}"
            )
        if plan.resume_call and conn.server_model.callbacks is not None:
            kind = conn.server_model.callbacks.resume_kind
            _note(f"on_resume {kind} under {policy}, {conn.version.name}")
        self._check_outcome(server_out, expect)
        if conn.server is None and server_out.error is None:
            conn.server = server_out.value  # made by wrap_socket()
        if plan.error is not None:
            conn.phase = "failed"
            if client_out.error is not None:
                name = _outcome_name(client_out.error)
                assert name in ("SSLError", "OSError"), client_out.error
            self._check_callback_log(conn, plan, plan.issue_calls)
            if conn.session in self.sessions:
                # OpenSSL 3.5's client marks a session it offered in a
                # handshake that got a fatal alert not resumable (it is never
                # offered again; 3.0 and 1.1.1 keep offering it): not used again.
                self.sessions.remove(conn.session)
            return
        assert client_out.error is None, client_out.error
        conn.phase = "open"
        conn.resumed = plan.resumed
        assert conn.server is not None and conn.client is not None
        assert conn.server.session_reused is plan.resumed
        assert conn.client.session_reused is plan.resumed
        if conn.resumed and conn.session is not None:
            conn.appdata = conn.session.appdata
        self._check_callback_log(conn, plan, plan.issue_calls)
        if not conn.tls13:
            self._save_session(conn)  # TLS 1.2 tickets come in the handshake
        key = self._key_for_new_ticket(conn.server_model)
        conn.expected_keys += [(conn.server_model, key)] * plan.openssl_tickets
        if conn.stash and conn.tls13:
            conn.held = plan.openssl_tickets
        else:
            conn.openssl_tickets += plan.openssl_tickets
        conn.deferred = plan.deferred
        if not conn.tls13:
            conn.synced = True  # TLS 1.2 tickets are read inside the handshake
        elif plan.openssl_tickets and not conn.stash:
            conn.synced = conn.transport != "tcp"
        if by_write:
            self._after_first_write(conn, len(data))
            return
        # Nothing out of turn: the server's output after its handshake.
        pending = self._server_pending_output(conn)
        if pending is not None and (not conn.tls13 or conn.openssl_tickets == 0):
            assert pending == 0, "the server wrote after its handshake"
        elif pending is not None and conn.transport != "tcp":
            assert pending > 0, "OpenSSL's own tickets did not follow the handshake"

    def _after_first_write(self, conn: Conn, size: int) -> None:
        """Model of a successful server write of ``size`` bytes: the tickets
        due go first (tlsctl's: counted in ``issued``)."""
        generated = conn.extra + (0 if conn.written else conn.deferred)
        key = self._key_for_new_ticket(conn.server_model)
        conn.expected_keys += [(conn.server_model, key)] * generated
        conn.issued += conn.tickets_due()
        conn.written = True
        conn.held = conn.deferred = conn.extra = 0
        conn.to_client += size
        conn.synced = True

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def server_write(self, index: int, size: int) -> None:
        live = [c for c in self.conns if c.phase == "open" and not c.sent_shutdown]
        if live:
            self._server_write(live[index % len(live)], size)

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def exchange(self, index: int, size: int) -> None:
        """The server writes (tickets due go first), the client reads it all."""
        live = [c for c in self.conns if c.phase == "open" and not c.sent_shutdown]
        if live:
            conn = live[index % len(live)]
            self._server_write(conn, size)
            if conn.phase == "open":
                self._client_read(conn)

    def _server_write(self, conn: Conn, size: int) -> None:
        self.touched.add(conn.ident)
        server = conn.server
        assert server is not None
        callbacks = conn.server_model.callbacks if conn.guarded else None
        generated = conn.extra + (0 if conn.written else conn.deferred)
        due = conn.tickets_due()
        expect = "ok"
        issue_calls = 0
        if callbacks is not None and callbacks.issue_kind is not None and generated:
            issue_calls = generated
            if callbacks.issue_kind in FAILING_ISSUE:
                expect, issue_calls = FAILING_ISSUE[callbacks.issue_kind], 1
        data = b"w" * size
        before = conn.s_out.pending if conn.s_out is not None else 0
        outcome = self._run(conn, lambda: _write_all(server, data), {expect})
        if due:
            _note(f"write sends {'held' if conn.held else 'new'} tickets: {expect}")
        if due and conn.born != conn.server_model.changes:
            _note("tickets written on a connection older than its context's settings")
        self._check_callback_log(conn, None, issue_calls)
        if outcome.error is not None:
            conn.phase = "failed"
            return
        if conn.s_out is not None and conn.tls13:
            out = conn.s_out.read()
            records = split_records(out[before:])
            assert len(records) == due + 1, (
                f"the write emitted {len(records)} records, expected {due} "
                "tickets and the data"
            )
            assert conn.c_in is not None
            conn.c_in.write(out)
        self._after_first_write(conn, size)

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1))
    def client_read(self, index: int) -> None:
        live = [c for c in self.conns if c.phase == "open"]
        conn = live[index % len(live)]
        self._client_read(conn)

    def _client_read(self, conn: Conn) -> None:
        """The client reads everything the server sent (tickets and data)."""
        self.touched.add(conn.ident)
        client = conn.client
        assert client is not None
        got = b""
        if conn.transport == "bio":
            assert conn.s_out is not None and conn.c_in is not None
            conn.c_in.write(conn.s_out.read())
            for _ in range(100):
                try:
                    chunk = client.read(65536)
                except ssl.SSLWantReadError:
                    break
                assert chunk, "the server closed unexpectedly"
                got += chunk
        else:
            assert isinstance(client, ssl.SSLSocket) and conn.c_ctl is not None
            for _ in range(100):
                if len(got) >= conn.to_client:
                    break
                chunk = client.recv(65536)
                assert chunk, "the server closed unexpectedly"
                got += chunk
            if _readable(conn.c_ctl) or client.pending():
                # Only tickets can be left: read them without waiting for data.
                client.settimeout(0.0)
                try:
                    for _ in range(100):
                        got += client.recv(65536)
                except ssl.SSLWantReadError:
                    pass
                finally:
                    client.settimeout(TIMEOUT)
        assert len(got) == conn.to_client, (len(got), conn.to_client)
        conn.to_client = 0
        self._save_session(conn)

    def _save_session(self, conn: Conn) -> None:
        """Keep the client's session if a ticket came since the last save."""
        assert conn.client is not None
        names = self._client_tickets(conn)
        if len(names) <= conn.saved:
            return
        conn.saved = len(names)
        session = conn.client.session
        if session is None or not session.has_ticket:
            return
        server = conn.server_model
        key_name = names[-1]
        shared = server.keys is not None and key_name in [
            k.export()[:16] for k in server.keys
        ]
        self.sessions.append(
            Session(conn.version, session, server, key_name, shared, conn.appdata)
        )
        del self.sessions[:-MAX_SESSIONS]

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def client_write_server_read(self, index: int, size: int) -> None:
        live = [c for c in self.conns if c.phase == "open" and not c.sent_shutdown]
        if live:
            self._client_write_server_read(live[index % len(live)], size)

    def _client_write_server_read(self, conn: Conn, size: int) -> None:
        self.touched.add(conn.ident)
        server, client = conn.server, conn.client
        assert server is not None and client is not None
        caught_up = self._caught_up(conn)
        data = b"c" * size
        if conn.transport == "bio":
            assert conn.c_out is not None and conn.s_in is not None
            client.write(data)
            conn.s_in.write(conn.c_out.read())

            def read() -> bytes:
                return server.read(size)

            outcome = self._run(conn, read, {"ok"})
        else:
            assert isinstance(client, ssl.SSLSocket)
            assert isinstance(server, ssl.SSLSocket)
            client.sendall(data)

            def read() -> bytes:
                got = b""
                for _ in range(100):
                    if len(got) == size:
                        break
                    got += server.recv(size - len(got))
                return got

            del self.log[:]
            (outcome,) = _in_threads([(read, conn.s_ctl)])
            self._check_outcome(outcome, {"ok"})
        assert outcome.value == data
        self._check_callback_log(conn, None, 0)
        self._assert_silent(conn, caught_up, "a server read")

    @precondition(lambda self: bool(self.conns))
    @rule(
        index=st.integers(0, MAX_CONNS - 1),
        count=st.one_of(
            st.integers(1, 3), st.sampled_from([0, -1, MAX_TICKETS, 17, 2**31 - 1])
        ),
        misuse=st.booleans(),
    )
    def issue_tickets(self, index: int, count: int, misuse: bool) -> None:
        conn = self._pick(index)
        self.touched.add(conn.ident)
        if misuse:
            self._misuse(conn)
            return
        server = conn.server
        if server is None:
            return
        expect = self._plan_issue(conn, count)
        caught_up = self._caught_up(conn)
        outcome = self._run(conn, lambda: tlsctl.issue_tickets(server, count), expect)
        _note(f"issue_tickets: {sorted(expect)}")
        self._check_callback_log(conn, None, 0)
        if outcome.error is None and conn.phase == "open":
            conn.extra += count
        self._assert_silent(conn, caught_up, "issue_tickets()")

    def _misuse(self, conn: Conn) -> None:
        """Documented refusals: the client side, wrong argument types."""
        client = conn.client
        if client is None:
            return
        assert tlsctl.connection_state(client) == tlsctl.ConnectionState(None, False, 0)
        if conn.phase == "open":
            self._run(
                conn, lambda: tlsctl.issue_tickets(client), {"ConnectionStateError"}
            )
        server = conn.server
        bad: Any = "2"
        if server is not None:
            self._run(
                conn,
                lambda: tlsctl.issue_tickets(server, bad),
                {"TypeError", "ConnectionStateError"},
            )
        self._run(None, lambda: tlsctl.issue_tickets(bad), {"TypeError"})

    def _waiting_count(self, conn: Conn) -> int:
        """Tickets waiting for the next write, as issue_tickets() bounds
        them: those asked for, plus patch()'s count before a native
        "defer" connection's first write."""
        waiting = conn.extra
        if conn.native_defer and not conn.written and conn.policy is not None:
            waiting += conn.policy.count
        return waiting

    def _plan_issue(self, conn: Conn, count: int) -> set[str]:
        """issue_tickets()'s documented outcome, in the order it checks."""
        if conn.transport != "bio" and conn.phase in ("closed", "unwrapped"):
            return {"ConnectionStateError"}  # no TLS state left
        if not 1 <= count <= MAX_TICKETS:
            return {"ValueError"}
        if conn.phase == "failed":
            return {"ok", "ConnectionStateError"}
        if conn.sent_shutdown or conn.phase != "open" or not conn.tls13:
            return {"ConnectionStateError"}
        if not NATIVE_TICKETS:
            return {"UnsupportedError"}
        if self._waiting_count(conn) + count > MAX_TICKETS:
            return {"ValueError"}
        return {"ok"}

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1))
    def unwrap(self, index: int) -> None:
        live = [c for c in self.conns if c.phase == "open" and not c.sent_shutdown]
        if not live:
            return
        conn = live[index % len(live)]
        self.touched.add(conn.ident)
        server, client = conn.server, conn.client
        assert server is not None and client is not None
        released = conn.held if not conn.written else 0
        self._client_read(conn)  # take in what is in flight first
        before = len(self._client_tickets(conn))
        if conn.transport == "bio":
            assert conn.s_out is not None and conn.c_in is not None
            assert conn.c_out is not None and conn.s_in is not None

            def first() -> None:
                try:
                    server.unwrap()
                except ssl.SSLWantReadError:
                    pass  # waits for the client's close_notify

            self._run(conn, first, {"ok"})
            conn.sent_shutdown = True
            out = conn.s_out.read()
            assert len(split_records(out)) == released + 1, "not tickets + close_notify"
            conn.c_in.write(out)
            assert client.read(10) == b""  # close_notify, after any tickets
            client.unwrap()
            conn.s_in.write(conn.c_out.read())
            self._run(conn, server.unwrap, {"ok"})
        else:
            assert isinstance(client, ssl.SSLSocket)

            def client_side() -> Any:
                for _ in range(100):
                    if client.recv(100) == b"":
                        break
                return client.unwrap()

            del self.log[:]
            server_out, client_out = _in_threads(
                [(server.unwrap, conn.s_ctl), (client_side, conn.c_ctl)]
            )
            self._check_outcome(server_out, {"ok"})
            assert client_out.error is None, client_out.error
        self._check_callback_log(conn, None, 0)
        if conn.synced:  # else OpenSSL's own tickets may have come in late
            assert len(self._client_tickets(conn)) - before == released
        conn.synced = True  # the client has read up to the close_notify
        if released:
            _note("unwrap releases the stash's tickets")
        conn.issued += released
        conn.held = 0
        conn.sent_shutdown = True
        conn.phase = "unwrapped"

    @precondition(
        lambda self: any(
            c.transport != "bio" and c.phase != "closed" for c in self.conns
        )
    )
    @rule(index=st.integers(0, MAX_CONNS - 1))
    def close(self, index: int) -> None:
        socks = [c for c in self.conns if c.transport != "bio" and c.phase != "closed"]
        conn = socks[index % len(socks)]
        self.touched.add(conn.ident)
        self._close_sockets(conn)
        conn.phase = "closed"

    @precondition(lambda self: bool(self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), collect=st.booleans())
    def drop(self, index: int, collect: bool) -> None:
        """Forget a connection without closing its server end."""
        conn = self.conns.pop(index % len(self.conns))
        del self.log[:]  # a callback's exception references the connection
        if conn.server is not None:
            self.dropped.append((repr(conn), weakref.ref(conn.server)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            if isinstance(conn.client, ssl.SSLSocket):
                conn.client.close()
            for ctl in (conn.s_ctl, conn.c_ctl):
                if ctl is not None:
                    ctl.close()
            conn.server = conn.client = None
            del conn
            if collect:
                self.collect()

    @rule()
    def collect(self) -> None:
        """gc.collect(); every dropped connection is gone afterwards."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        for name, ref in self.dropped:
            assert ref() is None, f"dropped {name} is still alive"
        del self.dropped[:]

    # -- invariants -----------------------------------------------------------

    @invariant()
    def connection_states(self) -> None:
        for conn in self.conns:
            if conn.server is None:
                continue
            state = tlsctl.connection_state(conn.server)
            policy = conn.policy.tickets if conn.policy else None
            if conn.transport != "bio" and conn.phase in ("closed", "unwrapped"):
                # closed or unwrapped: the TLS state is gone
                assert state == tlsctl.ConnectionState(None, False, 0), state
                continue
            if conn.phase == "failed":
                assert state.policy == policy or state.policy is None, state
                continue
            assert state == self._expected_state(conn), (
                f"{conn}: {state}, expected {self._expected_state(conn)}"
            )

    def _expected_state(self, conn: Conn) -> tlsctl.ConnectionState:
        policy = conn.policy.tickets if conn.policy else None
        return tlsctl.ConnectionState(policy, conn.tickets_due() > 0, conn.issued)

    @invariant()
    def tickets_received_match_issued(self) -> None:
        """Once the client has read everything the server sent, the tickets
        it read are OpenSSL's own plus what ``issued`` reports (checked
        against the model in ``connection_states``)."""
        for conn in self.conns:
            if conn.phase not in ("open", "unwrapped") or conn.client is None:
                continue
            if conn.to_client or not conn.synced:
                continue
            if conn.phase == "open" and self._server_pending_output(conn):
                continue  # not read yet
            names = self._client_tickets(conn)
            assert len(names) == conn.openssl_tickets + conn.issued, (
                f"{conn}: the client read {len(names)} tickets, expected "
                f"{conn.openssl_tickets} from OpenSSL + {conn.issued} from tlsctl"
            )
            for (server, key), got in zip(conn.expected_keys, names):
                self._learn_key(server, key, got)

    @invariant()
    def untouched_connections_stay_silent(self) -> None:
        """A connection nobody used during a step (other connections'
        operations, context changes, drops, gc) sent nothing in it."""
        for conn in self.conns:
            if conn.ident in self.quiet and conn.ident not in self.touched:
                assert self._server_pending_output(conn) in (0, None), (
                    f"{conn} sent something while nobody used it"
                )
        self.quiet = {c.ident for c in self.conns if self._caught_up(c)}
        self.touched.clear()

    @invariant()
    def nothing_out_of_turn(self) -> None:
        for conn in self.conns:
            if conn.phase != "open" or conn.written or not conn.tls13:
                continue
            if conn.policy is None or conn.policy.tickets == "immediate":
                continue
            assert self._server_pending_output(conn) in (0, None), (
                f"{conn}: the server sent something before its first write"
            )


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


TlsctlMachine.TestCase.settings = settings(
    max_examples=EXAMPLES or 40,
    stateful_step_count=STEPS or 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # The bounded run in the suite is the same 40 programs every time (a
    # red CI must be reproducible); a soak (TLSCTL_FUZZ_EXAMPLES) explores.
    derandomize=not EXAMPLES,
)
TestTlsctlStateMachine = TlsctlMachine.TestCase


# --- bugs, replayed ----------------------------------------------------------
# Random runs reach these (a soak surely, the bounded run sometimes); these
# programs reach them every time, through the same rules and invariants.
# "fixed-*": bugs fixed in 8b66a00 (before it, the first three crashed the
# interpreter) and, found by this test, in 64b1b04.  "open-*": the bugs
# behind the BUG_* flags; they pass with the flags as set, and verify the
# fix once a flag is set to False.

Step = Callable[[TlsctlMachine], object]

BUG_REPLAYS: dict[str, list[Step]] = {
    # set_ticket_callbacks(), then the first write of an older "defer" connection
    "fixed-segv-first-write": [
        lambda m: m.patch(0, "defer", None, True),
        lambda m: m.new_connection(0, V13, None, "bio", "now"),
        lambda m: m.set_callbacks(0, ("appdata", None)),
        lambda m: m.server_write(0, 5),
    ],
    # set_ticket_callbacks(), then an older connection resumes (socket, TLS 1.2)
    "fixed-segv-resume": [
        lambda m: m.patch(0, "immediate", None, True),
        lambda m: m.new_connection(0, V12, None, "socketpair", "now"),
        lambda m: m.exchange(0, 5),
        lambda m: m.new_connection(0, V12, 0, "socketpair", "later"),
        lambda m: m.set_callbacks(0, ("none", "mirror")),
        lambda m: m.handshake(0, False),
    ],
    # issue_tickets() on an unpatched context, set_ticket_callbacks(), a write
    "fixed-segv-issue-tickets": [
        lambda m: m.new_connection(0, V13, None, "bio", "now"),
        lambda m: m.issue_tickets(0, 1, False),
        lambda m: m.set_callbacks(0, ("raise", None), True),
    ],
    # patch(): a count above MAX_TICKETS, and a count with "suppress"
    "fixed-patch-count": [
        lambda m: m.patch(0, "defer", MAX_TICKETS + 1, True),
        lambda m: m.patch(0, "defer", 2**31 - 1, True),
        lambda m: m.patch(0, "suppress", 1, True),
    ],
    # issue_tickets() past MAX_TICKETS, in one call or in total
    "fixed-issue-count": [
        lambda m: m.patch(0, "defer", 1, True),
        lambda m: m.new_connection(0, V13, None, "bio", "now"),
        lambda m: m.issue_tickets(0, 2**31 - 1, False),
        lambda m: m.issue_tickets(0, MAX_TICKETS, False),
        lambda m: m.issue_tickets(0, MAX_TICKETS - 1, False),
        lambda m: m.issue_tickets(0, 1, False),
        lambda m: m.exchange(0, 5),
    ],
    # issue_tickets() after unwrap()
    "fixed-issue-after-unwrap": [
        lambda m: m.new_connection(0, V13, None, "bio", "now"),
        lambda m: m.unwrap(0),
        lambda m: m.issue_tickets(0, 1, False),
    ],
    # native "defer" sent tickets after on_resume said USE, then IGNORE
    "fixed-defer-decision": [
        lambda m: m.patch(0, "defer", None, True),
        lambda m: m.reconnect(0, V13, "bio"),
        lambda m: m.set_callbacks(0, (None, "use")),
        lambda m: m.reconnect(0, V13, "bio"),
        lambda m: m.set_callbacks(0, (None, "ignore")),
        lambda m: m.reconnect(0, V13, "socketpair"),
    ],
    # native waiting_for_write was true before the handshake, with count=0,
    # after close_notify and on TLS 1.2 with callbacks
    "fixed-native-waiting": [
        lambda m: m.patch(0, "defer", 0, True),
        lambda m: m.new_connection(0, V13, None, "bio", "later"),
        lambda m: m.new_connection(0, V13, None, "bio", "now"),
        lambda m: m.unwrap(0),
        lambda m: m.set_callbacks(1, ("none", None)),
        lambda m: m.patch(1, "defer", None, True),
        lambda m: m.new_connection(1, V12, None, "tcp", "now"),
    ],
    # the stash's connection_state() forgot issue_tickets() (stash only)
    "fixed-stash-state": [
        lambda m: m.patch(0, "defer", None, True),
        lambda m: m.reconnect(0, V13, "bio"),
        lambda m: m.issue_tickets(0, 1, False),
        lambda m: m.exchange(0, 5),
    ],
    # renew_on_resume is the context's setting at handshake time (README):
    # re-patched between a connection's creation and its resumption
    "renew-is-the-contexts": [
        lambda m: m.patch(0, "immediate", 1, True),
        lambda m: m.reconnect(0, V13, "bio"),
        lambda m: m.new_connection(0, V13, 0, "bio", "later"),
        lambda m: m.patch(0, "immediate", 1, False, True),
        lambda m: m.patch(1, "defer", None, True),
        lambda m: m.reconnect(1, V13, "bio"),
        lambda m: m.new_connection(1, V13, 1, "socketpair", "later"),
        lambda m: m.patch(1, "defer", None, False, True),
    ],
    # native defer made under renew_on_resume=False, resumed after
    # patch(renew_on_resume=True): renews, as immediate and the stash do
    # (fixed: was BUG_NATIVE_DEFER_RENEW_AT_CREATION)
    "fixed-defer-renew-at-creation": [
        lambda m: m.patch(0, "defer", None, False),
        lambda m: m.reconnect(0, V13, "bio"),
        lambda m: m.new_connection(0, V13, 0, "bio", "later"),
        lambda m: m.patch(0, "defer", None, True, True),
    ],
}


@pytest.mark.parametrize("name", list(BUG_REPLAYS))
def test_bug_replay(name: str) -> None:
    machine = TlsctlMachine()
    try:
        for step in BUG_REPLAYS[name]:
            step(machine)
            machine.connection_states()
            machine.tickets_received_match_issued()
            machine.nothing_out_of_turn()
            machine.untouched_connections_stay_silent()
    finally:
        machine.teardown()
