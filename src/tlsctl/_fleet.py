"""A fleet of server processes on one port (``tests/test_ticket_keys``):
do reconnects resume whichever process they reach?  A scenario of
``scenarios``' kind, kept apart because only the test suite runs it.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any

from tlsctl.scenarios import LOCALHOST, Certs, client_context, recv_line

__all__ = ["FleetResult", "fleet_resumption"]


@dataclass
class FleetResult:
    """Outcome of ``fleet_resumption``."""

    workers: int
    reconnects: int
    resumed: int
    served_by: dict[int, int]  # worker id -> reconnects it served

    @property
    def missed(self) -> int:
        return self.reconnects - self.resumed


def _fleet_worker(
    worker: int,
    pem: bytes,
    port: int,
    keys: list[bytes] | None,
    ready: Any,
    stop: Any,
) -> None:
    """One server process of ``fleet_resumption`` (spawned: own interpreter,
    own SSLContext, own OpenSSL state).  Replies ``<worker> <resumed>``."""
    import os
    import tempfile

    import tlsctl

    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    if keys is not None:
        tlsctl.set_ticket_keys(ctx, keys)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((LOCALHOST, port))
    listener.listen(64)
    listener.settimeout(0.1)
    ready.put(worker)
    with listener:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except socket.timeout:
                continue
            raw.settimeout(10.0)
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    recv_line(conn)
                    reused = int(bool(conn.session_reused))
                    conn.sendall(f"{worker} {reused}\n".encode())
            except OSError:
                continue


def fleet_resumption(
    certs: Certs,
    *,
    workers: int = 4,
    reconnects: int = 40,
    keys: list[Any] | None = None,
    timeout: float = 30.0,
) -> FleetResult:
    """``workers`` server processes share one 127.0.0.1 port (SO_REUSEPORT:
    the kernel spreads connections over them), each with its own
    SSLContext, given ``keys`` (``tlsctl.TicketKey`` list) or OpenSSL's own
    random keys.  One client connects, then reconnects ``reconnects`` times
    with the newest session it holds; counts the resumed reconnects."""
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    ready, stop = mp.Queue(), mp.Event()
    exported = None if keys is None else [k.export() for k in keys]
    pem = certs.server.private_key_and_cert_chain_pem.bytes()
    # Reserve a port in the same SO_REUSEPORT group; never listened on, so
    # the kernel gives it no connections.
    reserve = socket.socket()
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind((LOCALHOST, 0))
    port = reserve.getsockname()[1]
    procs = [
        mp.Process(
            target=_fleet_worker,
            args=(i, pem, port, exported, ready, stop),
            daemon=True,
        )
        for i in range(workers)
    ]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=timeout)
        reserve.close()
        client = client_context(certs)
        session: ssl.SSLSession | None = None
        resumed = 0
        served_by: dict[int, int] = {}
        for i in range(reconnects + 1):
            with socket.create_connection((LOCALHOST, port), timeout=timeout) as raw:
                with client.wrap_socket(
                    raw, server_hostname="localhost", session=session
                ) as c:
                    c.sendall(b"hello\n")
                    reply = recv_line(c)
                    if not reply.endswith(b"\n"):
                        raise ConnectionError("a fleet worker closed early")
                    worker, _ = map(int, reply.split())
                    if i > 0:  # the first connection has nothing to resume
                        served_by[worker] = served_by.get(worker, 0) + 1
                        resumed += bool(c.session_reused)
                    session = c.session
    finally:
        reserve.close()
        stop.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return FleetResult(workers, reconnects, resumed, served_by)
