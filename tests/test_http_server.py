"""``http.server.ThreadingHTTPServer`` behind a patched context, driven by
real clients: ``curl``, ``openssl s_client`` and a one-way uploader."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import needs_defer, s_client
from tlsctl import scenarios

pytestmark = [
    pytest.mark.skipif(not tlsctl.info().bound, reason="tlsctl not bound"),
    needs_defer,
]

UPLOAD = 256 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET: a small page.  POST: reads the whole body.  Records, per request,
    whether the TLS session was resumed and how many body bytes arrived."""

    protocol_version = "HTTP/1.1"
    log: list[tuple[str, bool, int]]  # set on the subclass per server

    def do_GET(self) -> None:
        body = b"hello from http.server\n"
        self._record(0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        want = int(self.headers.get("Content-Length", "0"))
        got = 0
        try:
            while got < want:
                chunk = self.rfile.read(min(65536, want - got))
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass  # a reset: what the stock server suffers
        self._record(got)
        try:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the one-way client is gone

    def _record(self, received: int) -> None:
        conn = self.connection
        assert isinstance(conn, ssl.SSLSocket)
        self.log.append((self.command, bool(conn.session_reused), received))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _https_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, list[Any]]]:
    """The documented recipe: wrap the listening socket with the context."""
    log: list[tuple[str, bool, int]] = []
    handler = type("Handler", (_Handler,), {"log": log})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}
    )
    thread.start()
    try:
        yield httpd.server_address[1], log
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def ca_file(certs: scenarios.Certs, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(path))
    return path


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (ci/matrix.sh installs it)")
    return path


def test_curl_gets_tickets_and_resumes(
    server_ctx: Callable[..., ssl.SSLContext], ca_file: Path
) -> None:
    """Two URLs in one curl run, each on a new connection: the second
    resumes from the ticket the first delivered (curl's session cache)."""
    curl = _tool("curl")
    ctx = tlsctl.patch(server_ctx())
    with _https_server(ctx) as (port, log):
        url = f"https://localhost:{port}/"
        proc = subprocess.run(
            [
                curl,
                "-sS",
                "-v",
                "--tlsv1.3",
                "--cacert",
                str(ca_file),
                "--resolve",
                f"localhost:{port}:127.0.0.1",
                "-H",
                "Connection: close",  # a new TLS connection per URL
                url,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello from http.server\n" * 2
    assert [(m, r) for m, r, _ in log] == [("GET", False), ("GET", True)]
    # curl -v prints each NewSessionTicket it reads: 2 after the full
    # handshake, 1 after the resumed one; as stock, none twice, none lost.
    tickets = proc.stderr.count("Newsession Ticket")
    print(f"\ncurl: {tickets} NewSessionTicket messages, server saw {log}")
    assert tickets == 3


def test_s_client_against_http_server(
    server_ctx: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    _tool("openssl")
    session = tmp_path / "session.pem"
    ctx = tlsctl.patch(server_ctx())

    request = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"

    with _https_server(ctx) as (port, log):
        first = s_client(port, ca_file, request, "-sess_out", str(session))
        second = s_client(port, ca_file, request, "-sess_in", str(session))
    assert "hello from http.server" in first and "New, TLSv1.3" in first
    assert first.count("Post-Handshake New Session Ticket arrived") == 2
    assert "hello from http.server" in second and "Reused, TLSv1.3" in second
    assert [(m, r) for m, r, _ in log] == [("GET", False), ("GET", True)]


def _one_way_posts(port: int, client: ssl.SSLContext, n: int) -> None:
    """POST a body, then close without reading the response."""
    head = (
        f"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Length: {UPLOAD}\r\nConnection: close\r\n\r\n"
    ).encode()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(head + b"u" * UPLOAD)


def test_one_way_posts_lose_nothing(
    server_ctx: Callable[..., ssl.SSLContext], client_ctx: Callable[..., ssl.SSLContext]
) -> None:
    n = 30
    results = {}
    for name, ctx in (("stock", server_ctx()), ("patched", tlsctl.patch(server_ctx()))):
        with _https_server(ctx) as (port, log):
            _one_way_posts(port, client_ctx(), n)
            deadline = threading.Event()
            for _ in range(200):  # the handlers finish after the clients
                if len(log) == n:
                    break
                deadline.wait(0.05)
        results[name] = [got for _, _, got in log]
    lost = {
        k: sum(UPLOAD - g for g in v) + UPLOAD * (n - len(v))
        for k, v in results.items()
    }
    print(f"\nhttp.server one-way POSTs of {UPLOAD} bytes: lost bytes {lost}")
    assert results["patched"] == [UPLOAD] * n
