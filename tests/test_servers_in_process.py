"""Real servers in this process, on their own event loop in a thread:
aiohttp and tornado through their own context parameters and through
``tlsctl.inject_into_ssl()``; websockets through ``serve(..., ssl=ctx)``.
test_servers.py's docstring describes the clients and the figures; the
CLI servers under the launcher are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import _server_helpers as common
import tlsctl
from _server_helpers import Figures, _installed, _one_way_posts, _reconnects, _settle
from conftest import needs_c_defer
from tlsctl import _inject, scenarios

# The real servers run the product as deployed (sockets, the launcher, key
# files): the binding's mechanisms.  The python mechanism's frameworks are
# test_pyhold's.
pytestmark = [needs_c_defer]


# --- aiohttp and tornado, in this process -------------------------------------


@dataclass
class InProcess:
    port: int
    posts: list[int]  # body bytes the handler got, one entry per POST


def _serve_in_thread(
    start: Callable[[list[int]], Any],
) -> Iterator[InProcess]:
    """Run ``start(posts)`` (a coroutine function that starts a server and
    returns ``(port, stop)``, ``stop`` an async clean-up) on a fresh
    asyncio loop in a thread; yield, then stop it."""
    loop = asyncio.new_event_loop()
    posts: list[int] = []
    started: list[Any] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.append(loop.run_until_complete(start(posts)))
        except BaseException as exc:
            started.append(exc)
        ready.set()
        if isinstance(started[0], BaseException):
            return
        loop.run_forever()
        loop.run_until_complete(started[0][1]())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(common.START_TIMEOUT), "the server did not start"
        if isinstance(started[0], BaseException):
            raise started[0]
        yield InProcess(started[0][0], posts)
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(common.STOP_TIMEOUT)
        assert not thread.is_alive(), "the server thread did not stop"
        loop.close()


@contextlib.contextmanager
def _aiohttp(ctx: ssl.SSLContext) -> Iterator[InProcess]:
    """aiohttp's ``AppRunner`` + ``TCPSite(ssl_context=ctx)``."""
    from aiohttp import web

    async def start(posts: list[int]) -> tuple[int, Callable[[], Any]]:
        async def upload(request: web.Request) -> web.Response:
            got = 0
            try:
                while chunk := await request.content.read(65536):
                    got += len(chunk)
            finally:
                posts.append(got)
            return web.Response(text=f"got {got}\n")

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hello from aiohttp\n")

        app = web.Application()
        app.router.add_post("/upload", upload)
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        return runner.addresses[0][1], runner.cleanup

    yield from _serve_in_thread(start)


@contextlib.contextmanager
def _tornado(ctx: ssl.SSLContext) -> Iterator[InProcess]:
    """tornado's ``HTTPServer(app, ssl_options=ctx)``."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    async def start(posts: list[int]) -> tuple[int, Callable[[], Any]]:
        class Upload(tornado.web.RequestHandler):
            def post(self) -> None:
                posts.append(len(self.request.body))
                self.write(f"got {len(self.request.body)}\n")

        class Hello(tornado.web.RequestHandler):
            def get(self) -> None:
                self.write("hello from tornado\n")

        app = tornado.web.Application([("/upload", Upload), ("/", Hello)])
        server = tornado.httpserver.HTTPServer(app, ssl_options=ctx)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)

        async def stop() -> None:
            server.stop()
            await server.close_all_connections()

        return sockets[0].getsockname()[1], stop

    yield from _serve_in_thread(start)


IN_PROCESS = {"aiohttp": _aiohttp, "tornado": _tornado}


def _measure_in_process(
    framework: str, ctx: ssl.SSLContext, certs: scenarios.Certs, patched: bool
) -> Figures:
    with IN_PROCESS[framework](ctx) as server:
        _one_way_posts(server.port, scenarios.client_context(certs))
        _settle(lambda: len(server.posts), common.UPLOADS, patched)
        posts = list(server.posts)
        resumed = _reconnects(server.port, scenarios.client_context(certs))
    return Figures(sum(p == common.UPLOAD for p in posts), len(posts), resumed)


@pytest.mark.parametrize("framework", list(IN_PROCESS))
def test_framework_with_a_patched_context(
    framework: str, certs: scenarios.Certs
) -> None:
    """``tlsctl.patch(ctx)``, then the framework's own context parameter."""
    _installed(framework)
    stock = _measure_in_process(
        framework, scenarios.server_context(certs), certs, patched=False
    )
    ctx = tlsctl.patch(scenarios.server_context(certs))
    patched = _measure_in_process(framework, ctx, certs, patched=True)
    print(f"\n{framework} stock:   {stock}\n{framework} patched: {patched}")
    assert patched.complete == common.UPLOADS, patched
    assert patched.resumed == common.RECONNECTS, patched


@pytest.mark.parametrize("framework", list(IN_PROCESS))
def test_framework_after_inject_into_ssl(
    framework: str, certs: scenarios.Certs
) -> None:
    """``tlsctl.inject_into_ssl()`` from application code; the framework
    gets a context nobody patched."""
    _installed(framework)
    tlsctl.inject_into_ssl()
    try:
        ctx = scenarios.server_context(certs)
        injected = _measure_in_process(framework, ctx, certs, patched=True)
        adopted = _inject.injected()
    finally:
        tlsctl.extract_from_ssl()
    print(f"\n{framework} after inject_into_ssl(): {injected}")
    assert adopted is not None and adopted["contexts"] >= 1
    assert injected.complete == common.UPLOADS, injected
    assert injected.resumed == common.RECONNECTS, injected


# --- websockets ---------------------------------------------------------------


@contextlib.contextmanager
def _websockets(ctx: ssl.SSLContext) -> Iterator[InProcess]:
    """websockets' ``serve(handler, host, port, ssl=ctx)``."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def start(posts: list[int]) -> tuple[int, Callable[[], Any]]:
        async def upload(ws: ServerConnection) -> None:
            got = 0
            try:
                async for message in ws:
                    got += len(message)
            except ConnectionClosed:
                pass  # the clients close without a close frame
            finally:
                posts.append(got)

        server = await serve(upload, "127.0.0.1", 0, ssl=ctx, max_size=None)

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        return next(iter(server.sockets)).getsockname()[1], stop

    yield from _serve_in_thread(start)


_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
# One masked binary frame (mask key 0: the payload goes as is).
_FRAME = (
    b"\x82\xff" + common.UPLOAD.to_bytes(8, "big") + b"\0" * 4 + b"w" * common.UPLOAD
)


def _switched(conn: ssl.SSLSocket) -> None:
    """Send the upgrade request and read the whole 101 response."""
    conn.sendall(_UPGRADE)
    common.read_head(conn, b"HTTP/1.1 101")


def _ws_uploads(port: int, client: ssl.SSLContext, *, pipelined: bool) -> None:
    """One 256 KiB message per connection, then close without reading; after
    reading the 101, or pipelined with the upgrade request (the 101 is then
    left unread)."""
    for _ in range(common.UPLOADS):
        with socket.create_connection(
            ("127.0.0.1", port), timeout=common.IO_TIMEOUT
        ) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as conn:
                if pipelined:
                    conn.sendall(_UPGRADE + _FRAME)
                else:
                    _switched(conn)
                    conn.sendall(_FRAME)


def _measure_websockets(
    ctx: ssl.SSLContext, certs: scenarios.Certs, *, pipelined: bool, patched: bool
) -> Figures:
    with _websockets(ctx) as server:
        _ws_uploads(server.port, scenarios.client_context(certs), pipelined=pipelined)
        # A pipelining client loses data even when patched: do not wait long.
        _settle(lambda: len(server.posts), common.UPLOADS, patched and not pipelined)
        posts = list(server.posts)
        resumed = _reconnects(server.port, scenarios.client_context(certs), _switched)
    return Figures(sum(p == common.UPLOAD for p in posts), len(posts), resumed)


def test_websockets_with_a_patched_context(certs: scenarios.Certs) -> None:
    """``serve(..., ssl=tlsctl.patch(ctx))``: the tickets go with the 101,
    which a client reads before its first message.  A client that pipelines
    its first message with the upgrade request leaves the 101 unread and
    loses data whatever the tickets do: printed, not asserted."""
    _installed("websockets")
    figures = {}
    for pipelined in (False, True):
        for label in ("stock", "patched"):
            ctx = scenarios.server_context(certs)
            if label == "patched":
                tlsctl.patch(ctx)
            figures[label, pipelined] = _measure_websockets(
                ctx, certs, pipelined=pipelined, patched=label == "patched"
            )
    for (label, pipelined), f in figures.items():
        client = "pipelined, 101 unread" if pipelined else "reads the 101 first"
        print(f"\nwebsockets {label:7} ({client}): {f}", end="")
    print()
    patched = figures["patched", False]
    assert patched.complete == common.UPLOADS, patched
    assert patched.resumed == common.RECONNECTS, patched
