"""What a deferring server costs on the wire: no delayed-ACK stall for
clients without TCP_NODELAY, and the tickets leave in the same write()
as the first data.  Real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import assert_stall_free, stall_free_batches
from tlsctl import _bind, scenarios
from tlsctl.scenarios import LOCALHOST

CtxFactory = Callable[..., ssl.SSLContext]

pytestmark = pytest.mark.skipif(
    tlsctl.info().mechanism is None, reason="needs a defer mechanism"
)
linux_only = pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's"
)


def _serve_one(raw: socket.socket, ctx: ssl.SSLContext, mode: str) -> None:
    """Handshake, read one line, answer it: as a blocking, timeout or
    non-blocking socket server would."""
    if mode == "timeout":
        raw.settimeout(10)
    if mode != "nonblocking":
        with ctx.wrap_socket(raw, server_side=True) as conn:
            line = scenarios.recv_line(conn)
            conn.sendall(b"pong:" + line)
        return
    raw.setblocking(False)
    conn = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    with conn:

        def wait(call: Callable[[], Any]) -> Any:
            while True:
                try:
                    return call()
                except ssl.SSLWantReadError:
                    select.select([conn], [], [], 10)
                except ssl.SSLWantWriteError:
                    select.select([], [conn], [], 10)

        wait(conn.do_handshake)
        line = b""
        while not line.endswith(b"\n"):
            line += wait(lambda: conn.recv(1024))
        reply = memoryview(b"pong:" + line)

        def send() -> int:
            return conn.send(reply)

        while reply:
            reply = reply[wait(send) :]


def _first_response_s(
    server: ssl.SSLContext, client: ssl.SSLContext, mode: str, connections: int = 5
) -> list[float]:
    """Per connection: seconds from the client's request to the first
    byte of the answer, for a client that keeps Nagle on (no TCP_NODELAY)."""
    listener = socket.create_server((LOCALHOST, 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(connections):
                raw, _ = listener.accept()
                _serve_one(raw, server, mode)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    times = []
    try:
        for _ in range(connections):
            raw = socket.create_connection((LOCALHOST, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            with client.wrap_socket(raw, server_hostname="localhost") as conn:
                start = time.perf_counter()
                conn.sendall(b"ping\n")
                assert conn.recv(1)
                times.append(time.perf_counter() - start)
                conn.recv(1024)
    finally:
        thread.join(30)
        listener.close()
    assert not errors, errors
    return times


@linux_only
@pytest.mark.parametrize("mode", ["blocking", "timeout", "nonblocking"])
@pytest.mark.parametrize("setup", ["defer", "suppress", "defer+callbacks"])
def test_no_delayed_ack_stall_for_clients_without_nodelay(
    mode: str, setup: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """A patched server sends nothing after the client's Finished, so the
    client's Nagle held its request until the kernel's delayed ACK (~40 ms
    on Linux); tlsctl sets TCP_QUICKACK when the handshake is done.  20 ms
    is half the stall: no ambiguity (conftest.stall_free_batches)."""
    server = tlsctl.patch(server_ctx(), tickets=setup.split("+")[0])
    if setup.endswith("callbacks"):
        tlsctl.set_ticket_callbacks(server, on_issue=lambda conn: None)
    client = client_ctx()
    batches = stall_free_batches(lambda: _first_response_s(server, client, mode))
    assert_stall_free(batches)


# --- one write() for the tickets and the first data -------------------------

_SERVER = r"""
import os, socket, ssl, sys
sys.path[:0] = [{src!r}]
import tlsctl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert!r})
if {patched!r}:
    tlsctl.patch(ctx)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
raw, _ = listener.accept()
with ctx.wrap_socket(raw, server_side=True) as conn:
    assert conn.recv(5) == b"ping\n"
    os.write(2, b"MARK first-write fd=%d\n" % conn.fileno())
    conn.sendall(b"pong\n")
    os.write(2, b"MARK done\n")
    conn.recv(1)
"""


def _writes_of_first_write(tmp_path: Path, patched: bool, certs: Any) -> list[int]:
    """Run a one-connection server under strace; return the byte counts of
    the write()/send() calls its first application write made."""
    cert = tmp_path / "server.pem"
    certs.server.private_key_and_cert_chain_pem.write_to_path(str(cert))
    src = str(Path(tlsctl.__file__).parent.parent)
    script = _SERVER.format(src=src, cert=str(cert), patched=patched)
    trace = tmp_path / "trace"
    proc = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=write,sendto,sendmsg",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    client = scenarios.client_context(certs)
    with client.wrap_socket(
        socket.create_connection((LOCALHOST, port)), server_hostname="localhost"
    ) as conn:
        conn.sendall(b"ping\n")
        assert scenarios.recv_line(conn) == b"pong\n"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    lines = trace.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if "MARK " in line]
    assert len(marks) == 2, lines
    fd = re.search(rb"fd=(\d+)", err)
    assert fd is not None
    pattern = re.compile(rf"(write|sendto|sendmsg)\({int(fd.group(1))},.*= (\d+)$")
    sizes = []
    for line in lines[marks[0] + 1 : marks[1]]:
        m = pattern.search(line)
        if m:
            sizes.append(int(m.group(2)))
    return sizes


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_tickets_and_first_data_leave_in_one_write(tmp_path: Path, certs: Any) -> None:
    """Native defer on a socket wrote ticket, ticket, data: three write()
    calls (a peer could reset between them).  Now one, as stock's first
    write is (stock sent its tickets during the handshake)."""
    stock = _writes_of_first_write(tmp_path, False, certs)
    patched = _writes_of_first_write(tmp_path, True, certs)
    print(f"\nwrite() calls of the first write: stock {stock}, patched {patched}")
    assert len(stock) == 1
    assert len(patched) == 1
    assert patched[0] > stock[0] + 200  # the tickets went along


def test_first_write_reaches_the_kernel_whole_with_small_buffers(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """Tickets held for the first write and a socket that takes only part
    of it (non-blocking, tiny send buffer): every byte arrives, in order.
    The client reads nothing until the server's first write has been
    refused, so the refusal does not depend on how fast it drains."""
    server = tlsctl.patch(server_ctx())
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
    payload = os.urandom(300_000)
    got = bytearray()
    errors: list[BaseException] = []
    first_refused = threading.Event()

    def client_side() -> None:
        try:
            with client_ctx().wrap_socket(b, server_hostname="localhost") as c:
                if not first_refused.wait(30):
                    raise AssertionError("the server's first write was never refused")
                while len(got) < len(payload):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got.extend(chunk)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client_side)
    thread.start()
    try:
        a.setblocking(False)
        conn = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        view = memoryview(payload)
        with conn:
            while True:
                try:
                    conn.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    select.select([conn], [], [], 10)
                except ssl.SSLWantWriteError:
                    select.select([], [conn], [], 10)
            while view:
                try:
                    view = view[conn.send(view) :]
                except (ssl.SSLWantWriteError, BlockingIOError):
                    # 300 kB cannot fit a 1 KiB send buffer the client is not
                    # reading yet: the first send is refused, and only then
                    # does the client start reading
                    first_refused.set()
                    select.select([], [conn], [], 10)
                except ssl.SSLWantReadError:
                    select.select([conn], [], [], 10)
                assert first_refused.is_set(), "the first send was not refused"
            # The refused first write was retried through the proxy, which put
            # the real object back and took its filter out of the write chain:
            # later writes cost what stock's cost.
            real = conn._sslobj  # type: ignore[attr-defined]
            assert type(real) is _bind.SSL_SOCKET_TYPE
            held = _bind.ffi.new("size_t *")
            released = _bind.ffi.new("size_t *")
            ptr = _bind.sslobj_pointer(real)
            assert _bind.lib.tlsctl_stash_state(ptr, held, released) == 0
    finally:
        first_refused.set()  # a failure above must not leave the client waiting
        thread.join(30)
    assert not errors, errors
    assert bytes(got) == payload
