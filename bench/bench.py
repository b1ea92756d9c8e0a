"""tlsctl benchmark: patched / stock ratios, measured in one run.

    python bench/bench.py                  # wall clock, 41 rounds per metric
    python bench/bench.py --quick          # wall clock, 9 rounds per metric
    python bench/bench.py --instructions   # also callgrind instruction counts
    python bench/bench.py --scaling        # also one-way loss vs size / delay
    python bench/bench.py --smoke          # seconds; checks the tool, not speed

It prints a table with a progress bar while it runs and writes PNG charts
(``--plot-dir``, default ``bench/``; needs matplotlib: ``pip install
'.[bench]'``): ``ratios.png`` and, with ``--scaling``, ``scaling.png``.

Wall clock: each metric runs stock and patched in many short rounds and
reports the median of the per-round patched/stock ratios with its spread,
so slow drift of the machine cancels out and the noise floor is visible.
Inside a round the two sides alternate operation by operation, each timed
on its own, alternating which goes first: a handshake (60 per side and
round), or a sweep of one write over each of 16 connections per side
(single connections differ from each other by up to 3%: buffer placement,
measured between two stock connections).  On this 2-core VM, blocks of 60
handshakes per side left a spread of up to +/-0.04 between rounds as the
host's load changed; one-by-one pairs +/-0.005.  It is also the harder
comparison for tlsctl: a patched handshake never follows another one, so
its own code always starts cold.

Instructions (``--instructions``, needs valgrind): the same work under
``valgrind --tool=callgrind`` with ``PYTHONHASHSEED=0``, counting
instructions for N and 11N operations and taking the difference, so start-up
cancels.  Deterministic; the best view of tlsctl's own overhead.

Everything runs in-process over memory BIOs, so the figures are the CPU
cost of the TLS work plus tlsctl's own Python and C work, with no network
noise:

* full handshakes/s: handshake, then the server's first write (1 byte) and
  the client's read of it, tickets included (stock: 2 sent during the
  handshake; patched: 2 sent with that write);
* 1 KiB writes/s: ``conn.write(1 KiB)`` on established connections whose
  first write is done, output drained;
* bulk MB/s: the same with 64 KiB writes;
* full handshakes/s, technique by hand: the same OpenSSL calls tlsctl
  makes, made directly by the benchmark on a plain context with
  ``num_tickets = 0`` (``SSL_new_session_ticket`` twice right before the
  first write, which carries the tickets; no tlsctl code in the
  connection's path): the cost of the technique itself, against which
  tlsctl's own per-connection cost shows (OpenSSL 3.0+; left out on
  1.1.1, which has no ``SSL_new_session_ticket``);
* resumed handshakes/s: TLS 1.3 resumption from a saved session, then the
  first byte (the server decrypts the ticket and sends one renewal ticket);
* resumed handshakes/s, technique by hand: the same by hand (one ticket
  queued after the resumed handshake, as tlsctl and stock send);
* resumed handshakes/s, shared keys: the same, where "patched" is a context
  given shared keys with ``tlsctl.set_ticket_keys`` (the key lookup runs in
  C) and "stock" one with OpenSSL's built-in keys;
* junk-PSK hellos/s, on_resume (CPU): the server's CPU time
  (``time.thread_time``) in ``do_handshake`` for one crafted 63 KB TLS 1.3
  ClientHello offering 9,000 one-byte PSK identities (``clienthello.py``
  beside this file), up to its ServerHello; "patched" is a plain context
  given ``tlsctl.set_ticket_callbacks(on_resume=...)`` (answering
  IGNORE_RENEW), "stock" one without.  OpenSSL calls the decrypt callback
  once per identity, so without a bound on the Python calls this is an
  amplification (target: at most 2x stock CPU, a ratio of 0.5);
* RSS per 1,000 idle connections: resident memory of 1,000 server
  connections after their handshakes (memory-BIO pairs, clients included
  on both sides, so the difference is the server's), measured in fresh
  processes, alternating, median of 5 each.  The ratio is stock/patched so
  that, as for the rates, above 1 is better; the target is an absolute
  +256 bytes per connection.

Scaling (``--scaling``, real sockets on 127.0.0.1, 20 connections a point):
the share of one-way uploads (the client uploads and closes without
reading) that lost data, stock vs patched, against the upload size
(4 KiB .. 4 MiB) and against the server's read delay after the handshake.

This is a measuring tool, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import clienthello  # beside this file (bench/ is sys.path[0])
import tlsctl
from tlsctl import scenarios

BY_HAND = "full handshakes/s, technique by hand"
BY_HAND_RESUMED = "resumed handshakes/s, technique by hand"
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
    "1 KiB writes/s": 0.98,
    "bulk MB/s": 0.99,
    # Server CPU for a hello of junk PSK identities: at most 2x stock.
    JUNK_PSK: 0.5,
}
RSS_METRIC = "RSS per 1,000 idle conns"
RSS_TARGET_BYTES = 256  # per connection
IDLE = 1000
BULK = 64 * 1024
CONNECTIONS = 16
HANDSHAKES = 60  # per side and round


class Pair:
    """A server and a client SSLObject over memory BIOs."""

    def __init__(
        self,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (
            ssl.MemoryBIO() for _ in range(4)
        )
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(
            self.c_in, self.c_out, server_hostname="localhost", session=session
        )

    def handshake_only(self) -> Pair:
        for _ in range(4):
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.s_in.write(self.c_out.read())
            try:
                self.server.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.c_in.write(self.s_out.read())
        return self

    def handshake_and_first_byte(self) -> Pair:
        self.handshake_only()
        self.server.write(b"!")
        self.c_in.write(self.s_out.read())
        if self.client.read(10) != b"!":
            raise RuntimeError("handshake pair broken")
        return self


def one_handshake(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> None:
    pair = Pair(server, client, session).handshake_and_first_byte()
    if session is not None and not pair.client.session_reused:
        raise RuntimeError("the benchmark's handshakes did not resume")


def one_by_hand(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> Pair:
    """``one_handshake`` on a ``num_tickets = 0`` context, queueing the
    tickets by hand right before the first write (two, or one after a
    resumed handshake), which then writes them ahead of its data, as tlsctl
    does on a memory BIO (tlsctl's private binding, unchecked pointer: a
    measuring aid only)."""
    from tlsctl._bind import lib

    pair = Pair(server, client, session).handshake_only()
    real = pair.server._sslobj  # type: ignore[attr-defined]
    if lib.tlsctl_queue_tickets(lib.tlsctl_ssl_of(id(real)), 2, 1, 0) < 1:
        raise RuntimeError("SSL_new_session_ticket failed (OpenSSL 3.0+ only)")
    pair.server.write(b"!")
    pair.c_in.write(pair.s_out.read())
    if pair.client.read(10) != b"!":
        raise RuntimeError("handshake pair broken")
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


def handshakes(server: ssl.SSLContext, client: ssl.SSLContext, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        one_handshake(server, client)
    return n / (time.perf_counter() - start)


def session_of(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLSession:
    session = Pair(server, client).handshake_and_first_byte().client.session
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


def writes(pairs: list[Pair], size: int, n: int) -> float:
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
            pair = Pair(self.server, self.client).handshake_and_first_byte()
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


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a TTY
    unless forced), so a long run shows it is alive."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {label[:40]:40}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _paired_rounds(
    one_stock: Callable[[], object],
    one_patched: Callable[[], object],
    rounds: int,
    progress: Progress,
    label: str,
    per_round: int = HANDSHAKES,
    setup: Callable[[], None] | None = None,
    self_timed: bool = False,
) -> tuple[float, float, float, float]:
    """Inside a round the two sides alternate operation by operation, each
    timed on its own, so both see the same state of the machine; the
    round's ratio is its total stock time / total patched time (= patched
    rate / stock rate).  Rates are operations per second.  ``setup`` runs
    before each round, untimed.  ``self_timed``: each operation returns
    its own time in ns (the part of it that is measured, on its own clock)
    instead of being timed whole with ``perf_counter_ns``."""
    clock = time.perf_counter_ns
    for _ in range(per_round):  # warm-up, discarded
        one_stock()
        one_patched()
    stock, patched, ratios = [], [], []
    for _ in range(rounds):
        if setup is not None:
            setup()
        t_stock = t_patched = 0
        for i in range(per_round):
            stock_first = i % 2 == 0
            first, second = (
                (one_stock, one_patched) if stock_first else (one_patched, one_stock)
            )
            a = clock()
            first_ns = first()
            b = clock()
            second_ns = second()
            c = clock()
            if not self_timed:
                first_ns, second_ns = b - a, c - b
            assert isinstance(first_ns, int) and isinstance(second_ns, int)
            if stock_first:
                t_stock, t_patched = t_stock + first_ns, t_patched + second_ns
            else:
                t_patched, t_stock = t_patched + first_ns, t_stock + second_ns
        stock.append(per_round * 1e9 / t_stock)
        patched.append(per_round * 1e9 / t_patched)
        ratios.append(t_stock / t_patched)
        progress.step(label)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        statistics.median(stock),
        statistics.median(patched),
        statistics.median(ratios),
        (q3 - q1) / 2,
    )


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


Result = tuple[float, float, float, float]


def junk_psk(rounds: int, progress: Progress) -> Result:
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
    return _paired_rounds(
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
    by_hand = (BY_HAND, BY_HAND_RESUMED)
    native = tlsctl.info().native_tickets
    return [m for m in TARGETS if native or m not in by_hand]


def wall_clock(rounds: int, progress: Progress) -> dict[str, Result]:
    metrics = wall_metrics()
    client, stock_ctx, patched_ctx, keyed_ctx, bare_ctx = _contexts()
    sessions = {
        ctx: session_of(ctx, client) for ctx in (stock_ctx, patched_ctx, keyed_ctx)
    }

    def full(ctx: ssl.SSLContext) -> Callable[[], None]:
        return lambda: one_handshake(ctx, client)

    def resumed(ctx: ssl.SSLContext) -> Callable[[], None]:
        return lambda: one_handshake(ctx, client, sessions[ctx])

    results: dict[str, Result] = {}
    results["full handshakes/s"] = _paired_rounds(
        full(stock_ctx), full(patched_ctx), rounds, progress, "full handshakes/s"
    )
    if BY_HAND in metrics:
        results[BY_HAND] = _paired_rounds(
            full(stock_ctx),
            lambda: one_by_hand(bare_ctx, client),
            rounds,
            progress,
            "by hand",
        )
    results["resumed handshakes/s"] = _paired_rounds(
        resumed(stock_ctx), resumed(patched_ctx), rounds, progress, "resumed"
    )
    if BY_HAND_RESUMED in metrics:
        by_hand_session = one_by_hand(bare_ctx, client).client.session

        def resumed_by_hand() -> None:
            one_by_hand(bare_ctx, client, by_hand_session)

        results[BY_HAND_RESUMED] = _paired_rounds(
            resumed(stock_ctx), resumed_by_hand, rounds, progress, "resumed by hand"
        )
    results["resumed handshakes/s, shared keys"] = _paired_rounds(
        resumed(stock_ctx), resumed(keyed_ctx), rounds, progress, "shared keys"
    )
    results[JUNK_PSK] = junk_psk(rounds, progress)
    # A sweep writes once on each of the CONNECTIONS connections of its side.
    for size, metric, per_round in (
        (1024, "1 KiB writes/s", 10000 // CONNECTIONS),
        (BULK, "bulk MB/s", 256 // CONNECTIONS),
    ):
        stock_sweep = WriteSweep(stock_ctx, client, size)
        patched_sweep = WriteSweep(patched_ctx, client, size)
        results[metric] = _paired_rounds(
            stock_sweep,
            patched_sweep,
            rounds,
            progress,
            metric,
            per_round,
            WriteSweep.renewer(stock_sweep, patched_sweep),
        )
    s, p, r, spread = results.pop("1 KiB writes/s")
    results["1 KiB writes/s"] = (s * CONNECTIONS, p * CONNECTIONS, r, spread)
    s, p, r, spread = results.pop("bulk MB/s")
    mb = CONNECTIONS * BULK / 1e6
    results["bulk MB/s"] = (s * mb, p * mb, r, spread)
    return results


# ------------------------------------------------------------ memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_worker(side: str, n: int) -> None:
    """Print the RSS growth of ``n`` idle server connections (and their
    clients) after their handshakes, in this fresh process."""
    client, stock_ctx, patched_ctx, _, _ = _contexts()
    ctx = stock_ctx if side == "stock" else patched_ctx
    warm = [Pair(ctx, client).handshake_and_first_byte() for _ in range(20)]
    gc.collect()
    before = _rss_bytes()
    idle = []
    for _ in range(n):
        pair = Pair(ctx, client)
        pair.handshake_only()
        idle.append(pair)
    gc.collect()
    print(_rss_bytes() - before)
    del warm, idle


RSS_REPEATS = 5


def rss(progress: Progress) -> tuple[float, float]:
    """Median RSS growth (bytes) of IDLE idle connections: (stock, patched)."""
    grown: dict[str, list[int]] = {"stock": [], "patched": []}
    for i in range(RSS_REPEATS):
        for side in ("stock", "patched") if i % 2 == 0 else ("patched", "stock"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-worker", side, str(IDLE)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            grown[side].append(int(out.split()[-1]))
        progress.step(RSS_METRIC)
    return statistics.median(grown["stock"]), statistics.median(grown["patched"])


# ------------------------------------------------------------ scaling

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
DELAYS = [0.0, 0.002, 0.01, 0.05]
SCALING_CONNECTIONS = 20


def scaling(
    progress: Progress,
) -> dict[str, list[tuple[float, float, float]]]:
    """{"size": [(size, stock loss share, patched loss share)], "delay": ...}"""
    certs = scenarios.make_certs(client_sans=1)
    client = scenarios.client_context(certs)
    stock = scenarios.server_context(certs)
    patched = tlsctl.patch(scenarios.server_context(certs))

    def loss(ctx: ssl.SSLContext, size: int, delay: float) -> float:
        r = scenarios.one_way_uploads(
            ctx,
            client,
            connections=SCALING_CONNECTIONS,
            size=size,
            read_delay=delay,
        )
        return r.lost_connections / r.connections

    out: dict[str, list[tuple[float, float, float]]] = {"size": [], "delay": []}
    for size in SIZES:
        out["size"].append((size, loss(stock, size, 0.0), loss(patched, size, 0.0)))
        progress.step(f"scaling: {size >> 10} KiB")
    for delay in DELAYS:
        out["delay"].append(
            (delay, loss(stock, 256 << 10, delay), loss(patched, 256 << 10, delay))
        )
        progress.step(f"scaling: read delay {delay * 1000:g} ms")
    return out


# ------------------------------------------------------------ charts


def plot_ratios(
    results: dict[str, Result], rss_ratio: float, path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*results, RSS_METRIC]
    ratios = [results[n][2] for n in results] + [rss_ratio]
    errors = [results[n][3] for n in results] + [0.0]
    targets = [TARGETS[n] for n in results] + [None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = [
        "tab:grey" if t is None else "tab:green" if r >= t else "tab:orange"
        for r, t in zip(ratios, targets)
    ]
    ax.barh(names, ratios, xerr=errors, color=colors)
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([t, t], [i - 0.4, i + 0.4], color="black", linewidth=2)
    left = 0.85
    for i, (r, t) in enumerate(zip(ratios, targets)):
        if r < left:  # off the scale (the junk-PSK row): say it in words
            target = "" if t is None else f" (target {t:.2f})"
            ax.text(left + 0.005, i, f"{r:.3f}{target}", va="center")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlim(left, 1.1)
    ax.invert_yaxis()
    ax.set_xlabel(
        "patched / stock (above 1 is better; black bar = target; "
        "grey = reference without tlsctl)"
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(
    data: dict[str, list[tuple[float, float, float]]], path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [x / 1024 for x, _, _ in data["size"]]
    left.plot(sizes, [100 * s for _, s, _ in data["size"]], "o-", label="stock")
    left.plot(sizes, [100 * p for _, _, p in data["size"]], "s-", label="patched")
    left.set_xscale("log", base=2)
    left.set_xlabel("upload size (KiB), server reads at once")
    left.set_ylabel("uploads that lost data (%)")
    left.set_ylim(-5, 105)
    left.legend()
    delays = [1000 * x for x, _, _ in data["delay"]]
    right.plot(delays, [100 * s for _, s, _ in data["delay"]], "o-", label="stock")
    right.plot(delays, [100 * p for _, _, p in data["delay"]], "s-", label="patched")
    right.set_xlabel("server read delay after the handshake (ms), 256 KiB uploads")
    right.set_ylim(-5, 105)
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------ instructions

_WORK = {
    "full handshakes/s": 20,
    "resumed handshakes/s": 20,
    "resumed handshakes/s, shared keys": 20,
    "1 KiB writes/s": 2000,
    "bulk MB/s": 64,
}


def _worker(metric: str, side: str, n: int) -> None:
    client, stock_ctx, patched_ctx, keyed_ctx, _ = _contexts()
    ctx = stock_ctx if side == "stock" else patched_ctx
    if metric == "resumed handshakes/s, shared keys":
        ctx = stock_ctx if side == "stock" else keyed_ctx
    if metric.startswith("resumed"):
        resumed_handshakes(ctx, client, session_of(ctx, client), n)
    elif metric == "full handshakes/s":
        handshakes(ctx, client, n)
    else:
        pairs = [Pair(ctx, client).handshake_and_first_byte() for _ in range(4)]
        writes(pairs, 1024 if metric.startswith("1 KiB") else BULK, n)


def _instructions(metric: str, side: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--worker",
            metric,
            side,
            str(n),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in proc.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"no callgrind total in: {proc.stderr[-500:]}")


def instruction_ratios(progress: Progress) -> dict[str, tuple[float, float, float]]:
    """Instructions per operation (stock, patched) and patched/stock cost
    expressed as a rate ratio (stock instructions / patched instructions)."""
    out = {}
    for metric, n in _WORK.items():
        per_op = {}
        for side in ("stock", "patched"):
            small = _instructions(metric, side, n)
            large = _instructions(metric, side, 11 * n)
            per_op[side] = (large - small) / (10 * n)
        out[metric] = (
            per_op["stock"],
            per_op["patched"],
            per_op["stock"] / per_op["patched"],
        )
        progress.step(f"callgrind {metric}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="9 rounds, not 41")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions with callgrind",
    )
    parser.add_argument(
        "--scaling", action="store_true", help="also one-way loss vs size and delay"
    )
    parser.add_argument(
        "--plot-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="where the PNG charts go (default: bench/)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no charts")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, everything once: checks the tool runs (numbers meaningless)",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rss-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        metric, side, n = args.worker
        _worker(metric, side, int(n))
        return 0
    if args.rss_worker:
        side, n = args.rss_worker
        _rss_worker(side, int(n))
        return 0

    info = tlsctl.info()
    rounds = 9 if args.quick else 41
    if args.smoke:
        global IDLE, RSS_REPEATS, SCALING_CONNECTIONS, SIZES, DELAYS
        rounds, IDLE, RSS_REPEATS, SCALING_CONNECTIONS = 2, 50, 1, 3
        SIZES, DELAYS = [4 << 10, 256 << 10], [0.0, 0.01]
        args.scaling = True
    header = (
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"tlsctl mechanism={info.mechanism}"
    )
    print(header)
    if info.mechanism is None:
        print(f"cannot benchmark defer here: {info.reason or 'no mechanism'}")
        return 1
    if args.instructions and shutil.which("valgrind") is None:
        print("--instructions needs valgrind (apt-get install valgrind)")
        return 1
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("charts need matplotlib: pip install '.[bench]' (or --no-plot)")
            return 1
    steps = rounds * len(wall_metrics()) + RSS_REPEATS
    steps += (len(SIZES) + len(DELAYS)) if args.scaling else 0
    steps += len(_WORK) if args.instructions else 0
    progress = Progress(steps, enabled=True)

    results = wall_clock(rounds, progress)
    rss_stock, rss_patched = rss(progress)
    scale = scaling(progress) if args.scaling else None
    counts = instruction_ratios(progress) if args.instructions else None

    print(
        f"\nwall clock, {rounds} interleaved rounds "
        "(ratio = median of per-round patched/stock; +/- = half the IQR)"
    )
    print(
        f"{'metric':40} {'stock':>12} {'patched':>12} {'ratio':>7} "
        f"{'+/-':>6} {'target':>7}  verdict"
    )
    for metric, (stock, patched, ratio, spread) in results.items():
        target = TARGETS[metric]
        if target is None:
            shown, verdict = "-", "reference"
        else:
            shown, verdict = f"{target:.2f}", "meets" if ratio >= target else "BELOW"
        print(
            f"{metric:40} {stock:12.1f} {patched:12.1f} {ratio:7.3f} "
            f"{spread:6.3f} {shown:>7}  {verdict}"
        )
    per_conn = (rss_patched - rss_stock) / IDLE
    rss_ratio = rss_stock / rss_patched
    print(
        f"{RSS_METRIC:40} {rss_stock / 1e6:10.2f}MB {rss_patched / 1e6:10.2f}MB "
        f"{rss_ratio:7.3f} {'':6} {'+256B':>7}  "
        f"{'meets' if per_conn <= RSS_TARGET_BYTES else 'BELOW'} "
        f"({per_conn:+.0f} bytes per connection)"
    )

    if counts is not None:
        print("\ninstructions per operation (callgrind, PYTHONHASHSEED=0)")
        print(
            f"{'metric':40} {'stock':>12} {'patched':>12} {'ratio':>7} "
            f"{'target':>7}  verdict"
        )
        for metric, (stock, patched, ratio) in counts.items():
            target = TARGETS[metric]
            assert target is not None  # reference rows are not counted
            verdict = "meets" if ratio >= target else "BELOW"
            print(
                f"{metric:40} {stock:12.0f} {patched:12.0f} {ratio:7.4f} "
                f"{target:7.2f}  {verdict}"
            )

    if scale is not None:
        print(f"\none-way uploads that lost data ({SCALING_CONNECTIONS} per point)")
        for size, s, p in scale["size"]:
            print(
                f"  {int(size) >> 10:6} KiB, no delay:      "
                f"stock {s:5.0%}  patched {p:5.0%}"
            )
        for delay, s, p in scale["delay"]:
            print(
                f"  256 KiB, read delay {delay * 1000:4g} ms: "
                f"stock {s:5.0%}  patched {p:5.0%}"
            )

    if not args.no_plot:
        ratios_png = os.path.join(args.plot_dir, "ratios.png")
        plot_ratios(results, rss_ratio, ratios_png, header)
        print(f"\nwrote {ratios_png}")
        if scale is not None:
            scaling_png = os.path.join(args.plot_dir, "scaling.png")
            plot_scaling(scale, scaling_png, header)
            print(f"wrote {scaling_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
