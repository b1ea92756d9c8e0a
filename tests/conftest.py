"""Shared fixtures: throwaway certificates, contexts, memory-BIO pairs.

Everything is real: OpenSSL handshakes over MemoryBIO or 127.0.0.1 sockets,
certificates from trustme.  Nothing from ssl is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from tlsctl import scenarios
from tlsctl.scenarios import TicketCounter

# The memory-BIO pair (BioPair, connect) is bench/_pairs.py, shared with the
# benchmark and the soak.  pytest puts bench/ on sys.path (pyproject's
# pythonpath); child processes that import conftest with only tests/ on their
# path get it here.
_BENCH = str(Path(__file__).resolve().parent.parent / "bench")
if _BENCH not in sys.path:
    sys.path.append(_BENCH)
from _pairs import BioPair as BioPair  # noqa: E402  (re-exported to the tests)
from _pairs import connect as connect  # noqa: E402

TLS_VERSIONS = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def pytest_report_header(config: Any) -> list[str]:
    info = tlsctl.info()
    return [
        f"python: {sys.version.split()[0]}, ssl: {ssl.OPENSSL_VERSION}",
        f"tlsctl: bound={info.bound} mechanism={info.mechanism} "
        f"library={info.library} reason={info.reason}",
    ]


needs_native = pytest.mark.skipif(
    not tlsctl.info().native_tickets,
    reason="needs native ticket issuing (SSL_new_session_ticket, OpenSSL 3.0+)",
)
native_defer = pytest.mark.skipif(
    tlsctl.info().mechanism != "native",
    reason="defer does not use native issuing here "
    f"(mechanism: {tlsctl.info().mechanism})",
)
needs_defer = pytest.mark.skipif(
    tlsctl.info().mechanism is None,
    reason="needs a defer mechanism (native, stash or python)",
)

# --- tlsctl-pymech: interpreters tlsctl cannot bind, and the python axis ----
_INFO = tlsctl.info()
needs_binding = pytest.mark.skipif(
    not _INFO.bound,
    reason=f"needs tlsctl's binding to OpenSSL; not bound here: {_INFO.reason}",
)
needs_socket_defer = pytest.mark.skipif(
    _INFO.mechanism in (None, "python"),
    reason="defers tickets on ssl sockets: with the python mechanism (no "
    "binding, or TLSCTL_MECHANISM=python) sockets are stock",
)
needs_c_defer = pytest.mark.skipif(
    _INFO.mechanism in (None, "python"),
    reason="defers through the binding (native or stash), not the python mechanism",
)
needs_refcounting = pytest.mark.skipif(
    sys.implementation.name != "cpython",
    reason="relies on CPython's reference counting (freed at del)",
)


def require_binding_for(
    tickets: str = "defer", count: int | None = None, renew_on_resume: bool = True
) -> None:
    """Skip the calling test where these ``patch()`` settings need the
    binding and tlsctl is not bound (``NotBoundError`` there)."""
    if not _INFO.bound and (
        tickets == "suppress" or count is not None or not renew_on_resume
    ):
        pytest.skip(
            f"tickets={tickets!r} count={count} renew_on_resume={renew_on_resume} "
            f"needs tlsctl's binding; not bound here: {_INFO.reason}"
        )


# Whole modules: every test in them needs the binding (ticket callbacks and
# keys, their C) or deferred sockets.  Mixed modules
# mark their tests themselves.
_MODULE_MARKS = {
    "test_hardening": needs_binding,
    "test_inject": needs_binding,  # test_pyhold covers injection unbound
    "test_keyfiles": needs_binding,
    "test_keyfiles_lifetime": needs_binding,
    "test_lifecycle": needs_binding,
    "test_resume_amplification": needs_binding,
    "test_statemachine": needs_c_defer,  # a model of the bound mechanisms
    "test_ticket_callbacks": needs_binding,
    "test_ticket_keys": needs_binding,
    "test_http_server": needs_socket_defer,
    "test_openssl_cli": needs_socket_defer,
    "test_scenarios": needs_socket_defer,
    "test_sockets": needs_socket_defer,
    "test_wire": needs_socket_defer,
    "test_bench": needs_socket_defer,
}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        mark = _MODULE_MARKS.get(getattr(module, "__name__", ""))
        if mark is not None:
            item.add_marker(mark)


# --- end tlsctl-pymech -------------------------------------------------------


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once the tests are selected, a module's ``start_early(item)`` may
    start a slow child for an item that will run, so that it overlaps the
    rest of the suite (test_stdlib_suites: CPython's test_ssl, which mostly
    waits)."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return  # nothing will run, or a pytest-xdist worker (the tests spread)
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_early", None)
        if start is not None:
            start(item)


@pytest.fixture(scope="session")
def certs() -> scenarios.Certs:
    return scenarios.make_certs(client_sans=400)


@pytest.fixture(params=list(TLS_VERSIONS))
def tls_version(request: Any) -> ssl.TLSVersion:
    return TLS_VERSIONS[request.param]


@pytest.fixture
def server_ctx(certs: scenarios.Certs) -> Callable[..., ssl.SSLContext]:
    def make(**kw: Any) -> ssl.SSLContext:
        return scenarios.server_context(certs, **kw)

    return make


@pytest.fixture
def client_ctx(certs: scenarios.Certs) -> Callable[..., ssl.SSLContext]:
    def make(**kw: Any) -> ssl.SSLContext:
        return scenarios.client_context(certs, **kw)

    return make


bio_pair = BioPair  # the tests' name for a fresh (not handshaken) pair


def split_records(data: bytes) -> list[bytes]:
    """Split a byte stream into whole TLS records (5-byte header + body)."""
    records = []
    while data:
        assert len(data) >= 5, "truncated record header"
        length = int.from_bytes(data[3:5], "big")
        assert len(data) >= 5 + length, "truncated record"
        records.append(data[: 5 + length])
        data = data[5 + length :]
    return records


@pytest.fixture
def pair_factory() -> Iterator[Callable[..., BioPair]]:
    yield bio_pair


@pytest.fixture
def counted_pair(
    server_ctx: Callable[..., ssl.SSLContext],
    client_ctx: Callable[..., ssl.SSLContext],
) -> Callable[..., tuple[BioPair, TicketCounter]]:
    """Make a handshaken memory-BIO pair and a counter of the tickets its
    client reads.  The server context is ``server`` if given, else a fresh
    one passed through ``tlsctl.patch(..., **patch_kw)``."""

    def make(
        server: ssl.SSLContext | None = None, **patch_kw: Any
    ) -> tuple[BioPair, TicketCounter]:
        client = client_ctx()
        counter = TicketCounter(client)
        if server is None:
            server = tlsctl.patch(server_ctx(), **patch_kw)
        pair = bio_pair(server, client)
        pair.handshake()
        return pair, counter

    return make


async def read_upload(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> int:
    """The bytes of a one-way upload, read until EOF or a reset."""
    got = 0
    try:
        while chunk := await reader.read(65536):
            got += len(chunk)
    except (ConnectionError, ssl.SSLError):
        pass
    return got


@contextlib.asynccontextmanager
async def asyncio_uploads(
    ctx: ssl.SSLContext,
    client: ssl.SSLContext,
    n: int,
    size: int,
    receive: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[int | None]
    ] = read_upload,
    timeout: float = 30,
) -> AsyncIterator[tuple[Any, list[int]]]:
    """An ``asyncio.start_server`` on ``ctx`` to which ``n`` blocking clients
    (``scenarios.upload_clients``, in a thread) each upload ``size`` bytes
    and close without reading.  Yields (its address, the bytes each upload
    delivered) once all ``n`` have ended, the server still serving.
    ``receive`` reads one connection: its upload's byte count, or None for a
    connection that is no upload (``receive`` answered and closed it)."""
    received: list[int] = []
    done = asyncio.Event()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        got = await receive(reader, writer)
        if got is None:
            return
        received.append(got)
        writer.close()
        if len(received) == n:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    address = server.sockets[0].getsockname()
    async with server:
        await asyncio.get_running_loop().run_in_executor(
            None, scenarios.upload_clients, address, client, n, size
        )
        await asyncio.wait_for(done.wait(), timeout)
        yield address, received


def s_client(port: int, ca: Path, stdin: bytes, *args: str) -> str:
    """Run ``openssl s_client`` (TLS 1.3, verifying ``localhost`` against
    ``ca``) against 127.0.0.1:``port``, feeding it ``stdin``; returns its
    stdout and stderr."""
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(ca),
            "-tls1_3",
            "-ign_eof",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=30,
    )
    return (proc.stdout + proc.stderr).decode(errors="replace")


# --- the delayed-ACK stall (TCP_QUICKACK) -------------------------------------

#: Seconds: a first response slower than this, as the median of a batch of
#: connections, is the ~40 ms delayed-ACK stall (half of it; Linux never
#: delays an ACK less than 40 ms, so a stalled connection is never faster).
STALL = 0.020
#: Batches a latency test may take before it calls a server stalled.
STALL_BATCHES = 3


def stall_free_batches(measure: Callable[[], list[float]]) -> list[list[float]]:
    """Batches of first-response latencies (seconds) from ``measure``, until
    one's median is under ``STALL`` or ``STALL_BATCHES`` were taken.  A
    server with the stall is over it on every connection of every batch; a
    loaded machine's scheduling delays (several ms a wake-up with the other
    suites running) can push one batch of a good server over, rarely three
    in a row."""
    batches: list[list[float]] = []
    while len(batches) < STALL_BATCHES:
        batches.append(measure())
        if statistics.median(batches[-1]) < STALL:
            break
    return batches


def _ms(batches: list[list[float]]) -> str:
    return "; ".join(", ".join(f"{v * 1e3:.2f}" for v in b) for b in batches)


def assert_stall_free(batches: list[list[float]]) -> None:
    """The last batch (see ``stall_free_batches``) is free of the stall."""
    assert statistics.median(batches[-1]) < STALL, f"latencies (ms): {_ms(batches)}"


def assert_stalled(batches: list[list[float]]) -> None:
    """Every batch stalled (a control: the stall is there without the fix)."""
    assert len(batches) == STALL_BATCHES, f"latencies (ms): {_ms(batches)}"
    assert all(statistics.median(b) > STALL for b in batches), _ms(batches)
