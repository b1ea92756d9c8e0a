"""The state machine's rules about connections, for tests/test_statemachine.py.

``ConnectionRules`` is the part of ``TlsctlMachine`` (test_statemachine.py)
that makes, uses and ends connections: what a server application and its
clients do with them.  The rules about server contexts and the invariants are
``TlsctlMachine``'s own; the operations are ``MachineDrivers``'.
"""

from __future__ import annotations

import gc
import socket
import ssl
import warnings
import weakref
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import tlsctl
from _statemachine_drivers import MachineDrivers
from _statemachine_model import (
    DEFAULT_NUM_TICKETS,
    MAX_CONNS,
    MAX_SESSIONS,
    MAX_TICKETS,
    MECHANISM,
    VERSIONS,
    Conn,
    Session,
    plan_handshake,
    plan_issue,
)
from _statemachine_plumbing import TIMEOUT, _in_threads, _note
from conftest import split_records
from tlsctl.scenarios import LOCALHOST


class ConnectionRules(MachineDrivers):
    """Rules: connections made, handshaken, used, shut down, dropped."""

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
        plan = plan_handshake(conn)
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

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def server_write(self, index: int, size: int) -> None:
        conn = self._pick_writable(index)
        if conn is not None:
            self._server_write(conn, size)

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def exchange(self, index: int, size: int) -> None:
        """The server writes (tickets due go first), the client reads it all."""
        conn = self._pick_writable(index)
        if conn is not None:
            self._server_write(conn, size)
            if conn.phase == "open":
                self._client_read(conn)

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1))
    def client_read(self, index: int) -> None:
        live = [c for c in self.conns if c.phase == "open"]
        conn = live[index % len(live)]
        self._client_read(conn)

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1), size=st.integers(1, 64))
    def client_write_server_read(self, index: int, size: int) -> None:
        conn = self._pick_writable(index)
        if conn is not None:
            self._client_write_server_read(conn, size)

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
        expect = plan_issue(conn, count)
        caught_up = self._caught_up(conn)
        outcome = self._run(conn, lambda: tlsctl.issue_tickets(server, count), expect)
        _note(f"issue_tickets: {sorted(expect)}")
        self._check_callback_log(conn, None, 0)
        if outcome.error is None and conn.phase == "open":
            conn.extra += count
        self._assert_silent(conn, caught_up, "issue_tickets()")

    @precondition(lambda self: any(c.phase == "open" for c in self.conns))
    @rule(index=st.integers(0, MAX_CONNS - 1))
    def unwrap(self, index: int) -> None:
        conn = self._pick_writable(index)
        if conn is None:
            return
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
