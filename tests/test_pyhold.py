"""The python mechanism (``tlsctl._pyhold``): memory-BIO servers defer their
tickets without the binding (PyPy, uv's python-build-standalone builds,
``TLSCTL_BINDING=off``; ``TLSCTL_MECHANISM=python`` forces it).

The byte-level tests run in every run: where the python mechanism is not
what ``patch()`` uses, they install its plan directly.  The subprocess tests
run the unbound path with ``TLSCTL_BINDING=off``.  The whole suite runs
again with the python mechanism forced and with the binding off: the
``python`` and ``binding-off`` axes (``tests/axes.txt``, ``nox``, CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest

import tlsctl
from conftest import (
    BioPair,
    asyncio_uploads,
    bio_pair,
    connect,
    needs_refcounting,
    read_upload,
    split_records,
)
from tlsctl import _bind, _pyhold, _wrap, scenarios
from tlsctl.scenarios import TicketCounter

ROOT = Path(__file__).resolve().parent.parent
PYTHON = tlsctl.info().mechanism == "python"
CtxFactory = Callable[..., ssl.SSLContext]


@pytest.fixture
def held_ctx(server_ctx: CtxFactory) -> Callable[..., ssl.SSLContext]:
    """A server context whose memory-BIO connections get the python
    mechanism: ``patch()`` where it is the mechanism, else its plan put in
    place directly (the context then sends OpenSSL's own tickets, which the
    proxy holds)."""

    def make(**kw: Any) -> ssl.SSLContext:
        ctx = server_ctx(**kw)
        if PYTHON:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tlsctl.SocketsNotDeferredWarning)
                return tlsctl.patch(ctx)
        _wrap.install()
        ctx.__dict__[_wrap.PLAN_ATTR] = _pyhold.make_plan(None)
        return ctx

    return make


def _pair(
    held_ctx: Callable[..., ssl.SSLContext],
    client_ctx: CtxFactory,
    session: ssl.SSLSession | None = None,
    **kw: Any,
) -> tuple[BioPair, TicketCounter]:
    client = client_ctx()
    counter = TicketCounter(client)
    return bio_pair(held_ctx(**kw), client, session=session), counter


def _deliver(p: BioPair) -> bytes | None:
    """Move what the server wrote to the client, which reads it."""
    p.server_to_client()
    return p.client_read()


def test_tickets_held_until_the_first_write_then_in_front_of_it(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, counter = _pair(held_ctx, client_ctx)
    assert type(p.server._sslobj) is _pyhold.PROXY  # type: ignore[attr-defined]
    p.handshake()
    assert p.s_out.pending == 0, "tickets left with the handshake"
    assert tlsctl.connection_state(p.server) == tlsctl.ConnectionState("defer", True, 0)
    p.client.write(b"request")
    p.client_to_server()
    assert p.server.read(100) == b"request"
    assert p.s_out.pending == 0, "a read released the tickets"
    p.server.write(b"response")
    records = split_records(p.s_out.read())
    assert len(records) == 3  # two tickets, then the data, in one buffer
    for i, record in enumerate(records[:2], start=1):
        p.c_in.write(record)
        assert p.client_read() is None
        assert counter.count == i
    p.c_in.write(records[2])
    assert p.client_read() == b"response"
    assert tlsctl.connection_state(p.server) == tlsctl.ConnectionState(
        "defer", False, 2
    )
    # Its job done, the proxy stepped aside: the stock object again.
    assert type(p.server._sslobj) is _bind.SSL_SOCKET_TYPE  # type: ignore[attr-defined]
    p.server.write(b"more")
    assert len(split_records(p.s_out.read())) == 1


def test_bytes_the_application_had_not_drained_stay_in_front(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    """The snapshot: only what the finishing call appended is held; older
    bytes still in the outgoing BIO stay where they were, first."""
    p, counter = _pair(held_ctx, client_ctx)
    with pytest.raises(ssl.SSLWantReadError):
        p.client.do_handshake()
    p.client_to_server()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.do_handshake()
    flight = p.s_out.read()
    p.c_in.write(flight)
    p.client.do_handshake()
    p.client_to_server()
    stale = b"\x17\x03\x03\x00\x01Z"  # stands for bytes not drained yet
    p.s_out.write(stale)
    p.server.do_handshake()  # appends the tickets: held, the stale bytes stay
    assert p.s_out.read() == stale
    p.s_out.write(stale)
    p.server.write(b"data")
    out = p.s_out.read()
    assert out.startswith(stale)
    records = split_records(out[len(stale) :])
    assert len(records) == 3
    p.c_in.write(out[len(stale) :])
    assert p.client_read() == b"data"
    assert counter.count == 2


def test_unwrap_sends_the_held_tickets_before_close_notify(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, counter = _pair(held_ctx, client_ctx)
    p.handshake()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.unwrap()  # sends close_notify, waits for the client's
    assert len(split_records(p.server_to_client())) == 3
    assert p.client.read(10) == b""  # close_notify, after both tickets
    assert counter.count == 2
    assert tlsctl.connection_state(p.server).issued == 2


def test_a_connection_closed_without_a_write_never_sends_them(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, counter = _pair(held_ctx, client_ctx)
    p.handshake()
    p.client.write(b"upload")
    p.client_to_server()
    assert p.server.read(100) == b"upload"
    del p.server  # the application drops it: the tickets go with it
    assert p.s_out.pending == 0
    assert counter.count == 0


def test_a_write_that_finishes_the_handshake_holds_nothing(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, counter = _pair(held_ctx, client_ctx)
    with pytest.raises(ssl.SSLWantReadError):
        p.client.do_handshake()
    p.client_to_server()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.do_handshake()
    p.server_to_client()
    p.client.do_handshake()
    p.client_to_server()  # the client's Finished
    p.server.write(b"first")  # runs the rest of the handshake, then the data
    records = split_records(p.s_out.read())
    assert len(records) == 3  # OpenSSL's own order: tickets, then the data
    p.c_in.write(b"".join(records))
    assert p.client_read() == b"first"
    assert counter.count == 2
    assert type(p.server._sslobj) is _bind.SSL_SOCKET_TYPE  # type: ignore[attr-defined]
    assert tlsctl.connection_state(p.server).waiting_for_write is False


def test_a_read_that_finishes_the_handshake_holds_the_tickets(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    """No do_handshake() on the server: its reads run the handshake.  The
    read that finishes it wants more data, and what it wrote is held."""
    p, counter = _pair(held_ctx, client_ctx)
    with pytest.raises(ssl.SSLWantReadError):
        p.client.do_handshake()
    p.client_to_server()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.read(100)  # writes the server's flight: not held
    assert p.s_out.pending > 0
    p.server_to_client()
    p.client.do_handshake()
    p.client_to_server()
    with pytest.raises(ssl.SSLWantReadError):
        p.server.read(100)  # finishes the handshake, writes the tickets
    assert p.s_out.pending == 0
    assert tlsctl.connection_state(p.server).waiting_for_write
    p.exchange(b"reply")
    assert counter.count == 2


def test_tls12_holds_nothing(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, counter = _pair(held_ctx, client_ctx, maximum_version=ssl.TLSVersion.TLSv1_2)
    p.handshake()
    assert p.server.version() == "TLSv1.2"
    assert type(p.server._sslobj) is _bind.SSL_SOCKET_TYPE  # type: ignore[attr-defined]
    assert tlsctl.connection_state(p.server).waiting_for_write is False
    p.exchange(b"x")
    assert counter.count == 1  # TLS 1.2's ticket, in the handshake, as stock


def test_resumption_holds_the_renewal_ticket(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    client = client_ctx()
    counter = TicketCounter(client)
    server = held_ctx()
    first = bio_pair(server, client)
    first.handshake()
    first.exchange(b"x")
    assert counter.count == 2
    second = bio_pair(server, client, session=first.client.session)
    second.handshake()
    assert second.client.session_reused
    assert second.s_out.pending == 0
    second.exchange(b"y")
    assert counter.count == 3  # one renewal ticket, with the first write
    assert tlsctl.connection_state(second.server).issued == 1


@needs_refcounting
def test_a_held_connection_has_no_reference_cycle(
    held_ctx: Callable[..., ssl.SSLContext], client_ctx: CtxFactory
) -> None:
    p, _ = _pair(held_ctx, client_ctx)
    p.handshake()
    ref = weakref.ref(p.server)
    del p.server
    assert ref() is None


def test_records_counts_whole_records() -> None:
    rec = b"\x17\x03\x03\x00\x02ab"
    assert _pyhold._records(rec * 3) == 3
    assert _pyhold._records(b"") == 0


# ------------------------------------------------------------ asyncio


async def _asyncio_uploads_and_requests(
    ctx: ssl.SSLContext, client: CtxFactory, n: int, size: int
) -> tuple[list[int], scenarios.ResumptionResult]:
    """One asyncio server: ``n`` one-way uploads of ``size`` bytes, then
    request/response connections that resume."""

    async def receive(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> int | None:
        first = await reader.read(8)
        if first.startswith(b"request"):
            line = first + await reader.readline()
            writer.write(b"reply to " + line)
            await writer.drain()
            writer.close()
            return None
        return len(first) + await read_upload(reader, writer)

    uploads = asyncio_uploads(ctx, client(), n, size, receive, timeout=60)
    async with uploads as (address, received):
        resumption = await asyncio.get_running_loop().run_in_executor(
            None, scenarios.request_clients, address, client(), 8
        )
    return received, resumption


def test_asyncio_server_uploads_and_resumption(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """30 one-way 256 KiB uploads to a patched asyncio server all arrive,
    and resumption is as stock (in every run: native, stash or python)."""
    n, size = 30, 256 * 1024
    stock = asyncio.run(
        _asyncio_uploads_and_requests(server_ctx(), client_ctx, n, size)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tlsctl.SocketsNotDeferredWarning)
        patched_ctx = tlsctl.patch(server_ctx())
    patched = asyncio.run(
        _asyncio_uploads_and_requests(patched_ctx, client_ctx, n, size)
    )
    lost = sum(r != size for r in stock[0])
    print(
        f"\n[asyncio, mechanism {tlsctl.info().mechanism}] one-way uploads that "
        f"lost data: stock {lost}/{n}, patched "
        f"{sum(r != size for r in patched[0])}/{n}; resumption {patched[1]}"
    )
    assert patched[0] == [size] * n
    assert patched[1] == stock[1]
    assert patched[1].replies_ok == 8 and patched[1].resumed == 7


# ------------------------------------------------ without the binding


# Unbound runs are an interpreter tlsctl cannot bind, as a user has it: no
# mechanism forced (the stash axis's TLSCTL_MECHANISM=stash needs the binding).
_ENV_UNFORCED = {k: v for k, v in os.environ.items() if k != "TLSCTL_MECHANISM"}


def _unbound(code: str, *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` with ``TLSCTL_BINDING=off``; it sets ``out``."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, ssl, warnings, tlsctl\nout = {}\n"
            "def state(conn):\n"
            "    s = tlsctl.connection_state(conn)\n"
            "    return [s.policy, s.waiting_for_write, s.issued]\n"
            + textwrap.dedent(code)
            + "\nprint(json.dumps(out))\n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "tests",
        env={**_ENV_UNFORCED, "TLSCTL_BINDING": "off", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_unbound_info_and_one_warning() -> None:
    out = _unbound(
        """
        from tlsctl import scenarios
        info = tlsctl.info()
        out["info"] = [info.bound, info.mechanism, info.reason]
        certs = scenarios.make_certs(client_sans=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tlsctl.patch(scenarios.server_context(certs))
            tlsctl.patch(scenarios.server_context(certs))
            tlsctl.patch(scenarios.server_context(certs), tickets="immediate")
        out["warnings"] = [
            [w.category.__name__, str(w.message), w.filename] for w in caught
        ]
        out["user"] = issubclass(tlsctl.SocketsNotDeferredWarning, UserWarning)
        """
    )
    bound, mechanism, reason = out["info"]
    assert (bound, mechanism) == (False, "python")
    assert "TLSCTL_BINDING=off" in reason
    assert len(out["warnings"]) == 1, out["warnings"]
    name, message, filename = out["warnings"][0]
    assert name == "SocketsNotDeferredWarning" and out["user"]
    assert "memory-BIO connections only" in message
    assert "TLSCTL_BINDING=off" in message
    assert filename == "<string>"  # the caller of patch()


def test_unbound_sockets_are_stock() -> None:
    """A patched socket server sends its tickets right after the
    handshake, as stock: the client reads them before any data exists."""
    out = _unbound(
        """
        import socket, threading, time
        from tlsctl import scenarios
        certs = scenarios.make_certs(client_sans=1)
        warnings.simplefilter("ignore")
        server = tlsctl.patch(scenarios.server_context(certs))
        client = scenarios.client_context(certs)
        counter = scenarios.TicketCounter(client)
        listener = socket.create_server(("127.0.0.1", 0))
        states = []

        def serve():
            raw, _ = listener.accept()
            with server.wrap_socket(raw, server_side=True) as conn:
                states.append(state(conn))
                conn.recv(10)

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as c:
                # the server sends no data: each recv only lets the tickets
                # in, until both came (or 10 s passed: a loaded machine may
                # take more than one short timeout to schedule the server)
                c.settimeout(0.1)
                deadline = time.monotonic() + 10
                while counter.count < 2 and time.monotonic() < deadline:
                    try:
                        if not c.recv(10):
                            break  # the server is gone
                    except socket.timeout:
                        pass
                    except ssl.SSLError:  # the end (a timeout is the above)
                        break
                out["tickets_before_data"] = counter.count
                c.sendall(b"bye")
        thread.join(10)
        out["states"] = states
        """
    )
    assert out["tickets_before_data"] == 2
    assert out["states"] == [[None, False, 0]]  # tlsctl left it alone


def test_unbound_refuses_what_needs_the_binding() -> None:
    out = _unbound(
        """
        from tlsctl import scenarios
        certs = scenarios.make_certs(client_sans=1)
        warnings.simplefilter("ignore")
        ctx = scenarios.server_context(certs)
        key = tlsctl.TicketKey.generate()
        calls = {
            "suppress": lambda: tlsctl.patch(ctx, tickets="suppress"),
            "count": lambda: tlsctl.patch(ctx, count=1),
            "renew": lambda: tlsctl.patch(ctx, renew_on_resume=False),
            "callbacks": lambda: tlsctl.set_ticket_callbacks(ctx, on_issue=print),
            "keys": lambda: tlsctl.set_ticket_keys(ctx, [key]),
            "rotate": lambda: tlsctl.rotate_ticket_keys(ctx, every=3600),
            "lifetime": lambda: tlsctl.set_ticket_lifetime(ctx, 60),
            "inject-keys": lambda: tlsctl.inject_into_ssl(ticket_keys=[key]),
            "inject-lifetime": lambda: tlsctl.inject_into_ssl(ticket_lifetime=60),
            "inject-suppress": lambda: tlsctl.inject_into_ssl(tickets="suppress"),
        }
        for name, call in calls.items():
            try:
                call()
                out[name] = "ok"
            except tlsctl.TlsctlError as exc:
                out[name] = [
                    isinstance(exc, tlsctl.UnsupportedError),
                    isinstance(exc, tlsctl.BindingError),
                    str(exc),
                ]
        tlsctl.patch(ctx)
        from conftest import connect
        p = connect(ctx, scenarios.client_context(certs))
        try:
            tlsctl.issue_tickets(p.server)
        except tlsctl.NotBoundError as exc:
            out["issue"] = str(exc)
        imm = tlsctl.patch(scenarios.server_context(certs), tickets="immediate")
        q = connect(imm, scenarios.client_context(certs))
        out["immediate"] = state(q.server)
        try:
            tlsctl.patch(scenarios.client_context(certs))
        except ValueError as exc:
            out["client"] = str(exc)
        """
    )
    for name in (
        "suppress",
        "count",
        "renew",
        "callbacks",
        "keys",
        "rotate",
        "lifetime",
        "inject-keys",
        "inject-lifetime",
        "inject-suppress",
    ):
        unsupported, binding, message = out[name]
        assert unsupported and binding, name
        assert "not bound" in message and "TLSCTL_BINDING=off" in message, name
    assert "count=" in out["count"][2] and "ctx.num_tickets" in out["count"][2]
    assert "issue_tickets()" in out["issue"]
    assert out["immediate"] == ["immediate", False, 0]
    assert "PROTOCOL_TLS_CLIENT" in out["client"]


def test_unbound_injection_defers_memory_bio_and_skips_keys() -> None:
    out = _unbound(
        """
        from tlsctl import scenarios
        from conftest import bio_pair
        certs = scenarios.make_certs(client_sans=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tlsctl.inject_into_ssl()
        out["warnings"] = len(caught)
        ctx = scenarios.server_context(certs)  # never patched by the user
        p = bio_pair(ctx, scenarios.client_context(certs))
        p.handshake()
        out["held"] = [p.s_out.pending, state(p.server)]
        p.exchange(b"x")
        out["after"] = state(p.server)
        from tlsctl import _inject
        out["injected"] = _inject.injected()
        tlsctl.extract_from_ssl()
        q = bio_pair(scenarios.server_context(certs), scenarios.client_context(certs))
        q.handshake()
        out["extracted"] = q.s_out.pending
        """
    )
    assert out["warnings"] == 1
    assert out["held"] == [0, ["defer", True, 0]]
    assert out["after"] == ["defer", False, 2]
    assert out["injected"]["tickets"] == "defer"
    assert out["injected"]["ticket_keys"].startswith("skipped: ticket keys need")
    assert out["injected"]["contexts"] == 1
    assert out["extracted"] > 0  # stock again: tickets right after the handshake


def test_unbound_doctor_says_what_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tlsctl", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(_ENV_UNFORCED, TLSCTL_BINDING="off"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    for line in (
        "mechanism                python",
        "memory-BIO servers       tickets='defer' works",
        "ssl sockets              stock:",
        "needs the binding        unavailable: tickets='suppress', count=",
        "shared libssl",
        "bytes sent between handshake and first write 0",
        "-> OK",
    ):
        assert line in proc.stdout, line


def test_unknown_binding_setting_is_refused_not_ignored() -> None:
    out = _unbound(
        "out['info'] = [tlsctl.info().bound, tlsctl.info().reason]",
        env={"TLSCTL_BINDING": "of"},
    )
    assert out["info"][0] is False
    assert "TLSCTL_BINDING='of' is not understood" in out["info"][1]


@pytest.mark.skipif(
    tlsctl.info().mechanism != "python" or not tlsctl.info().bound,
    reason="the python mechanism with the binding loaded (TLSCTL_MECHANISM=python)",
)
def test_callbacks_under_the_python_mechanism_leave_a_stock_connection(
    certs: scenarios.Certs,
) -> None:
    """Ticket callbacks' C guard stands behind the python mechanism's proxy;
    once both are done the connection is the stock object again."""
    server = tlsctl.patch(scenarios.server_context(certs))
    tlsctl.set_ticket_callbacks(server, on_issue=lambda c: b"x")
    pair = connect(server, scenarios.client_context(certs))
    pair.exchange(b"more").exchange(b"again")
    assert type(pair.server._sslobj) is _bind.SSL_SOCKET_TYPE  # type: ignore[attr-defined]
