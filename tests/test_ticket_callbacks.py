"""tlsctl.set_ticket_callbacks: on_issue / on_resume on real handshakes."""

from __future__ import annotations

import gc
import os
import socket
import ssl
import threading
import traceback
import weakref
from typing import Any, Callable, cast

import pytest

import tlsctl
from conftest import BioPair, bio_pair, connect
from tlsctl import ResumeStatus, TicketDecision, TicketStatus, _wrap
from tlsctl.scenarios import LOCALHOST, TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
TLS13 = ssl.TLSVersion.TLSv1_3
POLICY_CHOICES = [None, "defer", "suppress", "immediate"]


def _session(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLSession:
    session = connect(server, client).client.session
    assert session is not None and session.has_ticket
    return session


def _resume(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession
) -> BioPair:
    return connect(server, client, session, b"y")


def _server(
    server_ctx: CtxFactory, version: ssl.TLSVersion, policy: str | None = None
) -> ssl.SSLContext:
    ctx = server_ctx(maximum_version=version)
    if policy is not None:
        tlsctl.patch(ctx, tickets=policy)
    return ctx


@pytest.mark.parametrize("policy", [None, "defer", "immediate"])
def test_appdata_sealed_by_on_issue_comes_back_to_on_resume(
    policy: str | None,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    server = _server(server_ctx, tls_version, policy)
    issued: list[Any] = []
    resumed: list[tuple[Any, bytes | None, ResumeStatus]] = []

    def on_issue(conn: Any) -> bytes:
        issued.append(conn)
        return b"user=42"

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        resumed.append((conn, appdata, status))
        return TicketDecision.USE_RENEW

    tlsctl.set_ticket_callbacks(server, on_issue=on_issue, on_resume=on_resume)
    client = client_ctx()
    first = connect(server, client)
    assert issued and all(c is first.server for c in issued)
    session = first.client.session
    assert session is not None

    second = _resume(server, client, session)
    assert second.client.session_reused and second.server.session_reused
    ((conn, appdata, status),) = resumed
    assert conn is second.server
    assert appdata == b"user=42"
    assert status.decrypted
    expected = (
        TicketStatus.SUCCESS_RENEW if tls_version == TLS13 else TicketStatus.SUCCESS
    )
    assert status.code is expected
    assert status.renew is (tls_version == TLS13)
    assert status.key_index is None and status.key_id is not None


# Tickets the client reads after presenting a ticket, per decision
# (measured on 1.1.1, 3.0 and 3.5 alike): USE and IGNORE send none.
@pytest.mark.parametrize("decision", list(TicketDecision))
def test_each_decision_does_what_openssl_documents(
    decision: TicketDecision,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    server = _server(server_ctx, tls_version)
    tlsctl.set_ticket_callbacks(server, on_resume=lambda c, a, s: decision)
    client = client_ctx()
    counter = TicketCounter(client)
    session = _session(server, client)
    counter.count = 0
    pair = bio_pair(server, client, session=session)
    if decision is TicketDecision.ABORT:
        with pytest.raises(ssl.SSLError):
            pair.handshake()
        return
    pair.handshake()
    pair.exchange(b"y")
    resumes = decision in (TicketDecision.USE, TicketDecision.USE_RENEW)
    assert pair.client.session_reused is resumes
    assert pair.server.session_reused is resumes
    expected = {
        TicketDecision.USE: 0,
        TicketDecision.USE_RENEW: 1,
        TicketDecision.IGNORE: 0,
        # a full handshake: TLS 1.3 sends num_tickets (2), TLS 1.2 one
        TicketDecision.IGNORE_RENEW: 2 if tls_version == TLS13 else 1,
    }
    assert counter.count == expected[decision]


class Boom(Exception):
    pass


def _raise_boom(*args: Any) -> Any:
    raise Boom("from the callback")


def _assert_callback_traceback(exc: BaseException) -> None:
    names = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    assert "_raise_boom" in names, names  # the callback's own frame survived
    assert isinstance(exc.__context__, ssl.SSLError)  # what OpenSSL reported


def test_exception_in_on_resume_is_reraised_from_do_handshake(
    tls_version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = _server(server_ctx, tls_version)
    client = client_ctx()
    session = _session(server, client)
    tlsctl.set_ticket_callbacks(server, on_resume=_raise_boom)
    pair = bio_pair(server, client, session=session)
    with pytest.raises(Boom) as info:
        pair.handshake()
    _assert_callback_traceback(info.value)


@pytest.mark.parametrize("policy", ["immediate", "defer"])
def test_exception_in_on_issue_is_reraised_from_the_call_that_made_the_ticket(
    policy: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = _server(server_ctx, TLS13, policy)
    tlsctl.set_ticket_callbacks(server, on_issue=_raise_boom)
    pair = bio_pair(server, client_ctx())
    native_defer = policy == "defer" and tlsctl.info().mechanism == "native"
    if not native_defer:
        # Tickets are made inside the handshake (stock timing, or the stash,
        # which lets OpenSSL make them and holds the bytes).
        with pytest.raises(Boom) as info:
            pair.handshake()
    else:
        pair.handshake()  # no ticket made yet
        with pytest.raises(Boom) as info:
            pair.server.write(b"first")
    _assert_callback_traceback(info.value)


@pytest.mark.parametrize(
    ("on_issue", "on_resume", "error", "message"),
    [
        (lambda c: 5, None, TypeError, "on_issue must return bytes"),
        (lambda c: b"x" * 20000, None, ValueError, "limited to 16384"),
        (None, lambda c, a, s: "yes", TypeError, "must return a tlsctl"),
        (None, lambda c, a, s: 9, ValueError, "not a tlsctl.TicketDecision"),
    ],
)
def test_bad_callback_results_raise_clear_errors(
    on_issue: Any,
    on_resume: Any,
    error: type[Exception],
    message: str,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    server = _server(server_ctx, TLS13, "immediate")
    client = client_ctx()
    session = _session(server, client)
    tlsctl.set_ticket_callbacks(server, on_issue=on_issue, on_resume=on_resume)
    pair = bio_pair(server, client, session=session)
    with pytest.raises(error, match=message):
        pair.handshake()


def test_use_for_a_ticket_that_did_not_decrypt_is_refused(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    client = client_ctx()
    session = _session(server_ctx(), client)  # another context's ticket
    statuses: list[ResumeStatus] = []

    def on_resume(conn: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        statuses.append(status)
        assert appdata is None
        return TicketDecision.USE

    server = tlsctl.set_ticket_callbacks(server_ctx(), on_resume=on_resume)
    pair = bio_pair(server, client, session=session)
    with pytest.raises(ValueError, match="did not decrypt"):
        pair.handshake()
    assert [s.code for s in statuses] == [TicketStatus.NO_DECRYPT]
    assert not statuses[0].decrypted


def test_renew_on_resume_false_caps_use_renew(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = tlsctl.patch(server_ctx(), renew_on_resume=False)
    tlsctl.set_ticket_callbacks(
        server, on_resume=lambda c, a, s: TicketDecision.USE_RENEW
    )
    client = client_ctx()
    counter = TicketCounter(client)
    session = _session(server, client)
    counter.count = 0
    pair = _resume(server, client, session)
    assert pair.client.session_reused
    assert counter.count == 0


@pytest.mark.parametrize("policy", POLICY_CHOICES)
def test_callbacks_compose_with_every_policy(
    policy: str | None,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
) -> None:
    server = _server(server_ctx, tls_version)
    client = client_ctx()
    # suppress sends no tickets: take the session before suppressing
    session = _session(
        tlsctl.set_ticket_callbacks(server, on_issue=lambda c: b"a"), client
    )
    if policy is not None:
        tlsctl.patch(server, tickets=policy)
    seen: list[bytes | None] = []

    def on_resume(c: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        seen.append(appdata)
        return TicketDecision.USE_RENEW

    tlsctl.set_ticket_callbacks(server, on_issue=lambda c: b"b", on_resume=on_resume)
    pair = _resume(server, client, session)
    assert pair.client.session_reused
    assert seen == [b"a"]
    if policy != "suppress" and tls_version == TLS13:
        later = pair.client.session
        assert later is not None
        seen.clear()
        assert _resume(server, client, later).client.session_reused
        assert seen == [b"b"]  # the renewal ticket carries on_issue's data


@pytest.mark.parametrize("handshake_on_connect", [True, False])
def test_socket_server_reraises_from_wrap_socket_or_recv(
    handshake_on_connect: bool, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    client = client_ctx()
    session = _session(server, client)
    tlsctl.set_ticket_callbacks(server, on_resume=_raise_boom)
    caught: list[BaseException] = []
    fds_before = len(os.listdir("/proc/self/fd"))
    with socket.create_server((LOCALHOST, 0)) as listener:

        def client_side() -> None:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                try:
                    client.wrap_socket(
                        raw, server_hostname="localhost", session=session
                    ).close()
                except (ssl.SSLError, OSError):
                    pass  # the server aborted the handshake

        thread = threading.Thread(target=client_side)
        thread.start()
        raw, _ = listener.accept()
        raw.settimeout(10)
        try:
            conn = server.wrap_socket(
                raw,
                server_side=True,
                do_handshake_on_connect=handshake_on_connect,
            )
            with conn:
                conn.recv(10)  # the implicit handshake
        except Boom as exc:
            caught.append(exc)
        finally:
            raw.close()
            thread.join()
    assert len(caught) == 1
    _assert_callback_traceback(caught[0])
    # The traceback still references the failed connection's frames, so an
    # unclosed socket would still hold its descriptor here.
    assert len(os.listdir("/proc/self/fd")) == fds_before


class _Marker:
    pass


def test_callbacks_live_exactly_as_long_as_the_context(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    marker = _Marker()
    alive = weakref.ref(marker)
    calls: list[int] = []
    server = server_ctx()
    ctx_alive = weakref.ref(server)

    def on_issue(conn: Any, _keep: _Marker = marker, _ctx: Any = server) -> bytes:
        calls.append(1)  # captures the marker AND the context: a cycle
        return b""

    tlsctl.set_ticket_callbacks(server, on_issue=on_issue)
    del on_issue, marker
    pair = bio_pair(server, client_ctx())  # created, handshake not run
    del server
    gc.collect()
    assert alive() is not None and ctx_alive() is not None  # the conn holds it
    pair.handshake()
    pair.exchange()
    assert calls  # still called after the user's reference was dropped
    del pair
    gc.collect()
    assert ctx_alive() is None
    assert alive() is None  # the cycle through the callback was collected


def test_replacing_and_removing_callbacks(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    marker = _Marker()
    alive = weakref.ref(marker)
    server = server_ctx()
    tlsctl.set_ticket_callbacks(server, on_issue=cast(Any, lambda c, _m=marker: b"old"))
    del marker
    calls: list[str] = []
    tlsctl.set_ticket_callbacks(server, on_issue=lambda c: calls.append("new"))
    gc.collect()
    assert alive() is None  # replaced: the old callback and its capture are gone
    _session(server, client_ctx())
    assert calls
    assert _wrap.PLAN_ATTR in vars(server)

    tlsctl.set_ticket_callbacks(server)  # removes them
    assert _wrap.PLAN_ATTR not in vars(server)  # stock again
    assert server.sslobject_class is ssl.SSLObject  # never touched
    assert server.sslsocket_class is ssl.SSLSocket
    calls.clear()
    _session(server, client_ctx())
    assert calls == []


def test_connections_made_before_the_callbacks_behave_as_stock(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    client = client_ctx()
    session = _session(server, client)
    early = bio_pair(server, client, session=session)  # before the callbacks
    tlsctl.set_ticket_callbacks(server, on_resume=_raise_boom)
    early.handshake()  # no callback runs, so nothing raises
    assert early.client.session_reused


def test_python_ex_data_index_0_is_undisturbed(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """_ssl finds the Python object of a connection through SSL ex_data
    index 0 (for example to call sni_callback); tlsctl uses its own index."""
    server = server_ctx()
    sni_saw: list[Any] = []
    resume_saw: list[Any] = []
    server.sni_callback = lambda obj, name, ctx: sni_saw.append(obj)
    client = client_ctx()
    session = _session(server, client)

    def on_resume(c: Any, appdata: bytes | None, status: ResumeStatus) -> Any:
        resume_saw.append(c)
        return TicketDecision.USE

    tlsctl.set_ticket_callbacks(server, on_resume=on_resume)
    sni_saw.clear()
    pair = _resume(server, client, session)
    assert sni_saw == [pair.server]
    assert resume_saw == [pair.server]


def test_bad_arguments(server_ctx: CtxFactory, client_ctx: CtxFactory) -> None:
    with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
        tlsctl.set_ticket_callbacks(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_issue must be callable"):
        tlsctl.set_ticket_callbacks(server_ctx(), on_issue=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server context"):
        tlsctl.set_ticket_callbacks(client_ctx(), on_issue=lambda c: None)
    OpenSSL = pytest.importorskip("OpenSSL")
    with pytest.raises(TypeError):
        tlsctl.set_ticket_callbacks(
            cast(Any, OpenSSL.SSL.Context(OpenSSL.SSL.TLS_METHOD)),
            on_issue=lambda c: None,
        )


def test_connection_state_of_a_guarded_connection(
    tls_version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """On a callback context the proxy may stay in place after the first
    write (TLS 1.2 can renegotiate); that is not 'waiting for a write'."""
    server = tlsctl.patch(server_ctx(maximum_version=tls_version))
    tlsctl.set_ticket_callbacks(server, on_issue=lambda c: None)
    pair = connect(server, client_ctx())
    state = tlsctl.connection_state(pair.server)
    assert state.policy == "defer"
    assert not state.waiting_for_write


def test_reraised_callback_exception_makes_no_context_cycle(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """The same exception object raised by a callback twice, the second
    time while the first is being handled: re-raising it makes no
    ``__context__`` cycle (as Python's own ``raise`` cuts it)."""
    server = _server(server_ctx, TLS13, "immediate")
    same = Boom("raised twice")

    def on_issue(conn: Any) -> bytes:
        raise same

    tlsctl.set_ticket_callbacks(server, on_issue=on_issue)
    with pytest.raises(Boom) as first:
        bio_pair(server, client_ctx()).handshake()
    assert first.value is same
    assert isinstance(same.__context__, ssl.SSLError)
    try:
        raise first.value
    except Boom:
        with pytest.raises(Boom) as second:
            bio_pair(server, client_ctx()).handshake()
    assert second.value is same
    seen: list[BaseException] = []
    link: BaseException | None = same
    while link is not None:
        assert all(link is not s for s in seen), "a __context__ cycle"
        seen.append(link)
        link = link.__context__
    assert isinstance(same.__context__, ssl.SSLError)


def test_guarded_methods_under_any_spelling(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """A name built at run time reaches the proxy's re-raising read and
    do_handshake as the interned one does."""
    server = tlsctl.patch(server_ctx())
    tlsctl.set_ticket_callbacks(server, on_issue=lambda c: None)
    pair = bio_pair(server, client_ctx())
    proxy = pair.server._sslobj  # type: ignore[attr-defined]
    for name in ("read", "do_handshake"):
        built = "".join(list(name))
        assert built is not name
        assert type(getattr(proxy, built).__self__) is type(proxy), name
