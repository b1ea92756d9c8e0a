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

import os
import ssl
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tlsctl
from _statemachine_connections import ConnectionRules
from _statemachine_model import (
    CALLBACKS,
    COUNTS,
    DEFAULT_NUM_TICKETS,
    MAX_TICKETS,
    V12,
    V13,
    VALID_POLICIES,
    VERSIONS,
    Policy,
    expected_state,
)
from tlsctl import TicketKey

pytestmark = pytest.mark.skipif(
    tlsctl.info().mechanism is None, reason="needs a defer mechanism (native or stash)"
)

# ---------------------------------------------------------------------------
# Bugs found by this test and not fixed yet.  Each flag makes the model
# expect exactly the deviation described (nothing more); False expects the
# documented behaviour.  test_bug_replay has a short program for each.

#: (None open.)

# ---------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("TLSCTL_FUZZ_EXAMPLES", "0"))
STEPS = int(os.environ.get("TLSCTL_FUZZ_STEPS", "0"))


class TlsctlMachine(ConnectionRules, RuleBasedStateMachine):
    """Two server contexts, a client context per TLS version, up to
    ``MAX_CONNS`` connections; the rules below are what an application does,
    the invariants what must hold after each of them (module docstring).
    The rules about connections are ``ConnectionRules``'
    (_statemachine_connections), the operations they run ``MachineDrivers``'
    (_statemachine_drivers), the model _statemachine_model."""

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
            assert state == expected_state(conn), (
                f"{conn}: {state}, expected {expected_state(conn)}"
            )

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
