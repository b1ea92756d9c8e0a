"""The in-process rows of ``bench.py`` (its docstring says how each is
measured): wall clock and server CPU over memory BIOs, their callgrind
counts (``--instructions``) and resumption under key rotation
(``--rotation``)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import clienthello  # beside this file (bench/ is sys.path[0])
import tlsctl
import tlsserver  # beside this file
from _pairs import BioPair, connect  # beside this file
from bench_stats import (
    VALGRIND,
    CountRow,
    Plan,
    Progress,
    Row,
    callgrind_total,
    count_row,
    paired_rounds,
)
from tlsctl import scenarios

BY_HAND = "full handshakes/s, technique by hand"
BY_HAND_RESUMED = "resumed handshakes/s, technique by hand"
SERVER_FULL = "server CPU, full + request/response"
SERVER_RESUMED = "server CPU, resumed + request/response"
SERVER_BY_HAND = "server CPU, full, technique by hand"
SERVER_RESUMED_BY_HAND = "server CPU, resumed, technique by hand"
JUNK_PSK = "junk-PSK hellos/s, on_resume (CPU)"
JUNK_IDENTITIES = 9000  # one byte each: a 63 KB ClientHello
JUNK_PER_ROUND = 10  # hellos per side and round (unbounded: ~20-40 ms each)
# None: a reference row (the technique without tlsctl), no target of its own.
TARGETS: dict[str, float | None] = {
    "full handshakes/s": 0.98,
    BY_HAND: None,
    "resumed handshakes/s": 0.98,
    BY_HAND_RESUMED: None,
    "resumed handshakes/s, shared keys": 0.98,
    SERVER_FULL: 0.99,
    SERVER_BY_HAND: None,
    SERVER_RESUMED: 0.99,
    SERVER_RESUMED_BY_HAND: None,
    "1 KiB writes/s": 0.98,
    "bulk MB/s": 0.99,
    # Server CPU for a hello of junk PSK identities: at most 2x stock.
    JUNK_PSK: 0.5,
}
BULK = 64 * 1024
CONNECTIONS = 16
REQUEST, RESPONSE = tlsserver.REQUEST, tlsserver.RESPONSE
# The --worker entry point of the callgrind runs.
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def one_handshake(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> None:
    pair = connect(server, client, session)
    if session is not None and not pair.client.session_reused:
        raise RuntimeError("the benchmark's handshakes did not resume")


def one_by_hand(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> BioPair:
    """``one_handshake`` on a ``num_tickets = 0`` context, queueing the
    tickets by hand right before the first write (two, or one after a
    resumed handshake), which then writes them ahead of its data, as tlsctl
    does on a memory BIO (tlsctl's private binding, unchecked pointer: a
    measuring aid only)."""
    pair = BioPair(server, client, session).handshake()
    tlsserver.queue_by_hand(pair.server)
    pair.exchange()
    if session is not None and not pair.client.session_reused:
        raise RuntimeError("the benchmark's handshakes did not resume")
    return pair


def junk_psk_hello(server: ssl.SSLContext, hello: bytes) -> int:
    """Feed ``hello`` (records) to a new server connection; returns the
    thread CPU time, in ns, of the ``do_handshake`` that answers it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = server.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(hello)
    start = time.thread_time_ns()
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:  # answered; waits for the client's Finished
        elapsed = time.thread_time_ns() - start
    else:
        raise RuntimeError("a handshake finished on a ClientHello alone")
    if not outgoing.pending:
        raise RuntimeError("the server did not answer the junk-PSK hello")
    return elapsed


def server_exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    by_hand: bool = False,
) -> int:
    """A handshake (resumed with ``session``) and one request/response over
    memory BIOs; returns the server thread's CPU time, in ns, in its own
    calls only: ``wrap_bio``, ``do_handshake``, ``read``, ``write``
    (``by_hand``: on a ``num_tickets = 0`` context, ``queue_by_hand``
    right before the write, itself untimed)."""
    clock = time.thread_time_ns
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(
        c_in, c_out, server_hostname="localhost", session=session
    )
    start = clock()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent = clock() - start
    try:
        client.do_handshake()  # ClientHello
    except ssl.SSLWantReadError:
        pass
    s_in.write(c_out.read())
    start = clock()
    try:
        server.do_handshake()  # ServerHello .. Finished
    except ssl.SSLWantReadError:
        pass
    spent += clock() - start
    c_in.write(s_out.read())
    client.do_handshake()  # the client's Finished: done
    client.write(REQUEST)
    s_in.write(c_out.read())
    start = clock()
    server.do_handshake()  # reads the Finished (stock: writes the tickets)
    request = server.read(4096)
    spent += clock() - start  # every side stops here: the same clock calls
    if by_hand:  # untimed: the Python glue is no part of the technique
        tlsserver.queue_by_hand(server)  # SSL_new_session_ticket only counts them
    start = clock()
    server.write(RESPONSE)  # patched: the tickets go with it
    spent += clock() - start
    c_in.write(s_out.read())
    if request != REQUEST or client.read(4096) != RESPONSE:
        raise RuntimeError("server exchange broken")
    if session is not None and not client.session_reused:
        raise RuntimeError("the benchmark's handshakes did not resume")
    return spent


def handshakes(server: ssl.SSLContext, client: ssl.SSLContext, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        one_handshake(server, client)
    return n / (time.perf_counter() - start)


def session_of(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLSession:
    session = connect(server, client).client.session
    if session is None or not session.has_ticket:
        raise RuntimeError("no ticket to resume with")
    return session


def resumed_handshakes(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession, n: int
) -> float:
    start = time.perf_counter()
    for _ in range(n):
        one_handshake(server, client, session)
    return n / (time.perf_counter() - start)


def writes(pairs: list[BioPair], size: int, n: int) -> float:
    """``n`` writes of ``size`` bytes, spread over ``pairs``; returns writes/s."""
    data = b"w" * size
    per_pair = max(1, n // len(pairs))
    start = time.perf_counter()
    for pair in pairs:
        conn, drain = pair.server, pair.s_out.read
        for _ in range(per_pair):
            conn.write(data)
            drain()
    return per_pair * len(pairs) / (time.perf_counter() - start)


class WriteSweep:
    """Calling it writes ``size`` bytes once on each of ``CONNECTIONS``
    established connections of ``server`` (first write done, output
    drained).  ``renew()`` replaces the connections: where their buffers
    land in memory moves a single connection's rate by up to 3%, so each
    round gets fresh ones and the median over rounds averages that out."""

    def __init__(
        self, server: ssl.SSLContext, client: ssl.SSLContext, size: int
    ) -> None:
        self.server, self.client, self.data = server, client, b"w" * size
        self.ends: list[tuple[Callable[[bytes], int], Callable[[], bytes]]] = []
        self.renew()

    def renew(self) -> None:
        self.ends = []  # free the old connections first
        for _ in range(CONNECTIONS):
            pair = connect(self.server, self.client)
            self.ends.append((pair.server.write, pair.s_out.read))

    @staticmethod
    def renewer(*sweeps: WriteSweep) -> Callable[[], None]:
        def renew() -> None:
            for sweep in sweeps:
                sweep.renew()

        return renew

    def __call__(self) -> None:
        data = self.data
        for write, drain in self.ends:
            write(data)
            drain()


class Contexts(NamedTuple):
    client: ssl.SSLContext
    stock: ssl.SSLContext  # OpenSSL's defaults
    patched: ssl.SSLContext  # tlsctl.patch()
    keyed: ssl.SSLContext  # tlsctl.set_ticket_keys()
    by_hand: ssl.SSLContext  # num_tickets = 0, for one_by_hand


def _contexts() -> Contexts:
    certs = scenarios.make_certs(client_sans=1)
    by_hand = scenarios.server_context(certs)
    by_hand.num_tickets = 0
    return Contexts(
        client=scenarios.client_context(certs),
        stock=scenarios.server_context(certs),
        patched=tlsctl.patch(scenarios.server_context(certs)),
        keyed=tlsctl.set_ticket_keys(
            scenarios.server_context(certs), [tlsctl.TicketKey.generate()]
        ),
        by_hand=by_hand,
    )


def junk_psk(rounds: int, progress: Progress) -> Row:
    """The JUNK_PSK row: one crafted hello, fed to plain contexts with and
    without an ``on_resume`` callback."""
    certs = scenarios.make_certs(client_sans=1)
    stock = scenarios.server_context(certs)
    patched = tlsctl.set_ticket_callbacks(
        scenarios.server_context(certs),
        on_resume=lambda conn, appdata, status: tlsctl.TicketDecision.IGNORE_RENEW,
    )
    hello = clienthello.records(
        clienthello.client_hello(clienthello.junk_identities(JUNK_IDENTITIES))
    )
    return paired_rounds(
        lambda: junk_psk_hello(stock, hello),
        lambda: junk_psk_hello(patched, hello),
        rounds,
        progress,
        JUNK_PSK,
        JUNK_PER_ROUND,
        self_timed=True,
    )


def wall_metrics() -> list[str]:
    """The wall-clock metrics this OpenSSL can run: the by-hand references
    need ``SSL_new_session_ticket`` (3.0+)."""
    by_hand = (BY_HAND, BY_HAND_RESUMED, SERVER_BY_HAND, SERVER_RESUMED_BY_HAND)
    native = tlsctl.info().native_tickets
    return [m for m in TARGETS if native or m not in by_hand]


def wall_clock(rounds: int, progress: Progress) -> dict[str, Row]:
    metrics = wall_metrics()
    client, stock_ctx, patched_ctx, keyed_ctx, bare_ctx = _contexts()
    sessions = {
        ctx: session_of(ctx, client) for ctx in (stock_ctx, patched_ctx, keyed_ctx)
    }

    def full(ctx: ssl.SSLContext) -> Callable[[], None]:
        return lambda: one_handshake(ctx, client)

    def resumed(ctx: ssl.SSLContext) -> Callable[[], None]:
        return lambda: one_handshake(ctx, client, sessions[ctx])

    results: dict[str, Row] = {}
    results["full handshakes/s"] = paired_rounds(
        full(stock_ctx), full(patched_ctx), rounds, progress, "full handshakes/s"
    )
    if BY_HAND in metrics:
        results[BY_HAND] = paired_rounds(
            full(stock_ctx),
            lambda: one_by_hand(bare_ctx, client),
            rounds,
            progress,
            "by hand",
        )
    results["resumed handshakes/s"] = paired_rounds(
        resumed(stock_ctx), resumed(patched_ctx), rounds, progress, "resumed"
    )
    if BY_HAND_RESUMED in metrics:
        by_hand_session = one_by_hand(bare_ctx, client).client.session

        def resumed_by_hand() -> None:
            one_by_hand(bare_ctx, client, by_hand_session)

        results[BY_HAND_RESUMED] = paired_rounds(
            resumed(stock_ctx), resumed_by_hand, rounds, progress, "resumed by hand"
        )
    results["resumed handshakes/s, shared keys"] = paired_rounds(
        resumed(stock_ctx), resumed(keyed_ctx), rounds, progress, "shared keys"
    )
    results[SERVER_FULL] = paired_rounds(
        lambda: server_exchange(stock_ctx, client),
        lambda: server_exchange(patched_ctx, client),
        rounds,
        progress,
        SERVER_FULL,
        self_timed=True,
    )
    if SERVER_BY_HAND in metrics:
        results[SERVER_BY_HAND] = paired_rounds(
            lambda: server_exchange(stock_ctx, client),
            lambda: server_exchange(bare_ctx, client, by_hand=True),
            rounds,
            progress,
            SERVER_BY_HAND,
            self_timed=True,
        )
    results[SERVER_RESUMED] = paired_rounds(
        lambda: server_exchange(stock_ctx, client, sessions[stock_ctx]),
        lambda: server_exchange(patched_ctx, client, sessions[patched_ctx]),
        rounds,
        progress,
        SERVER_RESUMED,
        self_timed=True,
    )
    if SERVER_RESUMED_BY_HAND in metrics:
        bare_session = one_by_hand(bare_ctx, client).client.session
        results[SERVER_RESUMED_BY_HAND] = paired_rounds(
            lambda: server_exchange(stock_ctx, client, sessions[stock_ctx]),
            lambda: server_exchange(bare_ctx, client, bare_session, by_hand=True),
            rounds,
            progress,
            SERVER_RESUMED_BY_HAND,
            self_timed=True,
        )
    results[JUNK_PSK] = junk_psk(rounds, progress)
    # A sweep writes once on each of the CONNECTIONS connections of its side.
    for size, metric, per_round in (
        (1024, "1 KiB writes/s", 10000 // CONNECTIONS),
        (BULK, "bulk MB/s", 256 // CONNECTIONS),
    ):
        stock_sweep = WriteSweep(stock_ctx, client, size)
        patched_sweep = WriteSweep(patched_ctx, client, size)
        results[metric] = paired_rounds(
            stock_sweep,
            patched_sweep,
            rounds,
            progress,
            metric,
            per_round,
            WriteSweep.renewer(stock_sweep, patched_sweep),
        )
    # Sweeps/s to writes/s and MB/s; keep TARGETS' order.
    kib, bulk = results.pop("1 KiB writes/s"), results.pop("bulk MB/s")
    results["1 KiB writes/s"] = kib._replace(
        stock=kib.stock * CONNECTIONS, patched=kib.patched * CONNECTIONS
    )
    mb = CONNECTIONS * BULK / 1e6
    results["bulk MB/s"] = bulk._replace(
        stock=bulk.stock * mb, patched=bulk.patched * mb
    )
    return {metric: results[metric] for metric in metrics}


# ------------------------------------------------------------ instructions

WORK = {
    "full handshakes/s": 20,
    "resumed handshakes/s": 20,
    "resumed handshakes/s, shared keys": 20,
    "1 KiB writes/s": 2000,
    "bulk MB/s": 64,
}


def worker(metric: str, side: str, n: int) -> None:
    """``bench.py --worker``: ``n`` operations of ``metric`` on the ``side``
    ("stock" or "patched") context, the process callgrind counts."""
    client, stock_ctx, patched_ctx, keyed_ctx, _ = _contexts()
    ctx = stock_ctx if side == "stock" else patched_ctx
    if metric == "resumed handshakes/s, shared keys":
        ctx = stock_ctx if side == "stock" else keyed_ctx
    if metric.startswith("resumed"):
        resumed_handshakes(ctx, client, session_of(ctx, client), n)
    elif metric == "full handshakes/s":
        handshakes(ctx, client, n)
    else:
        pairs = [connect(ctx, client) for _ in range(4)]
        writes(pairs, 1024 if metric.startswith("1 KiB") else BULK, n)


def _instructions(metric: str, side: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [*VALGRIND, sys.executable, BENCH_SCRIPT, "--worker", metric, side, str(n)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return callgrind_total(proc.stderr)


def instruction_ratios(plan: Plan, progress: Progress) -> dict[str, CountRow]:
    """In-process instructions per operation (client included), stock vs
    patched (this process's mechanism), ``plan.repeats`` times."""
    out = {}
    for metric, work in WORK.items():
        n = max(1, round(work * plan.work_scale))
        per_op: dict[str, list[float]] = {"stock": [], "patched": []}
        for _ in range(plan.repeats):
            for side in ("stock", "patched"):
                small = _instructions(metric, side, n)
                large = _instructions(metric, side, 11 * n)
                per_op[side].append((large - small) / (10 * n))
            progress.step(f"callgrind {metric}")
        out[metric] = count_row(per_op["stock"], per_op["patched"])
    return out


# ----------------------------------------- resumption under key rotation


ROTATION_EVERY = 1  # seconds: the rotation period, scaled down from hours
ROTATION_DELAYS = (0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75)  # x every
ROTATION_SESSIONS = 8  # per delay


def rotation_resumption(keep: int = 2) -> list[tuple[float, int, int]]:
    """Share of reconnects that resume when the keys rotate every
    ROTATION_EVERY s with ``keep`` previous keys (``rotate_ticket_keys``),
    against the reconnect delay in periods: [(delay, resumed, tried)].
    Real handshakes and the real clock: sessions are taken at spread
    phases of a window, all delays waited at once (about 4 s)."""
    certs = scenarios.make_certs(client_sans=1)
    server = tlsctl.rotate_ticket_keys(
        scenarios.server_context(certs), every=ROTATION_EVERY, keep=keep
    )
    client = scenarios.client_context(certs)
    sessions: list[tuple[float, ssl.SSLSession]] = []
    for _ in range(ROTATION_SESSIONS):
        time.sleep(ROTATION_EVERY / ROTATION_SESSIONS)  # spread over a window
        pair = connect(server, client)
        if pair.client.session is not None:
            sessions.append((time.monotonic(), pair.client.session))
    due = sorted(
        (made + delay * ROTATION_EVERY, delay, session)
        for delay in ROTATION_DELAYS
        for made, session in sessions
    )
    tally: dict[float, list[int]] = {d: [0, 0] for d in ROTATION_DELAYS}
    for when, delay, session in due:
        time.sleep(max(0.0, when - time.monotonic()))
        pair = connect(server, client, session)
        tally[delay][0] += pair.client.session_reused
        tally[delay][1] += 1
    return [(d, r, n) for d, (r, n) in sorted(tally.items())]
