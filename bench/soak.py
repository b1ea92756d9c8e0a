"""tlsctl soak: does memory grow with the number of connections served?

    python bench/soak.py                         # every configuration, 10,000 each
    python bench/soak.py --threads 4             # the same, 4 threads x 2,500
    python bench/soak.py --config keys           # one configuration, this process
    TLSCTL_MECHANISM=stash python bench/soak.py --config defer
    python bench/soak.py --connections 2000 --warmup 200   # a quick run

What it measures: the resident set size (``VmRSS`` from
``/proc/self/status``) of a process that makes ``--connections`` TLS
connections (default 10,000) with patched server contexts, over memory-BIO
pairs in this process, and drops each one.  RSS is read after a warm-up
(the first ``--warmup`` connections, default 1,000: caches, free lists and
malloc arenas fill up) and at the end, each time after ``gc.collect()``;
the figure is the growth between the two divided by the connections made in
between, in bytes per connection.  A leak of one small allocation per
connection shows as tens of bytes; a healthy run is ~0 (allocator noise:
a few pages either way).  Also printed: the RSS after ``malloc_trim(0)``
(separates fragmentation from leaks), the number of objects the garbage
collector tracks (Python-level leaks), samples every 1,000 connections and
the wall time.

Configurations (``--config``), each run in its own process when none is
given, for the native mechanism and ``TLSCTL_MECHANISM=stash``:

* ``stock``: unpatched contexts, the noise floor of the same work;
* ``defer``: ``tlsctl.patch(ctx)`` (native: the C plan and C proxy);
* ``keys``: ``patch`` plus ticket callbacks (``on_issue`` seals appdata,
  ``on_resume`` decides), shared keys on two contexts (a ticket issued by
  one resumes on the other) rotated every 250 connections, alternately by
  ``set_ticket_keys([new, previous, anchor])`` and by
  ``rotate_ticket_keys(every=2, keep=64, master=...)`` (keys derived from
  one master, rotating lazily in C every 2 seconds), and the callbacks
  replaced every 1,000 connections;
* ``keys+abort``: the same, and one connection in ten is a resumption that
  ``on_resume`` refuses by raising (the handshake fails).  OpenSSL 1.1.1
  and 3.x leak the decrypted ``SSL_SESSION`` whenever the decrypt callback
  answers ``SSL_TICKET_RETURN_ABORT`` (``tls_parse_ctos_psk`` returns
  without freeing it; fixed upstream by openssl#30464, May 2026, after the
  3.0.19 used here), and tlsctl answers that for ``ABORT`` and for an
  exception: ~1 KB per refused resumption, ~100 B per connection here.

Each connection is one of ten kinds, in turn, so every path tlsctl has for
a connection's end is taken: full handshake then the first write; resumed
handshake then the first write; resumed, write, ``close_notify`` both ways;
full and resumed handshakes dropped before any write (deferred tickets
never sent); ``issue_tickets(conn, 1)`` then a 16 KiB write and a client
request; a TLS 1.2 connection; a resumption whose ``on_resume`` raises
(``keys+abort`` only, otherwise a plain resumption); the server reading the
request before its first write; a resumption answered ``USE`` (no renewal
ticket).  With ``--threads N`` every thread makes its share of the
connections (and of the warm-up) on the same contexts; a resumption that
overlapped another thread's key change (and may have had a full handshake)
is left out of the ``resumed`` column and counted as ``raced``.

Resumptions use sessions the client kept during the warm-up only (the
first of each kind of key epoch: under the anchor key, which stays listed,
or under the derived keys, which resume for 64 x 2 seconds): on CPython
3.11 (and 3.12 / 3.13 before the fix of late 2024) every read of
``SSLObject.session`` leaks a copy of the session (CPython gh-116810;
~6.5 KB a read with 3.11.7 and OpenSSL 3.0, in ``stock`` too), which would
otherwise be most of the figure.  The ``resumed`` column counts, out of the
completed resumption handshakes, those that did resume.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import tlsctl
from _pairs import BioPair  # beside this file (bench/ is sys.path[0])
from tlsctl import ResumeStatus, TicketDecision, TicketKey, scenarios

CONFIGS = ("stock", "defer", "keys", "keys+abort")
MECHANISMS = ("native", "stash")
KINDS = 10
ROTATE_EVERY = 250
ROTATE_SECONDS = 2
KEEP = 64
CALLBACKS_EVERY = 1000
SAMPLE_EVERY = 1000


class SoakError(Exception):
    """Raised by ``on_resume`` on purpose (the failing-handshake kind)."""


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None


def trimmed_rss_bytes() -> int | None:
    """RSS after glibc's ``malloc_trim(0)`` (None without glibc)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return None
    trim(0)
    return rss_bytes()


# --- the server side of one configuration ----------------------------------


@dataclass
class Counts:
    connections: int = 0
    resumed: int = 0
    resume_attempts: int = 0
    raced: int = 0
    failed_on_purpose: int = 0
    issued_by_hand: int = 0
    rotations: int = 0


class Servers:
    """The server contexts of a configuration, and its periodic changes.

    ``epoch`` names the keys in force (``"fixed"``, or for ``keys``
    alternately ``"listed"`` and ``"derived"``): a session kept under one
    resumes while that kind of epoch is back.
    """

    def __init__(self, config: str, certs: scenarios.Certs) -> None:
        self.config = config
        self.keyed = config.startswith("keys")
        self.refusals = config == "keys+abort"
        self.local = threading.local()
        self.first = scenarios.server_context(certs)
        self.second = self.first
        self.lock = threading.Lock()
        self.done = 0
        self.rotations = 0
        self.epoch = "fixed"
        self.generation = 0  # key changes completed
        # Listed keys: [new, previous, anchor]; the anchor stays listed, so
        # a session kept during the warm-up resumes for the whole run.
        self.anchor = TicketKey.generate()
        self.previous = self.anchor
        self.master = TicketKey.generate()
        if config == "stock":
            return
        tlsctl.patch(self.first)
        if self.keyed:
            self.epoch = "listed"
            self.second = tlsctl.patch(scenarios.server_context(certs))
            for ctx in (self.first, self.second):
                self._set_callbacks(ctx)
                tlsctl.set_ticket_keys(ctx, [self.anchor])
                tlsctl.set_ticket_lifetime(ctx, 3600)

    def _set_callbacks(self, ctx: ssl.SSLContext) -> None:
        tlsctl.set_ticket_callbacks(
            ctx, on_issue=self.on_issue, on_resume=self.on_resume
        )

    def on_issue(self, conn: Any) -> bytes:
        return b"soak appdata %d" % self.done

    def on_resume(
        self, conn: Any, appdata: bytes | None, status: ResumeStatus
    ) -> TicketDecision:
        mode = getattr(self.local, "mode", None)
        if mode == "raise":
            raise SoakError("on_resume fails this handshake on purpose")
        if not status.decrypted:
            return TicketDecision.IGNORE_RENEW
        if mode == "use":
            return TicketDecision.USE
        return TicketDecision.USE_RENEW

    def connection_done(self) -> None:
        """Count a connection; every ``ROTATE_EVERY`` change the keys."""
        with self.lock:
            self.done += 1
            due = self.keyed and self.done % ROTATE_EVERY == 0
            if not due:
                return
            self.rotations += 1
            contexts = (self.first, self.second)
            if self.rotations % 2 == 0:
                new = TicketKey.generate()
                keys = [new, self.previous, self.anchor]
                if self.previous is self.anchor:
                    keys = [new, self.anchor]
                for ctx in contexts:
                    tlsctl.set_ticket_keys(ctx, keys)
                self.previous = new
                self.epoch = "listed"
            else:
                # Keys derived from the master and the clock, a new one
                # every ROTATE_SECONDS (lazily, in C); the same master gives
                # the same keys again, and keep=KEEP keeps a session kept
                # during the warm-up resuming for KEEP * ROTATE_SECONDS.
                for ctx in contexts:
                    tlsctl.rotate_ticket_keys(
                        ctx, every=ROTATE_SECONDS, keep=KEEP, master=self.master
                    )
                self.epoch = "derived"
            if self.done % CALLBACKS_EVERY == 0:
                for ctx in contexts:
                    self._set_callbacks(ctx)
            self.generation += 1

    def snapshot(self) -> tuple[int, str]:
        """(generation, epoch), never in the middle of a key change."""
        with self.lock:
            return self.generation, self.epoch


# --- the connections --------------------------------------------------------


class Worker:
    """Makes connections of every kind in turn.

    Sessions are kept (one per kind of key epoch) only while ``harvest`` is
    true, during the warm-up, and reused afterwards: reading
    ``SSLObject.session`` leaks on CPython 3.11 (gh-116810, see the module
    docstring), a leak that is not tlsctl's.
    """

    def __init__(
        self,
        servers: Servers,
        client: ssl.SSLContext,
        client12: ssl.SSLContext,
        on_connection: Callable[[], None],
    ) -> None:
        self.servers = servers
        self.client = client
        self.client12 = client12
        self.on_connection = on_connection
        self.sessions: dict[str, ssl.SSLSession] = {}
        self.harvest = True
        self.before = (0, "")
        self.counts = Counts()
        self.patched = servers.config != "stock"

    def _full(self) -> BioPair:
        pair = BioPair(self.servers.first, self.client)
        pair.handshake()
        return pair

    def _resumed(self) -> BioPair:
        """A resumption attempt with the session kept for the epoch in force
        (a full handshake when there is none)."""
        before = self.servers.snapshot()
        session = self.sessions.get(before[1])
        if session is None:
            return self._full()
        pair = BioPair(self.servers.second, self.client, session)
        pair.handshake()
        if self.servers.snapshot() != before:
            # Another thread changed the keys meanwhile: not counted.
            self.counts.raced += 1
            return pair
        self.counts.resume_attempts += 1  # handshakes that completed
        if pair.client.session_reused:
            self.counts.resumed += 1
        return pair

    def _keep_session(self, pair: BioPair) -> None:
        """Keep the first session of each kind of epoch (a listed epoch's
        first is under the anchor key, listed for good), if no key change
        (another thread's) overlapped the connection."""
        if not self.harvest or self.before != self.servers.snapshot():
            return
        epoch = self.before[1]
        if epoch in self.sessions:
            return
        session = pair.client.session
        if session is not None and session.has_ticket:
            self.sessions[epoch] = session

    def one(self, index: int) -> None:
        kind = index % KINDS
        if self.harvest:
            self.before = self.servers.snapshot()
        local = self.servers.local
        local.mode = None
        if kind == 0:  # full handshake, first write; keep the session
            pair = self._full()
            pair.exchange(b"x")
            self._keep_session(pair)
        elif kind in (1, 9):  # resumed (kind 9: on_resume answers USE)
            local.mode = "use" if kind == 9 else None
            pair = self._resumed()
            pair.exchange(b"x")
            self._keep_session(pair)
        elif kind == 2:  # resumed, first write, close_notify both ways
            pair = self._resumed()
            pair.exchange(b"x")
            self._keep_session(pair)
            pair.close()
        elif kind == 3:  # full handshake, dropped before any write
            self._full()
        elif kind == 4:  # resumed, dropped before any write
            self._resumed()
        elif kind == 5:  # issue_tickets, 16 KiB response, then a request
            pair = self._full()
            if self.patched:
                try:
                    tlsctl.issue_tickets(pair.server, 1)
                    self.counts.issued_by_hand += 1
                except tlsctl.UnsupportedError:
                    pass
            pair.exchange(b"y" * 16384)
            pair.request(b"request")
        elif kind == 6:  # TLS 1.2
            pair = BioPair(self.servers.first, self.client12)
            pair.handshake()
            pair.exchange(b"x")
        elif kind == 7:  # on_resume raises: the handshake fails
            if self.servers.refusals and self.servers.epoch in self.sessions:
                local.mode = "raise"
                try:
                    self._resumed()
                except SoakError:
                    self.counts.failed_on_purpose += 1
                else:
                    raise RuntimeError("on_resume's exception was not re-raised")
            else:
                self._resumed().exchange(b"x")
        elif kind == 8:  # the server reads the request before its first write
            pair = self._full()
            pair.request(b"GET / HTTP/1.1\r\n\r\n")
            pair.exchange(b"HTTP/1.1 204 No Content\r\n\r\n")
        local.mode = None
        self.counts.connections += 1
        self.on_connection()


# --- one run ----------------------------------------------------------------


@dataclass
class Result:
    config: str
    mechanism: str | None
    threads: int
    connections: int
    warmup: int
    rss_start: int
    rss_warm: int
    rss_end: int
    trimmed_warm: int | None
    trimmed_end: int | None
    objects_warm: int
    objects_end: int
    seconds: float
    bytes_per_connection: float
    trimmed_bytes_per_connection: float | None
    samples: list[tuple[int, int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _measure() -> tuple[int, int | None, int]:
    gc.collect()
    rss = rss_bytes()
    return rss, trimmed_rss_bytes(), len(gc.get_objects())


def run(config: str, connections: int, warmup: int, threads: int) -> Result:
    """Make ``connections`` connections in ``threads`` threads; measure."""
    if not 0 < warmup < connections:
        raise ValueError("need 0 < warmup < connections")
    certs = scenarios.make_certs(client_sans=1)
    servers = Servers(config, certs)
    client = scenarios.client_context(certs)
    client12 = scenarios.client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    rss_start = rss_bytes()
    start = time.perf_counter()
    samples: list[tuple[int, int]] = []
    workers = [
        Worker(servers, client, client12, servers.connection_done)
        for _ in range(threads)
    ]
    if threads == 1:
        worker = workers[0]
        for i in range(warmup):
            worker.one(i)
        worker.harvest = False
        rss_warm, trimmed_warm, objects_warm = _measure()
        samples.append((warmup, rss_warm))
        for i in range(warmup, connections):
            worker.one(i)
            if (i + 1) % SAMPLE_EVERY == 0 and i + 1 < connections:
                gc.collect()
                samples.append((i + 1, rss_bytes()))
    else:
        barrier = threading.Barrier(threads + 1)
        errors: list[BaseException] = []

        def body(worker: Worker, offset: int) -> None:
            try:
                share_warm = warmup // threads
                share = connections // threads
                for i in range(share_warm):
                    worker.one(offset + i)
                worker.harvest = False
                barrier.wait()
                barrier.wait()
                for i in range(share_warm, share):
                    worker.one(offset + i)
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()
                raise

        pool = [
            threading.Thread(target=body, args=(w, n * 7), daemon=True)
            for n, w in enumerate(workers)
        ]
        for t in pool:
            t.start()
        rss_warm, trimmed_warm, objects_warm = 0, None, 0
        try:
            barrier.wait()
            rss_warm, trimmed_warm, objects_warm = _measure()
            samples.append((warmup, rss_warm))
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # a worker failed: its exception is raised below
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
    seconds = time.perf_counter() - start
    rss_end, trimmed_end, objects_end = _measure()
    samples.append((connections, rss_end))
    made = sum(w.counts.connections for w in workers)
    counts = {
        key: sum(getattr(w.counts, key) for w in workers) for key in asdict(Counts())
    }
    counts["rotations"] = servers.rotations
    after = made - (warmup // threads) * threads
    return Result(
        config=config,
        mechanism=tlsctl.info().mechanism if config != "stock" else None,
        threads=threads,
        connections=made,
        warmup=warmup,
        rss_start=rss_start,
        rss_warm=rss_warm,
        rss_end=rss_end,
        trimmed_warm=trimmed_warm,
        trimmed_end=trimmed_end,
        objects_warm=objects_warm,
        objects_end=objects_end,
        seconds=seconds,
        bytes_per_connection=(rss_end - rss_warm) / after,
        trimmed_bytes_per_connection=(
            None
            if trimmed_warm is None or trimmed_end is None
            else (trimmed_end - trimmed_warm) / after
        ),
        samples=samples,
        counts=counts,
    )


# --- output -----------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


HEADER = (
    f"{'config':<10} {'mechanism':<9} {'threads':>7} {'conns':>6} "
    f"{'RSS warm MiB':>12} {'RSS end MiB':>11} {'B/conn':>7} "
    f"{'trimmed B/conn':>14} {'objects +':>9} {'resumed':>11} {'raced':>5} "
    f"{'seconds':>7}"
)


def row(r: Result) -> str:
    trimmed = (
        "-"
        if r.trimmed_bytes_per_connection is None
        else f"{r.trimmed_bytes_per_connection:.1f}"
    )
    resumed = f"{r.counts['resumed']}/{r.counts['resume_attempts']}"
    return (
        f"{r.config:<10} {r.mechanism or '-':<9} {r.threads:>7} {r.connections:>6} "
        f"{_mib(r.rss_warm):>12} {_mib(r.rss_end):>11} "
        f"{r.bytes_per_connection:>7.1f} {trimmed:>14} "
        f"{r.objects_end - r.objects_warm:>9} {resumed:>11} "
        f"{r.counts['raced']:>5} {r.seconds:>7.1f}"
    )


def _child(config: str, mechanism: str, args: argparse.Namespace) -> Result:
    env = dict(os.environ)
    env.pop("TLSCTL_MECHANISM", None)
    if mechanism == "stash":
        env["TLSCTL_MECHANISM"] = "stash"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--config",
        config,
        "--connections",
        str(args.connections),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--json",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["samples"] = [tuple(s) for s in data["samples"]]
    return Result(**data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="RSS growth per connection over a soak of TLS connections"
    )
    parser.add_argument(
        "--config",
        choices=CONFIGS,
        help="run one configuration in this process (default: every one, "
        "native and stash, each in its own process)",
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument(
        "--threads", type=int, default=1, help="threads sharing the connections"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as one JSON line"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    info = tlsctl.info()
    if args.config is not None:
        if args.config != "stock" and info.mechanism is None:
            parser.error(f"tlsctl cannot defer here: {info.reason}")
        result = run(args.config, args.connections, args.warmup, args.threads)
        if args.json:
            print(json.dumps(asdict(result)))
        else:
            print(HEADER)
            print(row(result))
            print(
                "samples (connections, RSS MiB):",
                ", ".join(f"({n}, {_mib(rss)})" for n, rss in result.samples),
            )
            print("counts:", result.counts)
        return 0
    print(
        f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"{args.connections} connections, {args.threads} thread(s), "
        f"warm-up {args.warmup}",
        flush=True,
    )
    print(HEADER, flush=True)
    runs = [("stock", "native")] + [
        (config, mech) for mech in MECHANISMS for config in CONFIGS[1:]
    ]
    for config, mech in runs:
        result = _child(config, mech, args)
        print(row(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
