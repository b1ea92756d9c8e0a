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
* server CPU, full, technique by hand: the same on a ``num_tickets = 0``
  context with the tickets queued by hand (``SSL_new_session_ticket``)
  right before the write (that call untimed), no tlsctl code: the
  technique's own cost (reference, no target; OpenSSL 3.0+);
* server CPU, resumed + request/response: the same with a resumed
  handshake (target 0.99), and its by-hand reference;
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
  (target: stock/patched >= 0.99 for each), and the technique by hand
  (``tlsserver.py byhand``: ``num_tickets = 0``, the tickets queued with
  ``SSL_new_session_ticket`` before the response; a reference, no target;
  OpenSSL 3.0+);
* server CPU per connection: two server processes, stock and one
  configuration (native, stash, the technique by hand; and two controls:
  stock again, "A/A", the method's own bias, and "imported", stock in a
  process that has imported and bound tlsctl), serve the same exchange (a
  full or resumed handshake, a request line, a 100-byte response)
  alternately, connection by connection, the client using ``TCP_NODELAY``
  (so that no side's response waits for a delayed ACK: the technique by
  hand sets no ``TCP_QUICKACK``); where this process may use two CPUs both
  servers run on the first and the client on the second; each process
  holds a random 0 to 1 MiB from its start (``--pad``), so that the pairs
  differ in memory layout, and runs with glibc's malloc thresholds fixed
  (``bench_processes.FIXED_MALLOC``: by default an asyncio server's
  per-connection read buffer made some layouts ~10% dearer, stock or
  not).  Each server reports its thread's CPU time
  (``time.thread_time_ns``: user and system, so the kernel's work for its
  syscalls counts) and its minor page faults per round of 100
  connections (the report names rows where a server took 1 or more per
  connection); the first round is a warm-up.  5 pairs of fresh processes
  x 10 rounds, pooled; the ratio is the median of the per-round
  stock/patched CPU times, its interval a bootstrap over the pairs, then
  their rounds (target 0.99 for native and the stash).  Unlike the
  in-process CPU rows this counts what a socket server pays in the kernel:
  stock writes each ticket with its own ``write()`` during the handshake,
  a patched server its tickets and the response in one.  Two servers: a
  blocking one (``SSLSocket``) and ``asyncio.start_server`` (memory BIOs);
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

The code, beside this file: ``bench_stats.py`` (the plan, statistics,
verdicts, paired rounds), ``bench_inprocess.py`` (the memory-BIO rows,
their callgrind counts, rotation), ``bench_sockets.py`` (first response,
scaling), ``bench_processes.py`` (the server subprocess rows, import time),
``bench_report.py`` (tables and charts) and ``_pairs.py`` (the memory-BIO
pair, shared with ``soak.py`` and the tests); this file is the command line.

This is a measuring tool, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import sys
import tempfile

import tlsctl
from bench_inprocess import (
    TARGETS,
    WORK,
    instruction_ratios,
    rotation_resumption,
    wall_clock,
    wall_metrics,
    worker,
)
from bench_processes import (
    MODES,
    SERVER_KINDS,
    import_time,
    instruction_configs,
    instruction_target,
    rss_table,
    server_configs,
    server_cpu,
    server_instructions,
    socket_cpu_configs,
    socket_cpu_target,
    write_call_table,
)
from bench_report import (
    ChartRow,
    load_average,
    plot_ratios,
    plot_scaling,
    report_counts,
    report_import,
    report_latency,
    report_rotation,
    report_rss,
    report_scaling,
    report_server_cpu,
    report_wall,
    report_writes,
)
from bench_sockets import first_response, scaling
from bench_stats import Plan, Progress
from tlsctl import scenarios


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
        worker(metric, side, int(n))
        return 0

    info = tlsctl.info()
    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan()
    if args.repeats is not None:
        plan.repeats = max(1, args.repeats)
    if args.smoke:
        args.scaling = True
    header = (
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"tlsctl mechanism={info.mechanism} (in-process rows)"
    )
    print(header)
    print(f"load average at start: {load_average()}")
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
        # Now, not after the run: a folder that cannot be made fails at once.
        os.makedirs(args.plot_dir, exist_ok=True)
    strace = shutil.which("strace") is not None
    configs = 1 + len(server_configs())
    steps = plan.rounds * len(wall_metrics()) + 2 + plan.rss_repeats + 1
    steps += plan.import_runs + (len(MODES) * configs if strace else 0)
    steps += (
        len(SERVER_KINDS)
        * len(MODES)
        * len(socket_cpu_configs())
        * plan.socket_cpu_pairs
    )
    steps += (len(plan.sizes) + len(plan.delays)) if args.scaling else 0
    if args.instructions:
        counted = 1 + len(instruction_configs())
        steps += plan.repeats * (len(WORK) + len(MODES) * counted)
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
        socket_cpu = server_cpu(plan, certfile, client, progress)
        writes_table = (
            write_call_table(plan, certfile, client, progress) if strace else None
        )
        rss_rows = rss_table(plan, certfile, client, progress)
        imports = import_time(plan, progress)
        scale = scaling(plan, progress) if args.scaling else None
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
            {
                f"server instr/conn, {mode}, {config}": instruction_target(config)
                for mode, config in server_counts
            },
        )
    report_server_cpu(socket_cpu, plan)
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
        report_scaling(scale, plan)
    print(f"\nload average at end: {load_average()}")

    if not args.no_plot:
        chart = [
            ChartRow(m, r.ratio, r.lo, r.hi, TARGETS[m]) for m, r in results.items()
        ]
        chart += [
            ChartRow(f"first response, {name}", r.ratio, r.lo, r.hi, None)
            for name, r in latency.items()
        ]
        chart += [
            ChartRow(
                f"server CPU, {kind}, {mode}, {config}",
                r.ratio,
                r.lo,
                r.hi,
                socket_cpu_target(config),
            )
            for (kind, mode, config), r in socket_cpu.rows.items()
        ]
        if server_counts is not None:
            chart += [
                ChartRow(
                    f"server instr/conn, {mode}, {config}",
                    r.ratio,
                    r.lo,
                    r.hi,
                    instruction_target(config),
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
