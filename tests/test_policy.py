"""tlsctl._policy over memory BIOs: what the server emits, byte by byte."""

from __future__ import annotations

import gc
import ssl
import warnings
import weakref
from typing import Any, Callable, cast
from unittest import mock

import pytest

import tlsctl
from conftest import (
    BioPair,
    connect,
    native_defer,
    needs_binding,
    needs_c_defer,
    needs_defer,
    needs_native,
    needs_refcounting,
    require_binding_for,
    split_records,
)
from tlsctl.scenarios import TicketCounter

SSL_SOCKET = tlsctl._bind.SSL_SOCKET_TYPE  # _ssl._SSLSocket (PyPy: found)
PairFactory = Callable[..., BioPair]
CountedPair = Callable[..., tuple[BioPair, TicketCounter]]
CtxFactory = Callable[..., ssl.SSLContext]


def _request(p: BioPair) -> None:
    """Client sends a request, the server reads it: a server READ, which must
    not flush deferred tickets (the SSL_new_session_ticket trap)."""
    p.client.write(b"request")
    p.client_to_server()
    assert p.server.read(100) == b"request"


@needs_defer
def test_defer_sends_nothing_until_first_write_then_tickets_first(
    server_ctx: CtxFactory, counted_pair: CountedPair
) -> None:
    p, counter = counted_pair()
    assert p.server.version() == "TLSv1.3"
    assert p.s_out.pending == 0, "server wrote after its handshake"
    _request(p)
    assert p.s_out.pending == 0, "a server read flushed deferred tickets"
    assert tlsctl.connection_state(p.server).waiting_for_write

    p.server.write(b"response")
    records = split_records(p.s_out.read())
    assert len(records) == 3  # two tickets, then the application record
    for i, record in enumerate(records[:2], start=1):
        p.c_in.write(record)
        assert p.client_read() is None, "application data before a ticket"
        assert counter.count == i
    p.c_in.write(records[2])
    assert p.client_read() == b"response"
    state = tlsctl.connection_state(p.server)
    assert state == tlsctl.ConnectionState("defer", False, 2)
    # After the first write the connection is exactly as stock: its own
    # class, the real _ssl object, no extra attributes (zero write overhead;
    # the stash keeps a filter BIO in C, invisible here).
    stock, _ = counted_pair(server_ctx())
    assert type(p.server) is ssl.SSLObject
    assert type(cast(Any, p.server)._sslobj) is SSL_SOCKET
    assert sorted(vars(p.server)) == sorted(vars(stock.server))
    # Later writes carry no ticket.
    p.server.write(b"more")
    assert len(split_records(p.s_out.read())) == 1


def _tickets_for(
    policy: str | None,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
    pair_factory: PairFactory,
    **kw: Any,
) -> tuple[int, int, int]:
    """(tickets read by the client during the handshake, bytes the server
    emitted between its handshake and its first write, tickets in total)."""
    server = server_ctx(maximum_version=tls_version)
    if policy is not None:
        tlsctl.patch(server, tickets=policy, **kw)
    client = client_ctx()
    counter = TicketCounter(client)
    p = pair_factory(server, client)
    p.handshake()
    in_handshake = counter.count
    _request(p)
    idle = p.s_out.pending
    p.server_to_client()
    p.client_read()
    p.exchange(b"response")
    return in_handshake, idle, counter.count


@pytest.mark.parametrize("policy", tlsctl.POLICIES)
def test_every_policy_on_both_tls_versions(
    policy: str,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
    pair_factory: PairFactory,
) -> None:
    if policy == "defer" and tlsctl.info().mechanism is None:
        pytest.skip("needs a defer mechanism (native or stash)")
    require_binding_for(policy)
    args = (tls_version, server_ctx, client_ctx, pair_factory)
    stock = _tickets_for(None, *args)
    got = _tickets_for(policy, *args)
    if tls_version == ssl.TLSVersion.TLSv1_2 or policy == "immediate":
        assert got == stock  # TLS 1.2 and "immediate" behave exactly as stock
        return
    assert stock[1] > 0 and stock[2] == 2  # stock TLS 1.3 sends 2 tickets early
    if policy == "defer":
        assert got == (0, 0, 2)
    else:
        assert got == (0, 0, 0)


@needs_defer
@needs_binding  # count=
@pytest.mark.parametrize("count", [0, 1, 5])
def test_defer_count(
    count: int,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
    pair_factory: PairFactory,
) -> None:
    args = (ssl.TLSVersion.TLSv1_3, server_ctx, client_ctx, pair_factory)
    assert _tickets_for("defer", *args, count=count) == (0, 0, count)


@needs_binding  # count=
@pytest.mark.parametrize("count", [0, 3])
def test_immediate_count(
    count: int,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
    pair_factory: PairFactory,
) -> None:
    args = (ssl.TLSVersion.TLSv1_3, server_ctx, client_ctx, pair_factory)
    _, idle, total = _tickets_for("immediate", *args, count=count)
    assert total == count
    assert (idle > 0) == (count > 0)  # sent right after the handshake, as stock


@pytest.mark.parametrize(
    ("policy", "renew"),
    [(None, True)] + [(p, r) for p in tlsctl.POLICIES for r in (True, False)],
)
def test_resumption_and_renewal(
    policy: str | None,
    renew: bool,
    tls_version: ssl.TLSVersion,
    server_ctx: CtxFactory,
    client_ctx: CtxFactory,
    pair_factory: PairFactory,
) -> None:
    if policy == "defer" and tlsctl.info().mechanism is None:
        pytest.skip("needs a defer mechanism (native or stash)")
    require_binding_for(policy or "immediate", renew_on_resume=renew)
    server = server_ctx(maximum_version=tls_version)
    if policy is not None:
        tlsctl.patch(server, tickets=policy, renew_on_resume=renew)
    if policy == "suppress":
        # Tickets issued before suppressing must still resume: take the
        # session from a stock connection on the same context.
        tlsctl.patch(server, tickets="immediate", renew_on_resume=renew)
    client = client_ctx()
    counter = TicketCounter(client)
    first = pair_factory(server, client)
    first.handshake()
    first.exchange(b"x")
    session = first.client.session
    assert session is not None and session.has_ticket
    if policy == "suppress":
        tlsctl.patch(server, tickets="suppress", renew_on_resume=renew)
    counter.count = 0
    second = pair_factory(server, client, session=session)
    second.handshake()
    _request(second)
    second.exchange(b"y")
    assert second.client.session_reused
    if tls_version == ssl.TLSVersion.TLSv1_2:
        assert counter.count == 0  # stock OpenSSL does not renew TLS 1.2 here
    elif policy == "suppress" or not renew:
        assert counter.count == 0
    else:
        assert counter.count == 1  # at most one after a resumed handshake


@needs_native
def test_issue_tickets_mid_connection_waits_for_next_write(
    server_ctx: CtxFactory, counted_pair: CountedPair
) -> None:
    p, counter = counted_pair(server_ctx())  # unpatched: works on any server
    p.server_to_client()
    p.client_read()
    assert counter.count == 2
    tlsctl.issue_tickets(p.server, 3)
    assert tlsctl.connection_state(p.server).waiting_for_write
    _request(p)
    assert p.s_out.pending == 0, "issued tickets leaked out with a read"
    p.server.write(b"z")
    records = split_records(p.server_to_client())
    assert len(records) == 4
    assert p.client_read() == b"z"
    assert counter.count == 5
    assert tlsctl.connection_state(p.server).issued == 3


@needs_native
@needs_c_defer
def test_issue_tickets_before_first_deferred_write_adds_up(
    counted_pair: CountedPair,
) -> None:
    p, counter = counted_pair()
    tlsctl.issue_tickets(p.server)
    _request(p)
    assert p.s_out.pending == 0
    p.exchange(b"z")
    assert counter.count == 3


@needs_binding
def test_issue_tickets_errors(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    p = pair_factory(server_ctx(), client_ctx())
    with pytest.raises(tlsctl.ConnectionStateError, match="finished handshake"):
        tlsctl.issue_tickets(p.server)
    p.handshake()
    with pytest.raises(tlsctl.ConnectionStateError, match="server-side"):
        tlsctl.issue_tickets(p.client)
    with pytest.raises(ValueError, match="from 1 to 16"):
        tlsctl.issue_tickets(p.server, 0)
    with pytest.raises(TypeError, match="int"):
        tlsctl.issue_tickets(p.server, "2")  # type: ignore[arg-type]
    for bad in (
        None,
        object(),
        mock.Mock(spec=ssl.SSLObject),
        cast(Any, p.server)._sslobj,
    ):
        with pytest.raises(TypeError):
            tlsctl.issue_tickets(bad)  # type: ignore[arg-type]
    if not tlsctl.info().native_tickets:
        with pytest.raises(tlsctl.UnsupportedError, match=r"OpenSSL 3\.0"):
            tlsctl.issue_tickets(p.server)

    p12 = pair_factory(server_ctx(maximum_version=ssl.TLSVersion.TLSv1_2), client_ctx())
    p12.handshake()
    with pytest.raises(tlsctl.ConnectionStateError, match=r"TLS 1\.3"):
        tlsctl.issue_tickets(p12.server)


def test_patch_rejects_bad_input_and_leaves_context_untouched(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    ctx = server_ctx()
    before = (ctx.num_tickets, ctx.sslsocket_class, ctx.sslobject_class)
    for bad in (
        None,
        object(),
        "ctx",
        mock.Mock(spec=ssl.SSLContext),
        mock.MagicMock(),
    ):
        with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
            tlsctl.patch(bad)  # type: ignore[arg-type]
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"tickets": "later"}, ValueError, "one of"),
        ({"tickets": None}, ValueError, "one of"),
        ({"count": -1}, ValueError, "from 0 to 16"),
        ({"count": 17}, ValueError, "from 0 to 16"),
        ({"count": True}, TypeError, "int"),
        ({"count": 1.0}, TypeError, "int"),
        ({"renew_on_resume": "no"}, TypeError, "bool"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            tlsctl.patch(ctx, **kwargs)
        assert (ctx.num_tickets, ctx.sslsocket_class, ctx.sslobject_class) == before
    with pytest.raises(ValueError, match="PROTOCOL_TLS_CLIENT"):
        tlsctl.patch(client_ctx())


def test_patch_refuses_pyopenssl_context() -> None:
    SSL = pytest.importorskip("OpenSSL.SSL", reason="pyOpenSSL not installed")
    with pytest.raises(TypeError, match=r"OpenSSL\.SSL\.Context"):
        tlsctl.patch(cast(Any, SSL.Context(SSL.TLS_SERVER_METHOD)))


@needs_binding
def test_patch_refuses_unproven_fixed_version_context() -> None:
    with warnings.catch_warnings():  # deprecated since 3.10
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLSv1_2)
    with pytest.raises(tlsctl.BindingError, match="left untouched"):
        tlsctl.patch(ctx, tickets="suppress")
    assert ctx.sslsocket_class is ssl.SSLSocket


@needs_defer
@needs_binding  # count=
def test_user_classes_are_composed_not_clobbered(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    writes: list[bytes] = []

    class MyObject(ssl.SSLObject):
        def write(self, data: Any) -> int:
            writes.append(bytes(data))
            return super().write(data)

    class MySocket(ssl.SSLSocket):
        pass

    server = server_ctx()
    server.sslobject_class = MyObject
    server.sslsocket_class = MySocket
    tlsctl.patch(server)
    tlsctl.patch(server, count=1)  # re-patching keeps the user's classes too
    client = client_ctx()
    counter = TicketCounter(client)
    p = pair_factory(server, client)
    assert type(p.server) is MyObject
    p.handshake()
    p.exchange(b"hi")
    assert writes == [b"hi"] and counter.count == 1
    assert issubclass(server.sslsocket_class, MySocket)
    tlsctl.patch(server, tickets="immediate")
    assert type(pair_factory(server, client).server) is MyObject


@needs_defer
@needs_binding  # suppress
def test_repatch_applies_to_new_connections_only(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    server = tlsctl.patch(server_ctx())
    client = client_ctx()
    counter = TicketCounter(client)
    old = pair_factory(server, client)
    tlsctl.patch(server, tickets="suppress")
    new = pair_factory(server, client)
    for p in (old, new):
        p.handshake()
        assert p.s_out.pending == 0
        p.exchange(b"w")
    assert counter.count == 2  # old kept "defer"; new is "suppress"
    assert tlsctl.connection_state(old.server).policy == "defer"
    assert tlsctl.connection_state(new.server).policy == "suppress"
    # The original num_tickets is remembered across patches.
    tlsctl.patch(server, tickets="immediate")
    assert server.num_tickets == 2


@needs_defer
def test_client_role_on_patched_generic_context_is_stock(
    certs: Any, pair_factory: PairFactory
) -> None:
    generic = ssl.SSLContext(ssl.PROTOCOL_TLS)
    generic.check_hostname = False
    generic.verify_mode = ssl.CERT_NONE
    tlsctl.patch(generic)
    server = tlsctl.patch(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    certs.server.configure_cert(server)
    p = pair_factory(server, generic)
    assert type(cast(Any, p.client)._sslobj) is SSL_SOCKET  # never armed
    assert tlsctl.connection_state(p.client) == tlsctl.ConnectionState(None, False, 0)
    p.handshake()
    p.client.write(b"c")
    p.client_to_server()
    assert p.server.read(10) == b"c"


@needs_defer
@needs_refcounting
def test_armed_connection_has_no_reference_cycle(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    p = pair_factory(tlsctl.patch(server_ctx()), client_ctx())
    if tlsctl.info().mechanism == "native":
        assert type(cast(Any, p.server)._sslobj).__name__ == "FirstWriteProxy"
    ref = weakref.ref(p.server)
    gc.disable()
    try:
        del p.server
        assert ref() is None, "armed connection kept alive by a cycle"
    finally:
        gc.enable()


@needs_defer
def test_python_ex_data_index_0_is_intact(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    """_ssl finds the SSLObject from SSL app data (ex_data index 0) in its SNI
    callback; it must still find the right one on a patched context."""
    seen: list[Any] = []
    server = tlsctl.patch(server_ctx())
    server.sni_callback = cast(Any, lambda conn, name, ctx: seen.append((conn, name)))
    p = pair_factory(server, client_ctx())
    p.handshake()
    assert seen == [(p.server, "localhost")]


@native_defer
def test_c_proxy_answers_its_own_names_and_forwards_the_rest(
    server_ctx: CtxFactory, counted_pair: CountedPair
) -> None:
    """The C FirstWriteProxy matches names by identity (interned names from
    code) with a hash fallback: a computed spelling of "write" must still
    reach its write, or the tickets would be skipped."""
    p, counter = counted_pair()
    proxy = p.server._sslobj  # type: ignore[attr-defined]
    assert type(proxy).__name__ == "FirstWriteProxy"
    with pytest.raises(TypeError, match="made by tlsctl only"):
        type(proxy)()  # it would have nothing to forward to
    with pytest.raises(TypeError):
        type("Sub", (type(proxy),), {})  # and it is final
    real = getattr(proxy, "".join(["_re", "al"]))
    assert type(real) is SSL_SOCKET
    assert proxy.version() == real.version() == "TLSv1.3"
    assert proxy.server_side is True
    other = server_ctx()
    p.server.context = other  # SSLObject's setter writes through the proxy
    assert real.context is other
    write = getattr(proxy, "".join(["wri", "te"]))
    assert write.__self__ is proxy
    assert write(b"computed") == len(b"computed")
    records = split_records(p.s_out.read())
    assert len(records) == 3  # two tickets, then the data
    for record in records:
        p.c_in.write(record)
    assert p.client_read() == b"computed"
    assert counter.count == 2
    assert p.server._sslobj is real  # type: ignore[attr-defined]
    assert tlsctl.connection_state(p.server) == tlsctl.ConnectionState(
        "defer", False, 2
    )


@pytest.mark.parametrize("policy", tlsctl.POLICIES)
def test_connection_state_of_every_policy(
    policy: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    if policy == "defer" and tlsctl.info().mechanism is None:
        pytest.skip("needs a defer mechanism (native or stash)")
    require_binding_for(policy)
    p = connect(tlsctl.patch(server_ctx(), tickets=policy), client_ctx())
    issued = 2 if policy == "defer" else 0  # "immediate": OpenSSL's own
    assert tlsctl.connection_state(p.server) == tlsctl.ConnectionState(
        policy, False, issued
    )


def test_connection_state_rejects_non_connections() -> None:
    with pytest.raises(TypeError):
        tlsctl.connection_state(cast(Any, mock.Mock(spec=ssl.SSLSocket)))


@needs_c_defer
def test_the_first_write_path_reports_its_named_states(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """The states' Python names come from the C constants, and a defer
    connection and a callback connection pass through them as docs/design.md
    tables them: due until the first write, stock after it; guarded while a
    callback may still run."""
    from tlsctl import _bind, _policy

    assert _policy.STATES == {0: "stock", 1: "due", 2: "flushing", 3: "guarded"}
    assert _policy._POLICY_NAMES == {
        0: None,
        1: "defer",
        2: "suppress",
        3: "immediate",
    }

    def state(conn: Any) -> str:
        report = _bind.fast["report"](conn._sslobj)
        return _policy.STATES[report[1]]

    server = tlsctl.patch(server_ctx())
    pair = BioPair(server, client_ctx())
    assert state(pair.server) == "due"  # before the handshake
    pair.handshake()
    assert state(pair.server) == "due"
    pair.exchange(b"first")
    assert state(pair.server) == "stock"

    guarded = tlsctl.patch(server_ctx(), tickets="immediate")
    tlsctl.set_ticket_callbacks(guarded, on_issue=lambda c: None)
    pair = BioPair(guarded, client_ctx())
    assert state(pair.server) == "guarded"
    pair.handshake()
    pair.exchange(b"first")
    assert state(pair.server) == "stock"  # TLS 1.3 done: nothing can call back
