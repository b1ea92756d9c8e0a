"""tlsctl benchmark: what a server operator pays for tlsctl, measured in one run.

    python bench/bench.py                  # 41 rounds per wall-clock metric
    python bench/bench.py --quick          # 9 rounds, fewer repeats elsewhere
    python bench/bench.py --instructions   # also callgrind instruction counts
    python bench/bench.py --scaling        # also one-way loss vs size / delay
    python bench/bench.py --smoke          # seconds; checks the tool, not speed
    TLSCTL_MECHANISM=stash python bench/bench.py   # in-process rows: the stash

It prints tables with a progress bar while it runs and writes PNG charts
(``--plot-dir``, default ``bench/``; needs matplotlib: ``pip install
'.[bench]'``): ``ratios.png`` (every ratio row with its interval) and, with
``--scaling``, ``scaling.png``.  The load average is printed before and
after: the figures of a busy machine are wider, not wrong, as long as the
intervals are read with them.

Mechanisms.  Rows measured in this process ("patched" = ``tlsctl.patch``)
use the mechanism this process bound (the header says which; set
``TLSCTL_MECHANISM=stash`` to measure the stash, OpenSSL 1.1.1's mechanism,
on OpenSSL 3.x).  Rows measured in server subprocesses (instructions per
connection, write calls, RSS) show every mechanism side by side: the
subprocess gets ``TLSCTL_MECHANISM=native`` or ``stash`` in its
environment, and the stock server does not import tlsctl at all.

Verdicts.  A row with a target says "meets" or "misses" only when its whole
interval lies on one side of the target, otherwise "inconclusive":

* wall-clock and server-CPU rows: the ratio is the median of the per-round
  patched/stock ratios, "+/-" is half their interquartile range (the
  spread), and the interval is a percentile bootstrap 95% confidence
  interval of that median (2,000 resamples of the rounds, fixed seed);
* instruction rows: the interval is the range (min..max) of the ratios of
  ``--repeats`` independent repetitions (callgrind counts vary a little
  with random keys and address layout);
* RSS per idle connection: median of the per-repetition differences
  patched - stock, bootstrap 95% CI of that median;
* import time: difference of the minimums, bootstrap 95% CI of that
  difference (resampling each side's processes).

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

Most rows run in-process over memory BIOs, so the figures are the CPU
cost of the TLS work plus tlsctl's own Python and C work, with no network
noise.  Client and server both run here, so in the rows without "server"
in their name the client's work (which tlsctl does not change) dilutes the
server's difference:

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
* server CPU, full + request/response: the server thread's CPU time
  (``time.thread_time_ns``) in only its own calls, ``wrap_bio`` (where
  tlsctl's factory runs), ``do_handshake``, ``read`` of a 42-byte request
  and ``write`` of a 100-byte response (the first write: patched sends the
  tickets with it), over memory BIOs; the client's calls and the BIO
  transfers are not timed.  Reported as exchanges per server CPU second
  (target 0.99 of stock);
* server CPU, resumed + request/response: the same with a resumed
  handshake (target 0.99);
* junk-PSK hellos/s, on_resume (CPU): the server's CPU time
  (``time.thread_time``) in ``do_handshake`` for one crafted 63 KB TLS 1.3
  ClientHello offering 9,000 one-byte PSK identities (``clienthello.py``
  beside this file), up to its ServerHello; "patched" is a plain context
  given ``tlsctl.set_ticket_callbacks(on_resume=...)`` (answering
  IGNORE_RENEW), "stock" one without.  OpenSSL calls the decrypt callback
  once per identity, so without a bound on the Python calls this is an
  amplification (target: at most 2x stock CPU, a ratio of 0.5).

First response on real sockets (127.0.0.1, in-process mechanism): a
blocking server thread per side (stock, patched) serves one request per
connection; the client, in the main thread, connects, handshakes, then
times from its ``sendall`` of the request to the last byte of the 100-byte
response.  41 connections per side, alternating stock/patched (which goes
first alternates too), after 3 warm-up pairs; once with a client socket
without ``TCP_NODELAY`` (Nagle holds the request until the client's
Finished is ACKed, so a server that sends nothing after the handshake and
delays its ACK stalls it ~40 ms) and once with it.  Reported: each side's
median in ms with half its IQR, and the median of the per-pair
stock/patched latency ratios (above 1: patched answers sooner) with its
bootstrap CI.  No target: the row shows whether a stall exists.

Server process (``tlsserver.py`` beside this file; real sockets on
127.0.0.1, the client is this process, not traced or counted):

* instructions per connection (``--instructions``, needs valgrind): the
  server process under ``valgrind --tool=callgrind`` (``PYTHONHASHSEED=0``)
  serves N and 11N connections, each a full handshake (or a resumed one
  with the client's newest session: the first connection of a run is full,
  so the difference holds 10N resumed ones), a request line and a 100-byte
  response; (11N run - N run) / 10N is the server's cost per connection,
  start-up cancelled.  stock vs native vs stash, ``--repeats`` times
  (target: stock/patched >= 0.99 for each);
* write calls per first write (needs strace): the server runs under
  ``strace -f`` tracing write, writev, sendto, sendmsg and sendmmsg, and
  writes markers to /dev/null around each connection's first application
  write (``sendall`` of the response); the calls on the connection's fd
  between them are counted, with the bytes they wrote (5 connections; a
  count, not a ratio; the resumed row skips each run's first, full
  connection);
* RSS per idle connection: after 20 warm-up exchanges the server accepts
  N = 1,000 connections, or 3N, and keeps them idle after their
  handshakes (no first write yet: the stash holds the tickets it made,
  stock has already sent them to the kernel); the growth of its resident
  set from the N run to the 3N run, / 2N, is the cost per connection.  A
  slope, because the growth of the first connections carries a one-time
  offset that differs between the sides (measured: patched ~1.25 MB less
  in the first 1,000, so growth / N read -1,190 bytes per connection for
  native at N = 1,000 and -355 at 3,000, while the slopes from 500 to
  5,000 connections all agreed within 10 bytes).  7 repetitions
  alternating stock, native and stash (target: patched - stock <= +256
  bytes per connection).  The breakdown: the same slope with
  ``tracemalloc`` (bytes of Python objects, patched - stock) and tlsctl's
  stash accessor (ticket bytes held back, read in the N run); the rest
  (OpenSSL structures, the stash's BIO, malloc slack) is inferred as the
  remainder.  (Until this version the row ran memory-BIO pairs in one
  process, clients included: stock clients kept the 510 bytes of tickets
  unread in their memory BIO, which made patched look ~510 bytes better.)

Import time: ``python -X importtime -c "import tlsctl"`` against ``import
ssl``, 15 fresh processes each, alternating; the cumulative time of the
top-level module, minimum of each side; reported as ms added over
``import ssl`` (target <= +5 ms), with the largest self times among the
modules ``import tlsctl`` adds.  On a loaded machine every one of 15
processes can be preempted (measured at load 6 on 2 CPUs: the minimum of
``import ssl`` doubled), so a cross-check line gives the same difference
of minimums for each process's user + system CPU time (``getrusage``;
whole process, start-up included on both sides), which preemption does
not inflate; it has no verdict of its own.

Instructions of the in-process rows (``--instructions``): the same work
as the wall-clock rows under callgrind with ``PYTHONHASHSEED=0``, counting
instructions for N and 11N operations and taking the difference, so
start-up cancels (client included).

Scaling (``--scaling``, real sockets on 127.0.0.1, 20 connections a point):
the share of one-way uploads (the client uploads and closes without
reading) that lost data, stock vs patched, against the upload size
(4 KiB .. 4 MiB) and against the server's read delay after the handshake.

Rotation (``--rotation``, about 4 s): the share of reconnects that resume
when ``rotate_ticket_keys(every=1, keep=2)`` rotates the keys, against the
reconnect delay in periods (real clock; an hour-long period behaves the
same, scaled).

This is a measuring tool, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Callable, NamedTuple

import clienthello  # beside this file (bench/ is sys.path[0])
import tlsctl
import tlsserver  # beside this file
from _pairs import BioPair, connect  # beside this file
from tlsctl import scenarios

BY_HAND = "full handshakes/s, technique by hand"
BY_HAND_RESUMED = "resumed handshakes/s, technique by hand"
SERVER_FULL = "server CPU, full + request/response"
SERVER_RESUMED = "server CPU, resumed + request/response"
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
    SERVER_RESUMED: 0.99,
    "1 KiB writes/s": 0.98,
    "bulk MB/s": 0.99,
    # Server CPU for a hello of junk PSK identities: at most 2x stock.
    JUNK_PSK: 0.5,
}
SERVER_INSTRUCTIONS_TARGET = 0.99  # stock / patched instructions per connection
RSS_TARGET_BYTES = 256  # per connection, patched - stock
IMPORT_TARGET_MS = 5.0  # added over import ssl
BULK = 64 * 1024
CONNECTIONS = 16
HANDSHAKES = 60  # per side and round
REQUEST, RESPONSE = tlsserver.REQUEST, tlsserver.RESPONSE
LOCALHOST = tlsserver.LOCALHOST
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tlsserver.py")
# Server subprocess configurations: name -> (tlsserver.py side, TLSCTL_MECHANISM).
SERVER_CONFIGS: dict[str, tuple[str, str | None]] = {
    "stock": ("stock", None),
    "native": ("patched", "native"),
    "stash": ("patched", "stash"),
}
MODES = ("full", "resumed")


@dataclasses.dataclass
class Plan:
    """How much of everything one run measures (``--quick``, ``--smoke``)."""

    rounds: int = 41  # wall-clock and server-CPU rounds
    latency_pairs: int = 41  # connections per side, per client kind
    latency_warm: int = 3
    idle: int = 1000  # N: RSS runs hold N and 3N idle connections
    idle_warm: int = 20
    rss_repeats: int = 7
    import_runs: int = 15  # fresh processes per side
    strace_connections: int = 5
    repeats: int = 3  # callgrind repetitions
    server_instr_n: int = 20  # N of the N / 11N server-process runs
    work_scale: float = 1.0  # of the in-process callgrind work (_WORK)

    @classmethod
    def quick(cls) -> Plan:
        return cls(rounds=9, latency_pairs=15, rss_repeats=3, import_runs=7)

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            rounds=2,
            latency_pairs=3,
            latency_warm=1,
            idle=50,
            idle_warm=2,
            rss_repeats=1,
            import_runs=2,
            strace_connections=2,
            repeats=1,
            server_instr_n=1,
            work_scale=0.05,
        )


# ------------------------------------------------------------ statistics

BOOTSTRAP = 2000


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[Sequence[float]], float] = statistics.median,
    resamples: int = BOOTSTRAP,
) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of ``stat(values)``
    (fixed seed: the same data give the same interval)."""
    rng = random.Random(0)
    n = len(values)
    stats = sorted(stat(rng.choices(values, k=n)) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]


def verdict(lo: float, hi: float, target: float | None, higher_is_better: bool) -> str:
    """Return "meets" / "misses" only when the interval [lo, hi] lies entirely on
    one side of the target, else "inconclusive"; "reference" without one."""
    if target is None:
        return "reference"
    if higher_is_better:
        good, bad = lo >= target, hi < target
    else:
        good, bad = hi <= target, lo > target
    return "meets" if good else "misses" if bad else "inconclusive"


def _iqr_half(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


class Row(NamedTuple):
    """One paired-rounds metric: median rates, median ratio, its spread
    (half the IQR of the per-round ratios) and bootstrap 95% CI."""

    stock: float
    patched: float
    ratio: float
    spread: float
    lo: float
    hi: float


def row_of(stock: list[float], patched: list[float], ratios: list[float]) -> Row:
    lo, hi = bootstrap_ci(ratios)
    return Row(
        statistics.median(stock),
        statistics.median(patched),
        statistics.median(ratios),
        _iqr_half(ratios),
        lo,
        hi,
    )


# ------------------------------------------------------------ in process


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
    from tlsctl._bind import lib

    pair = BioPair(server, client, session).handshake()
    real = pair.server._sslobj  # type: ignore[attr-defined]
    if lib.tlsctl_queue_tickets(lib.tlsctl_ssl_of(id(real)), 2, 1, 0) < 1:
        raise RuntimeError("SSL_new_session_ticket failed (OpenSSL 3.0+ only)")
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
) -> int:
    """A handshake (resumed with ``session``) and one request/response over
    memory BIOs; returns the server thread's CPU time, in ns, in its own
    calls only: ``wrap_bio``, ``do_handshake``, ``read``, ``write``."""
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
) -> Row:
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
    return row_of(stock, patched, ratios)


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
    results[SERVER_FULL] = _paired_rounds(
        lambda: server_exchange(stock_ctx, client),
        lambda: server_exchange(patched_ctx, client),
        rounds,
        progress,
        SERVER_FULL,
        self_timed=True,
    )
    results[SERVER_RESUMED] = _paired_rounds(
        lambda: server_exchange(stock_ctx, client, sessions[stock_ctx]),
        lambda: server_exchange(patched_ctx, client, sessions[patched_ctx]),
        rounds,
        progress,
        SERVER_RESUMED,
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
        results[metric] = _paired_rounds(
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
    import threading

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
    ratios = [s / p for s, p in zip(times[0], times[1])]
    lo, hi = bootstrap_ci(ratios)
    return Latency(
        statistics.median(stock_ms),
        _iqr_half(stock_ms),
        statistics.median(patched_ms),
        _iqr_half(patched_ms),
        statistics.median(ratios),
        lo,
        hi,
    )


# ------------------------------------------------------------ server process


def _server_env(mechanism: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("TLSCTL_MECHANISM", None)
    if mechanism is not None:
        env["TLSCTL_MECHANISM"] = mechanism
    return env


class ServerProcess:
    """``tlsserver.py`` in a subprocess (under ``prefix``: valgrind,
    strace), for ``with``; ``port`` is where it listens."""

    def __init__(
        self,
        config: str,
        n: int,
        certfile: str,
        *flags: str,
        prefix: Sequence[str] = (),
    ) -> None:
        side, mechanism = SERVER_CONFIGS[config]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, SERVER_SCRIPT, side, str(n), certfile, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=_server_env(mechanism),
        )
        self.port = int(self.read_line())

    def read_line(self, timeout: float = 300.0) -> str:
        """One line of the server's stdout (unbuffered: select works)."""
        stream: IO[bytes] | None = self.proc.stdout
        assert stream is not None
        fd, line = stream.fileno(), b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no line from the server: {self.error_text()}")
            byte = os.read(fd, 1)
            if not byte:
                raise RuntimeError(f"the server exited: {self.error_text()}")
            line += byte
        return line.decode()

    def error_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def finish(self, timeout: float = 600.0) -> str:
        """Close its stdin, wait for it; returns its stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(timeout) != 0:
            raise RuntimeError(
                f"server exited {self.proc.returncode}: {self.error_text()}"
            )
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # only on an error path
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.stderr.close()


def exchange_clients(port: int, client: ssl.SSLContext, n: int, resumed: bool) -> None:
    """``n`` connections, one request and response each; ``resumed``: each
    offers the newest session (the first one is a full handshake)."""
    session: ssl.SSLSession | None = None
    reused = 0
    for _ in range(n):
        with socket.create_connection((LOCALHOST, port), timeout=120) as raw:
            with client.wrap_socket(
                raw, server_hostname="localhost", session=session
            ) as conn:
                conn.sendall(REQUEST)
                if tlsserver.recv_line(conn) != RESPONSE:
                    raise RuntimeError("bad response from the server process")
                reused += bool(conn.session_reused)
                if resumed:
                    session = conn.session
    if reused != (n - 1 if resumed else 0):
        raise RuntimeError(f"{reused} of {n} connections resumed ({resumed=})")


VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def _collected(stderr: str) -> int:
    for line in stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"no callgrind total in: {stderr[-500:]}")


def _server_instructions(
    config: str, mode: str, n: int, certfile: str, client: ssl.SSLContext
) -> int:
    with ServerProcess(config, n, certfile, prefix=VALGRIND) as server:
        exchange_clients(server.port, client, n, resumed=mode == "resumed")
        return _collected(server.finish())


class CountRow(NamedTuple):
    """Instructions per operation: medians over repetitions, the median
    stock/patched ratio and the range of the per-repetition ratios."""

    stock: float
    patched: float
    ratio: float
    lo: float
    hi: float


def _count_row(stock: list[float], patched: list[float]) -> CountRow:
    ratios = [s / p for s, p in zip(stock, patched)]
    return CountRow(
        statistics.median(stock),
        statistics.median(patched),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def server_configs() -> list[str]:
    """The patched server configurations this OpenSSL can run."""
    native = tlsctl.info().native_tickets
    return [c for c in SERVER_CONFIGS if c != "stock" and (native or c != "native")]


def server_instructions(
    plan: Plan, certfile: str, client: ssl.SSLContext, progress: Progress
) -> dict[tuple[str, str], CountRow]:
    """{(mode, config): row} of server-process instructions per connection."""
    n = plan.server_instr_n
    configs = ["stock", *server_configs()]
    per_conn: dict[tuple[str, str], list[float]] = {}
    for _ in range(plan.repeats):
        for mode in MODES:
            for config in configs:
                small = _server_instructions(config, mode, n, certfile, client)
                large = _server_instructions(config, mode, 11 * n, certfile, client)
                per_conn.setdefault((mode, config), []).append(
                    (large - small) / (10 * n)
                )
                progress.step(f"callgrind server {mode} {config}")
    return {
        (mode, config): _count_row(per_conn[mode, "stock"], per_conn[mode, config])
        for mode in MODES
        for config in configs[1:]
    }


STRACE_CALLS = "write,writev,sendto,sendmsg,sendmmsg"
_SYSCALL = re.compile(r"^(?:\d+\s+)?(\w+)\((\d+),.*\)\s+=\s+(-?\d+)")


def first_write_calls(log: str) -> list[tuple[int, int]]:
    """(write calls on the connection, bytes they wrote) per first write,
    from an strace log of ``tlsserver.py --mark``."""
    begin, end = tlsserver.MARK_BEGIN.decode(), tlsserver.MARK_END.decode()
    out: list[tuple[int, int]] = []
    fd: str | None = None
    calls = written = 0
    for line in log.splitlines():
        if begin in line:
            fd = line.split(begin, 1)[1].split('"', 1)[0]
            calls = written = 0
        elif end in line:
            if fd is not None:
                out.append((calls, written))
            fd = None
        elif fd is not None:
            m = _SYSCALL.match(line)
            if m and m.group(2) == fd:
                calls += 1
                written += max(0, int(m.group(3)))
    return out


def write_calls(
    config: str, mode: str, n: int, certfile: str, client: ssl.SSLContext
) -> list[tuple[int, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "strace.log")
        strace = ("strace", "-f", "-qq", "-s", "64", "-e", f"trace={STRACE_CALLS}")
        with ServerProcess(
            config, n, certfile, "--mark", prefix=(*strace, "-o", log)
        ) as server:
            exchange_clients(server.port, client, n, resumed=mode == "resumed")
            server.finish()
        with open(log) as f:
            counts = first_write_calls(f.read())
    if len(counts) != n:
        raise RuntimeError(f"{len(counts)} first writes in the trace, expected {n}")
    return counts[1:] if mode == "resumed" else counts


def write_call_table(
    plan: Plan, certfile: str, client: ssl.SSLContext, progress: Progress
) -> dict[tuple[str, str], list[tuple[int, int]]]:
    out = {}
    for mode in MODES:
        for config in ("stock", *server_configs()):
            n = plan.strace_connections + (mode == "resumed")
            out[mode, config] = write_calls(config, mode, n, certfile, client)
            progress.step(f"strace {mode} {config}")
    return out


def idle_server(
    config: str,
    n: int,
    plan: Plan,
    certfile: str,
    client: ssl.SSLContext,
    trace_python: bool = False,
) -> dict[str, int]:
    """One ``tlsserver.py --idle`` run of ``n`` idle connections: its
    rss/py/held/waiting line."""
    flags = ["--idle", "--warm", str(plan.idle_warm)]
    if trace_python:
        flags.append("--tracemalloc")
    with ServerProcess(config, n, certfile, *flags) as server:
        exchange_clients(server.port, client, plan.idle_warm, resumed=False)
        idle = []
        try:
            for _ in range(n):
                raw = socket.create_connection((LOCALHOST, server.port), timeout=60)
                idle.append(client.wrap_socket(raw, server_hostname="localhost"))
            line = server.read_line()
        finally:
            for conn in idle:
                conn.close()
        server.finish()
    return {k: int(v) for k, v in (item.split("=") for item in line.split())}


class RssRow(NamedTuple):
    stock: float  # median bytes per idle connection (slope N -> 3N)
    patched: float
    delta: float  # median of per-repetition patched - stock
    lo: float
    hi: float
    python: float  # tracemalloc: patched - stock, bytes per connection
    held: float  # stash bytes held per connection (-1: unknown)
    waiting: int  # of the N idle connections: tickets wait for the first write


def _slope(
    key: str, config: str, plan: Plan, certfile: str, client: ssl.SSLContext
) -> tuple[float, dict[str, int]]:
    """(growth of ``key`` per connection between N and 3N idle connections,
    the N run's line): one-time effects of the first connections cancel."""
    trace = key == "py"
    small = idle_server(config, plan.idle, plan, certfile, client, trace)
    large = idle_server(config, 3 * plan.idle, plan, certfile, client, trace)
    return (large[key] - small[key]) / (2 * plan.idle), small


def rss_table(
    plan: Plan, certfile: str, client: ssl.SSLContext, progress: Progress
) -> dict[str, RssRow]:
    """{config: row}: resident set growth per idle connection of the server
    process, as the slope between N and 3N connections."""
    configs = ["stock", *server_configs()]
    grown: dict[str, list[float]] = {c: [] for c in configs}
    for i in range(plan.rss_repeats):
        shift = i % len(configs)
        for config in configs[shift:] + configs[:shift]:
            grown[config].append(_slope("rss", config, plan, certfile, client)[0])
        progress.step("RSS per idle connection")
    traced = {c: _slope("py", c, plan, certfile, client) for c in configs}
    progress.step("RSS breakdown (tracemalloc)")
    out = {}
    for config in configs[1:]:
        deltas = [p - s for p, s in zip(grown[config], grown["stock"])]
        lo, hi = bootstrap_ci(deltas)
        line = traced[config][1]
        out[config] = RssRow(
            statistics.median(grown["stock"]),
            statistics.median(grown[config]),
            statistics.median(deltas),
            lo,
            hi,
            traced[config][0] - traced["stock"][0],
            line["held"] / plan.idle if line["held"] >= 0 else -1.0,
            line["waiting"],
        )
    return out


# ------------------------------------------------------------ import time


def _bytecode(module: str) -> None:
    """Compile ``module``'s package to bytecode first, as pip does when it
    installs one: an editable checkout, or PYTHONDONTWRITEBYTECODE=1 in the
    environment, would otherwise make every fresh process compile tlsctl
    from source (~15 ms here), a cost no installed server pays."""
    code = (
        f"import compileall, os, {module} as m\n"
        "if hasattr(m, '__path__'):\n"
        "    compileall.compile_dir(os.path.dirname(m.__file__), quiet=1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _import_us(module: str) -> tuple[int, dict[str, int], float]:
    """(cumulative us of ``import module`` in a fresh process, {module:
    self us} of everything it imported, from ``-X importtime``; the whole
    process's user + system CPU ms, from the kernel's accounting)."""
    import resource

    _bytecode(module)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = 1000 * (
        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    )
    selfs: dict[str, int] = {}
    total = None
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        selfs[name.strip()] = int(own)
        if name.strip() == module:
            total = int(cumulative)
    if total is None:
        raise RuntimeError(f"no importtime line for {module}: {proc.stderr[-500:]}")
    return total, selfs, cpu_ms


class ImportRow(NamedTuple):
    ssl_ms: float  # minimum cumulative
    tlsctl_ms: float
    added_ms: float  # tlsctl_ms - ssl_ms
    lo: float
    hi: float
    top: list[tuple[str, float]]  # largest self times (ms) tlsctl adds
    cpu_ssl_ms: float  # minimum process CPU time (start-up included)
    cpu_tlsctl_ms: float
    cpu_added_ms: float
    cpu_lo: float
    cpu_hi: float


def _min_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """min(a) - min(b) and a bootstrap 95% CI of it (each side resampled)."""
    rng = random.Random(0)
    boot = sorted(
        min(rng.choices(a, k=len(a))) - min(rng.choices(b, k=len(b)))
        for _ in range(BOOTSTRAP)
    )
    return (
        min(a) - min(b),
        boot[int(0.025 * BOOTSTRAP)],
        boot[int(0.975 * BOOTSTRAP) - 1],
    )


def import_time(plan: Plan, progress: Progress) -> ImportRow:
    times: dict[str, list[float]] = {"ssl": [], "tlsctl": []}
    cpu: dict[str, list[float]] = {"ssl": [], "tlsctl": []}
    best: dict[str, tuple[int, dict[str, int]]] = {}
    for i in range(plan.import_runs):
        for module in ("ssl", "tlsctl") if i % 2 == 0 else ("tlsctl", "ssl"):
            total, selfs, cpu_ms = _import_us(module)
            times[module].append(total / 1000)
            cpu[module].append(cpu_ms)
            if module not in best or total < best[module][0]:
                best[module] = (total, selfs)
        progress.step("import time")
    added, lo, hi = _min_difference(times["tlsctl"], times["ssl"])
    cpu_added, cpu_lo, cpu_hi = _min_difference(cpu["tlsctl"], cpu["ssl"])
    ssl_modules = best["ssl"][1]
    extra = [
        (name, us / 1000)
        for name, us in best["tlsctl"][1].items()
        if name not in ssl_modules
    ]
    extra.sort(key=lambda item: -item[1])
    return ImportRow(
        min(times["ssl"]),
        min(times["tlsctl"]),
        added,
        lo,
        hi,
        extra[:5],
        min(cpu["ssl"]),
        min(cpu["tlsctl"]),
        cpu_added,
        cpu_lo,
        cpu_hi,
    )


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


class ChartRow(NamedTuple):
    name: str
    ratio: float
    lo: float
    hi: float
    target: float | None


def plot_ratios(rows: list[ChartRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    ratios = [r.ratio for r in rows]
    errors = [
        [max(0.0, r.ratio - r.lo) for r in rows],
        [max(0.0, r.hi - r.ratio) for r in rows],
    ]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    colors = [
        "tab:grey"
        if r.target is None
        else {"meets": "tab:green", "misses": "tab:orange"}.get(
            verdict(r.lo, r.hi, r.target, True), "tab:olive"
        )
        for r in rows
    ]
    ax.barh(names, ratios, xerr=errors, color=colors)
    for i, r in enumerate(rows):
        if r.target is not None:
            ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black", lw=2)
    left, right = 0.85, 1.1
    for i, r in enumerate(rows):
        if not left <= r.ratio <= right:  # off the scale: say it in words
            target = "" if r.target is None else f" (target {r.target:.2f})"
            x = left + 0.005 if r.ratio < left else right - 0.1
            ax.text(x, i, f"{r.ratio:.3f}{target}", va="center")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlim(left, right)
    ax.invert_yaxis()
    ax.set_xlabel(
        "stock cost / patched cost (above 1 is better; whiskers: 95% CI or "
        "range; black bar = target;\ngreen meets, orange misses, olive "
        "inconclusive, grey = no target)"
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
        pairs = [connect(ctx, client) for _ in range(4)]
        writes(pairs, 1024 if metric.startswith("1 KiB") else BULK, n)


def _instructions(metric: str, side: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [*VALGRIND, sys.executable, __file__, "--worker", metric, side, str(n)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return _collected(proc.stderr)


def instruction_ratios(plan: Plan, progress: Progress) -> dict[str, CountRow]:
    """In-process instructions per operation (client included), stock vs
    patched (this process's mechanism), ``plan.repeats`` times."""
    out = {}
    for metric, work in _WORK.items():
        n = max(1, round(work * plan.work_scale))
        per_op: dict[str, list[float]] = {"stock": [], "patched": []}
        for _ in range(plan.repeats):
            for side in ("stock", "patched"):
                small = _instructions(metric, side, n)
                large = _instructions(metric, side, 11 * n)
                per_op[side].append((large - small) / (10 * n))
            progress.step(f"callgrind {metric}")
        out[metric] = _count_row(per_op["stock"], per_op["patched"])
    return out


# ------------------------------------------------------------ report


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def _interval(lo: float, hi: float, digits: int = 3) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def report_wall(results: dict[str, Row], rounds: int) -> None:
    print(
        f"\nin process, {rounds} interleaved rounds (ratio = median of per-round "
        "patched/stock rate ratios; +/- = half their IQR;\n95% CI = bootstrap "
        "CI of that median; verdict from the CI)"
    )
    print(
        f"{'metric':40} {'stock':>11} {'patched':>11} {'ratio':>6} {'+/-':>6} "
        f"{'95% CI':>15} {'target':>6}  verdict"
    )
    for metric, row in results.items():
        target = TARGETS[metric]
        shown = "-" if target is None else f"{target:.2f}"
        print(
            f"{metric:40} {row.stock:11.1f} {row.patched:11.1f} {row.ratio:6.3f} "
            f"{row.spread:6.3f} {_interval(row.lo, row.hi):>15} {shown:>6}  "
            f"{verdict(row.lo, row.hi, target, True)}"
        )


def report_latency(rows: dict[str, Latency], pairs: int) -> None:
    print(
        f"\nfirst response, real sockets, {pairs} connections per side alternating "
        "(ms from the client's request to the last byte of the response:\n"
        "median +/- half the IQR; ratio = median of per-pair stock/patched, "
        "above 1: patched sooner; 95% CI bootstrap; no target)"
    )
    print(
        f"{'client':40} {'stock ms':>15} {'patched ms':>15} {'ratio':>6} {'95% CI':>15}"
    )
    for name, r in rows.items():
        print(
            f"{name:40} {r.stock_ms:8.3f} +/-{r.stock_spread:<5.3f}"
            f"{r.patched_ms:8.3f} +/-{r.patched_spread:<5.3f}{r.ratio:6.3f} "
            f"{_interval(r.lo, r.hi):>15}"
        )


def report_counts(
    title: str, rows: dict[str, CountRow], targets: dict[str, float]
) -> None:
    print(f"\n{title}")
    print(
        f"{'metric':40} {'stock':>11} {'patched':>11} {'ratio':>7} "
        f"{'range':>17} {'target':>6}  verdict"
    )
    for name, r in rows.items():
        target = targets[name]
        print(
            f"{name:40} {r.stock:11.0f} {r.patched:11.0f} {r.ratio:7.4f} "
            f"{_interval(r.lo, r.hi, 4):>17} {target:6.2f}  "
            f"{verdict(r.lo, r.hi, target, True)}"
        )


def report_writes(table: dict[tuple[str, str], list[tuple[int, int]]]) -> None:
    print(
        "\nwrite calls on the connection per first application write "
        "(strace; min-max over connections; bytes written)"
    )
    configs = sorted({c for _, c in table}, key=list(SERVER_CONFIGS).index)
    print(f"{'first write after':40} " + " ".join(f"{c:>18}" for c in configs))
    for mode in MODES:
        cells = []
        for config in configs:
            counts = table[mode, config]
            calls = sorted({c for c, _ in counts})
            written = sorted({b for _, b in counts})
            shown_calls = (
                f"{calls[0]}" if len(calls) == 1 else f"{calls[0]}-{calls[-1]}"
            )
            shown_bytes = (
                f"{written[0]}" if len(written) == 1 else f"{written[0]}-{written[-1]}"
            )
            cells.append(f"{shown_calls} ({shown_bytes} B)")
        label = f"a {mode} handshake"
        print(f"{label:40} " + " ".join(f"{c:>18}" for c in cells))


def report_rss(rows: dict[str, RssRow], plan: Plan) -> None:
    print(
        f"\nRSS per idle connection, server process (bytes: growth from "
        f"{plan.idle} to {3 * plan.idle} idle connections / {2 * plan.idle}; "
        f"{plan.rss_repeats} repetitions;\ndelta = median of per-repetition "
        f"patched - stock, 95% CI bootstrap; target <= +{RSS_TARGET_BYTES} B)"
    )
    print(
        f"{'mechanism':40} {'stock':>8} {'patched':>8} {'delta':>7} "
        f"{'95% CI':>15} {'target':>6}  verdict"
    )
    for config, r in rows.items():
        name = f"RSS per idle conn, {config}"
        print(
            f"{name:40} {r.stock:8.0f} {r.patched:8.0f} {r.delta:+7.0f} "
            f"{_interval(r.lo, r.hi, 0):>15} {'+' + str(RSS_TARGET_BYTES):>6}  "
            f"{verdict(r.lo, r.hi, RSS_TARGET_BYTES, False)}"
        )
    for config, r in rows.items():
        held = "unknown" if r.held < 0 else f"{r.held:+.0f} B"
        rest = r.delta - r.python - max(r.held, 0.0)
        print(
            f"  breakdown {config}: Python objects {r.python:+.0f} B (tracemalloc), "
            f"ticket bytes held {held}, rest {rest:+.0f} B (inferred); "
            f"{r.waiting}/{plan.idle} waiting for their first write"
        )


def report_import(r: ImportRow, runs: int) -> None:
    print(
        f"\nimport time, -X importtime, min of {runs} fresh processes each "
        "(95% CI: bootstrap of the difference of the minimums)"
    )
    print(
        f"{'metric':40} {'ssl':>8} {'tlsctl':>8} {'added':>7} {'95% CI':>15} "
        f"{'target':>6}  verdict"
    )
    print(
        f"{'import ms added over import ssl':40} {r.ssl_ms:8.2f} {r.tlsctl_ms:8.2f} "
        f"{r.added_ms:+7.2f} {_interval(r.lo, r.hi, 2):>15} "
        f"{'+' + format(IMPORT_TARGET_MS, 'g'):>6}  "
        f"{verdict(r.lo, r.hi, IMPORT_TARGET_MS, False)}"
    )
    print(
        f"{'  cross-check: process CPU ms added':40} {r.cpu_ssl_ms:8.2f} "
        f"{r.cpu_tlsctl_ms:8.2f} {r.cpu_added_ms:+7.2f} "
        f"{_interval(r.cpu_lo, r.cpu_hi, 2):>15}  (whole process, no verdict)"
    )
    top = ", ".join(f"{name} {ms:.1f}" for name, ms in r.top)
    print(f"  largest self times (ms) among modules tlsctl adds: {top}")


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


def report_rotation(rows: list[tuple[float, int, int]], keep: int) -> None:
    print(
        f"\nresumption under key rotation (rotate_ticket_keys every="
        f"{ROTATION_EVERY} s, keep={keep}; a ticket stays usable between "
        f"{keep} and {keep + 1} periods):"
    )
    print("  reconnect after (periods)  resumed")
    for delay, resumed, tried in rows:
        print(f"  {delay:25.2f}  {resumed}/{tried}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="9 rounds, not 41")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions with callgrind",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="callgrind repetitions per instruction row (default 3)",
    )
    parser.add_argument(
        "--scaling", action="store_true", help="also one-way loss vs size and delay"
    )
    parser.add_argument(
        "--rotation",
        action="store_true",
        help="also the resumption rate under key rotation (about 4 s)",
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
    args = parser.parse_args()
    if args.worker:
        metric, side, n = args.worker
        _worker(metric, side, int(n))
        return 0

    info = tlsctl.info()
    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan()
    if args.repeats is not None:
        plan.repeats = max(1, args.repeats)
    if args.smoke:
        global SCALING_CONNECTIONS, SIZES, DELAYS
        SCALING_CONNECTIONS = 3
        SIZES, DELAYS = [4 << 10, 256 << 10], [0.0, 0.01]
        args.scaling = True
    header = (
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"tlsctl mechanism={info.mechanism} (in-process rows)"
    )
    print(header)
    print(f"load average at start: {_load()}")
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
    strace = shutil.which("strace") is not None
    configs = 1 + len(server_configs())
    steps = plan.rounds * len(wall_metrics()) + 2 + plan.rss_repeats + 1
    steps += plan.import_runs + (len(MODES) * configs if strace else 0)
    steps += (len(SIZES) + len(DELAYS)) if args.scaling else 0
    if args.instructions:
        steps += plan.repeats * (len(_WORK) + len(MODES) * configs)
    progress = Progress(steps, enabled=True)

    certs = scenarios.make_certs(client_sans=1)
    client = scenarios.client_context(certs)
    with tempfile.TemporaryDirectory() as tmp:
        certfile = os.path.join(tmp, "server.pem")
        certs.server.private_key_and_cert_chain_pem.write_to_path(certfile)

        results = wall_clock(plan.rounds, progress)
        stock_ctx = scenarios.server_context(certs)
        patched_ctx = tlsctl.patch(scenarios.server_context(certs))
        latency = {
            f"without TCP_NODELAY ({info.mechanism})": first_response(
                stock_ctx, patched_ctx, client, False, plan, progress
            ),
            f"with TCP_NODELAY ({info.mechanism})": first_response(
                stock_ctx, patched_ctx, client, True, plan, progress
            ),
        }
        writes_table = (
            write_call_table(plan, certfile, client, progress) if strace else None
        )
        rss_rows = rss_table(plan, certfile, client, progress)
        imports = import_time(plan, progress)
        scale = scaling(progress) if args.scaling else None
        counts = server_counts = None
        if args.instructions:
            server_counts = server_instructions(plan, certfile, client, progress)
            counts = instruction_ratios(plan, progress)

    report_wall(results, plan.rounds)
    report_latency(latency, plan.latency_pairs)
    if server_counts is not None:
        rows = {
            f"server instr/conn, {mode}, {config}": row
            for (mode, config), row in server_counts.items()
        }
        report_counts(
            f"server process instructions per connection (callgrind, "
            f"{plan.server_instr_n} vs {11 * plan.server_instr_n} connections, "
            f"{plan.repeats} repetitions; ratio = stock/patched,\nmedian; range = "
            "min..max of the repetitions' ratios; verdict from the range)",
            rows,
            dict.fromkeys(rows, SERVER_INSTRUCTIONS_TARGET),
        )
    if writes_table is not None:
        report_writes(writes_table)
    else:
        print("\nwrite calls per first write: not measured (strace not installed)")
    report_rss(rss_rows, plan)
    report_import(imports, plan.import_runs)
    if args.rotation:
        report_rotation(rotation_resumption(), 2)
    if counts is not None:
        targets = {m: t for m, t in TARGETS.items() if t is not None}
        report_counts(
            f"in-process instructions per operation, client included (callgrind, "
            f"{plan.repeats} repetitions; mechanism={info.mechanism})",
            counts,
            targets,
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
    print(f"\nload average at end: {_load()}")

    if not args.no_plot:
        chart = [
            ChartRow(m, r.ratio, r.lo, r.hi, TARGETS[m]) for m, r in results.items()
        ]
        chart += [
            ChartRow(f"first response, {name}", r.ratio, r.lo, r.hi, None)
            for name, r in latency.items()
        ]
        if server_counts is not None:
            chart += [
                ChartRow(
                    f"server instr/conn, {mode}, {config}",
                    r.ratio,
                    r.lo,
                    r.hi,
                    SERVER_INSTRUCTIONS_TARGET,
                )
                for (mode, config), r in server_counts.items()
            ]
        ratios_png = os.path.join(args.plot_dir, "ratios.png")
        plot_ratios(chart, ratios_png, header)
        print(f"\nwrote {ratios_png}")
        if scale is not None:
            scaling_png = os.path.join(args.plot_dir, "scaling.png")
            plot_scaling(scale, scaling_png, header)
            print(f"wrote {scaling_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
