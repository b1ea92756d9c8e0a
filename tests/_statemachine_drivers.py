"""The state machine's state and drivers for tests/test_statemachine.py.

``MachineDrivers`` holds the contexts, connections and sessions of one
program and carries out one operation on a connection (handshake, server
write, client read, ...), checking its outcome and the callbacks it ran
against the model (_statemachine_model).  The rules that call these are
test_statemachine.py's ``TlsctlMachine`` and _statemachine_connections'
``ConnectionRules``.
"""

from __future__ import annotations

import ssl
import warnings
import weakref
from typing import Any, Callable

import tlsctl
from _statemachine_model import (
    FAILING_ISSUE,
    MAX_SESSIONS,
    V12,
    V13,
    Boom,
    Call,
    Callbacks,
    Conn,
    HandshakePlan,
    Server,
    Session,
    key_for_new_ticket,
    plan_handshake,
)
from _statemachine_plumbing import (
    TIMEOUT,
    Counter,
    Outcome,
    _certs,
    _in_threads,
    _note,
    _outcome_name,
    _readable,
    _traceback_names,
    _write_all,
)
from conftest import split_records
from tlsctl import TicketKey, scenarios


class MachineDrivers:
    """The state of a ``TlsctlMachine`` and the operations its rules run."""

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

    def _pick_writable(self, index: int) -> Conn | None:
        """An open connection the server has not shut down, if any."""
        live = [c for c in self.conns if c.phase == "open" and not c.sent_shutdown]
        return live[index % len(live)] if live else None

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

    # -- drivers: contexts ----------------------------------------------------

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

    # -- drivers: connections -------------------------------------------------

    def _handshake(self, conn: Conn, by_write: bool) -> None:
        """Handshake explicitly (``do_handshake``) or implicitly, by the
        server's first write."""
        self.touched.add(conn.ident)
        plan = plan_handshake(conn, by_write)
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
        key = key_for_new_ticket(conn.server_model)
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
        key = key_for_new_ticket(conn.server_model)
        conn.expected_keys += [(conn.server_model, key)] * generated
        conn.issued += conn.tickets_due()
        conn.written = True
        conn.held = conn.deferred = conn.extra = 0
        conn.to_client += size
        conn.synced = True

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
