"""Real servers from the test extra, run as their users run them: uvicorn,
hypercorn and gunicorn (sync, gthread) as unmodified CLIs with two workers
under ``python -m tlsctl run``; aiohttp and tornado through their own
context parameters and through ``tlsctl.inject_into_ssl()``; websockets
through ``serve(..., ssl=ctx)``.  docs/servers.md has the recipes.  The CLI
servers are here; the in-process ones are in test_servers_in_process.py, and
the clients and counting both use in _server_helpers.py.

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

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import _server_helpers as common
from _server_helpers import Figures, _installed, _one_way_posts, _reconnects, _settle
from conftest import assert_stall_free, needs_c_defer, stall_free_batches
from quickack_latency import nagle_client
from quickack_servers import console_script, free_port, stop_group
from tlsctl import TicketKey, scenarios

# The real servers run the product as deployed (sockets, the launcher, key
# files): the binding's mechanisms.  The python mechanism's frameworks are
# test_pyhold's.
pytestmark = [needs_c_defer]

WORKERS = 2

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
import asyncio

async def app(scope, receive, send):
    if scope["type"] == "lifespan":  # once per worker, before it serves
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                record("loop", type(asyncio.get_running_loop()).__module__)
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


# --- files --------------------------------------------------------------------


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


# --- CLI servers in their own process group -----------------------------------


def _server_argv(kind: str, port: int, files: Files) -> list[str]:
    bind = f"127.0.0.1:{port}"
    cert, key = str(files.cert), str(files.key)
    if kind.startswith("uvicorn"):  # uvicorn (--http auto), uvicorn-h11
        return [
            *console_script("uvicorn"),
            *(["--http", "h11"] if kind == "uvicorn-h11" else []),
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
    if kind.startswith("hypercorn"):  # hypercorn, hypercorn-uvloop
        return [
            *console_script("hypercorn"),
            *(["--worker-class", "uvloop"] if kind == "hypercorn-uvloop" else []),
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
        *console_script("gunicorn"),
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
        port = free_port()
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
            stop_group(proc, common.STOP_TIMEOUT)
            continue
        except BaseException:
            stop_group(proc, common.STOP_TIMEOUT)
            raise
        break
    try:
        yield port, log
    finally:
        stop_group(proc, common.STOP_TIMEOUT)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, log: Path, out: Path, last_try: bool
) -> None:
    """Poll, with a deadline, until the port accepts (connections then wait
    in the backlog) and every worker's application is up."""
    deadline = time.monotonic() + common.START_TIMEOUT

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


def _measureconsole_script(
    kind: str, files: Files, tmp_path: Path, certs: scenarios.Certs, launcher: bool
) -> Figures:
    with _cli_server(kind, files, tmp_path, launcher=launcher) as (port, log):
        _one_way_posts(port, scenarios.client_context(certs))
        _settle(lambda: len(_records(log, "post")), common.UPLOADS, launcher)
        posts = _records(log, "post")
        resumed = _reconnects(port, scenarios.client_context(certs))
    return Figures(sum(int(p) == common.UPLOAD for p in posts), len(posts), resumed)


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
    stock = _measureconsole_script(kind, files, tmp_path, certs, launcher=False)
    patched = _measureconsole_script(kind, files, tmp_path, certs, launcher=True)
    print(f"\n{kind} x{WORKERS} stock:   {stock}\n{kind} x{WORKERS} patched: {patched}")
    assert patched.complete == common.UPLOADS, patched
    assert patched.resumed >= common.RECONNECTS - 1, patched


_GET = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="no TCP_QUICKACK (Linux only)"
)
@pytest.mark.parametrize("kind", ["uvicorn", "uvicorn-h11", "hypercorn-uvloop"])
def test_cli_server_on_uvloop_answers_without_stall(
    kind: str, files: Files, tmp_path: Path, certs: scenarios.Certs
) -> None:
    """uvicorn (``--loop auto`` picks uvloop, which the test extra installs;
    ``--http auto`` picks httptools, also installed, or h11) and ``hypercorn
    --worker-class uvloop`` under the launcher: a client without TCP_NODELAY
    gets its first response without the ~40 ms delayed-ACK stall (tlsctl
    hooks their protocols' connection_made; uvloop itself has no hook)."""
    _installed("uvloop")
    _installed(kind.split("-")[0])
    if kind == "uvicorn":
        _installed("httptools")
    with _cli_server(kind, files, tmp_path, launcher=True) as (port, log):
        client = scenarios.client_context(certs)
        batches = stall_free_batches(
            lambda: nagle_client(port, client, 5, request=_GET, response=None)
        )
    assert set(_records(log, "loop")) == {"uvloop"}  # every worker's loop
    assert_stall_free(batches)
