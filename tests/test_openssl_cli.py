"""``openssl s_client`` as a real, independent TLS client of a patched server."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import needs_defer, s_client
from tlsctl import scenarios

pytestmark = [
    pytest.mark.skipif(not tlsctl.info().bound, reason="tlsctl not bound"),
    pytest.mark.skipif(
        shutil.which("openssl") is None, reason="openssl CLI not installed"
    ),
    needs_defer,
]


def _serve(
    ctx: ssl.SSLContext, n: int, listener: socket.socket, errors: list[Any]
) -> None:
    try:
        for _ in range(n):
            raw, _ = listener.accept()
            raw.settimeout(10)
            with ctx.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(b"reply to " + scenarios.recv_line(conn))
    except Exception as exc:  # reported below
        errors.append(exc)


def test_s_client_gets_tickets_and_resumes(
    certs: Any, server_ctx: Callable[..., ssl.SSLContext], tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca))
    session = tmp_path / "session.pem"
    ctx = tlsctl.patch(server_ctx())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    errors: list[Any] = []
    thread = threading.Thread(target=_serve, args=(ctx, 2, listener, errors))
    thread.start()
    try:
        first = s_client(port, ca, b"hello\n", "-sess_out", str(session))
        second = s_client(port, ca, b"hello\n", "-sess_in", str(session))
    finally:
        thread.join(30)
        listener.close()
    assert not errors, errors
    assert "reply to hello" in first
    assert first.count("Post-Handshake New Session Ticket arrived") == 2
    assert "New, TLSv1.3" in first
    assert session.stat().st_size > 0
    assert "reply to hello" in second
    assert "Reused, TLSv1.3" in second
    assert second.count("Post-Handshake New Session Ticket arrived") == 1
