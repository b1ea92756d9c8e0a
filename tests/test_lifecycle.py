"""tlsctl.set_ticket_lifetime and tlsctl.rotate_ticket_keys on real
handshakes: lifetimes enforced, keys rotating by the clock, a fleet sharing
a master without talking.  The waits are short and shared: one schedule of
3.5 s for every time-dependent check of the module."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

import tlsctl
from conftest import connect
from tlsctl import TicketKey, _bind
from tlsctl.scenarios import LOCALHOST, TicketCounter

CtxFactory = Callable[..., ssl.SSLContext]
VERSIONS = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)


def _reused(server: ssl.SSLContext, client: ssl.SSLContext, s: ssl.SSLSession) -> bool:
    return connect(server, client, s).client.session_reused


def _window(ctx: ssl.SSLContext) -> int:
    """The rotation window a rotating context encrypts under now."""
    ptr, _ = _bind.ctx_pointer(ctx)
    return int(_bind.lib.tlsctl_rotation_window(ptr))


def _resumes_in_a_kept_window(rotating: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A ticket resumes 1.5 s later with every=1, keep=2: asserted when the
    check ended within two windows of the ticket's (1.5 s and three
    handshakes; a machine so loaded that it took longer tries again with a
    new ticket)."""
    for _ in range(3):
        issued = _window(rotating)
        session = connect(rotating, client).client.session
        assert session is not None
        time.sleep(1.5)
        reused = _reused(rotating, client, session)
        if _window(rotating) <= issued + 2:
            assert reused, "lost after 1.5 s, within the kept windows"
            return
    pytest.fail("three checks in a row took 2 s or more")


def test_lifetime_and_rotation_by_the_clock(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """For TLS 1.2 and 1.3: a ticket with a 1 s lifetime resumes at once
    and not 3.5 s later (OpenSSL counts whole seconds: a session made at
    10.9 s is still valid at 11.9 s); with every=1, keep=2 a ticket resumes
    1.5 s later and not 3.5 s later (3 or 4 windows on, past the 2 kept)."""
    cases = []
    for version in VERSIONS:
        short = tlsctl.set_ticket_lifetime(server_ctx(maximum_version=version), 1)
        rotating = tlsctl.rotate_ticket_keys(
            server_ctx(maximum_version=version), every=1, keep=2
        )
        client = client_ctx()
        s_short = connect(short, client).client.session
        s_rot_late = connect(rotating, client).client.session
        assert s_short is not None and s_rot_late is not None
        assert s_short.ticket_lifetime_hint == 1
        assert _reused(short, client, connect(short, client).client.session)  # type: ignore[arg-type]
        cases.append((version, short, rotating, client, s_short, s_rot_late))
    issued = time.monotonic()  # after every session the late checks refuse
    for _version, _, rotating, client, _, _ in cases:
        _resumes_in_a_kept_window(rotating, client)
    time.sleep(max(0.0, 3.5 - (time.monotonic() - issued)))
    for version, short, rotating, client, s_short, s_rot_late in cases:
        assert not _reused(short, client, s_short), f"{version}: outlived 1 s"
        assert not _reused(rotating, client, s_rot_late), f"{version}: 3.5 s"


def test_same_master_same_keys_across_contexts_and_windows(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    master = TicketKey.generate()
    a = tlsctl.rotate_ticket_keys(server_ctx(), every=1, keep=2, master=master)
    b = tlsctl.rotate_ticket_keys(server_ctx(), every=1, keep=2, master=master)
    other = tlsctl.rotate_ticket_keys(server_ctx(), every=1, keep=2)
    client = client_ctx()
    counter = TicketCounter(client)
    window = _window(a)
    session = connect(a, client).client.session
    assert session is not None
    assert _reused(b, client, session)  # same window
    assert not _reused(other, client, session)  # another master
    deadline = time.monotonic() + 3
    while _window(a) == window:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reused = _reused(b, client, session)
    if _window(a) <= window + 2:  # else too slow to tell: two more went by
        assert reused  # across the boundary: kept key
    # the new window's key encrypts on both: one name for both contexts,
    # when a's ticket and b's renewal of it came in one window (else again)
    for _ in range(3):
        now = _window(a)
        fresh = connect(a, client).client.session
        assert fresh is not None and _reused(b, client, fresh)
        names = counter.key_names[-2:]
        if _window(a) == now:
            break
    assert names[0] == names[1]


_FLEET_MEMBER = """
import socket, ssl, sys
sys.path[:0] = [{tests!r}]
import tlsctl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({pem!r})
tlsctl.rotate_ticket_keys(ctx, every=3600, master={master!r})
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
raw, _ = listener.accept()
with ctx.wrap_socket(raw, server_side=True) as conn:
    conn.sendall(b"x")
    conn.recv(1)
"""


def test_two_processes_with_one_master_resume_each_other(
    server_ctx: CtxFactory, client_ctx: CtxFactory, certs: object, tmp_path: Path
) -> None:
    """A fleet: another process, given the same master file, issued the
    ticket; this one resumes it (no coordination, no shared storage)."""
    master = tmp_path / "master.key"
    master.write_bytes(TicketKey.generate().export())
    pem = tmp_path / "server.pem"
    certs.server.private_key_and_cert_chain_pem.write_to_path(str(pem))  # type: ignore[attr-defined]
    script = textwrap.dedent(_FLEET_MEMBER).format(
        tests=str(Path(__file__).parent), pem=str(pem), master=str(master)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    client = client_ctx()
    with client.wrap_socket(
        socket.create_connection((LOCALHOST, port)), server_hostname="localhost"
    ) as conn:
        assert conn.recv(1) == b"x"
        conn.sendall(b"y")
        session = conn.session
    assert proc.wait(30) == 0
    assert session is not None
    here = tlsctl.rotate_ticket_keys(server_ctx(), every=3600, master=str(master))
    assert _reused(here, client, session)


def test_keys_replace_each_other(
    server_ctx: CtxFactory, client_ctx: CtxFactory
) -> None:
    """set_ticket_keys ends a rotation, rotate_ticket_keys replaces set keys."""
    key = TicketKey.generate()
    ctx = tlsctl.rotate_ticket_keys(server_ctx(), every=60)
    ptr, _ = _bind.ctx_pointer(ctx)
    assert _bind.lib.tlsctl_ticket_key_count(ptr) == 2 + 2  # now, 2 kept, next
    tlsctl.set_ticket_keys(ctx, [key])
    assert _bind.lib.tlsctl_ticket_key_count(ptr) == 1
    assert _bind.lib.tlsctl_rotation_window(ptr) == -(2**63)
    client = client_ctx()
    counter = TicketCounter(client)
    connect(ctx, client)
    assert counter.key_names[-1] == key.export()[:16]
    tlsctl.rotate_ticket_keys(ctx, every=60, keep=0)
    assert _bind.lib.tlsctl_ticket_key_count(ptr) == 2
    connect(ctx, client)
    assert counter.key_names[-1] != key.export()[:16]


def test_bad_arguments(server_ctx: CtxFactory, client_ctx: CtxFactory) -> None:
    ctx = server_ctx()
    for bad in (0, 604801, -1):
        with pytest.raises(ValueError, match="from 1 to 604800"):
            tlsctl.set_ticket_lifetime(ctx, bad)
    with pytest.raises(TypeError, match="int"):
        tlsctl.set_ticket_lifetime(ctx, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        tlsctl.rotate_ticket_keys(ctx, every=0)
    with pytest.raises(ValueError, match="keep"):
        tlsctl.rotate_ticket_keys(ctx, every=60, keep=65)
    with pytest.raises(TypeError, match="master"):
        tlsctl.rotate_ticket_keys(ctx, every=60, master=b"x" * 80)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PROTOCOL_TLS_CLIENT"):
        tlsctl.rotate_ticket_keys(client_ctx(), every=60)
    with pytest.raises(ValueError, match="PROTOCOL_TLS_CLIENT"):
        tlsctl.set_ticket_lifetime(client_ctx(), 60)
    assert tlsctl.MAX_TICKET_LIFETIME == 604800
