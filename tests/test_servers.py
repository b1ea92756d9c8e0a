"""Real servers from the test extra, run as their users run them: uvicorn,
hypercorn and gunicorn (sync, gthread) as unmodified CLIs with two workers
under ``python -m tlsctl run``; aiohttp and tornado through their own
context parameters and through ``tlsctl.inject_into_ssl()``; websockets
through ``serve(..., ssl=ctx)``.  docs/servers.md has the recipes.

Each server's application reads whole request bodies and records how many
bytes it got.  Two clients drive it over 127.0.0.1:

* one-way uploads: a full HTTP POST with a 256 KiB body, then close without
  reading (stock servers' unread tickets reset the connection and the
  server's kernel drops upload data);
* reconnects: GET, read the whole response, reconnect with the newest
  session; ``session_reused`` is counted on the client side.

(websockets: the same 256 KiB as one message after the 101; the reconnects
read the 101.)  CLI servers run in their own process group, which is
always terminated (SIGTERM, then SIGKILL after a deadline); in-process
servers run on their own event loop in a thread, always stopped and joined.

The same command without the launcher (or an unpatched context) gives the
stock figures, printed next to the patched ones (``pytest -s``) but not
asserted: they vary from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import needs_c_defer
from tlsctl import TicketKey, _inject, scenarios

# The real servers run the product as deployed (sockets, the launcher, key
# files): the binding's mechanisms.  The python mechanism's frameworks are
# test_pyhold's.
pytestmark = [needs_c_defer]

UPLOAD = 256 * 1024
UPLOADS = 30
RECONNECTS = 20
WORKERS = 2
START_TIMEOUT = 60.0  # a cold start of two spawned workers on a busy CI box
STOP_TIMEOUT = 10.0
SETTLE = 1.5  # no new record for this long: the server is done
IO_TIMEOUT = 30.0

# The applications the CLIs serve, written next to the certificates.  Each
# appends one line per event to the file named by TLSCTL_TEST_LOG: "up PID"
# when a worker is ready to serve, "post BYTES" when a POST ended (the body
# bytes that arrived, however it ended).  O_APPEND writes of one short line
# do not interleave between the workers.
_RECORD = """\
import os

LOG = os.environ["TLSCTL_TEST_LOG"]


def record(*words):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (" ".join(map(str, words)) + "\\n").encode())
    finally:
        os.close(fd)
"""

ASGI_APP = (
    _RECORD
    + """

async def app(scope, receive, send):
    if scope["type"] == "lifespan":  # once per worker, before it serves
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                record("up", os.getpid())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    got = 0
    if scope["method"] == "POST":
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                got += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        finally:
            record("post", got)
    body = b"hello from asgi\\n" if scope["method"] == "GET" else b"got %d\\n" % got
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
"""
)

WSGI_APP = (
    _RECORD
    + """

record("up", os.getpid())  # gunicorn imports the app in each worker


def app(environ, start_response):
    got = 0
    if environ["REQUEST_METHOD"] == "POST":
        want = int(environ.get("CONTENT_LENGTH") or 0)
        try:
            while got < want:
                chunk = environ["wsgi.input"].read(min(65536, want - got))
                if not chunk:
                    break
                got += len(chunk)
        finally:
            record("post", got)
        body = b"got %d\\n" % got
    else:
        body = b"hello from wsgi\\n"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""
)


# --- files, clients and counting ---------------------------------------------


@dataclass
class Files:
    folder: Path
    cert: Path  # the server's certificate chain
    key: Path  # its private key
    ticket_key: Path  # a tlsctl ticket key file for --ticket-keys


@pytest.fixture(scope="module")
def files(certs: scenarios.Certs, tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("servers")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in certs.server.cert_chain_pems))
    certs.server.private_key_pem.write_to_path(str(key))
    ticket_key = folder / "ticket.key"
    ticket_key.write_bytes(TicketKey.generate().export())
    ticket_key.chmod(0o600)
    (folder / "asgi_app.py").write_text(ASGI_APP)
    (folder / "wsgi_app.py").write_text(WSGI_APP)
    return Files(folder, cert, key, ticket_key)


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


def _read_response(conn: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 response with a Content-Length; its body.  Not read to
    EOF: a close without close_notify makes OpenSSL 3.5 drop the session."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"incomplete response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
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


# --- CLI servers in their own process group -----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(name: str) -> list[str]:
    """The server's console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def _server_argv(kind: str, port: int, files: Files) -> list[str]:
    bind = f"127.0.0.1:{port}"
    cert, key = str(files.cert), str(files.key)
    if kind == "uvicorn":
        return [
            *_cli("uvicorn"),
            "asgi_app:app",
            "--app-dir",
            str(files.folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(WORKERS),
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
            "--log-level",
            "warning",
        ]
    if kind == "hypercorn":
        return [
            *_cli("hypercorn"),
            "--workers",
            str(WORKERS),
            "--bind",
            bind,
            "--certfile",
            cert,
            "--keyfile",
            key,
            "asgi_app:app",
        ]
    worker_class = kind.split("-")[1]  # gunicorn-sync, gunicorn-gthread
    return [
        *_cli("gunicorn"),
        "--chdir",
        str(files.folder),
        "--workers",
        str(WORKERS),
        "--worker-class",
        worker_class,
        *(["--threads", "4"] if worker_class == "gthread" else []),
        "--bind",
        bind,
        "--certfile",
        cert,
        "--keyfile",
        key,
        "wsgi_app:app",
    ]


def _records(log: Path, kind: str) -> list[str]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split()[1] for line in lines if line.startswith(kind + " ")]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it after a deadline;
    return when no process of it is left."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _alive(pgid):
                return
            time.sleep(0.02)
    raise AssertionError(f"process group {pgid} survived SIGKILL")


class _PortTaken(Exception):
    """The free port was taken before the server bound it: try another."""


@contextlib.contextmanager
def _cli_server(
    kind: str, files: Files, tmp_path: Path, *, launcher: bool
) -> Iterator[tuple[int, Path]]:
    """Start the server CLI (under ``python -m tlsctl run --ticket-keys``
    when ``launcher``), wait until its port accepts and every worker is up;
    yield the port and the application's log.  Always stops the group."""
    label = f"{kind}-{'patched' if launcher else 'stock'}"
    log, output = tmp_path / f"{label}.log", tmp_path / f"{label}.out"
    env = dict(os.environ, TLSCTL_TEST_LOG=str(log))
    for attempt in range(3):
        port = _free_port()
        argv = _server_argv(kind, port, files)
        if launcher:
            argv = [
                sys.executable,
                *("-m", "tlsctl", "run", "--ticket-keys", str(files.ticket_key)),
                "--",
                *argv,
            ]
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=files.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_ready(proc, port, log, output, last_try=attempt == 2)
        except _PortTaken:
            _stop_group(proc)
            continue
        except BaseException:
            _stop_group(proc)
            raise
        break
    try:
        yield port, log
    finally:
        _stop_group(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, log: Path, out: Path, last_try: bool
) -> None:
    """Poll, with a deadline, until the port accepts (connections then wait
    in the backlog) and every worker's application is up."""
    deadline = time.monotonic() + START_TIMEOUT

    def check() -> None:
        if proc.poll() is not None:
            text = out.read_text()
            if "in use" in text and not last_try:
                raise _PortTaken
            raise AssertionError(f"server exited:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            text = out.read_text()[-3000:]
            raise AssertionError(f"server did not start in time:\n{text}")
        time.sleep(0.05)

    while True:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        check()
    while len(set(_records(log, "up"))) < WORKERS:
        check()


def _measure_cli(
    kind: str, files: Files, tmp_path: Path, certs: scenarios.Certs, launcher: bool
) -> Figures:
    with _cli_server(kind, files, tmp_path, launcher=launcher) as (port, log):
        _one_way_posts(port, scenarios.client_context(certs))
        _settle(lambda: len(_records(log, "post")), UPLOADS, launcher)
        posts = _records(log, "post")
        resumed = _reconnects(port, scenarios.client_context(certs))
    return Figures(sum(int(p) == UPLOAD for p in posts), len(posts), resumed)


CLI_SERVERS = {
    "uvicorn": "uvicorn",
    "hypercorn": "hypercorn",
    "gunicorn-sync": "gunicorn",
    "gunicorn-gthread": "gunicorn",
}


@pytest.mark.parametrize("kind", list(CLI_SERVERS))
def test_cli_server_under_the_launcher(
    kind: str, files: Files, tmp_path: Path, certs: scenarios.Certs
) -> None:
    """``python -m tlsctl run --ticket-keys FILE -- <server CLI>`` with two
    workers: every one-way upload arrives whole, and reconnects resume
    whichever worker they reach (gunicorn's sync and gthread workers even
    make a new context per connection)."""
    _installed(CLI_SERVERS[kind])
    stock = _measure_cli(kind, files, tmp_path, certs, launcher=False)
    patched = _measure_cli(kind, files, tmp_path, certs, launcher=True)
    print(f"\n{kind} x{WORKERS} stock:   {stock}\n{kind} x{WORKERS} patched: {patched}")
    assert patched.complete == UPLOADS, patched
    assert patched.resumed >= RECONNECTS - 1, patched


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
        assert ready.wait(START_TIMEOUT), "the server did not start"
        if isinstance(started[0], BaseException):
            raise started[0]
        yield InProcess(started[0][0], posts)
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
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
        _settle(lambda: len(server.posts), UPLOADS, patched)
        posts = list(server.posts)
        resumed = _reconnects(server.port, scenarios.client_context(certs))
    return Figures(sum(p == UPLOAD for p in posts), len(posts), resumed)


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
    assert patched.complete == UPLOADS, patched
    assert patched.resumed == RECONNECTS, patched


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
    assert injected.complete == UPLOADS, injected
    assert injected.resumed == RECONNECTS, injected


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
_FRAME = b"\x82\xff" + UPLOAD.to_bytes(8, "big") + b"\0" * 4 + b"w" * UPLOAD


def _switched(conn: ssl.SSLSocket) -> None:
    """Send the upgrade request and read the whole 101 response."""
    conn.sendall(_UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError(f"incomplete 101 response: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head


def _ws_uploads(port: int, client: ssl.SSLContext, *, pipelined: bool) -> None:
    """One 256 KiB message per connection, then close without reading; after
    reading the 101, or pipelined with the upgrade request (the 101 is then
    left unread)."""
    for _ in range(UPLOADS):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
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
        _settle(lambda: len(server.posts), UPLOADS, patched and not pipelined)
        posts = list(server.posts)
        resumed = _reconnects(server.port, scenarios.client_context(certs), _switched)
    return Figures(sum(p == UPLOAD for p in posts), len(posts), resumed)


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
    assert patched.complete == UPLOADS, patched
    assert patched.resumed == RECONNECTS, patched
