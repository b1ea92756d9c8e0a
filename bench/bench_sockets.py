"""The rows of ``bench.py`` over real sockets in this process (its
docstring says how each is measured): first-response latency, and one-way
upload loss against size and read delay (``--scaling``)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import NamedTuple

import tlsctl
import tlsserver  # beside this file (bench/ is sys.path[0])
from bench_stats import Plan, Progress, median_spread, ratio_summary
from tlsctl import scenarios

REQUEST, RESPONSE = tlsserver.REQUEST, tlsserver.RESPONSE
LOCALHOST = tlsserver.LOCALHOST


# ------------------------------------------------------------ first response


def _serve_requests(
    ctx: ssl.SSLContext, listener: socket.socket, n: int, errors: list[BaseException]
) -> None:
    """A blocking server thread: ``n`` connections, one request and one
    response each (the thread's exceptions go to ``errors``)."""
    try:
        for _ in range(n):
            raw, _ = listener.accept()
            raw.settimeout(None)
            with ctx.wrap_socket(raw, server_side=True) as conn:
                if tlsserver.recv_line(conn) == REQUEST:
                    conn.sendall(RESPONSE)
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def _timed_request(port: int, client: ssl.SSLContext, nodelay: bool) -> int:
    """ns from the client's ``sendall`` of the request, right after its
    handshake, to the last byte of the response."""
    with socket.create_connection((LOCALHOST, port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
        with client.wrap_socket(raw, server_hostname="localhost") as conn:
            start = time.perf_counter_ns()
            conn.sendall(REQUEST)
            reply = tlsserver.recv_line(conn)
            elapsed = time.perf_counter_ns() - start
    if reply != RESPONSE:
        raise RuntimeError(f"bad response {reply[:40]!r}")
    return elapsed


class Latency(NamedTuple):
    stock_ms: float  # median
    stock_spread: float  # half the IQR, ms
    patched_ms: float
    patched_spread: float
    ratio: float  # median of per-pair stock/patched latency
    lo: float
    hi: float


def first_response(
    stock: ssl.SSLContext,
    patched: ssl.SSLContext,
    client: ssl.SSLContext,
    nodelay: bool,
    plan: Plan,
    progress: Progress,
) -> Latency:
    """Paired first-response latencies, stock vs patched, one blocking
    server thread per side."""
    n = plan.latency_warm + plan.latency_pairs
    errors: list[BaseException] = []
    listeners, threads = [], []
    for ctx in (stock, patched):
        listener = socket.socket()
        listener.bind((LOCALHOST, 0))
        listener.listen(16)
        listener.settimeout(60.0)
        listeners.append(listener)
        threads.append(
            threading.Thread(
                target=_serve_requests, args=(ctx, listener, n, errors), daemon=True
            )
        )
    for thread in threads:
        thread.start()
    ports = [listener.getsockname()[1] for listener in listeners]
    times: tuple[list[int], list[int]] = ([], [])
    try:
        for i in range(n):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for side in order:
                elapsed = _timed_request(ports[side], client, nodelay)
                if i >= plan.latency_warm:
                    times[side].append(elapsed)
            if errors:
                raise errors[0]
    finally:
        for thread in threads:
            thread.join(30)
        for listener in listeners:
            listener.close()
    if errors:
        raise errors[0]
    progress.step("first response")
    stock_ms = [t / 1e6 for t in times[0]]
    patched_ms = [t / 1e6 for t in times[1]]
    ratio, _, lo, hi = ratio_summary([s / p for s, p in zip(times[0], times[1])])
    return Latency(*median_spread(stock_ms), *median_spread(patched_ms), ratio, lo, hi)


# ------------------------------------------------------------ scaling


def scaling(
    plan: Plan, progress: Progress
) -> dict[str, list[tuple[float, float, float]]]:
    """{"size": [(size, stock loss share, patched loss share)], "delay": ...}:
    ``plan.scaling_connections`` uploads a point."""
    certs = scenarios.make_certs(client_sans=1)
    client = scenarios.client_context(certs)
    stock = scenarios.server_context(certs)
    patched = tlsctl.patch(scenarios.server_context(certs))

    def loss(ctx: ssl.SSLContext, size: int, delay: float) -> float:
        r = scenarios.one_way_uploads(
            ctx,
            client,
            connections=plan.scaling_connections,
            size=size,
            read_delay=delay,
        )
        return r.lost_connections / r.connections

    out: dict[str, list[tuple[float, float, float]]] = {"size": [], "delay": []}
    for size in plan.sizes:
        out["size"].append((size, loss(stock, size, 0.0), loss(patched, size, 0.0)))
        progress.step(f"scaling: {size >> 10} KiB")
    for delay in plan.delays:
        out["delay"].append(
            (delay, loss(stock, 256 << 10, delay), loss(patched, 256 << 10, delay))
        )
        progress.step(f"scaling: read delay {delay * 1000:g} ms")
    return out
