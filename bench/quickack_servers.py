"""First-response latency of a client without TCP_NODELAY against real
server command lines, stock and under ``python -m tlsctl run``.

    python bench/quickack_servers.py [--connections 20]

For each server (uvicorn on uvloop, which ``--loop auto`` picks when it is
installed, with httptools and with h11, and on asyncio; hypercorn's asyncio
and uvloop workers; gunicorn's sync worker) it starts the command in a fresh
process group on 127.0.0.1, waits until its port accepts, makes
``--connections`` sequential TLS 1.3 connections with Nagle on
(``quickack_latency.nagle_client``: an HTTP GET with ``Connection: close``,
timed from the request's write to the first response byte), and stops the
group.  It prints median [min - max] in ms.  The figures are
docs/servers.md's table.  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from quickack_latency import nagle_client
from tlsctl import scenarios

GET = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

ASGI = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\\n"})
"""
WSGI = """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "3")])
    return [b"ok\\n"]
"""

# name -> argv after the console script, {port}, {cert}, {key} filled in
SERVERS: dict[str, list[str]] = {
    "uvicorn uvloop httptools": [
        *("uvicorn", "asgi:app", "--port", "{port}"),
        *("--loop", "uvloop", "--http", "httptools"),
    ],
    "uvicorn uvloop h11": [
        *("uvicorn", "asgi:app", "--port", "{port}"),
        *("--loop", "uvloop", "--http", "h11"),
    ],
    "uvicorn asyncio": [
        *("uvicorn", "asgi:app", "--port", "{port}"),
        *("--loop", "asyncio", "--http", "h11"),
    ],
    "hypercorn asyncio": ["hypercorn", "--bind", "127.0.0.1:{port}", "asgi:app"],
    "hypercorn -k uvloop": [
        *("hypercorn", "-k", "uvloop", "--bind", "127.0.0.1:{port}", "asgi:app"),
    ],
    "gunicorn sync": ["gunicorn", "--bind", "127.0.0.1:{port}", "wsgi:app"],
}
TLS_OPTIONS = {
    "uvicorn": [
        "--host",
        "127.0.0.1",
        "--ssl-certfile",
        "{cert}",
        "--ssl-keyfile",
        "{key}",
    ],
    "hypercorn": ["--certfile", "{cert}", "--keyfile", "{key}"],
    "gunicorn": ["--certfile", "{cert}", "--keyfile", "{key}"],
}


# --- server commands in their own process group (tests/test_servers.py too)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_script(name: str) -> list[str]:
    """The server's console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout``;
    return when no process of it is left."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _alive(pgid):
                return
            time.sleep(0.02)
    raise RuntimeError(f"process group {pgid} survived SIGKILL")


def _argv(name: str, port: int, folder: Path, patched: bool) -> list[str]:
    words = SERVERS[name] + TLS_OPTIONS[SERVERS[name][0]]
    fill = {
        "port": str(port),
        "cert": str(folder / "cert.pem"),
        "key": str(folder / "key.pem"),
    }
    argv = [w.format(**fill) for w in words]
    argv = console_script(argv[0]) + argv[1:]
    return [sys.executable, "-m", "tlsctl", "run", "--", *argv] if patched else argv


@contextlib.contextmanager
def _serving(argv: list[str], folder: Path, port: int) -> Iterator[None]:
    with open(folder / "server.out", "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (folder / "server.out").read_text()[-2000:]
                raise RuntimeError(f"{argv[0]} did not start:\n{tail}")
            time.sleep(0.05)
        yield
    finally:
        stop_group(proc)


def measure(
    name: str, patched: bool, connections: int, folder: Path, client_ctx: ssl.SSLContext
) -> list[float]:
    port = free_port()
    with _serving(_argv(name, port, folder, patched), folder, port):
        return nagle_client(port, client_ctx, connections, request=GET, response=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    certs = scenarios.make_certs(client_sans=1)
    client_ctx = scenarios.client_context(certs)
    print(
        f"first-response latency, ms, {args.connections} Nagle connections "
        f"(median [min - max]); Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        chain = b"".join(pem.bytes() for pem in certs.server.cert_chain_pems)
        (folder / "cert.pem").write_bytes(chain)
        certs.server.private_key_pem.write_to_path(folder / "key.pem")
        (folder / "asgi.py").write_text(ASGI)
        (folder / "wsgi.py").write_text(WSGI)
        for name in SERVERS:
            cells = []
            for patched in (False, True):
                try:
                    ms = [
                        v * 1e3
                        for v in measure(
                            name, patched, args.connections, folder, client_ctx
                        )
                    ]
                except (RuntimeError, OSError) as exc:
                    cells.append(f"error: {str(exc)[:40]!r}")
                    continue
                cells.append(
                    f"{statistics.median(ms):6.2f} [{min(ms):5.2f} - {max(ms):5.2f}]"
                )
            print(
                f"{name:24} stock {cells[0]:>24}   tlsctl run {cells[1]:>24}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
