"""The issue's scenarios at full size, over 127.0.0.1 (tlsctl.scenarios).

Stock runs are printed as evidence of the bug; whether a pass holds never
depends on stock's timing.  Run with ``-s`` to see the evidence lines.
"""

from __future__ import annotations

import ssl
from typing import Callable

import pytest

import tlsctl
from conftest import needs_defer
from tlsctl import scenarios

pytestmark = [
    pytest.mark.skipif(not tlsctl.info().bound, reason="tlsctl not bound"),
    needs_defer,
]

CtxFactory = Callable[..., ssl.SSLContext]


def test_one_way_uploads_lose_nothing(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    stock = scenarios.one_way_uploads(server_ctx(), client_ctx(), connections=200)
    print(
        f"\n[evidence] stock: {stock.lost_connections}/200 uploads lost data, "
        f"{stock.bytes_lost} bytes; server errors: {sorted(set(stock.server_errors))}"
    )
    patched = scenarios.one_way_uploads(
        tlsctl.patch(server_ctx()), client_ctx(), connections=200
    )
    print(f"[result] patched: {patched.lost_connections}/200 uploads lost data")
    assert patched.connections == 200
    assert patched.received == [256 * 1024] * 200
    assert patched.server_errors == []


def test_write_before_read_with_client_cert_completes(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    stock = scenarios.write_before_read(
        server_ctx(require_client_cert=True),
        client_ctx(with_client_cert=True),
        timeout=2.0,
    )
    print(
        f"\n[evidence] stock: server {stock.server_outcome}, "
        f"client {stock.client_outcome}"
    )
    patched = scenarios.write_before_read(
        tlsctl.patch(server_ctx(require_client_cert=True)),
        client_ctx(with_client_cert=True),
        timeout=10.0,
    )
    assert patched.server_outcome == "completed"
    assert patched.client_outcome == "completed"
    assert patched.received == 512 * 1024
    assert patched.tickets == 2


@pytest.mark.parametrize("tls", ["TLSv1.2", "TLSv1.3"])
def test_resumption_counts_match_stock(
    tls: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    version = ssl.TLSVersion[tls.replace(".", "_")]
    stock = scenarios.request_response(
        server_ctx(maximum_version=version), client_ctx(), connections=10
    )
    patched = scenarios.request_response(
        tlsctl.patch(server_ctx(maximum_version=version)), client_ctx(), connections=10
    )
    print(f"\n[{tls}] stock {stock}\n[{tls}] patched {patched}")
    assert patched == stock
    assert patched.replies_ok == 10 and patched.resumed == 9
    if tls == "TLSv1.3":
        assert patched.tickets == 2 + 9  # 2 after the full handshake, 1 per resume


def test_no_renewal_on_resume_still_resumes(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    result = scenarios.request_response(
        tlsctl.patch(server_ctx(), renew_on_resume=False), client_ctx(), connections=10
    )
    assert result.replies_ok == 10
    assert result.resumed == 9
    assert result.tickets == 2  # only the full handshake's tickets
