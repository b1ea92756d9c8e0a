"""The ticket stash (the ``defer`` mechanism for OpenSSL 1.1.1).

On OpenSSL 1.1.1 it is what ``patch()`` uses, and the whole suite exercises
it.  On OpenSSL 3.x, ``TLSCTL_MECHANISM=stash`` forces it: the ``stash`` axis
(``tests/axes.txt``; ``nox -s stash``, and CI wherever the native mechanism
runs) reruns the whole suite that way.
"""

from __future__ import annotations

import ssl
from typing import Any, Callable, cast

import pytest

import tlsctl
from conftest import BioPair, split_records
from tlsctl.scenarios import TicketCounter

stash_only = pytest.mark.skipif(
    tlsctl.info().mechanism != "stash",
    reason="the stash is not the active mechanism (run with TLSCTL_MECHANISM=stash)",
)
CtxFactory = Callable[..., ssl.SSLContext]
PairFactory = Callable[..., BioPair]
CountedPair = Callable[..., tuple[BioPair, TicketCounter]]


@stash_only
def test_stash_holds_whole_records_until_the_next_write(
    counted_pair: CountedPair,
) -> None:
    p, counter = counted_pair()
    state = tlsctl.connection_state(p.server)
    assert p.s_out.pending == 0
    assert state.waiting_for_write and state.issued == 0
    p.client.write(b"ping")
    p.client_to_server()
    assert p.server.read(10) == b"ping"
    assert p.s_out.pending == 0  # a read releases nothing
    p.server.write(b"pong")
    records = split_records(p.s_out.read())
    assert len(records) == 3  # two held tickets, in order, then the data
    for record in records:
        p.c_in.write(record)
    assert p.client_read() == b"pong"
    assert counter.count == 2
    assert tlsctl.connection_state(p.server) == tlsctl.ConnectionState(
        "defer", False, 2
    )
    # Its job done, the stash has left the write chain: later records go
    # straight to the transport (no per-write cost), one record per write.
    lib, ffi = tlsctl._bind.lib, tlsctl._bind.ffi
    ptr = tlsctl._bind.sslobj_pointer(cast(Any, p.server)._sslobj)
    assert lib.tlsctl_stash_state(ptr, ffi.new("size_t *"), ffi.new("size_t *")) == 0
    p.server.write(b"again")
    assert len(split_records(p.s_out.read())) == 1


@stash_only
def test_stash_holds_nothing_on_tls12(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    server = tlsctl.patch(server_ctx(maximum_version=ssl.TLSVersion.TLSv1_2))
    p = pair_factory(server, client_ctx())
    p.handshake()
    assert tlsctl.connection_state(p.server).waiting_for_write is False


@stash_only
def test_stash_releases_before_close_notify(
    counted_pair: CountedPair,
) -> None:
    p, counter = counted_pair()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.unwrap()  # sends close_notify, waits for the client's
    records = split_records(p.server_to_client())
    assert len(records) == 3  # tickets first, then the alert
    assert p.client.read(10) == b""  # close_notify, after both tickets
    assert counter.count == 2


@stash_only
def test_issue_tickets_is_native_only(
    server_ctx: CtxFactory, client_ctx: CtxFactory, pair_factory: PairFactory
) -> None:
    p = pair_factory(tlsctl.patch(server_ctx()), client_ctx())
    p.handshake()
    if tlsctl.info().native_tickets:
        tlsctl.issue_tickets(p.server)  # 3.x with the stash forced: native
    else:
        with pytest.raises(tlsctl.UnsupportedError, match=r"OpenSSL 3\.0"):
            tlsctl.issue_tickets(p.server)
