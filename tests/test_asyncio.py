"""asyncio servers (asyncio.start_server, loop.create_server) on a patched
context, driven by the blocking clients of tlsctl.scenarios in a thread."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable

import pytest

import tlsctl
from conftest import asyncio_uploads, needs_defer
from tlsctl import scenarios

pytestmark = [needs_defer]  # native, stash or python: memory-BIO servers

CtxFactory = Callable[..., ssl.SSLContext]


async def _upload_server(
    ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, n: int, size: int
) -> list[int]:
    async with asyncio_uploads(ctx, client_ctx, n, size) as (_, received):
        return received


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
def test_start_server_one_way_uploads(
    patched: bool, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    ctx = server_ctx()
    if patched:
        tlsctl.patch(ctx)
    received = asyncio.run(_upload_server(ctx, client_ctx(), 50, 256 * 1024))
    lost = sum(1 for r in received if r != 256 * 1024)
    print(
        f"\n[asyncio {'patched' if patched else 'stock'}] {lost}/50 uploads lost data"
    )
    if patched:
        assert received == [256 * 1024] * 50


class _Echo(asyncio.Protocol):
    """loop.create_server protocol: reply to one line, then close."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf.endswith(b"\n"):
            self.transport.write(b"reply to " + self.buf)
            self.transport.close()


async def _request_server(
    ctx: ssl.SSLContext, client: ssl.SSLContext, n: int
) -> scenarios.ResumptionResult:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=ctx)
    address = server.sockets[0].getsockname()
    async with server:
        return await loop.run_in_executor(
            None, scenarios.request_clients, address, client, n
        )


@pytest.mark.parametrize("tls", ["TLSv1.2", "TLSv1.3"])
def test_create_server_resumption_matches_stock(
    tls: str, server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    version = ssl.TLSVersion[tls.replace(".", "_")]
    stock = asyncio.run(
        _request_server(server_ctx(maximum_version=version), client_ctx(), 8)
    )
    patched = asyncio.run(
        _request_server(
            tlsctl.patch(server_ctx(maximum_version=version)), client_ctx(), 8
        )
    )
    assert patched == stock
    assert patched.replies_ok == 8 and patched.resumed == 7


PAYLOAD = bytes(range(256)) * 4096 * 4  # 4 MiB


async def _fetch(server: asyncio.Server, client: ssl.SSLContext) -> tuple[bytes, int]:
    """Ask ``server`` for PAYLOAD with an asyncio client; returns what arrived
    and how many NewSessionTickets the client read."""
    port = server.sockets[0].getsockname()[1]
    counter = scenarios.TicketCounter(client)
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        writer.write(b"get\n")
        data = await reader.readexactly(len(PAYLOAD))
        writer.close()
    return data, counter.count


def test_large_transfer_through_patched_asyncio_server(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    payload = PAYLOAD

    async def main() -> tuple[bytes, int]:
        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readline()
            writer.write(payload)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=tlsctl.patch(server_ctx())
        )
        return await _fetch(server, client_ctx())

    data, tickets = asyncio.run(main())
    assert data == payload
    assert tickets == 2


class _Sink(asyncio.Protocol):
    """loop.create_server protocol: count bytes until EOF or reset."""

    def __init__(self, received: list[int], done: Callable[[], None]) -> None:
        self.received, self.done, self.got = received, done, 0

    def data_received(self, data: bytes) -> None:
        self.got += len(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.received.append(self.got)
        self.done()


def test_create_server_one_way_uploads(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    n, size = 50, 256 * 1024

    async def run(ctx: ssl.SSLContext) -> list[int]:
        loop = asyncio.get_running_loop()
        received: list[int] = []
        all_done = asyncio.Event()

        def one_done() -> None:
            if len(received) == n:
                all_done.set()

        server = await loop.create_server(
            lambda: _Sink(received, one_done), "127.0.0.1", 0, ssl=ctx
        )
        address = server.sockets[0].getsockname()
        async with server:
            await loop.run_in_executor(
                None, scenarios.upload_clients, address, client_ctx(), n, size
            )
            await asyncio.wait_for(all_done.wait(), 30)
        return received

    stock = asyncio.run(run(server_ctx()))
    patched = asyncio.run(run(tlsctl.patch(server_ctx())))
    print(
        f"\n[asyncio create_server] uploads that lost data: stock "
        f"{sum(r != size for r in stock)}/{n}, patched "
        f"{sum(r != size for r in patched)}/{n}"
    )
    assert patched == [size] * n


def test_start_server_resumption_matches_stock(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    async def run(ctx: ssl.SSLContext) -> scenarios.ResumptionResult:
        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            line = await reader.readline()
            writer.write(b"reply to " + line)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        address = server.sockets[0].getsockname()
        async with server:
            return await asyncio.get_running_loop().run_in_executor(
                None, scenarios.request_clients, address, client_ctx(), 8
            )

    stock = asyncio.run(run(server_ctx()))
    patched = asyncio.run(run(tlsctl.patch(server_ctx())))
    assert patched == stock
    assert patched.replies_ok == 8 and patched.resumed == 7
    assert patched.tickets == 2 + 7


class _Bulk(asyncio.Protocol):
    """loop.create_server protocol: on one line, send ``payload`` and close."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.buf = payload, b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf.endswith(b"\n"):
            self.transport.write(self.payload)
            self.transport.close()


def test_create_server_large_transfer(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Bulk(PAYLOAD), "127.0.0.1", 0, ssl=tlsctl.patch(server_ctx())
        )
        return await _fetch(server, client_ctx())

    data, tickets = asyncio.run(main())
    assert data == PAYLOAD
    assert tickets == 2
