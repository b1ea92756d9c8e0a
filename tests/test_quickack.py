"""TCP_QUICKACK after the handshake on memory-BIO servers (tlsctl._quickack).

A client without TCP_NODELAY waits for the ACK of its Finished before its
first request leaves (Nagle); a ``defer`` server sends nothing after the
handshake, so without the hook that ACK waits for Linux's delayed-ACK timer
(~40 ms; measured 42-43 ms for every server here).  The latency tests assert
the median first response of 5 connections is below 20 ms, the threshold
the issue prescribes (half the stall), in one of up to three batches
(``conftest.stall_free_batches``: a stalled server misses it in every
one).  The servers and the client are ``bench/quickack_latency.py``'s,
which prints the full table.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import ssl
import subprocess
import sys
import types
import warnings
from typing import Any, Callable, cast

import pytest

import tlsctl
from conftest import (
    assert_stall_free,
    assert_stalled,
    bio_pair,
    needs_c_defer,
    needs_defer,
    require_binding_for,
    stall_free_batches,
)
from quickack_latency import (
    GET,
    LOCALHOST,
    REQUEST,
    RESPONSE,
    nagle_client,
    run_aiohttp,
    run_asyncio,
    run_trio,
    run_websockets,
)
from tlsctl import _bind, _quickack, scenarios

pytestmark = [needs_defer]  # native, stash or python: memory-BIO servers
linux_only = pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="no TCP_QUICKACK (Linux only)"
)

CONNECTIONS = 5


@pytest.fixture(scope="module")
def certs() -> scenarios.Certs:
    return scenarios.make_certs(client_sans=1)


def _patched(certs: scenarios.Certs, **kw: Any) -> ssl.SSLContext:
    ctx = tlsctl.patch(scenarios.server_context(certs), **kw)
    _quickack.install()  # tlsctl.patch() will call it
    return ctx


def _client(certs: scenarios.Certs) -> Callable[[int], list[list[float]]]:
    client_ctx = scenarios.client_context(certs)

    def client(port: int) -> list[list[float]]:
        return stall_free_batches(
            lambda: nagle_client(port, client_ctx, CONNECTIONS, nodelay=False)
        )

    return client


def _assert_no_stall(batches: list[list[float]]) -> None:
    assert all(len(b) == CONNECTIONS for b in batches)
    assert_stall_free(batches)


# ------------------------------------------------------------- latency


@linux_only
@pytest.mark.parametrize("api", ["start_server", "create_server"])
def test_asyncio_first_response_without_stall(certs: scenarios.Certs, api: str) -> None:
    _assert_no_stall(run_asyncio(_patched(certs), _client(certs), api=api))
    assert _quickack.status()["asyncio"] == "active"


@linux_only
def test_trio_first_response_without_stall(certs: scenarios.Certs) -> None:
    pytest.importorskip("trio", reason="trio is not installed")
    _assert_no_stall(run_trio(_patched(certs), _client(certs)))
    assert _quickack.status()["trio"] == "active"


_UVLOOP_SERVERS = {  # framework -> its hooked class, as "module:Class"
    "start_server": "asyncio.streams:StreamReaderProtocol",
    "aiohttp": "aiohttp.web_protocol:RequestHandler",
    "websockets": "websockets.asyncio.connection:Connection",
}


@linux_only
@pytest.mark.parametrize("hooked", [True, False], ids=["hooked", "control"])
@pytest.mark.parametrize("framework", list(_UVLOOP_SERVERS))
def test_uvloop_servers_without_stall(
    certs: scenarios.Certs,
    framework: str,
    hooked: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On uvloop (Cython, no handshake hook) asyncio.start_server's
    StreamReaderProtocol, aiohttp's RequestHandler and websockets' asyncio
    Connection are reached through their connection_made; the control,
    with that one hook undone, stalls (~40 ms), so the hook is what helps.
    aiohttp and websockets get a plain GET, timed to the first byte."""
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    module_name, class_name = _UVLOOP_SERVERS[framework].split(":")
    module = pytest.importorskip(module_name, reason=f"{framework} is not installed")
    ctx = _patched(certs)
    assert _quickack.status()[f"uvloop: {framework}"] == "active"
    assert _quickack.status()["uvloop"].startswith("partial: ")
    cls = getattr(module, class_name)
    if not hooked:
        monkeypatch.setattr(cls, "connection_made", cls.connection_made.__wrapped__)
    client_ctx = scenarios.client_context(certs)

    def client(port: int) -> list[list[float]]:
        return stall_free_batches(
            lambda: nagle_client(
                port, client_ctx, CONNECTIONS, request=GET, response=None
            )
        )

    if framework == "start_server":
        latencies = run_asyncio(ctx, _client(certs), api="start_server", uvloop=True)
    else:
        run = run_aiohttp if framework == "aiohttp" else run_websockets
        latencies = run(ctx, client)
    if hooked:
        _assert_no_stall(latencies)
    else:
        assert_stalled(latencies)


@linux_only
@pytest.mark.parametrize("remedy", [True, False])
def test_uvloop_own_protocol_needs_the_remedy(
    certs: scenarios.Certs, remedy: bool
) -> None:
    """A protocol of the application's own on uvloop is out of tlsctl's
    reach: it stalls (the control, ~40 ms) until its connection_made calls
    the documented remedy, tlsctl.quickack(transport)."""
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    ctx = _patched(certs)
    latencies = run_asyncio(
        ctx, _client(certs), api="create_server", uvloop=True, remedy=remedy
    )
    if remedy:
        _assert_no_stall(latencies)
    else:
        assert_stalled(latencies)


# ------------------------------------------------- who gets the option


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The local address of every socket the hooks set TCP_QUICKACK on."""
    seen: list[Any] = []
    real = _quickack.quickack

    def spy(obj: Any) -> bool:
        if hasattr(obj, "get_extra_info"):
            seen.append(obj.get_extra_info("sockname"))
        else:
            seen.append(obj.getsockname())
        return real(obj)

    monkeypatch.setattr(_quickack, "quickack", spy)
    return seen


def _generic_client_context(certs: scenarios.Certs) -> ssl.SSLContext:
    """A patched PROTOCOL_TLS context used on the client side."""
    with warnings.catch_warnings():  # deprecated since 3.10; both roles on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS)
    certs.ca.configure_trust(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return tlsctl.patch(ctx)


async def _asyncio_round_trips(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, n: int
) -> int:
    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readline()
        writer.write(RESPONSE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOCALHOST, 0, ssl=server_ctx)
    port: int = server.sockets[0].getsockname()[1]
    async with server:
        for _ in range(n):
            reader, writer = await asyncio.open_connection(
                LOCALHOST, port, ssl=client_ctx, server_hostname="localhost"
            )
            writer.write(REQUEST)
            assert await asyncio.wait_for(reader.readline(), 10) == RESPONSE
            writer.close()
    return port


@linux_only
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_asyncio_hook_touches_only_patched_server_connections(
    certs: scenarios.Certs, calls: list[Any], loop: str
) -> None:
    """On asyncio's loop (its sslproto hook) and on uvloop (the hooked
    StreamReaderProtocol, which open_connection's client side uses too)."""
    run: Callable[[Any], Any] = asyncio.run
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        run = uvloop.run
    patched = _patched(certs)
    client = _generic_client_context(certs)
    port = run(_asyncio_round_trips(patched, client, 3))
    # Three server sockets; the client side (a patched context too) none.
    assert [address[1] for address in calls] == [port] * 3
    calls.clear()
    stock = scenarios.server_context(certs)
    run(_asyncio_round_trips(stock, client, 2))
    assert calls == []


@linux_only
@pytest.mark.parametrize("tickets", ["defer", "suppress", "immediate", None])
def test_trio_hook_only_for_policies_without_handshake_tickets(
    certs: scenarios.Certs, calls: list[Any], tickets: str | None
) -> None:
    pytest.importorskip("trio", reason="trio is not installed")
    require_binding_for(tickets or "immediate")
    ctx = scenarios.server_context(certs)
    if tickets is not None:
        ctx = _patched(certs, tickets=tickets)
    _quickack.install()
    client_ctx = scenarios.client_context(certs)
    latencies = run_trio(
        ctx, lambda port: nagle_client(port, client_ctx, CONNECTIONS, nodelay=False)
    )
    assert len(latencies) == CONNECTIONS
    expected = CONNECTIONS if tickets in ("defer", "suppress") else 0
    assert len(calls) == expected


@pytest.mark.parametrize(
    ("tickets", "version", "expected"),
    [
        ("defer", ssl.TLSVersion.TLSv1_3, True),
        ("suppress", ssl.TLSVersion.TLSv1_3, True),
        ("immediate", ssl.TLSVersion.TLSv1_3, False),
        (None, ssl.TLSVersion.TLSv1_3, False),  # stock context
        ("defer", ssl.TLSVersion.TLSv1_2, False),  # tlsctl leaves TLS 1.2 stock
    ],
    ids=["defer", "suppress", "immediate", "stock", "defer-TLSv1.2"],
)
def test_which_connections_need_it(
    certs: scenarios.Certs, tickets: str | None, version: ssl.TLSVersion, expected: bool
) -> None:
    require_binding_for(tickets or "immediate")
    server = scenarios.server_context(certs, maximum_version=version)
    if tickets is not None:
        tlsctl.patch(server, tickets=tickets)
    _quickack.install()
    pair = bio_pair(server, scenarios.client_context(certs))
    if sys.implementation.name == "cpython":  # PyPy's version() answers
        assert not _quickack._needs_quickack(pair.server)  # handshake not done
    pair.handshake()
    assert _quickack._needs_quickack(pair.server) is expected
    assert not _quickack._needs_quickack(pair.client)
    generic = _generic_client_context(certs)
    pair = bio_pair(tlsctl.patch(scenarios.server_context(certs)), generic)
    pair.handshake()
    assert not _quickack._needs_quickack(pair.client)  # client side of a patched ctx


def _inner(conn: ssl.SSLObject) -> Any:
    """``conn._sslobj``: the C proxy, or the real ``_ssl._SSLSocket``."""
    return cast(Any, conn)._sslobj


@needs_c_defer
@pytest.mark.parametrize(
    ("tickets", "version", "expected"),
    [
        ("defer", ssl.TLSVersion.TLSv1_3, True),  # _sslobj: the C proxy
        ("suppress", ssl.TLSVersion.TLSv1_3, True),  # _sslobj: the real object
        ("immediate", ssl.TLSVersion.TLSv1_3, False),
        ("defer", ssl.TLSVersion.TLSv1_2, False),
    ],
    ids=["defer", "suppress", "immediate", "defer-TLSv1.2"],
)
def test_the_binding_answers_for_its_connections(
    certs: scenarios.Certs, tickets: str, version: ssl.TLSVersion, expected: bool
) -> None:
    """The binding's ``quiet``, the one call _needs_quickack makes per
    handshake: the policy recorded for the connection, its side, version
    and handshake state; None for a connection it does not track, which
    _needs_quickack then reports as not needing the option."""
    _quickack.install()  # (tlsctl.patch() does too) _needs_quickack asks quiet
    quiet = _bind.fast["quiet"]
    server = scenarios.server_context(certs, maximum_version=version)
    pair = bio_pair(
        tlsctl.patch(server, tickets=tickets), _generic_client_context(certs)
    )
    assert quiet(_inner(pair.server)) is False  # handshake not done
    pair.handshake()
    assert quiet(_inner(pair.server)) is expected
    assert quiet(_inner(pair.client)) is None  # client side: never tracked
    stock = bio_pair(scenarios.server_context(certs), scenarios.client_context(certs))
    stock.handshake()
    assert quiet(_inner(stock.server)) is None
    assert _quickack._needs_quickack(stock.server) is False
    assert quiet(object()) is None  # not an _sslobj: its type says so, nothing read


@pytest.mark.parametrize("count", [0, 1])
def test_a_defer_connection_with_a_count_needs_it(
    certs: scenarios.Certs, count: int
) -> None:
    """With a count (and under the python mechanism, where the binding then
    tracks the connection for the count alone, its policy left to Python)
    the connection is still a quiet one: no ticket left in its handshake."""
    require_binding_for(count=count)
    server = tlsctl.patch(scenarios.server_context(certs), count=count)
    _quickack.install()
    pair = bio_pair(server, scenarios.client_context(certs))
    pair.handshake()
    assert tlsctl.connection_state(pair.server).policy == "defer"
    assert _quickack._needs_quickack(pair.server) is True


# ------------------------------------------------------------ quickack()


@linux_only
def test_quickack_on_sockets_and_transports() -> None:
    listener = socket.create_server((LOCALHOST, 0))
    with listener, socket.create_connection(listener.getsockname()) as tcp:
        assert _quickack.quickack(tcp) is True

        class Transport:  # the one method quickack() uses of a transport
            def get_extra_info(self, name: str) -> Any:
                return tcp if name == "socket" else None

        assert _quickack.quickack(Transport()) is True
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert _quickack.quickack(a) is False  # not TCP: ignored
    closed = socket.socket()
    closed.close()
    assert _quickack.quickack(closed) is False  # setsockopt's OSError ignored
    assert _quickack.quickack(object()) is False


def test_without_tcp_quickack_nothing_is_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_quickack, "_QUICKACK", None)
    a, b = socket.socketpair()
    with a, b:
        assert _quickack.quickack(a) is False
    assert set(_quickack.status().values()) == {
        "unavailable: no socket.TCP_QUICKACK (Linux only)"
    }


# -------------------------------------------------------- installation


@linux_only
def test_install_is_idempotent() -> None:
    import asyncio.sslproto

    _quickack.install()
    hooked = asyncio.sslproto.SSLProtocol._on_handshake_complete
    _quickack.install()
    assert asyncio.sslproto.SSLProtocol._on_handshake_complete is hooked
    assert _quickack._hook_asyncio(asyncio.sslproto) == "active"  # not twice
    assert asyncio.sslproto.SSLProtocol._on_handshake_complete is hooked
    assert not hasattr(cast(Any, hooked).__wrapped__, "__wrapped__")


def test_unexpected_private_hooks_are_left_alone() -> None:
    """A framework whose private hook changed is reported, not wrapped."""

    class SSLProtocol:
        def _on_handshake_complete(self, exc: Any, extra: Any) -> None: ...

    class SSLStream:
        def _do_handshake(self) -> None: ...  # not a coroutine function

    fake = types.ModuleType("fake")
    assert _quickack._hook_asyncio(fake).startswith("unavailable: ")
    assert _quickack._hook_trio(fake).startswith("unavailable: ")
    fake.SSLProtocol = SSLProtocol  # type: ignore[attr-defined]
    fake.SSLStream = SSLStream  # type: ignore[attr-defined]
    original = (SSLProtocol._on_handshake_complete, SSLStream._do_handshake)
    assert "unexpected signature" in _quickack._hook_asyncio(fake)
    assert "unexpected signature" in _quickack._hook_trio(fake)
    assert (SSLProtocol._on_handshake_complete, SSLStream._do_handshake) == original


def test_connection_made_hooks_wrap_once_and_check_signatures() -> None:
    calls: list[Any] = []

    class Proto:
        def connection_made(self, transport: Any) -> None:
            calls.append(transport)

    class Odd:
        def connection_made(self, transport: Any, extra: Any) -> None: ...

    class Broken:  # a uvloop transport whose get_extra_info fails
        __module__ = "uvloop.loop"

        def get_extra_info(self, name: str) -> Any:
            raise RuntimeError(name)

    fake = types.ModuleType("fake")
    fake.Proto = Proto  # type: ignore[attr-defined]
    fake.Odd = Odd  # type: ignore[attr-defined]
    assert _quickack._connection_made_hook("Gone")(fake).startswith("unavailable: ")
    assert "unexpected signature" in _quickack._connection_made_hook("Odd")(fake)
    original = Proto.connection_made
    assert _quickack._connection_made_hook("Proto")(fake) == "active"
    hooked = Proto.connection_made
    assert cast(Any, hooked).__wrapped__ is original
    assert _quickack._connection_made_hook("Proto")(fake) == "active"
    assert Proto.connection_made is hooked  # not twice
    broken = Broken()
    Proto().connection_made("asyncio's")  # not uvloop's: the original only
    Proto().connection_made(broken)  # the nudge fails, the protocol does not
    assert calls == ["asyncio's", broken]


_CHILD = """
import importlib.util
import sys
import tlsctl
from tlsctl import _quickack as q
frameworks = ("asyncio", "trio", "uvloop", "aiohttp")
assert not any(m.split(".")[0] in frameworks for m in sys.modules), sorted(sys.modules)
print(q.status())
import asyncio.sslproto
original = asyncio.sslproto.SSLProtocol._on_handshake_complete
print(q.status())
assert not hasattr(original, "__wrapped__")  # import tlsctl alone hooks nothing
assert q._finder not in sys.meta_path
q.install()
print(q.status())
assert asyncio.sslproto.SSLProtocol._on_handshake_complete.__wrapped__ is original
import asyncio.streams
made = asyncio.streams.StreamReaderProtocol.connection_made
assert not hasattr(made, "__wrapped__")  # no uvloop: the stdlib loop pays nothing
import trio
print(q.status())
assert trio.SSLStream._do_handshake.__wrapped__
loader = trio._ssl.__spec__.loader
assert type(loader).__module__.startswith("_frozen_importlib"), loader
assert trio._ssl.__loader__ is loader
uvloop_hooks = {f for f in q._HOOKS if f.startswith("uvloop: ")}
# the protocol modules not imported, and uvloop, which start_server's waits for
assert set(q._finder._watched.values()) == uvloop_hooks - {"uvloop: start_server"} | {
    "uvloop"
}, q._finder._watched
hooked_later = set()
if importlib.util.find_spec("uvloop") is not None:
    import uvloop  # after the protocol module: hooked now
    print(q.status())
    assert asyncio.streams.StreamReaderProtocol.connection_made.__wrapped__ is made
    hooked_later.add("uvloop: start_server")
    if importlib.util.find_spec("aiohttp") is not None:
        import aiohttp.web_protocol  # after uvloop: hooked on import
        assert aiohttp.web_protocol.RequestHandler.connection_made.__wrapped__
        hooked_later.add("uvloop: aiohttp")
else:
    q._finder.done("uvloop")
print(sorted(hooked_later))
left = set(q._finder._watched.values())  # the other servers' protocols
assert left == uvloop_hooks - {"uvloop: start_server"} - hooked_later, left
for framework in left:
    q._finder.done(framework)
assert q._finder not in sys.meta_path  # removed once nothing is watched
"""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@linux_only
def test_frameworks_imported_after_install_are_hooked_on_import() -> None:
    """Each hook goes in when its module is imported; the uvloop ones only
    once uvloop is imported too, whichever comes first."""
    pytest.importorskip("trio", reason="trio is not installed")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    hooks = [*_quickack._HOOKS, "uvloop"]
    assert lines[0] == str(dict.fromkeys(hooks, "not imported"))
    assert eval(lines[1])["asyncio"] == "not installed"
    # asyncio imports asyncio.streams; its uvloop hook waits for uvloop
    assert eval(lines[2]) == {
        **dict.fromkeys(hooks, "not imported"),
        "asyncio": "active",
    }
    assert eval(lines[3])["trio"] == "active"
    if not _has("uvloop"):
        assert lines[4:] == ["[]"]
        return
    after_uvloop = eval(lines[4])
    assert after_uvloop["uvloop: start_server"] == "active"
    assert after_uvloop["uvloop"].startswith("partial: ")
    hooked = ["uvloop: aiohttp"] if _has("aiohttp") else []
    assert lines[5:] == [str(sorted([*hooked, "uvloop: start_server"]))]
