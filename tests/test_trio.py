"""trio.SSLStream servers with a patched context (trio drives SSLObject over
MemoryBIOs and keeps its own outgoing buffer on top; the tickets must be
neither sent twice nor lost)."""

from __future__ import annotations

import socket
import ssl
from typing import Any, Callable

import pytest

import tlsctl
from conftest import needs_defer
from tlsctl import scenarios

trio = pytest.importorskip("trio", reason="trio is not installed (pip install trio)")

pytestmark = [needs_defer]  # native, stash or python: memory-BIO servers

CtxFactory = Callable[..., ssl.SSLContext]
UPLOAD = 256 * 1024


def _run_server(
    ctx: ssl.SSLContext,
    handler: Callable[[Any], Any],
    client: Callable[[int], Any],
) -> Any:
    """Serve with ``handler(ssl_stream)`` on 127.0.0.1 while ``client(port)``
    runs in a thread; returns the client's result."""

    async def main() -> Any:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        active = [0]  # handlers running
        idle = [trio.Event()]  # set when the count drops to zero

        async def serve_one(tcp: Any) -> None:
            active[0] += 1
            stream = trio.SSLStream(tcp, ctx, server_side=True)
            try:
                await handler(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the stock server's reset
            finally:
                await stream.aclose()
                active[0] -= 1
                if not active[0]:
                    idle[0].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_one, listeners)
            with trio.fail_after(120):
                result = await trio.to_thread.run_sync(client, port)
                while active[0]:  # the last handlers finish their work
                    idle[0] = trio.Event()
                    await idle[0].wait()
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def test_one_way_uploads(server_ctx: CtxFactory, client_ctx: CtxFactory) -> None:
    n = 50
    received: dict[str, list[int]] = {}
    for name, ctx in (
        ("stock", server_ctx()),
        ("patched", tlsctl.patch(server_ctx())),
    ):
        sizes: list[int] = []

        async def handler(stream: Any, sizes: list[int] = sizes) -> None:
            got = 0
            try:
                while chunk := await stream.receive_some(65536):
                    got += len(chunk)
            finally:
                sizes.append(got)

        def upload(port: int) -> None:
            scenarios.upload_clients(("127.0.0.1", port), client_ctx(), n, UPLOAD)

        _run_server(ctx, handler, upload)
        received[name] = sizes
    lost = {k: UPLOAD * n - sum(v) for k, v in received.items()}
    print(f"\ntrio one-way uploads {n} x {UPLOAD}: lost bytes {lost}")
    assert received["patched"] == [UPLOAD] * n


def test_request_response_tickets_and_resumption_match_stock(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    async def handler(stream: Any) -> None:
        request = b""
        while not request.endswith(b"\n"):
            chunk = await stream.receive_some(1024)
            if not chunk:
                return
            request += chunk
        await stream.send_all(b"reply to " + request)

    results = {}
    for name, ctx in (
        ("stock", server_ctx()),
        ("patched", tlsctl.patch(server_ctx())),
    ):

        def clients(port: int) -> scenarios.ResumptionResult:
            return scenarios.request_clients(("127.0.0.1", port), client_ctx(), 10)

        results[name] = _run_server(ctx, handler, clients)
    print(f"\ntrio request/response: {results}")
    assert results["patched"] == results["stock"]
    patched = results["patched"]
    assert patched.replies_ok == 10 and patched.resumed == 9
    assert patched.tickets == 2 + 9  # 2 after the full handshake, 1 per resume


def test_large_transfer_both_ways(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    size = 8 * 1024 * 1024

    async def handler(stream: Any) -> None:
        got = 0
        while got < size:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            got += len(chunk)
        await stream.send_all(b"d" * size)

    def client(port: int) -> tuple[int, int]:
        ctx = client_ctx()
        counter = scenarios.TicketCounter(ctx)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"u" * size)
                got = 0
                while got < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
        return got, counter.count

    got, tickets = _run_server(tlsctl.patch(server_ctx()), handler, client)
    assert got == size
    assert tickets == 2
