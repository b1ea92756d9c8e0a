"""Clients and counting shared by the real-server tests (test_servers.py,
test_servers_in_process.py): one-way uploads, reconnects, and the figures
they give.  Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import importlib.util
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest

UPLOAD = 256 * 1024
UPLOADS = 30
RECONNECTS = 20
START_TIMEOUT = 60.0  # a cold start of two spawned workers on a busy CI box
STOP_TIMEOUT = 10.0
SETTLE = 1.5  # no new record for this long: the server is done
IO_TIMEOUT = 30.0


# --- clients and counting -----------------------------------------------------


def _installed(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{module} is not installed (the test extra installs it; "
            f"Python {sys.version_info[0]}.{sys.version_info[1]})"
        )


def _one_way_posts(port: int, client: ssl.SSLContext, n: int = UPLOADS) -> None:
    """POST a ``UPLOAD``-byte body, then close without reading anything."""
    head = (
        f"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Length: {UPLOAD}\r\nConnection: close\r\n\r\n"
    ).encode()
    payload = head + b"u" * UPLOAD
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(payload)


def read_head(conn: ssl.SSLSocket, status: bytes) -> bytes:
    """Read an HTTP/1.1 response head with this status line start; what
    came after the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"incomplete response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(status), head
    return head + b"\r\n\r\n" + rest


def _read_response(conn: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 response with a Content-Length; its body.  Not read to
    EOF: a close without close_notify makes OpenSSL 3.5 drop the session."""
    head, _, body = read_head(conn, b"HTTP/1.1 200").partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("incomplete response body")
        body += chunk
    return body


def _get(conn: ssl.SSLSocket) -> None:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert _read_response(conn).startswith(b"hello")


def _reconnects(
    port: int,
    client: ssl.SSLContext,
    exchange: Callable[[ssl.SSLSocket], None] = _get,
    n: int = RECONNECTS,
) -> int:
    """``exchange`` (a request and its whole response) on a first
    connection, then on ``n`` reconnects, each with the newest session the
    client holds; how many of them resumed."""
    session: ssl.SSLSession | None = None
    resumed = 0
    for i in range(n + 1):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
            with client.wrap_socket(
                raw, server_hostname="localhost", session=session
            ) as conn:
                exchange(conn)
                resumed += i > 0 and bool(conn.session_reused)
                session = conn.session
    return resumed


def _settle(count: Callable[[], int], want: int, patched: bool) -> None:
    """Wait until ``count()`` reaches ``want``; for a stock server only
    until it stops growing for ``SETTLE`` seconds (it never records some
    uploads), for a patched one until ``IO_TIMEOUT``."""
    deadline = time.monotonic() + IO_TIMEOUT
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = count()
        if now >= want:
            return
        if now != last:
            last, since = now, time.monotonic()
        elif not patched and time.monotonic() - since > SETTLE:
            return
        time.sleep(0.02)


@dataclass
class Figures:
    complete: int  # uploads the application received whole
    recorded: int  # uploads the application saw at all
    resumed: int

    def __str__(self) -> str:
        return (
            f"uploads complete {self.complete}/{UPLOADS} (app saw "
            f"{self.recorded}), reconnects resumed {self.resumed}/{RECONNECTS}"
        )
