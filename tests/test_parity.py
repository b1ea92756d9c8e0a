"""A patched context keeps every stdlib knob and contract: ``num_tickets``,
classes assigned at any time, truststore, TLS 1.2, and the attributes a
server sets (ALPN, SNI, keylog, OP_NO_TICKET, post-handshake auth,
session_stats): the same as stock in everything but ticket timing."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import tlsctl
from conftest import (
    bio_pair,
    connect,
    native_defer,
    needs_binding,
    needs_defer,
    split_records,
)
from tlsctl import _bind
from tlsctl.scenarios import TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


def _tickets_at_handshake_and_first_write(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[int, int]:
    """NewSessionTickets the server wrote during the handshake, and with its
    first write."""
    pair = bio_pair(server, client)
    pair.handshake()
    at_handshake = sum(
        1 for r in split_records(pair.s_out.read()) if r[0] == 23
    )  # every post-handshake TLS 1.3 record is type 23 on the wire
    pair.server.write(b"x")
    at_write = len(split_records(pair.s_out.read())) - 1  # minus the data
    return at_handshake, at_write


# --- 1. num_tickets is the user's knob ---------------------------------------


@needs_defer
@needs_binding  # count=
def test_num_tickets_reads_what_the_user_set_and_counts_the_deferred_tickets(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    server.num_tickets = 3
    tlsctl.patch(server)
    assert server.num_tickets == 3  # was 0 once patched
    assert _tickets_at_handshake_and_first_write(server, client_ctx()) == (0, 3)
    server.num_tickets = 5  # later: new connections, never at handshake time
    assert server.num_tickets == 5
    assert _tickets_at_handshake_and_first_write(server, client_ctx()) == (0, 5)
    server.num_tickets = 0
    assert _tickets_at_handshake_and_first_write(server, client_ctx()) == (0, 0)
    tlsctl.patch(server, count=2)  # an explicit count wins over num_tickets
    server.num_tickets = 7
    assert _tickets_at_handshake_and_first_write(server, client_ctx()) == (0, 2)
    assert server.num_tickets == 7


@needs_binding  # suppress, count=
@pytest.mark.parametrize("policy", ["suppress", "immediate"])
def test_num_tickets_with_the_other_policies(
    policy: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    server.num_tickets = 3
    tlsctl.patch(server, tickets=policy)
    assert server.num_tickets == 3
    expected = (0, 0) if policy == "suppress" else (3, 0)
    assert _tickets_at_handshake_and_first_write(server, client_ctx()) == expected
    if policy == "immediate":
        tlsctl.patch(server, tickets="immediate", count=1)
        assert _tickets_at_handshake_and_first_write(server, client_ctx()) == (1, 0)
        assert server.num_tickets == 3


@needs_defer
def test_connection_state_agrees_with_the_wire_after_num_tickets_changes(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = tlsctl.patch(server_ctx())
    server.num_tickets = 4
    client = client_ctx()
    counter = TicketCounter(client)
    pair = bio_pair(server, client)
    pair.handshake()
    state = tlsctl.connection_state(pair.server)
    assert state.policy == "defer" and state.waiting_for_write
    pair.exchange()
    assert counter.count == tlsctl.connection_state(pair.server).issued == 4


# --- 2. classes assigned after patch() ----------------------------------------


class _MyObject(ssl.SSLObject):
    pass


class _MySocket(ssl.SSLSocket):
    pass


@needs_defer
@pytest.mark.parametrize("order", ["before", "after"])
def test_user_classes_keep_the_policy_in_either_order(
    order: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = server_ctx()
    if order == "before":
        server.sslobject_class = _MyObject
        server.sslsocket_class = _MySocket
    tlsctl.patch(server)
    if order == "after":
        server.sslobject_class = _MyObject
        server.sslsocket_class = _MySocket
    assert server.sslobject_class is _MyObject  # the user's, untouched
    client = client_ctx()
    counter = TicketCounter(client)
    pair = bio_pair(server, client)
    assert type(pair.server) is _MyObject
    pair.handshake()
    assert pair.s_out.pending == 0  # nothing after the handshake
    pair.exchange()
    assert counter.count == 2  # the policy held: tickets with the write


# --- 3. truststore --------------------------------------------------------------

_TRUSTSTORE = r"""
import ssl, sys
sys.path[:0] = [{tests!r}]
order = {order!r}
if order == "inject-first":
    import truststore
    truststore.inject_into_ssl()
import tlsctl
if order == "tlsctl-first":
    import truststore
    truststore.inject_into_ssl()
from conftest import bio_pair, split_records
from tlsctl import scenarios

certs = scenarios.make_certs(client_sans=1)
stdlib = tlsctl._bind.STDLIB_CONTEXT
assert ssl.SSLContext is not stdlib  # truststore's class is in place
for kind in ("stdlib", "truststore"):
    ctx = (stdlib if kind == "stdlib" else ssl.SSLContext)(ssl.PROTOCOL_TLS_SERVER)
    # (no trustme configure_* and no _msg_callback here: they check
    # isinstance(ctx, ssl.SSLContext) or use super(SSLContext, ...), which
    # truststore's swap of that name breaks for stdlib contexts)
    with certs.server.private_key_and_cert_chain_pem.tempfile() as pem:
        ctx.load_cert_chain(pem)
    assert tlsctl.patch(ctx) is ctx
    client = stdlib(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=certs.ca.cert_pem.bytes().decode())
    pair = bio_pair(ctx, client)
    pair.handshake()
    assert pair.s_out.pending == 0, kind  # deferred
    pair.server.write(b"x")
    tickets = len(split_records(pair.s_out.read())) - 1
    print(kind, "deferred", tickets)
"""


@needs_defer
@pytest.mark.parametrize("order", ["inject-first", "tlsctl-first"])
def test_truststore_in_either_order(order: str, tmp_path: Path) -> None:
    """truststore.inject_into_ssl() swaps ssl.SSLContext for its subclass,
    which makes connections through an inner stdlib context.  A real
    stdlib context was refused ("expected an ssl.SSLContext, got
    ssl.SSLContext") and a truststore one silently deferred nothing."""
    pytest.importorskip("truststore", reason="truststore not installed (3.10+)")
    tests = str(Path(__file__).parent)
    script = _TRUSTSTORE.format(tests=tests, order=order)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [
        *("stdlib", "deferred", "2"),
        *("truststore", "deferred", "2"),
    ]


# --- 4. TLS 1.2 connections ------------------------------------------------------


@native_defer
def test_tls12_connection_is_reported_honestly_and_left_stock(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    server = tlsctl.patch(server_ctx(maximum_version=TLS12))
    pair = bio_pair(server, client_ctx())
    pair.handshake()
    state = tlsctl.connection_state(pair.server)
    assert state == tlsctl.ConnectionState("defer", False, 0)
    assert pair.server.pending() == 0
    # the proxy stepped aside at that first look: the stock object from now on
    assert type(pair.server._sslobj) is _bind.SSL_SOCKET_TYPE  # type: ignore[attr-defined]
    pair.exchange()
    assert tlsctl.connection_state(pair.server) == state


# --- what the issue left open: every other knob behaves as stock ---------------


@pytest.mark.parametrize("patched", [False, True])
def test_alpn_sni_keylog_and_session_stats_as_stock(
    patched: bool, server_ctx: CtxFactory, client_ctx: CtxFactory, tmp_path: Path
) -> None:
    if sys.implementation.name != "cpython":
        pytest.skip(f"{sys.implementation.name}'s ssl writes no keylog_filename")
    keylog = tmp_path / "keys.log"
    server = server_ctx()
    server.set_alpn_protocols(["h2", "http/1.1"])
    server.keylog_filename = str(keylog)
    seen: list[str | None] = []
    server.sni_callback = lambda conn, name, ctx: seen.append(name)
    if patched:
        tlsctl.patch(server)
    client = client_ctx()
    client.set_alpn_protocols(["http/1.1"])
    session = connect(server, client).client.session
    pair = connect(server, client, session)
    assert pair.server.selected_alpn_protocol() == "http/1.1"
    assert seen == ["localhost", "localhost"]
    assert pair.client.session_reused
    assert keylog.read_text().count("SERVER_TRAFFIC_SECRET_0") == 2
    stats = server.session_stats()
    assert stats["accept"] == stats["accept_good"] == 2
    assert stats["hits"] == 1


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_op_no_ticket_as_stock(
    version: ssl.TLSVersion, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """OP_NO_TICKET: stateful session IDs instead of tickets; a patched
    context resumes and counts NewSessionTickets exactly as stock."""
    results = []
    for patched in (False, True):
        server = server_ctx(maximum_version=version)
        server.options |= ssl.OP_NO_TICKET
        if patched:
            tlsctl.patch(server)
        client = client_ctx()
        counter = TicketCounter(client)
        session = connect(server, client).client.session
        reused = connect(server, client, session).client.session_reused
        results.append((counter.count, reused, server.options & ssl.OP_NO_TICKET))
    assert results[0] == results[1]


@pytest.mark.parametrize("patched", [False, True])
def test_post_handshake_auth_as_stock(
    patched: bool, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """TLS 1.3 post-handshake client authentication: the CertificateRequest
    goes out with the server's next write (after any deferred tickets)
    and the client's certificate arrives, patched or not."""
    server = server_ctx(require_client_cert=True)
    server.post_handshake_auth = True
    if patched:
        tlsctl.patch(server)
    client = client_ctx(with_client_cert=True)
    client.post_handshake_auth = True
    pair = bio_pair(server, client)
    pair.handshake()
    assert pair.server.getpeercert() is None  # not asked for yet
    pair.server.verify_client_post_handshake()
    pair.exchange()  # (tickets,) CertificateRequest, data
    pair.client.write(b"y")  # after its Certificate, CertificateVerify, Finished
    pair.client_to_server()
    assert pair.server.read(1) == b"y"
    cert = pair.server.getpeercert()
    assert cert and "client0.example" in str(cert["subjectAltName"])
