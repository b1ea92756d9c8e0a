"""The rows of ``bench.py`` measured in other processes (its docstring
says how each is measured): the server subprocess (``tlsserver.py``) under
callgrind, under strace and holding idle connections (RSS), and fresh
interpreters importing tlsctl (import time)."""

from __future__ import annotations

import os
import random
import re
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, NamedTuple

import tlsctl
import tlsserver  # beside this file (bench/ is sys.path[0])
from bench_stats import (
    VALGRIND,
    CountRow,
    Plan,
    Progress,
    Row,
    bootstrap_ci,
    callgrind_total,
    count_row,
    grouped_row_of,
    min_difference,
)

SERVER_INSTRUCTIONS_TARGET = 0.99  # stock / patched instructions per connection
RSS_TARGET_BYTES = 256  # per connection, patched - stock
IMPORT_TARGET_MS = 5.0  # added over import ssl
REQUEST, RESPONSE = tlsserver.REQUEST, tlsserver.RESPONSE
LOCALHOST = tlsserver.LOCALHOST
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tlsserver.py")
# Server subprocess configurations: name -> (tlsserver.py side, TLSCTL_MECHANISM).
BY_HAND = "by hand"  # a reference, in the instruction and CPU rows only
IMPORTED = "imported"  # stock with tlsctl imported and bound: a CPU control
SERVER_CONFIGS: dict[str, tuple[str, str | None]] = {
    "stock": ("stock", None),
    "native": ("patched", "native"),
    "stash": ("patched", "stash"),
    BY_HAND: ("byhand", None),
    IMPORTED: ("imported", None),
}
MODES = ("full", "resumed")


# ------------------------------------------------------------ server process


# glibc's malloc with fixed thresholds, for both servers of the CPU rows.
# By default glibc raises its mmap and trim thresholds as a program frees
# large blocks, and an asyncio server allocates one 256 KiB read buffer per
# connection (asyncio.sslproto's max_size): whether that buffer's memory
# stays mapped or is given back at the top of the heap and faulted in again
# at the next connection then hangs on the heap's layout.  A process that
# draws the bad layout takes ~45 minor faults and ~10% more CPU per
# connection, stock or not (docs/performance.md, "Server CPU").  Fixed
# thresholds (an operator can set the same) take that draw out of the rows.
FIXED_MALLOC = (
    "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"
)
# Minor page faults per connection from which bench.py says a CPU row
# compares heap layouts (the effect above took ~45 a connection; a server
# whose allocator keeps its memory takes ~0 after the warm-up round).
FAULTS_WARN = 1.0


def _server_env(mechanism: str | None, fixed_malloc: bool = False) -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("TLSCTL_MECHANISM", None)
    if mechanism is not None:
        env["TLSCTL_MECHANISM"] = mechanism
    if fixed_malloc:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, FIXED_MALLOC])
    return env


class ServerProcess:
    """``tlsserver.py`` in a subprocess (under ``prefix``: valgrind,
    strace; ``fixed_malloc``: with ``FIXED_MALLOC``), for ``with``;
    ``port`` is where it listens."""

    def __init__(
        self,
        config: str,
        n: int,
        certfile: str,
        *flags: str,
        prefix: Sequence[str] = (),
        fixed_malloc: bool = False,
    ) -> None:
        side, mechanism = SERVER_CONFIGS[config]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, SERVER_SCRIPT, side, str(n), certfile, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=_server_env(mechanism, fixed_malloc),
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


def one_exchange(
    port: int,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    nodelay: bool = False,
) -> tuple[ssl.SSLSession | None, bool]:
    """One connection, one request and response; (its session, whether it
    resumed ``session``)."""
    with socket.create_connection((LOCALHOST, port), timeout=120) as raw:
        if nodelay:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with client.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as conn:
            conn.sendall(REQUEST)
            if tlsserver.recv_line(conn) != RESPONSE:
                raise RuntimeError("bad response from the server process")
            return conn.session, bool(conn.session_reused)


def exchange_clients(port: int, client: ssl.SSLContext, n: int, resumed: bool) -> None:
    """``n`` connections, one request and response each; ``resumed``: each
    offers the newest session (the first one is a full handshake)."""
    session: ssl.SSLSession | None = None
    reused = 0
    for _ in range(n):
        newest, resumed_now = one_exchange(port, client, session)
        reused += resumed_now
        if resumed:
            session = newest
    if reused != (n - 1 if resumed else 0):
        raise RuntimeError(f"{reused} of {n} connections resumed ({resumed=})")


def _server_instructions(
    config: str, mode: str, n: int, certfile: str, client: ssl.SSLContext
) -> int:
    with ServerProcess(config, n, certfile, prefix=VALGRIND) as server:
        exchange_clients(server.port, client, n, resumed=mode == "resumed")
        return callgrind_total(server.finish())


def server_configs() -> list[str]:
    """The patched server configurations this OpenSSL can run."""
    native = tlsctl.info().native_tickets
    return [
        c
        for c in SERVER_CONFIGS
        if c not in ("stock", BY_HAND, IMPORTED) and (native or c != "native")
    ]


def instruction_configs() -> list[str]:
    """Those, and the technique by hand where it can run (OpenSSL 3.0+)."""
    return server_configs() + ([BY_HAND] if tlsctl.info().native_tickets else [])


def instruction_target(config: str) -> float | None:
    """The target of a configuration's instruction rows (None: a reference)."""
    return None if config == BY_HAND else SERVER_INSTRUCTIONS_TARGET


def server_instructions(
    plan: Plan, certfile: str, client: ssl.SSLContext, progress: Progress
) -> dict[tuple[str, str], CountRow]:
    """{(mode, config): row} of server-process instructions per connection."""
    n = plan.server_instr_n
    configs = ["stock", *instruction_configs()]
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
        (mode, config): count_row(per_conn[mode, "stock"], per_conn[mode, config])
        for mode in MODES
        for config in configs[1:]
    }


# ------------------------------------------------------------ server CPU, sockets

SERVER_CPU_TARGET = 0.99  # stock / patched server CPU time per connection
PAD_MAX = 1 << 20  # bytes: the CPU rows' servers hold 0 .. 1 MiB from the start
# The servers of the CPU rows: a blocking one (SSLSocket: OpenSSL writes to
# the socket) and asyncio's (SSLObject: memory BIOs) -> tlsserver.py flags.
SERVER_KINDS: dict[str, list[str]] = {"sockets": [], "asyncio": ["--asyncio"]}
A_A = "A/A"  # stock against stock again: the method's own bias


def _cpus() -> tuple[int, int] | None:
    """(the servers' CPU, the client's) where this process may pin to two
    CPUs, else None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def socket_cpu_run(
    kind: str,
    config: str,
    mode: str,
    plan: Plan,
    certfile: str,
    client: ssl.SSLContext,
) -> tuple[list[float], list[float], float]:
    """Two fresh server processes of ``kind`` (``SERVER_KINDS``), stock
    and ``config``, their connections alternating one by one from this
    process (a client with ``TCP_NODELAY``); where it can, both servers run
    on one CPU and the client on another; both with ``FIXED_MALLOC``.
    Returns each server's CPU ns per connection, one value per round of
    ``plan.socket_cpu_connections`` (the first round, a warm-up, left
    out), and the minor page faults per connection of the server that
    took more (median of its rounds): ~0 unless the allocator gives memory
    back and takes it again on every connection (``FIXED_MALLOC``)."""
    k, rounds = plan.socket_cpu_connections, plan.socket_cpu_rounds
    cpus = _cpus()
    flags = ["--rounds", str(k)] + (["--cpu", str(cpus[0])] if cpus else [])
    flags += SERVER_KINDS[kind]
    # Each process its own heap layout, drawn at random, so that the rows
    # average over layouts (FIXED_MALLOC removes the one 10% effect found).
    pads = [str(random.randrange(0, PAD_MAX, 64)) for _ in range(2)]
    n = k * (rounds + 1)
    resumed = mode == "resumed"
    sessions: list[ssl.SSLSession | None] = [None, None]
    per_conn: tuple[list[float], list[float]] = ([], [])
    faults: tuple[list[float], list[float]] = ([], [])
    reused = 0
    other = "stock" if config == A_A else config
    with (
        ServerProcess(
            "stock", n, certfile, *flags, "--pad", pads[0], fixed_malloc=True
        ) as first,
        ServerProcess(
            other, n, certfile, *flags, "--pad", pads[1], fixed_malloc=True
        ) as second,
    ):
        saved = os.sched_getaffinity(0) if cpus else None
        try:
            if cpus:
                os.sched_setaffinity(0, {cpus[1]})
            for r in range(rounds + 1):
                order = (0, 1) if r % 2 == 0 else (1, 0)  # who starts alternates
                for _ in range(k):
                    for i in order:
                        server = (first, second)[i]
                        offered = sessions[i] if resumed else None
                        sessions[i], resumed_now = one_exchange(
                            server.port, client, offered, nodelay=True
                        )
                        reused += resumed_now
                for i, server in enumerate((first, second)):
                    ns, minor = (int(x) for x in server.read_line().split())
                    if r:
                        per_conn[i].append(ns / k)
                        faults[i].append(minor / k)
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
        first.finish()
        second.finish()
    if reused != (2 * (n - 1) if resumed else 0):
        raise RuntimeError(f"{reused} of {2 * n} connections resumed ({mode})")
    return (*per_conn, max(statistics.median(f) for f in faults))


def socket_cpu_configs() -> list[str]:
    """The configurations the socket CPU rows set against stock."""
    return [*instruction_configs(), IMPORTED, A_A]


def socket_cpu_target(config: str) -> float | None:
    """The target of a configuration's socket CPU rows (None: a reference)."""
    return None if config in (BY_HAND, IMPORTED, A_A) else SERVER_CPU_TARGET


class ServerCpu(NamedTuple):
    """The server CPU rows, and per row the minor page faults per
    connection of the worst server process (``socket_cpu_run``)."""

    rows: dict[tuple[str, str, str], Row]
    faults: dict[tuple[str, str, str], float]


def server_cpu(
    plan: Plan, certfile: str, client: ssl.SSLContext, progress: Progress
) -> ServerCpu:
    """{(kind, mode, config): row}: server-process CPU time per connection
    on real sockets, stock against ``config``, ``plan.socket_cpu_pairs``
    pairs of fresh processes, their rounds pooled (a round's ratio: stock's
    CPU time / config's, above 1 = cheaper than stock); the interval
    resamples the pairs, then their rounds (``cluster_bootstrap_ci``)."""
    out = ServerCpu({}, {})
    for kind in SERVER_KINDS:
        for mode in MODES:
            for config in socket_cpu_configs():
                stock_ns: list[float] = []
                other_ns: list[float] = []
                ratios: list[list[float]] = []
                worst = 0.0
                for _ in range(plan.socket_cpu_pairs):
                    a, b, faults = socket_cpu_run(
                        kind, config, mode, plan, certfile, client
                    )
                    stock_ns += a
                    other_ns += b
                    ratios.append([x / y for x, y in zip(a, b)])
                    worst = max(worst, faults)
                    progress.step(f"server CPU {kind} {mode} {config}")
                out.rows[kind, mode, config] = grouped_row_of(
                    [1e9 / x for x in stock_ns], [1e9 / x for x in other_ns], ratios
                )
                out.faults[kind, mode, config] = worst
    return out


STRACE_CALLS = "write,writev,sendto,sendmsg,sendmmsg"
_SYSCALL = re.compile(r"^(?:\d+\s+)?(\w+)\((\d+),.*\)\s+=\s+(-?\d+)")


class WriteCalls(NamedTuple):
    """One connection's write calls in an strace log."""

    first: int  # calls of its first application write
    written: int  # bytes they wrote
    total: int  # calls on the connection in all, handshake included


def first_write_calls(log: str) -> list[WriteCalls]:
    """The write calls of each connection, from an strace log of
    ``tlsserver.py --mark`` (a blocking server: one connection at a time,
    which writes nothing after its first write's end marker but closes)."""
    begin, end = tlsserver.MARK_BEGIN.decode(), tlsserver.MARK_END.decode()
    out: list[WriteCalls] = []
    fd: str | None = None
    calls = written = 0
    before: dict[str, int] = {}  # calls per fd since the last end marker
    for line in log.splitlines():
        if begin in line:
            fd = line.split(begin, 1)[1].split('"', 1)[0]
            calls = written = 0
        elif end in line:
            if fd is not None:
                out.append(WriteCalls(calls, written, before.get(fd, 0) + calls))
            fd = None
            before.clear()
        else:
            m = _SYSCALL.match(line)
            if m is None:
                continue
            if fd is None:
                before[m.group(2)] = before.get(m.group(2), 0) + 1
            elif m.group(2) == fd:
                calls += 1
                written += max(0, int(m.group(3)))
    return out


def write_calls(
    config: str, mode: str, n: int, certfile: str, client: ssl.SSLContext
) -> list[WriteCalls]:
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
) -> dict[tuple[str, str], list[WriteCalls]]:
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
    added, lo, hi = min_difference(times["tlsctl"], times["ssl"])
    cpu_added, cpu_lo, cpu_hi = min_difference(cpu["tlsctl"], cpu["ssl"])
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
