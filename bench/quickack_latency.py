"""First-response latency of a client without TCP_NODELAY against memory-BIO
TLS servers (asyncio ``start_server`` / ``create_server``, on asyncio's loop
and on uvloop; trio; aiohttp and websockets on uvloop).

A TLS 1.3 client without ``TCP_NODELAY`` (plain ``socket`` + ``ssl``, Java's
default) writes its first request right after its Finished; Nagle holds the
request until the Finished is acknowledged.  A stock server's tickets carry
that ACK; a server with ``tickets="defer"`` writes nothing, so the ACK, and
the request, wait for the delayed-ACK timer (~40 ms on Linux) unless the
server's socket gets ``TCP_QUICKACK`` (``tlsctl._quickack``).

    python bench/quickack_latency.py [--connections 20]

runs every (server, variant, client) cell in a fresh interpreter (the hooks
of ``_quickack.install()`` are process-wide) and prints median, min and max
of the time from the client's request write to its first response byte.
The servers and the client are also used by ``tests/test_quickack.py``.
Everything runs on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import tlsctl
from tlsctl import _quickack, scenarios

LOCALHOST = "127.0.0.1"
REQUEST = b"ping\n"
RESPONSE = b"pong\n"
TIMEOUT = 10.0

Client = Callable[[int], Any]


def nagle_client(
    port: int,
    client_ctx: ssl.SSLContext,
    connections: int,
    *,
    nodelay: bool = False,
    timeout: float = 5.0,
    request: bytes = REQUEST,
    response: bytes | None = RESPONSE,
) -> list[float]:
    """``connections`` sequential connections, each: TCP connect, set
    ``TCP_NODELAY`` explicitly (0 by default: Nagle on), full TLS handshake,
    then time ``sendall(request)`` to the first response byte.  Seconds.
    The response must be the line ``response``, or with ``None`` anything
    the server sends before it closes (an HTTP request with ``Connection:
    close``)."""
    latencies: list[float] = []
    for _ in range(connections):
        with socket.create_connection((LOCALHOST, port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                start = time.perf_counter()
                conn.sendall(request)
                first = conn.recv(1)
                latencies.append(time.perf_counter() - start)
                if not first:
                    raise ConnectionError("closed without a response")
                if response is None:
                    while conn.recv(65536):
                        pass
                elif first + scenarios.recv_line(conn) != response:
                    raise ConnectionError("unexpected response")
    return latencies


# ------------------------------------------------------------------ asyncio


async def _asyncio_serve(
    ctx: ssl.SSLContext, client: Client, api: str, remedy: bool
) -> Any:
    loop = asyncio.get_running_loop()

    if api == "start_server":

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            if remedy:
                tlsctl.quickack(writer)
            try:
                await reader.readline()
                writer.write(RESPONSE)
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, LOCALHOST, 0, ssl=ctx)
    else:

        class Pong(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                if remedy:
                    tlsctl.quickack(transport)
                self.transport = transport
                self.buffer = b""

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                if b"\n" in self.buffer:
                    self.transport.write(RESPONSE)
                    self.transport.close()

        server = await loop.create_server(Pong, LOCALHOST, 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await _client_in_thread(client, port)


async def _client_in_thread(client: Client, port: int) -> Any:
    """``client(port)`` in a worker thread while this loop serves; bounded."""
    call = asyncio.get_running_loop().run_in_executor(None, client, port)
    return await asyncio.wait_for(call, TIMEOUT)


def _run_loop(serve: Callable[[], Any], uvloop: bool) -> Any:
    """``serve()`` to completion on a fresh asyncio or uvloop event loop."""
    if uvloop:
        import uvloop as uv

        loop: asyncio.AbstractEventLoop = uv.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve())
    finally:
        loop.close()


def run_asyncio(
    ctx: ssl.SSLContext,
    client: Client,
    *,
    api: str = "start_server",
    uvloop: bool = False,
    remedy: bool = False,
) -> Any:
    """Serve ``REQUEST`` -> ``RESPONSE`` with ``asyncio.start_server`` or
    ``loop.create_server`` (``api``) on the stock or a uvloop event loop
    while ``client(port)`` runs in a thread; return its result.  ``remedy``:
    the application sets TCP_QUICKACK itself (``tlsctl.quickack``) in
    its handler / ``connection_made``."""
    return _run_loop(lambda: _asyncio_serve(ctx, client, api, remedy), uvloop)


# ------------------------------------------ aiohttp and websockets on uvloop

GET = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def run_aiohttp(ctx: ssl.SSLContext, client: Client) -> Any:
    """An aiohttp ``web.Application`` answering ``GET /`` on uvloop (a
    client of this server sends ``GET``, see ``HTTP_SERVERS``)."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def serve() -> Any:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, LOCALHOST, 0, ssl_context=ctx)
            await site.start()
            return await _client_in_thread(client, runner.addresses[0][1])
        finally:
            await runner.cleanup()

    return _run_loop(serve, uvloop=True)


def run_websockets(ctx: ssl.SSLContext, client: Client) -> Any:
    """A websockets (asyncio implementation) server on uvloop; a plain
    ``GET`` gets its HTTP error response, the first response timed."""
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as ws_serve

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async def serve() -> Any:
        async with ws_serve(handler, LOCALHOST, 0, ssl=ctx) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            return await _client_in_thread(client, port)

    return _run_loop(serve, uvloop=True)


# --------------------------------------------------------------------- trio


def run_trio(ctx: ssl.SSLContext, client: Client) -> Any:
    """The same server with ``trio.SSLStream`` over ``trio.serve_listeners``."""
    import trio

    async def main() -> Any:
        listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
        port = listeners[0].socket.getsockname()[1]

        async def serve_one(tcp: Any) -> None:
            stream = trio.SSLStream(tcp, ctx, server_side=True)
            try:
                data = b""
                while b"\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                await stream.send_all(RESPONSE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_one, listeners)
            with trio.fail_after(TIMEOUT):
                result = await trio.to_thread.run_sync(client, port)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


SERVERS: dict[str, Callable[..., Any]] = {
    "asyncio start_server": lambda ctx, client, remedy: run_asyncio(
        ctx, client, api="start_server", remedy=remedy
    ),
    "asyncio create_server": lambda ctx, client, remedy: run_asyncio(
        ctx, client, api="create_server", remedy=remedy
    ),
    "uvloop start_server": lambda ctx, client, remedy: run_asyncio(
        ctx, client, api="start_server", uvloop=True, remedy=remedy
    ),
    "uvloop create_server": lambda ctx, client, remedy: run_asyncio(
        ctx, client, api="create_server", uvloop=True, remedy=remedy
    ),
    "trio": lambda ctx, client, remedy: run_trio(ctx, client),
    "uvloop aiohttp": lambda ctx, client, remedy: run_aiohttp(ctx, client),
    "uvloop websockets": lambda ctx, client, remedy: run_websockets(ctx, client),
}
HTTP_SERVERS = ("uvloop aiohttp", "uvloop websockets")  # their clients send GET
NO_REMEDY = ("trio", *HTTP_SERVERS)  # hooked by tlsctl: no remedy variant
VARIANTS = ("stock", "patched", "patched+install", "patched+remedy")


def measure(server: str, variant: str, nodelay: bool, connections: int) -> list[float]:
    """One cell, in this process (``patched+install`` installs the hooks)."""
    certs = scenarios.make_certs(client_sans=1)
    ctx = scenarios.server_context(certs)
    if variant != "stock":
        tlsctl.patch(ctx)
    if variant == "patched+install":
        _quickack.install()
    client_ctx = scenarios.client_context(certs)

    def client(port: int) -> list[float]:
        if server in HTTP_SERVERS:
            return nagle_client(
                port,
                client_ctx,
                connections,
                nodelay=nodelay,
                request=GET,
                response=None,
            )
        return nagle_client(port, client_ctx, connections, nodelay=nodelay)

    result: list[float] = SERVERS[server](ctx, client, variant == "patched+remedy")
    return result


def _cell(server: str, variant: str, nodelay: bool, connections: int) -> list[float]:
    command = [sys.executable, __file__, "--cell", server, variant]
    command += [str(int(nodelay)), "--connections", str(connections)]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{server} / {variant}: {proc.stderr.strip()}")
    values: list[float] = json.loads(proc.stdout)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--cell", nargs=3, metavar=("SERVER", "VARIANT", "NODELAY"))
    args = parser.parse_args()
    if args.cell:
        server, variant, nodelay = args.cell
        print(json.dumps(measure(server, variant, nodelay == "1", args.connections)))
        return 0
    print(
        f"first-response latency, ms, {args.connections} connections per cell "
        f"(median [min - max]); Python {sys.version.split()[0]}, "
        f"{ssl.OPENSSL_VERSION}"
    )
    print(f"{'server':22} {'variant':16} {'Nagle client':>24} {'NODELAY client':>24}")
    for server in SERVERS:
        for variant in VARIANTS:
            if variant == "patched+remedy" and server in NO_REMEDY:
                continue
            cells = []
            for nodelay in (False, True):
                try:
                    ms = [
                        v * 1e3
                        for v in _cell(server, variant, nodelay, args.connections)
                    ]
                except RuntimeError as exc:
                    cells.append(f"error: {str(exc)[-40:]}")
                    continue
                cells.append(
                    f"{statistics.median(ms):6.2f} [{min(ms):5.2f} - {max(ms):5.2f}]"
                )
            print(f"{server:22} {variant:16} {cells[0]:>24} {cells[1]:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
