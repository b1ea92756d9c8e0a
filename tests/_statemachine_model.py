"""The model of tlsctl for tests/test_statemachine.py: what must happen.

Plain records of the contexts, connections, sessions and callbacks the state
machine drives (``Server``, ``Conn``, ``Session``, ``Callbacks``), the
Hypothesis strategies for their settings, and the model's predictions: what a
handshake must do (``plan_handshake``), which key a new ticket carries, what
``issue_tickets()`` must answer and what ``connection_state()`` must report.
test_statemachine.py's docstring describes the model.
"""

from __future__ import annotations

import socket
import ssl
import weakref
from dataclasses import dataclass, field
from typing import Any, Union

from hypothesis import strategies as st

import tlsctl
from tlsctl import ResumeStatus, TicketDecision, TicketKey

MECHANISM = tlsctl.info().mechanism  # "native" or "stash": how "defer" works
NATIVE_TICKETS = tlsctl.info().native_tickets  # issue_tickets() available
MAX_TICKETS = tlsctl.MAX_TICKETS  # tickets that may wait for one write
V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
MAX_CONNS = 5
MAX_SESSIONS = 6
DEFAULT_NUM_TICKETS = 2  # OpenSSL's num_tickets, what an unpatched context sends

Connection = Union[ssl.SSLObject, ssl.SSLSocket]


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
    def defer_policy(self) -> bool:
        return self.policy is not None and self.policy.tickets == "defer"

    @property
    def stash(self) -> bool:
        return self.defer_policy and MECHANISM == "stash"

    @property
    def native_defer(self) -> bool:
        return self.defer_policy and MECHANISM == "native"

    def tickets_due(self) -> int:
        """Tickets the server's next application write sends first."""
        if not self.tls13 or self.phase != "open" or self.sent_shutdown:
            return 0
        due = self.extra
        if not self.written:
            due += self.held + self.deferred
        return due


# --- the model's predictions ----------------------------------------------


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


def plan_handshake(conn: Conn, by_write: bool = False) -> HandshakePlan:
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
        made = min(1, conn.num_tickets) if decision is TicketDecision.USE_RENEW else 0
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


def key_for_new_ticket(server: Server) -> bytes | None:
    """The key name the server's next ticket must carry (None: its own
    built-in key, learned from the first ticket)."""
    return server.keys[0].export()[:16] if server.keys is not None else None


def waiting_count(conn: Conn) -> int:
    """Tickets waiting for the next write, as issue_tickets() bounds
    them: those asked for, plus patch()'s count before a native
    "defer" connection's first write."""
    waiting = conn.extra
    if conn.native_defer and not conn.written and conn.policy is not None:
        waiting += conn.policy.count
    return waiting


def plan_issue(conn: Conn, count: int) -> set[str]:
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
    if waiting_count(conn) + count > MAX_TICKETS:
        return {"ValueError"}
    return {"ok"}


def expected_state(conn: Conn) -> tlsctl.ConnectionState:
    policy = conn.policy.tickets if conn.policy else None
    return tlsctl.ConnectionState(policy, conn.tickets_due() > 0, conn.issued)
